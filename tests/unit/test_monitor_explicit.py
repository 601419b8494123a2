"""`vfioctl monitor` and an explicit property (docs/dbus.md): PropertiesChanged names a
device's `Link` without its value, and the monitor reads it by name to say what it is now."""

import asyncio
import io

from dbus_next import Message, MessageType, Variant

from vfiod.cmd.monitor import Monitor
from vfiod.errors import NotFound

DEV = "/org/vfiod1/device/0000_01_00_0"


class FakeClient:
    def __init__(self, values):
        self.values = values
        self.asked = []

    async def property(self, path, interface, name):
        self.asked.append((path, interface, name))
        if (path, name) not in self.values:
            raise NotFound(f"no object {path}")
        return self.values[(path, name)]


def changed(path, interface, values, invalidated):
    return Message(message_type=MessageType.SIGNAL, path=path, interface="org.freedesktop.DBus.Properties",
                   member="PropertiesChanged", signature="sa{sv}as", sender=":1.1",
                   body=[interface, values, invalidated])


def test_an_invalidated_link_is_read_by_name_and_said():
    client = FakeClient({(DEV, "Link"): [2.5, 1, 8.0, 16]})
    out = io.StringIO()
    m = Monitor(client, as_json=False, out=out)
    m.owner = ":1.1"
    asyncio.run(m.handle(changed(DEV, "org.vfiod1.Device", {"Driver": Variant("s", "vfio-pci")}, ["Link"])))
    assert client.asked == [(DEV, "org.vfiod1.Device", "Link")]
    line = out.getvalue()
    assert "device 0000:01:00.0" in line and "driver vfio-pci" in line and "link 2.5, 1, 8.0, 16" in line


def test_an_object_gone_before_it_is_read_says_what_came_with_the_signal():
    out = io.StringIO()
    m = Monitor(FakeClient({}), as_json=False, out=out)
    m.owner = ":1.1"
    asyncio.run(m.handle(changed(DEV, "org.vfiod1.Device", {"Driver": Variant("s", "")}, ["Link"])))
    assert "driver none" in out.getvalue() and "link" not in out.getvalue()
