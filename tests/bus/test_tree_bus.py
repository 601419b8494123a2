"""`vfioctl show --tree` and the devices' link, NUMA and parent facts, from the daemon over a
real private bus, asked by an unprivileged user."""

import json

import pytest

from tests.jsondoc import Schema
from vfiod.sim import hosts

pytestmark = pytest.mark.bus


def _addresses(devices):
    for d in devices:
        yield d["address"]
        yield from _addresses(d["children"])


def test_show_tree_as_a_user_is_the_whole_documented_tree(make_world):
    w = make_world(topology="switch")
    doc = json.loads(w.ctl("show", "--tree", "--json").stdout)
    assert Schema().validate(doc) == [] and doc["kind"] == "tree"
    (bus,) = doc["buses"]
    assert bus["bus"] == "pci0000:00"
    assert sorted(_addresses(bus["devices"])) == sorted(str(f.addr) for f in hosts.SWITCH.functions)
    text = w.ctl("show", "--tree").stdout
    port = next(line for line in text.splitlines() if "0000:02:10.0" in line)
    assert "group 4, pcieport, PCIe 2.5 GT/s x1 (downgraded, max 8.0 GT/s x4)" in port
    # the same tree vfiod inspect draws offline from the same host
    offline = w.python("import sys; from vfiod.cmd.server import main; "
                       "sys.exit(main(['inspect', '--simulate', 'switch', '--tree']))")
    assert offline.returncode == 0 and offline.stdout == text


def test_show_tree_with_targets_keeps_the_branches_to_them(make_world):
    w = make_world(topology="switch")
    doc = json.loads(w.ctl("show", "--tree", "enp4s0", "--json").stdout)      # an interface: its group
    assert sorted(_addresses(doc["buses"][0]["devices"])) == [
        "0000:00:01.0", "0000:01:00.0", "0000:02:10.0", "0000:04:00.0"]
    doc = json.loads(w.ctl("show", "--tree", "03:00.0", "--json").stdout)      # an address: that function
    assert list(_addresses(doc["buses"][0]["devices"])) == [
        "0000:00:01.0", "0000:01:00.0", "0000:02:08.0", "0000:03:00.0"]
    p = w.ctl("show", "--tree", "0000:09:00.0", check=False)
    assert p.returncode == 1 and "no PCI function 0000:09:00.0" in p.stderr and not p.stdout
    p = w.ctl("show", check=False)
    assert p.returncode == 2 and "name a TARGET" in p.stderr and "--tree" in p.stderr
    assert "Traceback" not in p.stderr


def test_device_objects_carry_link_numa_node_and_parent(make_world):
    # explicit properties (docs/dbus.md): read by name, not in GetAll
    w = make_world(topology="sriov")
    p = w.python(
        "import asyncio, json, os\n"
        "from vfiod.client import Client\n"
        "async def go():\n"
        "  c = await Client(os.environ['VFIOD_BUS']).connect()\n"
        "  out = {}\n"
        "  for name in ('0000_00_01_0', '0000_01_00_0', '0000_01_10_0', '0000_00_17_0'):\n"
        "    path = '/org/vfiod1/device/' + name\n"
        "    out[name] = [await c.property(path, 'org.vfiod1.Device', p) for p in ('Link', 'NumaNode', 'Parent')]\n"
        "  print(json.dumps(out))\n"
        "asyncio.run(go())\n")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["0000_00_01_0"] == [[5.0, 4, 8.0, 16], 0, "/"]
    assert got["0000_01_00_0"] == [[5.0, 4, 5.0, 4], 0, "/org/vfiod1/device/0000_00_01_0"]
    assert got["0000_01_10_0"] == [[0.0, 0, 0.0, 0], 0, "/org/vfiod1/device/0000_00_01_0"]     # a VF
    assert got["0000_00_17_0"] == [[0.0, 0, 0.0, 0], 0, "/"]                                  # root complex
