"""Property getters and ObjectManager errors reach clients as named errors.

Before, a property getter that raised (a device gone from the snapshot, a
value that does not marshal) reached the client through dbus-next's default
handler as ``org.freedesktop.DBus.Python.ServiceError`` with the Python
traceback in its message; now it is ``org.vfiod1.Error.BackendFailed`` with
no traceback, logged once."""

from types import SimpleNamespace

from dbus_next import Message, MessageType
from dbus_next.message_bus import BaseMessageBus

from vfiod.address import PciAddress
from vfiod.daemon.connection import VfiodBus
from vfiod.daemon.interfaces import DeviceInterface, ManagerInterface

DEV = "/org/vfiod1/device/0000_04_00_0"


def fake_bus(exports):
    sent = []

    def send(msg):
        msg._marshall(False)        # what the real connection does first
        sent.append(msg)
    bus = SimpleNamespace(send=send, sent=sent, _path_exports=exports, _unreadable=set(), managed_entries=None)
    bus.unreadable = lambda path, e: VfiodBus.unreadable(bus, path, e)
    return bus


def call(bus, member, signature, body, path=DEV, interface="org.freedesktop.DBus.Properties"):
    msg = Message(path=path, interface=interface, member=member, signature=signature, body=body,
                  serial=7, sender=":1.9")
    send_reply = VfiodBus._send_reply(bus, msg)
    with send_reply:
        if interface == "org.freedesktop.DBus.Properties":
            BaseMessageBus._default_properties_handler(bus, msg, send_reply)
        else:
            VfiodBus._default_get_managed_objects_handler(bus, msg, send_reply)
    return bus.sent[-1]


def gone_device():
    service = SimpleNamespace(host=SimpleNamespace(devices={}))     # the device left the snapshot
    return DeviceInterface(service, PciAddress.parse("0000:04:00.0"))


def test_a_failing_getter_is_a_named_error():
    bus = fake_bus({DEV: [gone_device()]})
    for member, sig, body in (("Get", "ss", ["org.vfiod1.Device", "Driver"]),
                              ("GetAll", "s", ["org.vfiod1.Device"])):
        reply = call(bus, member, sig, body)
        assert reply.message_type == MessageType.ERROR
        assert reply.error_name == "org.vfiod1.Error.BackendFailed", reply.error_name
        assert "Traceback" not in str(reply.body) and "File \"" not in str(reply.body)


def test_a_value_that_does_not_marshal_is_a_named_error():
    class Odd(ManagerInterface):
        pass
    service = SimpleNamespace()
    iface = Odd(service)
    bus = fake_bus({"/org/vfiod1": [iface]})
    # Version's getter is fine; break marshalling by handing the reply a bad value
    reply_msg = Message(path="/org/vfiod1", interface="org.freedesktop.DBus.Properties", member="Get",
                        signature="ss", body=["org.vfiod1.Manager", "Version"], serial=3, sender=":1.9")
    send_reply = VfiodBus._send_reply(bus, reply_msg)
    send_reply(Message.new_method_return(reply_msg, "t", [1 << 70]))
    reply = bus.sent[-1]
    assert reply.error_name == "org.vfiod1.Error.BackendFailed"
    assert "Traceback" not in str(reply.body)


def test_unknown_properties_keep_their_standard_error():
    bus = fake_bus({DEV: [gone_device()]})
    reply = call(bus, "Get", "ss", ["org.vfiod1.Device", "NoSuch"])
    assert reply.error_name == "org.freedesktop.DBus.Error.UnknownProperty"


def test_object_manager_leaves_out_an_unreadable_object():
    bus = fake_bus({DEV: [gone_device()]})
    reply = call(bus, "GetManagedObjects", "", [], path="/org/vfiod1",
                 interface="org.freedesktop.DBus.ObjectManager")
    assert reply.message_type == MessageType.METHOD_RETURN
    assert DEV not in reply.body[0]
