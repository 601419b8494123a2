"""A bad row in the journal is set aside; the daemon starts and serves the rest.

Before, one unusable row (an address that does not parse, a missing table)
stopped vfiod's start: a crash loop under ``Restart=on-failure``.  Now the
lease it belongs to is moved whole to the ``quarantine`` table and logged
once, and every other lease is reconciled and served as usual."""

import logging
import sqlite3

import pytest

from vfiod.leases import LeaseManager
from vfiod.backends import load_backends
from vfiod.state import Journal

from tests.sim.leasekit import Caller, Kit


def two_leases(tmp_path):
    kit = Kit(tmp_path, "ich10")
    good = kit.manager.request(Caller(1000), "group:8", "vfio", {"persistent": True})
    other = [g for g in sorted(kit.manager.scan().groups) if g != 8 and kit.manager.scan().endpoints(
        kit.manager.scan().groups[g]) and not kit.kernel.usage(kit.manager.scan().endpoints(
            kit.manager.scan().groups[g])[0].addr)][0]
    bad = kit.manager.request(Caller(1001), f"group:{other}", "vfio", {"persistent": True})
    kit.journal.close()
    return kit, good, bad


def reopen(kit, caplog):
    with caplog.at_level(logging.ERROR, logger="vfiod.state"):
        journal = Journal(kit.state_path)
    manager = LeaseManager(kit.kernel, journal, lambda: kit.policy, load_backends())
    manager.reconcile()
    return journal


@pytest.mark.parametrize("damage", [
    "UPDATE held SET addr='../../../etc' WHERE lease=?",
    "UPDATE leases SET grp='eight' WHERE id=?",
    "UPDATE steps SET record='{not json' WHERE lease=?",
    "UPDATE leases SET id='a/b' WHERE id=?",
])
def test_a_bad_row_is_quarantined_and_the_rest_served(tmp_path, caplog, damage):
    kit, good, bad = two_leases(tmp_path)
    db = sqlite3.connect(kit.state_path)
    db.execute(damage, (bad.id,))
    db.commit()
    db.close()
    journal = reopen(kit, caplog)
    assert [lease.id for lease in journal.leases()] == [good.id]
    assert journal.quarantine_rows()
    assert any("quarantine" in r.getMessage() for r in caplog.records)
    # once: opening it again finds nothing more to set aside
    caplog.clear()
    journal.close()
    journal = reopen(kit, caplog)
    assert not [r for r in caplog.records if "quarantine" in r.getMessage()]
    assert [lease.id for lease in journal.leases()] == [good.id]


def test_a_missing_table_is_recreated(tmp_path, caplog):
    kit, good, bad = two_leases(tmp_path)
    db = sqlite3.connect(kit.state_path)
    db.execute("DROP TABLE steps")
    db.execute("DROP TABLE audit")
    db.commit()
    db.close()
    journal = reopen(kit, caplog)
    assert {lease.id for lease in journal.leases()} == {good.id, bad.id}
    assert any("table audit was missing" in r.getMessage() for r in caplog.records)


def test_a_lease_without_device_records_is_quarantined(tmp_path, caplog):
    kit, good, bad = two_leases(tmp_path)
    db = sqlite3.connect(kit.state_path)
    db.execute("DROP TABLE held")
    db.commit()
    db.close()
    journal = reopen(kit, caplog)
    assert journal.leases() == []
    assert len({r[1] for r in journal.quarantine_rows()}) == 2
