"""Reset on release: the policy asks, the lease remembers, release resets each
endpoint after the lessee lets go and before the host driver sees it again."""

import logging
import os
import sqlite3

import pytest

from vfiod.address import PciAddress
from vfiod.policy import Policy
from vfiod.sim.kernel import Fault
from vfiod.state import Journal

from .leasekit import Caller, Kit

A = PciAddress.parse
USER = Caller(1000)
NICS = [A("0000:04:00.0"), A("0000:05:00.0")]          # ICH10 group 8


def kit_with(tmp_path, grant: str) -> Kit:
    pdir = tmp_path / "policy"
    pdir.mkdir()
    (pdir / "10.toml").write_text(f'[[rule]]\ngroup = [8]\nuids = [1000]\nbackends = ["vfio", "pci-stub"]\n{grant}\n')
    kit = Kit(tmp_path, "ich10")
    policy = Policy.load(str(pdir))
    kit.manager.policy_source = lambda: policy
    return kit


@pytest.mark.parametrize("backend", ["vfio", "pci-stub"])
def test_each_endpoint_is_reset_on_its_lessees_driver_before_it_goes_back(tmp_path, backend):
    kit = kit_with(tmp_path, "reset_on_release = true")
    before = kit.snapshot()
    lease = kit.manager.request(USER, "group:8", backend, {})
    assert lease.reset and kit.journal.lease(lease.id).reset
    drivers_at_reset = {}
    kit.kernel.after_write = lambda rel, data: (
        drivers_at_reset.setdefault(rel.split("/")[3], kit.kernel.driver_of(A(rel.split("/")[3])))
        if rel.endswith("/reset") else None)
    kit.kernel.writes.clear()
    kit.manager.release(lease.id, USER)
    assert kit.kernel.resets == NICS
    # still on the lessee's driver when reset: no host driver has touched it yet
    assert drivers_at_reset == {str(a): {"vfio": "vfio-pci", "pci-stub": "pci-stub"}[backend] for a in NICS}
    paths = [rel for rel, _ in kit.kernel.writes]
    last_reset = max(i for i, p in enumerate(paths) if p.endswith("/reset"))
    first_restore = min(i for i, p in enumerate(paths) if not p.endswith("/reset"))
    assert last_reset < first_restore, paths
    assert kit.snapshot() == before


def test_no_reset_unless_the_policy_asks(tmp_path):
    kit = kit_with(tmp_path, "")
    lease = kit.manager.request(USER, "group:8", "vfio", {})
    assert not lease.reset
    kit.manager.release(lease.id, USER)
    assert kit.kernel.resets == []
    assert not [rel for rel, _ in kit.kernel.writes if rel.endswith("/reset")]


def test_a_failed_reset_is_reported_and_the_device_still_goes_back(tmp_path, caplog):
    kit = kit_with(tmp_path, "reset_on_release = true")
    before = kit.snapshot()
    lease = kit.manager.request(USER, "group:8", "vfio", {})
    kit.kernel.inject("reset", NICS[0], Fault("error"))
    with caplog.at_level(logging.WARNING):
        kit.manager.release(lease.id, USER)
    assert kit.kernel.resets == [NICS[1]]
    assert kit.snapshot() == before and kit.journal.leases() == []
    assert f"{NICS[0]} was not reset" in caplog.text and "Input/output error" in caplog.text
    rows = kit.journal.db.execute("SELECT event, target, outcome FROM audit WHERE event='reset'").fetchall()
    assert rows == [("reset", str(NICS[0]), "failed")]


def test_a_device_the_kernel_cannot_reset_is_named_and_given_back(tmp_path, caplog):
    kit = kit_with(tmp_path, "reset_on_release = true")
    before = kit.snapshot()
    lease = kit.manager.request(USER, "group:8", "vfio", {})
    with open(os.path.join(kit.roots.sysfs, "bus/pci/devices", NICS[1].sysfs_name, "reset_method"), "w") as f:
        f.write("\n")            # the kernel offers no method for it
    with caplog.at_level(logging.WARNING):
        kit.manager.release(lease.id, USER)
    assert kit.kernel.resets == [NICS[0]]
    assert "knows no way to reset it" in caplog.text
    assert kit.snapshot()[1] == before[1]
    assert kit.kernel.state() == before[0]


def test_a_version_1_state_file_is_upgraded_and_keeps_its_leases(tmp_path):
    path = str(tmp_path / "state.db")
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE leases(
            id TEXT PRIMARY KEY, grp INTEGER NOT NULL UNIQUE, uid INTEGER NOT NULL, owner TEXT,
            backend TEXT NOT NULL, target TEXT NOT NULL, created REAL NOT NULL, expires REAL NOT NULL,
            persistent INTEGER NOT NULL, state TEXT NOT NULL, rule TEXT, memlock INTEGER);
        CREATE TABLE held(lease TEXT NOT NULL, pos INTEGER NOT NULL, addr TEXT NOT NULL, driver TEXT,
            override TEXT, role TEXT NOT NULL DEFAULT 'endpoint', PRIMARY KEY(lease, pos));
        CREATE TABLE steps(lease TEXT NOT NULL, seq INTEGER NOT NULL, action TEXT NOT NULL, addr TEXT,
            record TEXT, status TEXT NOT NULL, error TEXT, PRIMARY KEY(lease, seq));
        CREATE TABLE audit(ts REAL NOT NULL, event TEXT NOT NULL, uid INTEGER, target TEXT, lease TEXT,
            rule TEXT, outcome TEXT, detail TEXT);
        INSERT INTO meta VALUES('schema', '1');
        INSERT INTO leases VALUES('abc', 8, 1000, NULL, 'vfio', 'group:8', 1.0, 0, 1, 'granted', 'r:1', NULL);
        INSERT INTO held VALUES('abc', 0, '0000:04:00.0', 'e1000e', NULL, 'endpoint');
    """)
    db.commit()
    db.close()
    j = Journal(path)
    (lease,) = j.leases()
    assert (lease.id, lease.group, lease.persistent, lease.reset) == ("abc", 8, True, False)
    assert [h.addr for h in j.held("abc")] == ["0000:04:00.0"]
    assert j.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("8",)
    assert (lease.state, lease.revoke_reason, lease.grace, lease.on_revoke, lease.cap) == ("granted", None, 30, "kill", 0)
    j.close()


def test_sd_notify_to_a_manager_that_went_away_does_not_fail(tmp_path, monkeypatch):
    import socket
    from vfiod.daemon import sd_notify
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.close()                          # the file stays, nobody listens
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sd_notify("STOPPING=1") is False
