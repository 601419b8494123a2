"""The PCI tree (`vfiod inspect --tree`, `vfioctl show --tree`): root buses, bridges and
ports, functions, each with its IOMMU group, driver, PCIe link and NUMA node; the link read
from configuration space already read, from sysfs only where that showed too little."""

import json
import os
import struct

import attrs
import pytest

from tests.jsondoc import Schema
from vfiod import report
from vfiod.cmd.server import main as vfiod_main
from vfiod.pciids import PciIds
from vfiod.sim import hosts
from vfiod.sim.hosts.builder import Fn
from vfiod.sysfs import SysfsReader
from vfiod.sysfs import device as device_mod
from vfiod.sysfs.config import ConfigInfo, PcieLink
from vfiod.topology import Host

SCHEMA = Schema()


def scan(name, tmp_path):
    roots = hosts.build_spec(hosts.spec(name), str(tmp_path / name))
    return roots, Host.scan(SysfsReader(roots))


def links(host):
    return {str(a): d.raw.link for a, d in host.devices.items()}


def test_config_space_gives_the_link_now_and_at_most():
    fn = Fn.from_line("01:00.0 00:01.0 8086:10d3 020000 endpoint e1000e 8 link=5x2 maxlink=16x8")
    cfg = ConfigInfo.parse(fn.config())
    assert cfg.link == PcieLink(speed=5.0, width=2, max_speed=16.0, max_width=8)
    assert cfg.link.downgraded
    # Link Capabilities 2's supported speeds, where a device sets them, are what the kernel calls the maximum
    raw = bytearray(fn.config())
    struct.pack_into("<I", raw, 0x40 + 0x2C, 0b1111110)       # 2.5 .. 64 GT/s
    assert ConfigInfo.parse(bytes(raw)).link.max_speed == 64.0
    # a root complex integrated endpoint has no link; conventional PCI has no PCIe capability
    rciep = Fn.from_line("00:19.0 - 8086:10bd 020000 rciep e1000e 2")
    assert ConfigInfo.parse(rciep.config()).link is None
    assert ConfigInfo.parse(Fn.from_line("02:01.0 - 8086:100e 020000 pci e1000 2").config()).link is None
    # 64 bytes (what a reader that is not root sees): the capability list is past the end
    assert ConfigInfo.parse(fn.config()[:64]).link is None


@pytest.mark.parametrize("texts, want", [
    ((b"8.0 GT/s PCIe\n", b"4\n", b"16.0 GT/s PCIe\n", b"16\n"), PcieLink(8.0, 4, 16.0, 16)),
    ((b"8 GT/s\n", b"x4\n", b"8 GT/s\n", b"4\n"), PcieLink(8.0, 4, 8.0, 4)),             # older kernels
    ((b"Unknown\n", b"0\n", b"8.0 GT/s PCIe\n", b"4\n"), PcieLink(None, 0, 8.0, 4)),      # link down
    ((b"Unknown\n", b"0\n", b"Unknown speed\n", b"0\n"), None),          # no link registers (a root complex function)
    ((b"2.5 GT/s PCIe\n", b"garbage\n", None, None), PcieLink(2.5, None, None, None)),
    ((None, None, None, None), None),
])
def test_the_kernels_link_attributes_parse(texts, want):
    assert PcieLink.from_sysfs(*texts) == want


def test_a_scan_reads_links_and_numa_nodes_as_the_kernel_shows_them(tmp_path):
    _, switch = scan("switch", tmp_path)
    got = links(switch)
    assert got["0000:00:01.0"] == PcieLink(8.0, 16, 8.0, 16)
    assert got["0000:02:10.0"] == PcieLink(2.5, 1, 8.0, 4) and got["0000:02:10.0"].downgraded
    assert got["0000:03:00.0"] == PcieLink(8.0, 4, 8.0, 4) and not got["0000:03:00.0"].downgraded
    assert got["0000:00:17.0"] is None and got["0000:00:00.0"] is None     # root complex, host bridge
    _, sriov = scan("sriov", tmp_path)
    vfs = [d for d in sriov.devices.values() if d.is_vf]
    assert len(vfs) == 4 and all(d.raw.link is None for d in vfs)        # a VF has no link of its own
    assert {d.raw.numa_node for d in sriov.devices.values() if str(d.addr) != "0000:00:00.0"} == {0}
    _, server = scan("server:20", tmp_path)
    assert {str(a)[:4]: d.raw.numa_node for a, d in server.devices.items()} == {"0000": 0, "0001": 1}


def test_the_link_costs_no_read_where_config_space_showed_it(tmp_path, monkeypatch):
    """A whole-host scan as root (full config space) opens no link attribute; one that sees
    64 bytes of config space reads them, and only on PCIe functions; the answers agree."""
    roots, full = scan("switch", tmp_path)
    read = []
    real = device_mod.read_at

    def counting(dfd, name, *a):
        read.append(name)
        return real(dfd, name, *a)
    monkeypatch.setattr(device_mod, "read_at", counting)
    assert links(Host.scan(SysfsReader(roots))) == links(full)
    assert not [n for n in read if "link" in n]
    for name in os.listdir(os.path.join(roots.sysfs, "bus/pci/devices")):
        path = os.path.join(roots.sysfs, "bus/pci/devices", name, "config")
        with open(path, "rb") as f:
            head = f.read(64)
        with open(path, "wb") as f:
            f.write(head)
    read.clear()
    assert links(Host.scan(SysfsReader(roots))) == links(full)
    asked = [n for n in read if n == "current_link_speed"]
    pcie = [d for d in full.devices.values() if d.raw.config.is_pcie]
    assert len(asked) == len(pcie) < len(full.devices)        # the host bridge has none to read


def test_the_tree_nests_functions_below_their_bridges(tmp_path):
    _, switch = scan("switch", tmp_path)
    buses = report.tree_json(switch, PciIds())
    assert [b["bus"] for b in buses] == ["pci0000:00"]
    top = {d["address"]: d for d in buses[0]["devices"]}
    assert list(top) == ["0000:00:00.0", "0000:00:01.0", "0000:00:17.0", "0000:00:1f.6"]
    (upstream,) = top["0000:00:01.0"]["children"]
    assert upstream["address"] == "0000:01:00.0" and upstream["parent"] == "0000:00:01.0"
    down = {d["address"]: d for d in upstream["children"]}
    assert [c["address"] for c in down["0000:02:10.0"]["children"]] == ["0000:04:00.0"]
    nic = down["0000:02:10.0"]["children"][0]
    assert (nic["iommu_group"], nic["driver"], nic["children"]) == (4, "e1000e", [])
    assert down["0000:02:10.0"]["link"] == {"speed": 2.5, "width": 1, "max_speed": 8.0, "max_width": 4,
                                            "downgraded": True}

    def count(devices):
        return sum(1 + count(d["children"]) for d in devices)
    assert count(buses[0]["devices"]) == len(switch.devices)
    pruned = report.prune_tree(buses, {"0000:03:00.0"})
    path = pruned[0]["devices"]
    assert [d["address"] for d in path] == ["0000:00:01.0"]
    assert [d["address"] for d in path[0]["children"][0]["children"]] == ["0000:02:08.0"]
    assert report.prune_tree(buses, {"0000:09:00.0"}) == []


def test_two_domains_are_two_root_buses(tmp_path):
    _, server = scan("server:20", tmp_path)
    buses = report.tree_json(server, PciIds())
    assert [b["bus"] for b in buses] == ["pci0000:00", "pci0001:00"]
    assert [d["numa_node"] for d in buses[1]["devices"]] == [1]


def test_inspect_tree_prints_groups_drivers_links_and_numa(capsys):
    assert vfiod_main(["inspect", "--simulate", "switch", "--tree"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "pci0000:00"
    port = next(l for l in lines if "0000:02:10.0" in l)
    assert port.startswith("|       `-- 0000:02:10.0  PCI bridge: ")
    assert "group 4, pcieport, PCIe 2.5 GT/s x1 (downgraded, max 8.0 GT/s x4)" in port
    nic = lines[lines.index(port) + 1]
    assert nic.startswith("|           `-- 0000:04:00.0  Ethernet controller: ") and "group 4, e1000e" in nic
    assert vfiod_main(["inspect", "--simulate", "sriov", "--tree"]) == 0
    out = capsys.readouterr().out
    pf = next(l for l in out.splitlines() if "0000:01:00.0" in l)
    assert pf.endswith("igb, PCIe 5.0 GT/s x4, NUMA 0")
    assert "NUMA" not in next(l for l in out.splitlines() if "0000:00:00.0" in l)   # the kernel said -1


@pytest.mark.parametrize("topology", sorted(hosts.EXAMPLES) + ["ich10+noiommu"])
def test_inspect_tree_json_is_the_documented_tree(topology, capsys):
    assert vfiod_main(["inspect", "--simulate", topology, "--tree", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert SCHEMA.validate(doc) == [] and doc["kind"] == "tree"
    seen = []

    def walk(devices):
        for d in devices:
            seen.append(d["address"])
            walk(d["children"])
    for bus in doc["buses"]:
        walk(bus["devices"])
    assert sorted(seen) == sorted(str(f.addr) for f in hosts.spec(topology).functions)
    if topology.endswith("noiommu"):
        assert doc["buses"] and all(d["iommu_group"] is None for d in doc["buses"][0]["devices"])


def test_a_bad_link_flag_in_a_host_table_is_refused():
    with pytest.raises(ValueError, match="link=GTxW"):
        Fn.from_line("01:00.0 - 8086:10d3 020000 endpoint e1000e 8 link=7x4")
    with pytest.raises(ValueError, match="maxlink=GTxW"):
        Fn.from_line("01:00.0 - 8086:10d3 020000 endpoint e1000e 8 maxlink=8xfour")
    fn = Fn.from_line("01:00.0 - 8086:10d3 020000 endpoint e1000e 8")
    assert attrs.evolve(fn).link == (2.5, 1) and ConfigInfo.parse(fn.config()).link == PcieLink(2.5, 1, 2.5, 1)
