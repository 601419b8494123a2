"""A grant whose caller left the bus before the reply is undone.

Before, `request()` never checked that the caller was still there once the
grant finished: when the client's disconnect arrived while the grant was
still running, there was no granted lease to end yet, and the lease stayed
held for nobody (every later request: "already leased")."""

import json
import time

import pytest

pytestmark = pytest.mark.bus

CLIENT = r'''
import asyncio, os
from dbus_next import Message, Variant
from dbus_next.aio import MessageBus

async def once(delay):
    bus = await MessageBus(bus_address=os.environ["VFIOD_BUS"]).connect()
    bus.send(Message(destination="org.vfiod1", path="/org/vfiod1", interface="org.vfiod1.Manager",
                     member="RequestLease", signature="ssa{sv}", body=["group:8", "vfio", {}]))
    await asyncio.sleep(delay)
    bus.disconnect()          # gone before (or just as) the reply comes

async def main():
    for i in range(12):
        await once(0.002 * i)
        await asyncio.sleep(0.3)
asyncio.run(main())
'''


def test_a_client_that_leaves_during_the_grant_leaves_no_lease(make_world):
    w = make_world()
    before = w.drivers()
    p = w.python(CLIENT)
    assert p.returncode == 0, p.stderr
    deadline = time.time() + 10
    while time.time() < deadline:
        leases = json.loads(w.ctl("leases", "--json", user=None).stdout)["leases"]
        if not leases and w.drivers() == before:
            break
        time.sleep(0.2)
    assert leases == [], (leases, w.read_log()[-3000:])
    assert w.drivers() == before
    # and the group can be leased again at once
    p = w.ctl("lease", "group:8", "--", "true", check=False)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in w.read_log()
