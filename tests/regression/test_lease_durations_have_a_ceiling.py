"""Durations and renewals have a hard ceiling, also where no rule caps them.

Before, `RequestLease` (or `Renew`) with a duration of 2**64-1 under a rule
without `max_duration` was granted: the lease's `Expires` could not be
marshalled as a D-Bus ``t``, so `GetManagedObjects` failed for everyone
(`vfioctl groups` printed a traceback, `vfioctl leases` said "No leases."),
also after a restart.  Now anything over `MAX_LEASE_SECONDS` (one year) is
refused with InvalidArgument, and the lease time properties always marshal."""

import pytest

from vfiod.errors import InvalidArgument
from vfiod.policy import MAX_LEASE_SECONDS

from tests.sim.leasekit import Caller, Kit

USER = Caller(1000)
HUGE = (1 << 64) - 1


def test_a_huge_duration_is_refused_without_a_rule_cap(tmp_path):
    kit = Kit(tmp_path, "ich10")
    before = kit.snapshot()
    for asked in (HUGE, MAX_LEASE_SECONDS + 1, 1 << 63):
        with pytest.raises(InvalidArgument, match="at most"):
            kit.manager.request(USER, "group:8", "vfio", {"duration": asked})
    assert kit.journal.leases() == [] and kit.snapshot() == before


def test_the_ceiling_itself_is_granted(tmp_path):
    kit = Kit(tmp_path, "ich10")
    lease = kit.manager.request(USER, "group:8", "vfio", {"duration": MAX_LEASE_SECONDS})
    assert 0 < lease.expires - lease.created <= MAX_LEASE_SECONDS
    kit.manager.release(lease.id, USER)


def test_a_huge_renewal_is_refused(tmp_path):
    kit = Kit(tmp_path, "ich10")
    lease = kit.manager.request(USER, "group:8", "vfio", {"duration": 60})
    for asked in (HUGE, MAX_LEASE_SECONDS + 1):
        with pytest.raises(InvalidArgument, match="at most"):
            kit.manager.renew(lease.id, USER, asked)
    assert kit.journal.lease(lease.id).expires == lease.expires
    kit.manager.release(lease.id, USER)


def test_lease_times_always_marshal():
    """A journal row written before the ceiling (an expiry past 2**64) still shows."""
    from dbus_next import Message, Variant

    from vfiod.daemon.interfaces import LeaseInterface
    from vfiod.state import LeaseRow

    row = LeaseRow(id="a" * 16, group=8, uid=1000, owner=None, backend="vfio", target="group:8",
                   created=1.0, expires=float(HUGE) * 4, persistent=False, state="granted", rule=None,
                   memlock=None)
    iface = LeaseInterface(None, row)  # type: ignore[arg-type]
    body = {"Expires": Variant("t", iface.Expires), "Created": Variant("t", iface.Created)}
    Message.new_method_return(Message(path="/", member="x", serial=1), "a{sv}", [body])._marshall(False)


POLICY_NO_CAP = """
[[rule]]
group = [8]
users = ["{user}"]
backends = ["vfio"]
"""

CLIENT = r'''
import asyncio, os
from dbus_next import Message, Variant, MessageType
from dbus_next.aio import MessageBus

async def main():
    bus = await MessageBus(bus_address=os.environ["VFIOD_BUS"]).connect()
    for member, sig, body in (("RequestLease", "ssa{sv}", ["group:8", "vfio", {"duration": Variant("t", 2**64 - 1)}]),):
        r = await bus.call(Message(destination="org.vfiod1", path="/org/vfiod1", interface="org.vfiod1.Manager",
                                   member=member, signature=sig, body=body))
        print(r.message_type.name, r.error_name)
asyncio.run(main())
'''


@pytest.mark.bus
def test_object_manager_works_after_a_huge_request(make_world):
    w = make_world(policy=POLICY_NO_CAP)
    p = w.python(CLIENT)
    assert p.returncode == 0, p.stderr
    assert "ERROR org.vfiod1.Error.InvalidArgument" in p.stdout
    assert w.ctl("groups", user=None).returncode == 0
    assert "Traceback" not in w.read_log()
