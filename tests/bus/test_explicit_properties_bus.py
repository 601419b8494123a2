"""Explicit properties (docs/dbus.md): a group's `IsolationText` and a device's
`ResetMethods`, `Parent`, `NumaNode` and `Link` are read by name (`Get`) and left out of
GetManagedObjects, GetAll and InterfacesAdded, as sd-bus leaves out its
``SD_BUS_VTABLE_PROPERTY_EXPLICIT`` properties; the introspection data says which they
are.  Every other property is in every object's entry, as before."""

import json
import subprocess

from tests.bus.conftest import TEST_USER

GROUP_EXPLICIT = {"IsolationText"}
DEVICE_EXPLICIT = {"ResetMethods", "Parent", "NumaNode", "Link"}
GROUP_PROPS = {"Number", "Devices", "Viable", "Blockers", "State", "Lease", "Isolation"}
DEVICE_PROPS = {"Address", "VendorId", "DeviceId", "Class", "Name", "Driver", "OriginalDriver", "Group",
                "Bridge", "Protected", "PhysicalFunction", "Cdev"}

CLIENT = r"""
import asyncio, json, os
import xml.etree.ElementTree as ET
from vfiod.client import Client

async def go():
    c = await Client(os.environ['VFIOD_BUS']).connect()
    dev, grp = '/org/vfiod1/device/0000_01_00_0', '/org/vfiod1/group/1'
    tree = await c.managed_objects()
    out = {'tree_device': sorted(tree[dev]['org.vfiod1.Device']),
           'tree_group': sorted(tree[grp]['org.vfiod1.Group']),
           'getall_device': sorted(await c.properties(dev, 'org.vfiod1.Device')),
           'getall_group': sorted(await c.properties(grp, 'org.vfiod1.Group')),
           'get': [await c.property(dev, 'org.vfiod1.Device', 'Parent'),
                   await c.property(dev, 'org.vfiod1.Device', 'Link'),
                   await c.property(grp, 'org.vfiod1.Group', 'IsolationText')]}
    xml = (await c.call(dev, 'org.freedesktop.DBus.Introspectable', 'Introspect')).body[0]
    marked = {}
    for prop in ET.fromstring(xml).iter('property'):
        notes = {a.get('name'): a.get('value') for a in prop.iter('annotation')}
        if notes:
            marked[prop.get('name')] = notes
    out['introspected'] = marked
    print(json.dumps(out))

asyncio.run(go())
"""


def test_explicit_properties_are_read_by_name_only(make_world):
    w = make_world(topology="sriov")
    p = w.python(CLIENT)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert set(got["tree_device"]) == DEVICE_PROPS and set(got["getall_device"]) == DEVICE_PROPS
    assert set(got["tree_group"]) == GROUP_PROPS and set(got["getall_group"]) == GROUP_PROPS
    parent, link, text = got["get"]
    assert parent == "/org/vfiod1/device/0000_00_01_0" and link == [5.0, 4, 5.0, 4]
    assert "alone in its group" in text
    assert got["introspected"] == {
        "ResetMethods": {"org.freedesktop.systemd1.Explicit": "true",
                         "org.freedesktop.DBus.Property.EmitsChangedSignal": "const"},
        "Parent": {"org.freedesktop.systemd1.Explicit": "true",
                   "org.freedesktop.DBus.Property.EmitsChangedSignal": "const"},
        "NumaNode": {"org.freedesktop.systemd1.Explicit": "true",
                     "org.freedesktop.DBus.Property.EmitsChangedSignal": "const"},
        "Link": {"org.freedesktop.systemd1.Explicit": "true",
                 "org.freedesktop.DBus.Property.EmitsChangedSignal": "invalidates"}}


def test_busctl_reads_an_explicit_property_by_name(make_world):
    w = make_world(topology="sriov")
    p = subprocess.run(["busctl", f"--address={w.address}", "get-property", "org.vfiod1",
                        "/org/vfiod1/device/0000_01_00_0", "org.vfiod1.Device", "NumaNode"],
                       capture_output=True, text=True, user=TEST_USER, timeout=30)
    assert p.returncode == 0 and p.stdout.split() == ["i", "0"], p.stderr
