"""A policy reload applies its max_duration to the leases already granted (vfiod.leases.caps):
the cap is recomputed from the grant time, a lease past it goes through the revoke
ladder as expired (its holder ended after the grace), and Renew obeys the new cap."""

import signal
import time

import pytest

from vfiod.leases.caps import apply_caps
from vfiod.errors import PermissionDenied
from vfiod.policy import Caller

from .test_revoke import LESSEE, NIC, hold, kit, policy, turn  # noqa: F401  (kit: the fixture)

USER = Caller(LESSEE)


def test_a_reload_lowering_max_duration_ends_an_over_cap_lease_through_the_ladder(kit):
    kit.policy = policy(grace="1s", max_duration="8h")
    t0 = time.time()
    kit.manager.clock = lambda: t0
    lease = kit.manager.request(USER, str(NIC), "vfio", {})
    assert lease.cap == pytest.approx(t0 + 8 * 3600)
    p, _ = hold(kit, lease, mode="stubborn")
    # Two hours later the admin lowers the cap to one hour.
    kit.manager.clock = lambda: time.time() + 7200
    kit.policy = policy(grace="1s", max_duration="1h")
    got = apply_caps(kit.manager, kit.policy)
    assert [g.lease.id for g in got] == [lease.id]
    row = kit.journal.lease(lease.id)
    assert row.state == "revoking" and row.revoke_reason == "expired"
    assert row.cap == pytest.approx(t0 + 3600)
    ended = turn(kit, lease.id)
    assert ended.reason == "expired"
    assert p.wait(5) == -signal.SIGKILL                   # the ladder: grace, SIGTERM (ignored), SIGKILL
    assert kit.kernel.driver_of(NIC) == "e1000e"
    assert ("bus/pci/drivers/vfio-pci/unbind", str(NIC)) in [(w[0], w[1].strip()) for w in kit.kernel.writes]
    outcomes = [(r[0], r[5]) for r in kit.journal.audit_rows() if r[3] == lease.id]
    assert ("reload", "capped") in outcomes and ("release", "expired") in outcomes


def test_a_reload_adding_max_duration_caps_a_lease_and_renew_obeys_it(kit):
    kit.policy = policy()                                 # no cap at the grant
    t0 = time.time()
    kit.manager.clock = lambda: t0
    lease = kit.manager.request(USER, str(NIC), "vfio", {})
    assert lease.cap == 0 and lease.expires == 0
    kit.manager.renew(lease.id, USER, 10 * 3600)          # allowed before the reload
    kit.manager.clock = lambda: t0 + 600
    kit.policy = policy(max_duration="1h")
    assert apply_caps(kit.manager, kit.policy) == []      # within its new cap: it stays
    row = kit.journal.lease(lease.id)
    assert row.state == "granted" and row.cap == pytest.approx(t0 + 3600)
    assert row.expires == pytest.approx(t0 + 3600)        # the later expiry moved to the cap
    with pytest.raises(PermissionDenied, match="caps lease"):
        kit.manager.renew(lease.id, USER, 3600)
    kit.manager.renew(lease.id, USER, 3000)               # up to the cap is fine
    assert kit.kernel.driver_of(NIC) == "vfio-pci"


def test_a_reload_never_moves_a_cap_later(kit):
    kit.policy = policy(max_duration="1h")
    lease = kit.manager.request(USER, str(NIC), "vfio", {})
    kit.policy = policy(max_duration="8h")
    assert apply_caps(kit.manager, kit.policy) == []
    assert kit.journal.lease(lease.id).cap == pytest.approx(lease.cap)
    assert not [r for r in kit.journal.audit_rows() if r[5] == "capped"]
