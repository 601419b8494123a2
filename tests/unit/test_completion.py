"""Bash completion: the shipped script is the one the parsers make, and bash completes
commands, options, addresses, group:N and name:RESOURCE with it."""

import os
import shutil
import subprocess

import pytest

from vfiod.cmd import completion
from vfiod.sim import hosts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "completion", "vfiod")


def test_the_shipped_script_is_the_generated_one():
    with open(SCRIPT) as f:
        assert f.read() == completion.script(), \
            "completion/vfiod is stale: python -m vfiod.cmd.completion > completion/vfiod"


@pytest.fixture(scope="module")
def complete():
    if not shutil.which("bash"):
        pytest.skip("bash is not installed")

    def run(line):
        code = (f'source {SCRIPT}\nCOMP_LINE="$1"; COMP_POINT=${{#COMP_LINE}}\n'
                '_vfiod_complete\nprintf "%s\\n" "${COMPREPLY[@]}"\n')
        p = subprocess.run(["bash", "--norc", "--noprofile", "-c", code, "bash", line], capture_output=True,
                           text=True, timeout=30)
        assert p.returncode == 0 and not p.stderr, p.stderr
        return sorted(set(filter(None, p.stdout.splitlines())))
    return run


def test_commands_and_options(complete):
    assert complete("vfioctl ") == sorted(["groups", "show", "explain", "check", "leases", "lease", "vfs",
                                           "reload", "monitor", "release", "revoke", "status", "overrides", "policy"])
    assert complete("vfioctl le") == ["lease", "leases"]
    assert complete("vfioctl policy ") == ["check", "generate", "test"]
    assert complete("vfioctl overrides --e") == ["--etc-root"]
    assert complete("vfioctl lease --p") == ["--pass-fd", "--persistent"]
    assert complete("vfioctl lease --backend ") == ["libvirt", "pci-stub", "vfio"]
    assert complete("vfiod ") == ["end-leases", "inspect", "reload"]
    assert complete("vfiod inspect --simulate ") == sorted([*hosts.EXAMPLES, "server:"])
    assert complete("vfiod reload --") == ["--bus", "--help", "--json", "--timeout"]
    assert "root" in complete("vfioctl policy test --user ro")


def test_targets_from_sysfs_and_the_policy_files(complete, tmp_path):
    tmp, roots = hosts.build_temporary("ich10")
    with tmp:
        policy = tmp_path / "policy.d"
        policy.mkdir()
        (policy / "20-gpu.toml").write_text(
            '[[resource]]\nname = "fast-nic"\ndevices = [{ address = "0000:04:00.0", ids = "8086:10d3" }]\n\n'
            '[[rule]]\nresource = "fast-nic"\nusers = ["root"]\nname_like = "not-a-resource"\n'
            '[[resource]]\n  name = "gpu"\n')
        line = f"vfioctl policy test --sysfs-root {roots.sysfs} --policy-dir {policy} --user root "
        got = complete(line)
        assert "0000:04:00.0" in got and "0000:05:00.0" in got
        assert "group:8" in got
        assert "name:fast-nic" in got and "name:gpu" in got and "name:not-a-resource" not in got
        # bash splits words at ':', so only what follows the last colon is offered
        assert complete(line + "group:") and all(c.isdigit() for c in complete(line + "group:"))
        assert complete(line + "name:f") == ["fast-nic"]
        assert complete(line + "0000:04:") == ["00.0"]


def test_addresses_of_this_machine_read_from_sys(complete):
    devices = sorted(os.listdir("/sys/bus/pci/devices")) if os.path.isdir("/sys/bus/pci/devices") else []
    if not devices:
        pytest.skip("this machine shows no PCI devices")
    assert set(devices) <= set(complete("vfioctl lease "))


def test_a_command_after_the_double_dash(complete):
    assert "bash" in complete("vfioctl lease 0000:04:00.0 -- bas")
