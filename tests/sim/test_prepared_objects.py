"""GetManagedObjects from the prepared reply: the same objects and values as building the
reply from every property, and only what changed is marshalled again."""

import asyncio
import contextlib
import io
import os

from dbus_next._private.unmarshaller import Unmarshaller
from dbus_next import Message

from vfiod.backends import load_backends
from vfiod.daemon import Service
from vfiod.daemon.prepared import SIGNATURE, PreparedReply, body
from vfiod.policy import Caller, PolicyStore
from vfiod.sim import hosts
from vfiod.sim.kernel import SimKernel
from vfiod.state import Journal
from vfiod.wire import ROOT


class Exports:
    """Where the tree exports its objects: a bus that only remembers them."""

    managed_entries = None

    def __init__(self):
        self.objects = {}

    def quiet_exports(self):
        return contextlib.nullcontext()

    def export(self, path, iface):
        self.objects[path] = iface

    def unexport(self, path, iface):
        self.objects.pop(path, None)

    def unreadable(self, path, e):
        self.left_out = (path, e)


def service_on(tmp_path, name):
    spec = hosts.spec(name)
    roots = hosts.build(name, str(tmp_path / "host"))
    os.makedirs(tmp_path / "policy")
    with open(tmp_path / "policy" / "10-all.toml", "w") as f:
        f.write('[[rule]]\nids = "*:*"\neveryone = true\nbackends = ["vfio"]\n')
    store = PolicyStore(str(tmp_path / "policy"), owners=(os.getuid(),))
    store.reload()
    service = Service(SimKernel.for_spec(spec, roots), Journal(str(tmp_path / "state.db")), store, load_backends())
    service.attach(Exports())
    service.export_all()
    return service


def reply_of(service):
    """The prepared reply as a client unmarshals it."""
    call = Message(path=ROOT, interface="org.freedesktop.DBus.ObjectManager", member="GetManagedObjects",
                   serial=5, sender=":1.7")
    data = PreparedReply(call, SIGNATURE, body(service.objects.managed_entries(ROOT + "/")))._marshall()
    msg = Unmarshaller(io.BytesIO(data)).unmarshall()
    assert msg.reply_serial == 5 and msg.destination == ":1.7" and msg.signature == SIGNATURE
    return {path: {i: {p: v.value for p, v in props.items()} for i, props in ifaces.items()}
            for path, ifaces in msg.body[0].items()}


def built_from_every_property(service):
    exports = service.objects.bus.objects
    return {path: {iface.name: {p: v.value for p, v in iface.property_values().items()}}
            for path, iface in exports.items() if path.startswith(ROOT + "/")}


def test_the_prepared_reply_is_the_whole_tree_and_only_changes_are_marshalled_again(tmp_path):
    service = service_on(tmp_path, "server:64")
    prepared = service.objects.prepared
    first = reply_of(service)
    assert first == built_from_every_property(service)
    assert len(first) == 2 * len(service.host.devices) and prepared.marshalled == len(first)
    assert reply_of(service) == first and prepared.marshalled == len(first)      # nothing changed

    # A lease of one group (as root, by the daemon's own path) changes that group's object
    # and its device's, and adds the lease's; nothing else is marshalled again.
    vf = next(d for d in service.host.devices.values() if d.is_vf)
    lease = service.manager.request(Caller(0), f"group:{vf.group}", "vfio", {})
    service.objects.export_lease(lease)
    service.refresh([vf.group])
    service.objects.publish(service.host, service.host, [vf.group])
    before = prepared.marshalled
    after = reply_of(service)
    assert after == built_from_every_property(service)
    assert after[f"{ROOT}/group/{vf.group}"]["org.vfiod1.Group"]["State"] == "leased"
    assert prepared.marshalled - before == 3          # the group, its device, the lease
    service.manager.release(lease.id, Caller(0))


def test_an_object_whose_properties_cannot_be_read_is_left_out_and_the_rest_served(tmp_path):
    service = service_on(tmp_path, "ich10")
    gone = next(iter(service.objects._devices))
    service.host.devices.pop(gone)          # the snapshot lost it before the tree did
    reply = reply_of(service)
    path = f"{ROOT}/device/{gone.object_name}"
    exported = {p for p in service.objects.bus.objects if p.startswith(ROOT + "/")}
    assert path in exported and set(reply) == exported - {path}
    assert service.objects.bus.left_out[0] == path


def test_the_tree_is_prepared_after_start_a_few_objects_a_turn(tmp_path):
    service = service_on(tmp_path, "server:64")
    service.objects.PREPARE_CHUNK = 10
    turns = []

    async def go():
        service.objects.prepare_soon()
        while service.objects.prepared.marshalled < 2 * len(service.host.devices):
            turns.append(service.objects.prepared.marshalled)
            await asyncio.sleep(0)

    asyncio.run(asyncio.wait_for(go(), 10))
    assert len(turns) >= 12 and all(b - a <= 10 for a, b in zip(turns, turns[1:]))
    assert len(reply_of(service)) == 128 and service.objects.prepared.marshalled == 128   # all ready
