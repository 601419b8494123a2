"""Repeated refusals are counted on one audit row, and the audit table is bounded.

Before, every refused call was its own fsync'd audit row and log line: 2,000
denied calls grew the journal from 49 KB to 4.5 MB in 7 s, without end.  Now
the same refusal (event, uid, target, outcome) within `AUDIT_WINDOW` adds to
its first row's count, and past `MAX_AUDIT_ROWS` rows the oldest refusals are
rotated out first; grants and releases are kept."""

import os

import pytest

from vfiod import state
from vfiod.errors import InvalidAddress, PermissionDenied

from tests.sim.leasekit import Caller, Kit


def test_the_same_denial_is_one_row_with_a_count(tmp_path):
    kit = Kit(tmp_path, "ich10")
    kit.deny(1000)
    for _ in range(300):
        with pytest.raises(PermissionDenied):
            kit.manager.request(Caller(1000), "group:8", "vfio", {})
    lease = kit.manager.request(Caller(1001), "group:8", "vfio", {})
    kit.manager.release(lease.id, Caller(1001))
    rows = kit.journal.audit_counts()
    denials = [r for r in rows if r[3] == "denied"]
    assert denials == [("request", 1000, "group:8", "denied", 300)]
    assert [r[3] for r in rows if r[1] == 1001] == ["granted", "released"]


def test_the_audit_table_is_bounded_and_keeps_grants(tmp_path, monkeypatch):
    monkeypatch.setattr(state, "MAX_AUDIT_ROWS", 50)
    kit = Kit(tmp_path, "ich10")
    lease = kit.manager.request(Caller(1001), "group:8", "vfio", {})
    kit.manager.release(lease.id, Caller(1001))
    size = os.path.getsize(kit.state_path)
    for i in range(400):        # a different target each time: nothing to count together
        with pytest.raises(InvalidAddress):
            kit.manager.request(Caller(1000), f"junk/{i}", "vfio", {})   # no target (nor interface name)
    rows = kit.journal.audit_counts()
    assert len(rows) <= 50 + 100
    assert [r[3] for r in rows if r[1] == 1001] == ["granted", "released"]
    assert os.path.getsize(kit.state_path) < size + 200_000
