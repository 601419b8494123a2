"""The units verify, and the D-Bus policy file is well-formed and the one the bus tests load."""

import os
import re
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


def _unit_for_analysis(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    vfiod = os.path.join(ROOT, ".venv/bin/vfiod")
    if not os.path.exists(vfiod):
        pytest.skip("no .venv (run scripts/setup)")
    path = tmp_path / "vfiod.service"
    path.write_text(open(os.path.join(ROOT, "systemd/vfiod.service")).read().replace("/usr/bin/vfiod", vfiod))
    return path


def _security(path, *extra):
    return subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", *extra, str(path)],
                          capture_output=True, text=True, cwd=path.parent)


def test_exposure_is_no_worse_than_4_3(tmp_path):
    path = _unit_for_analysis(tmp_path)
    p = _security(path)
    score = re.search(r"Overall exposure level for vfiod.service: ([0-9.]+)", p.stdout)
    assert score, p.stdout + p.stderr
    assert float(score.group(1)) <= 4.3, p.stdout


def test_the_daemon_sees_the_host_network_namespace_and_the_uevent_feed(tmp_path):
    """The default-route NIC's protection reads /proc/net/route and /sys/class/net, and
    uevents are netlink multicasts: none of them reach a private network namespace."""
    import json
    path = _unit_for_analysis(tmp_path)
    p = _security(path, "--json=short")
    checks = {c["name"]: c for c in json.loads(p.stdout)}
    assert checks["PrivateNetwork="]["set"] is False
    assert checks["RestrictAddressFamilies=~AF_NETLINK"]["set"] is False     # netlink stays allowed
    unit = _directives(open(os.path.join(ROOT, "systemd/vfiod.service")).read())
    for hides in ("PrivateNetwork", "NetworkNamespacePath", "JoinsNamespaceOf", "PrivateUsers", "ProcSubset",
                  "ProtectProc"):
        assert hides not in unit, hides
    assert "AF_NETLINK" in unit["RestrictAddressFamilies"][0].split()


def _directives(text):
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_every_capability_and_relaxation_is_explained_and_reload_validates():
    text = open(os.path.join(ROOT, "systemd/vfiod.service")).read()
    unit = _directives(text)
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    caps = unit["CapabilityBoundingSet"][0].split()
    assert caps and all(re.search(rf"#\s+{cap}\s+\S", comments) for cap in caps), caps
    lines = text.splitlines()
    for i, line in enumerate(lines):      # each relaxed protection follows a comment saying why
        if re.match(r"(ProtectKernelTunables|ProtectKernelModules|PrivateDevices)=no", line):
            assert lines[i - 1].startswith("#") or lines[i - 2].startswith("#"), line
    # systemctl reload must fail when the policy is refused: a kill -HUP cannot tell
    assert unit["ExecReload"] == ["/usr/bin/vfiod reload"]


def _link_device(sysfs, addr, path):
    os.makedirs(sysfs / "devices" / path, exist_ok=True)
    (sysfs / "bus/pci/devices").mkdir(parents=True, exist_ok=True)
    os.symlink(f"../../../devices/{path}", sysfs / "bus/pci/devices" / addr)


def test_the_generator_opens_exactly_this_hosts_pci_root_buses(tmp_path):
    """vfiod.service leaves /sys read-only; the generator's drop-in names each PCI root
    bus directory (an x86 root bus, a VMD domain below it, a root bus below a platform
    device), once, and nothing else below /sys."""
    sysfs = tmp_path / "sys"
    _link_device(sysfs, "0000:00:02.0", "pci0000:00/0000:00:02.0")
    _link_device(sysfs, "0000:01:00.0", "pci0000:00/0000:00:02.0/0000:01:00.0")
    _link_device(sysfs, "10000:e0:01.0", "pci0000:00/0000:00:0e.0/pci10000:e0/10000:e0:01.0")
    _link_device(sysfs, "0000:80:00.0", "pci0000:80/0000:80:00.0")
    _link_device(sysfs, "0001:00:00.0", "platform/soc/1f00000.pcie/pci0001:00/0001:00:00.0")
    os.makedirs(sysfs / "devices/system/cpu")
    out = tmp_path / "generator"
    p = subprocess.run([os.path.join(ROOT, "systemd/vfiod-sysfs-generator"), str(out), str(out), str(out)],
                       env={"PATH": "/usr/bin:/bin", "VFIOD_SYSFS": str(sysfs)}, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert os.listdir(out / "vfiod.service.d") == ["50-pci-sysfs.conf"]
    dropin = (out / "vfiod.service.d/50-pci-sysfs.conf").read_text()
    lines = [line for line in dropin.splitlines() if not line.startswith("#")]
    assert lines == ["[Service]", "ReadWritePaths=-/sys/devices/pci0000:00", "ReadWritePaths=-/sys/devices/pci0000:80",
                     "ReadWritePaths=-/sys/devices/platform/soc/1f00000.pcie/pci0001:00"], dropin


def test_the_unit_keeps_proc_and_sys_read_only_and_filters_the_cross_process_calls():
    unit = _directives(open(os.path.join(ROOT, "systemd/vfiod.service")).read())
    assert unit["ProtectKernelTunables"] == ["yes"] and unit["ReadOnlyPaths"] == ["/proc"]
    rw = " ".join(unit["ReadWritePaths"]).split()
    assert sorted(rw) == ["-/dev/iommu", "/dev/vfio", "/sys/bus/pci/drivers", "/sys/bus/pci/drivers_probe"], rw
    denied = " ".join(v[1:] for v in unit["SystemCallFilter"] if v.startswith("~")).split()
    assert {"process_vm_readv", "process_vm_writev", "@debug"} <= set(denied), denied
