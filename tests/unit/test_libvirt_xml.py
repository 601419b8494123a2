"""The libvirt backend's hostdev XML, checked against libvirt's own domain schema
(``virt-xml-validate`` inside a minimal domain document)."""

import shutil
import subprocess

import pytest

from vfiod.sim import hosts
from vfiod.address import PciAddress
from vfiod.topology import Host
from vfiod.sysfs import SysfsReader
from vfiod_plugins.libvirt import domain_hostdevs, hostdev_elements, nodedev_name

A = PciAddress.parse

DOMAIN = """<domain type='qemu'>
  <name>vfiod-xml-check</name>
  <memory unit='MiB'>32</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
{hostdevs}  </devices>
</domain>
"""


def endpoints_of(name, group, tmp_path):
    roots = hosts.build(name, str(tmp_path / name))
    host = Host.scan(SysfsReader(roots))
    g = host.groups[group]
    return tuple(host.endpoints(g))


def validate(xml: str, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "domain.xml"
    path.write_text(DOMAIN.format(hostdevs=xml))
    return subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True, text=True)


@pytest.mark.parametrize("name, group, expected", [
    ("sriov", 3, ["0000:01:10.0"]),                          # one VF: a single-device group
    ("ich10", 8, ["0000:04:00.0", "0000:05:00.0"]),          # two endpoints (root ports left out)
    ("gpu", 2, ["0000:01:00.0", "0000:01:00.1"]),            # a multifunction GPU + audio
    ("bridge", 2, ["0000:02:01.0", "0000:02:02.0"]),         # behind a PCIe-to-PCI bridge (left out)
])
def test_hostdev_xml_names_every_endpoint_and_is_valid_for_libvirt(name, group, expected, tmp_path):
    if not shutil.which("virt-xml-validate"):
        pytest.fail("virt-xml-validate is missing: scripts/setup installs libvirt-clients and libxml2-utils")
    devs = [d.addr for d in endpoints_of(name, group, tmp_path)]
    assert [str(a) for a in devs] == expected
    xml = hostdev_elements(devs)
    assert xml.count("<hostdev mode='subsystem' type='pci' managed='no'>") == len(expected)
    got = domain_hostdevs(DOMAIN.format(hostdevs=xml))
    assert got == {(a.domain, a.bus, a.slot, a.function) for a in devs}
    p = validate(xml, tmp_path)
    assert p.returncode == 0 and "validates" in p.stdout + p.stderr, p.stdout + p.stderr


def test_the_schema_check_can_fail():
    # the same check refuses a hostdev libvirt would refuse
    import tempfile, pathlib
    with tempfile.TemporaryDirectory() as d:
        bad = "<hostdev mode='subsystem' type='pci' managed='maybe'><source><address domain='0x0000' " \
              "bus='0x01' slot='0x00' function='0x0'/></source></hostdev>\n"
        p = validate(bad, pathlib.Path(d))
        assert p.returncode != 0


def test_nodedev_names():
    assert nodedev_name(A("0000:01:00.0")) == "pci_0000_01_00_0"
    assert nodedev_name(A("0001:af:1f.7")) == "pci_0001_af_1f_7"
