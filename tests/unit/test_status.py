"""`vfioctl status` / `vfiod inspect --all`: every PCI device by class and driver, with
interfaces, groups and *Active* marks, like dpdk-devbind.py --status, IOMMU or not."""

import json
import os

import attrs
import pytest

from vfiod.cmd.ctl import main as vfioctl_main
from vfiod.cmd.server import main as vfiod_main
from vfiod.sim import hosts


def test_status_lists_every_device_by_section_and_marks_what_the_host_uses(capsys):
    assert vfioctl_main(["status", "--simulate", "ich10", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["version"], status["kind"]) == (1, "status") and status["iommu"] is True
    by = {d["address"]: d for d in status["devices"]}
    assert len(by) == len(hosts.ICH10.functions)
    assert by["0000:00:19.0"]["active"] and by["0000:00:19.0"]["net"] == ["eno1"]
    assert by["0000:00:1f.2"]["active"] and by["0000:00:1f.2"]["section"] == "Storage devices"
    assert not by["0000:04:00.0"]["active"] and by["0000:04:00.0"]["iommu_group"] == 8
    assert vfioctl_main(["status", "--simulate", "ich10"]) == 0
    text = capsys.readouterr().out
    assert "Network devices using a kernel driver" in text
    line = next(l for l in text.splitlines() if l.startswith("0000:00:19.0"))
    assert "if=eno1" in line and "drv=e1000e" in line and "*Active*" in line
    assert vfiod_main(["inspect", "--all", "--simulate", "ich10"]) == 0
    assert capsys.readouterr().out == text


def test_status_without_an_iommu_says_so_once_and_lists_everything(tmp_path, capsys):
    spec = attrs.evolve(hosts.ICH10, iommu=False)
    roots = hosts.build_spec(spec, str(tmp_path / "h"))
    assert vfioctl_main(["status", "--sysfs-root", roots.sysfs, "--proc-root", roots.proc]) == 0
    text = capsys.readouterr().out
    assert text.count("no IOMMU groups") == 1
    assert "0000:04:00.0" in text and "group=-" in text


def _status(capsys, *argv):
    assert vfioctl_main(["status", *argv, "--json"]) == 0
    return {d["address"]: d for d in json.loads(capsys.readouterr().out)["devices"]}


def test_class_keeps_only_the_devices_of_those_classes(capsys):
    """--class, like dpdk-devbind's --status-dev: names for PCI base classes (and subclasses)."""
    net = _status(capsys, "--simulate", "ich10", "--class", "net")
    assert sorted(net) == ["0000:00:19.0", "0000:04:00.0", "0000:05:00.0"]
    assert all(d["class"].startswith("02") for d in net.values())
    both = _status(capsys, "--simulate", "ich10", "--class", "net,storage")
    assert sorted(both) == sorted([*net, "0000:00:1f.2"])
    assert _status(capsys, "--simulate", "ich10", "--class", "net", "--class", "storage") == both
    usb = _status(capsys, "--simulate", "ich10", "--class", "usb")          # 0c03: USB, not SMBus (0c05)
    assert sorted(usb) == ["0000:00:1a.0", "0000:00:1a.7", "0000:00:1d.0", "0000:00:1d.7"]
    assert "0000:00:1f.3" in _status(capsys, "--simulate", "ich10", "--class", "serial")
    assert vfioctl_main(["status", "--simulate", "gpu", "--class", "display"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Display devices using a kernel driver\n") and "Network" not in text
    assert text.count("\n0000:") == 2 and "0000:01:00.0" in text and "0000:00:02.0" in text
    assert vfioctl_main(["status", "--simulate", "gpu", "--class", "crypto"]) == 0
    assert capsys.readouterr().out == "No PCI devices of class crypto on this host.\n"


def test_the_class_map_follows_the_pci_classes_and_dpdk_devbind():
    from vfiod.report import DEVICE_CLASSES, in_classes
    assert in_classes(0x020000, ["net"]) and not in_classes(0x010802, ["net"])
    assert in_classes(0x0B4000, ["crypto"]) and in_classes(0x108000, ["crypto"])   # QAT, encryption
    assert not in_classes(0x0B0000, ["crypto"]) and in_classes(0x0B0000, ["processor"])
    assert in_classes(0x088000, ["dma"]) and in_classes(0x088000, ["event"])       # Intel DSA/IOAT
    assert not in_classes(None, ["net"])
    for name, (codes, what) in DEVICE_CLASSES.items():
        assert name.isalpha() and name.islower() and what and codes, name
        assert all(0 <= c <= 0xFF or 0x100 <= c <= 0xFFFF for c in codes), name


def test_an_unknown_class_is_a_usage_error_that_lists_the_known_ones(capsys):
    with pytest.raises(SystemExit) as e:
        vfioctl_main(["status", "--simulate", "ich10", "--class", "net,nett"])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "unknown device class 'nett'" in err
    assert "known: net, storage, display," in err and "crypto" in err and "dma" in err
    assert "Traceback" not in err
    assert vfioctl_main(["status", "--class", "help"]) == 0
    table = capsys.readouterr().out
    assert "\ncrypto      10, 0b40  " in table and table.startswith("net         02        network")


def _add_virtio_nic(roots, tmp_path, iface, state="up", master=None):
    """A second virtio NIC as the kernel lays it out: its interface below virtioN."""
    from vfiod.sim.hosts.builder import add_function
    node = os.path.realpath(os.path.join(roots.sysfs, "bus/pci/devices/0000:00:02.0"))
    fn = hosts.builder.Fn.from_line(f"00:03.0 - 1af4:1041 020000 rciep virtio-pci 9 net={iface}")
    new = add_function(roots.sysfs, fn, None)
    assert os.path.dirname(new) == os.path.dirname(node)
    where = os.path.join(new, "virtio1/net", iface)
    with open(os.path.join(where, "operstate"), "w") as f:
        f.write(state + "\n")
    if master:
        os.makedirs(os.path.join(roots.sysfs, "devices/virtual/net", master))
        os.symlink(os.path.join(roots.sysfs, "devices/virtual/net", master), os.path.join(where, "master"))


def test_a_virtio_nic_shows_its_interface_and_is_active_where_the_host_uses_it(tmp_path, capsys):
    """A virtio NIC's interface is at BDF/virtioN/net/IF: if= and *Active* follow it there
    (up with routes; a member of a bond), and a virtio NIC the host does not use is not active."""
    roots = hosts.build_spec(hosts.BRIDGE, str(tmp_path / "h"))
    _add_virtio_nic(roots, tmp_path, "enp0s3", master="bond0")
    argv = ["--sysfs-root", roots.sysfs, "--proc-root", roots.proc]
    by = _status(capsys, *argv, "--class", "net")
    routed, bonded = by["0000:00:02.0"], by["0000:00:03.0"]
    assert routed["net"] == ["enp0s2"] and routed["active"]
    assert routed["in_use"] == ["network interface enp0s2 is up with routes"]
    assert bonded["net"] == ["enp0s3"] and bonded["in_use"] == ["network interface enp0s3 is a member of bond0"]
    assert vfioctl_main(["status", *argv, "--class", "net"]) == 0
    lines = {l.split()[0]: l for l in capsys.readouterr().out.splitlines() if l.startswith("0000:")}
    assert "if=enp0s2 drv=virtio-pci group=4 *Active*" in lines["0000:00:02.0"]
    assert "if=enp0s3 drv=virtio-pci group=9 *Active*" in lines["0000:00:03.0"]
    assert "*Active*" not in lines["0000:02:01.0"] and "if=ens1" in lines["0000:02:01.0"]


def test_a_virtio_nic_the_host_does_not_use_is_listed_but_not_active(tmp_path, capsys):
    roots = hosts.build_spec(attrs.evolve(hosts.BRIDGE, route_iface=None), str(tmp_path / "h"))
    _add_virtio_nic(roots, tmp_path, "enp0s3", state="down")
    by = _status(capsys, "--sysfs-root", roots.sysfs, "--proc-root", roots.proc, "--class", "net")
    assert by["0000:00:02.0"]["net"] == ["enp0s2"] and not by["0000:00:02.0"]["active"]
    assert by["0000:00:03.0"]["net"] == ["enp0s3"] and by["0000:00:03.0"]["in_use"] == []
