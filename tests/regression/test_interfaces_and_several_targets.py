"""Targets as dpdk-devbind takes them: a network interface name names its PCI device,
and `check`, `show` and `explain` take several targets in one call.

Before: `vfioctl check enp4s0` said "not a target: 'enp4s0'" and `vfioctl check
04:00.0 05:00.0` was a usage error."""

import os
import subprocess

import pytest

from tests.bus.conftest import ROOT, VENV_BIN
from vfiod.policy import parse_target


def test_an_interface_name_is_a_target_and_paths_never_are():
    assert parse_target("enp4s0") == ("interface", "enp4s0")
    for bad in ("../../etc/passwd", "a/b", ".", "..", "x" * 16, "eth 0", "eth0\x00"):
        with pytest.raises(Exception) as e:
            parse_target(bad)
        assert "not a target" in str(e.value) or "too long" in str(e.value)


@pytest.mark.bus
def test_interfaces_and_several_targets_against_the_daemon(make_world):
    w = make_world()
    p = w.ctl("check", "enp4s0")
    assert p.stdout.startswith("allowed: group 8"), p.stdout
    p = w.ctl("check", "enp4s0", "00:19.0", "group:8", check=False)
    lines = p.stdout.splitlines()
    assert [line.split(": ")[:2] for line in lines] == [["enp4s0", "allowed"], ["00:19.0", "denied"],
                                                        ["group:8", "allowed"]], p.stdout
    assert p.returncode == 3                     # the first failure's status
    p = w.ctl("explain", "enp5s0", "04:00.0")
    assert p.stdout.count("IOMMU group 8:") == 2
    p = w.ctl("show", "enp4s0", "nosuchif", check=False)
    assert p.returncode == 1 and "nosuchif: no network interface 'nosuchif'" in p.stderr
    assert "0000:04:00.0" in p.stdout
    assert w.writes() == []


def test_policy_test_takes_an_interface_offline():
    p = subprocess.run([os.path.join(VENV_BIN, "vfioctl"), "policy", "test", "--user", "dpdk-svc", "--simulate",
                        "--policy-dir", "policy", "enp5s0"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0 and "Target enp5s0: IOMMU group 8" in p.stdout, p.stdout + p.stderr
