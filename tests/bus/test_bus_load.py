"""Many connections at once, and a fuzz of random and malformed calls."""

import ast
import json
import random

import pytest

pytestmark = pytest.mark.bus

CONCURRENT = r'''
import asyncio, os, sys, collections
from vfiod.client import Client
from vfiod import errors

async def one():
    c = await Client(os.environ["VFIOD_BUS"], timeout=120).connect()
    try:
        await c.request_lease("group:8", persistent=True)
        return "granted"
    except errors.Busy:
        return "busy"
    except Exception as e:
        return type(e).__name__ + ": " + str(e)
    finally:
        c.close()

async def main():
    results = await asyncio.gather(*(one() for _ in range(200)))
    print(dict(collections.Counter(results)))

asyncio.run(main())
'''


def test_200_concurrent_requests_from_200_connections_grant_exactly_one(world):
    p = world.python(CONCURRENT, timeout=300)
    assert p.returncode == 0, p.stderr
    assert ast.literal_eval(p.stdout.strip()) == {"granted": 1, "busy": 199}, p.stdout
    rows = json.loads(world.ctl("leases", "--json").stdout)["leases"]
    assert len(rows) == 1 and rows[0]["group"] == 8


FUZZ = r'''
import asyncio, os, random, sys, collections
from dbus_next import Message, MessageType, Variant

from dbus_next.aio import MessageBus

N = int(sys.argv[1]); seed = int(sys.argv[2])
rnd = random.Random(seed)
# (NUL cannot be sent: D-Bus strings exclude it and the bus drops a sender that tries)
TARGETS = ["0000:04:00.0", "group:8", "group:-1", "group:99999999999", "../../../etc/passwd", "0000:04:00.0/../..",
           "pci_0000_04_00_0", "name:nope", "\x01", "a" * 100000, "0000:zz:00.0", "", "group:",
           "04:00.0", "group:7", "0000:00:19.0", "name:../x", "%s", "{}"]
BACKENDS = ["", "vfio", "pci-stub", "libvirt", "nope", "../vfio", "x" * 5000]

def rand_text():
    k = rnd.random()
    if k < 0.5:
        return rnd.choice(TARGETS)
    if k < 0.8:
        return "".join(chr(rnd.randrange(1, 0x2ff)) for _ in range(rnd.randrange(0, 64)))
    return rnd.choice(TARGETS) + rnd.choice(["/..", "\n", " ", ":", "\u202e"])

def rand_variant():
    return rnd.choice([Variant("t", rnd.randrange(0, 2**64)), Variant("b", rnd.random() < 0.5),
                       Variant("s", rand_text()), Variant("i", -1), Variant("as", ["x"]), Variant("u", 0)])

def rand_options():
    keys = ["duration", "persistent", "force", "uid", "owner", "", "x" * 300]
    return {rnd.choice(keys): rand_variant() for _ in range(rnd.randrange(0, 4))}

CALLS = [
    ("/org/vfiod1", "org.vfiod1.Manager", "RequestLease", "ssa{sv}", lambda: [rand_text(), rnd.choice(BACKENDS), rand_options()]),
    ("/org/vfiod1", "org.vfiod1.Manager", "Explain", "s", lambda: [rand_text()]),
    ("/org/vfiod1", "org.vfiod1.Manager", "CheckAccess", "ss", lambda: [rand_text(), rnd.choice(BACKENDS)]),
    ("/org/vfiod1", "org.vfiod1.Manager", "ReloadPolicy", "", lambda: []),
    ("/org/vfiod1", "org.vfiod1.Manager", "RequestLease", "s", lambda: [rand_text()]),
    ("/org/vfiod1", "org.vfiod1.Manager", "RequestLease", "ii", lambda: [1, 2]),
    ("/org/vfiod1", "org.vfiod1.Manager", "Nope", "", lambda: []),
    ("/org/vfiod1/lease/0000", "org.vfiod1.Lease", "Release", "", lambda: []),
    ("/org/vfiod1/lease/0000", "org.vfiod1.Lease", "OpenGroup", "", lambda: []),
    ("/org/vfiod1/group/8", "org.freedesktop.DBus.Properties", "Get", "ss", lambda: ["org.vfiod1.Group", rand_text()]),
    ("/org/vfiod1/group/8", "org.freedesktop.DBus.Properties", "Set", "ssv", lambda: ["org.vfiod1.Group", "State", Variant("s", "leased")]),
]

async def main():
    bus = await MessageBus(bus_address=os.environ["VFIOD_BUS"], negotiate_unix_fd=True).connect()
    names = collections.Counter()
    granted = []
    for i in range(N):
        path, iface, member, sig, body = rnd.choice(CALLS)
        msg = Message(destination="org.vfiod1", path=path, interface=iface, member=member, signature=sig, body=body())
        reply = await asyncio.wait_for(bus.call(msg), 30)
        if reply.message_type == MessageType.ERROR:
            names[reply.error_name] += 1
            text = reply.body[0] if reply.body else ""
            assert "Traceback" not in text, text
        else:
            names["ok:" + member] += 1
            if member == "RequestLease":
                granted.append(reply.body[0])
                rel = Message(destination="org.vfiod1", path=reply.body[0], interface="org.vfiod1.Lease", member="Release")
                await asyncio.wait_for(bus.call(rel), 30)
    print(N, dict(names))

asyncio.run(main())
'''

ALLOWED_WRITES = ("bus/pci/devices/", "bus/pci/drivers/", "bus/pci/drivers_probe")


def test_fuzz_10000_calls_get_named_errors_and_touch_nothing_else(world):
    import os
    import subprocess

    from .conftest import ROOT, TEST_USER, VENV_BIN
    env = dict(os.environ, VFIOD_BUS=world.address, PYTHONPATH=ROOT)
    script = os.path.join(world.dir, "fuzz.py")
    with open(script, "w") as f:
        f.write(FUZZ)
    os.chmod(script, 0o644)
    p = subprocess.run([os.path.join(VENV_BIN, "python"), script, "10000", str(random.randrange(1 << 30))],
                       capture_output=True, text=True, timeout=1200, user=TEST_USER, env=env, cwd=world.dir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    count, names = p.stdout.split(" ", 1)
    names = eval(names)
    print(f"\nfuzz: {count} calls -> {names}")
    assert int(count) == 10000 and sum(names.values()) == 10000
    for name in names:
        assert name.startswith(("ok:", "org.vfiod1.Error.", "org.freedesktop.DBus.Error.")), name
    assert world.daemon.poll() is None, world.read_log()[-3000:]
    for rel, data in world.writes():
        assert rel.startswith(ALLOWED_WRITES), rel
        assert rel.endswith(("driver_override", "unbind", "drivers_probe")), rel
    # the host is back as it was: every lease the fuzz got was released
    assert json.loads(world.ctl("leases", "--json").stdout)["leases"] == []
