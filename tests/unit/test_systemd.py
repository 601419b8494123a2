"""The units verify, and the D-Bus policy file is well-formed and the one the bus tests load."""

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("unit", ["vfiod.service", "dpdk-example.service"])
def test_systemd_analyze_verify_passes(unit, tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    text = open(os.path.join(ROOT, "systemd", unit)).read()
    # verify checks that ExecStart exists: point it at this checkout's binaries
    vfiod = os.path.join(ROOT, ".venv/bin/vfiod")
    if not os.path.exists(vfiod):
        pytest.skip("no .venv (run scripts/setup)")
    text = text.replace("/usr/bin/vfiod", vfiod).replace("/usr/bin/dpdk-testpmd", "/bin/true")
    path = tmp_path / unit
    path.write_text(text)
    if unit == "dpdk-example.service":     # it requires vfiod.service: give verify one to find
        (tmp_path / "vfiod.service").write_text(open(os.path.join(ROOT, "systemd/vfiod.service")).read()
                                                .replace("/usr/bin/vfiod", vfiod))
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True, text=True,
                       cwd=tmp_path, env=dict(os.environ, SYSTEMD_UNIT_PATH=f"{tmp_path}:"))
    problems = [l for l in (p.stdout + p.stderr).splitlines() if unit in l or "vfiod" in l]
    assert p.returncode == 0 and not problems, p.stdout + p.stderr


def test_dbus_policy_lets_root_own_and_everyone_call():
    tree = ET.parse(os.path.join(ROOT, "systemd/org.vfiod1.conf"))
    policies = {(p.get("user"), p.get("context")): p for p in tree.getroot().iter("policy")}
    root = policies[("root", None)]
    assert any(a.get("own") == "org.vfiod1" for a in root.iter("allow"))
    default = policies[(None, "default")]
    allowed = {a.get("send_interface") for a in default.iter("allow") if a.get("send_destination") == "org.vfiod1"}
    assert {"org.vfiod1.Manager", "org.vfiod1.Lease", "org.freedesktop.DBus.Properties",
            "org.freedesktop.DBus.ObjectManager"} <= allowed
    assert not any(a.get("own") for a in default.iter("allow"))


def test_the_bus_tests_include_this_policy_file():
    conftest = open(os.path.join(ROOT, "tests/bus/conftest.py")).read()
    assert 'PrivateBus(self.dir, os.path.join(ROOT, "systemd/org.vfiod1.conf"))' in conftest
    from vfiod.sim.privatebus import CONFIG
    assert "<include>{policy}</include>" in CONFIG
