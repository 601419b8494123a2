"""The unit allows the VFIO nodes by major (``DeviceAllow=char-vfio``), which systemd
looks up in /proc/devices when the unit starts: if vfio was not loaded yet the rule
was dropped and ``OpenGroup`` failed with EPERM.  vfio-pci is now loaded at boot by
systemd-modules-load (a modules-load.d file the package and `make install` ship),
the unit orders itself after it, and the package loads it before its first start."""

import configparser
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _unit():
    p = configparser.RawConfigParser(strict=False, comment_prefixes=("#",))
    p.optionxform = str
    p.read(os.path.join(ROOT, "systemd/vfiod.service"))
    return p


def test_the_unit_starts_after_the_modules_are_loaded():
    unit = _unit()
    assert "char-vfio rw" in open(os.path.join(ROOT, "systemd/vfiod.service")).read()
    assert "systemd-modules-load.service" in unit.get("Unit", "After").split()


def test_make_install_ships_the_modules_load_file(tmp_path):
    p = subprocess.run(["make", "-s", "install-data", f"DESTDIR={tmp_path}", "PREFIX=/usr"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [line.strip() for line in open(tmp_path / "usr/lib/modules-load.d/vfiod.conf")
             if line.strip() and not line.startswith("#")]
    assert lines == ["vfio-pci"]


def test_the_package_loads_vfio_before_its_first_start():
    postinst = open(os.path.join(ROOT, "debian/vfiod.postinst")).read()
    assert postinst.index("modprobe -q vfio-pci") < postinst.index("#DEBHELPER#")
