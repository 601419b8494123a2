"""A virtio NIC's interface is not at ``BDF/net/IF`` but at ``BDF/virtioN/net/IF`` (it
belongs to the virtio device below the PCI function).  vfiod read only ``BDF/net/``,
so a guest's secondary virtio NIC carrying routes (the usual DPDK-in-guest setup) was
not seen as in use and had no ``if=`` in `vfioctl status`."""

import os

from vfiod.address import PciAddress
from vfiod.pciids import PciIds
from vfiod.report import render_status, status_json
from vfiod.sim import hosts
from vfiod.sim.hosts.builder import Fn, build
from vfiod.sysfs import SysfsReader, device_usage
from vfiod.topology import Host

import attrs

NIC = PciAddress.parse("0000:00:03.0")


def host_with_a_second_virtio_nic(root):
    """The bridge host plus a virtio NIC at 00:03.0 (group 5, no interface yet), then its
    interface eth0 laid out by hand where the kernel puts it, with a route through it."""
    spec = attrs.evolve(hosts.BRIDGE, functions=hosts.BRIDGE.functions + (
        Fn.from_line("00:03.0 - 1af4:1041 020000 rciep virtio-pci 5"),))
    roots = build(spec, root)
    node = os.path.realpath(os.path.join(roots.sysfs, "bus/pci/devices", NIC.sysfs_name))
    iface = os.path.join(node, "virtio7", "net", "eth0")
    os.makedirs(iface)
    with open(os.path.join(iface, "operstate"), "w") as f:
        f.write("up\n")
    os.symlink(os.path.relpath(iface, os.path.join(roots.sysfs, "class/net")),
               os.path.join(roots.sysfs, "class/net/eth0"))
    with open(os.path.join(roots.proc, "net/route"), "a") as f:
        f.write("eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")
    return roots


def test_its_interface_with_routes_makes_it_in_use(tmp_path):
    roots = host_with_a_second_virtio_nic(str(tmp_path))
    assert device_usage(roots, NIC) == ["network interface eth0 is up with routes"]
    host = Host.scan(SysfsReader(roots))
    assert host.devices[NIC].raw.net == ("eth0",)
    assert not host.devices[NIC].protected          # not the default route: in use, not protected
    text = render_status(status_json(host, PciIds(), lambda a: device_usage(roots, a)))
    line = next(line for line in text.splitlines() if line.startswith("0000:00:03.0"))
    assert "if=eth0" in line and "*Active*" in line, line


def test_the_simulated_virtio_nics_are_laid_out_as_the_kernel_does(tmp_path):
    roots = hosts.build("bridge", str(tmp_path))
    node = os.path.realpath(os.path.join(roots.sysfs, "bus/pci/devices/0000:00:02.0"))
    assert not os.path.exists(os.path.join(node, "net"))
    assert os.path.isdir(os.path.join(node, "virtio0", "net", "enp0s2"))
    host = Host.scan(SysfsReader(roots))
    assert "default route" in host.devices[PciAddress.parse("00:02.0")].protected
