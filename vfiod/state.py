"""The journal: one SQLite file that lets vfiod survive its own crash.

File: ``STATE_DIR/state.db`` (WAL, ``synchronous=FULL``: a committed row is on
disk before the sysfs write it announces).  Schema version 2:

``meta(key, value)``
    ``schema`` = 2.  A file with a higher number is from a newer vfiod and is
    refused, untouched; a version 1 file is upgraded in place (version 2 added
    ``leases.reset``).
``leases(id, grp, uid, owner, backend, target, created, expires, persistent, state, rule, memlock, reset)``
    one row per lease; ``grp`` is UNIQUE (one lease per group).  ``state`` is
    ``granting`` (devices are being moved; a crash here rolls back),
    ``granted`` (handed over), or ``releasing`` (being returned; a crash here
    finishes the return).  ``owner`` is the bus name of the lessee.
    ``reset`` is 1 when the policy asks for a function reset of each endpoint
    before it goes back to its host driver.
``held(lease, pos, addr, driver, override, role)``
    each device's original driver and driver_override, written before the
    first sysfs write of the lease: the truth a release restores.  ``role``
    is ``endpoint`` (bound to the backend's driver) or ``bridge`` (a bridge
    of the group on a driver VFIO refuses, such as shpchp: held unbound).
``steps(lease, seq, action, addr, record, status, error)``
    the numbered steps of a grant or release: ``intent`` is committed before
    the write, ``done`` after it; an uncommitted step counts as failed.
    ``record`` (JSON) holds what the step needs to be undone, e.g. the
    original owner and mode of /dev/vfio/N.
``audit(ts, event, uid, target, lease, rule, outcome, detail)``
    every grant, denial, release and rollback.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from types import TracebackType
from typing import Any, Literal, Mapping

import attrs

from .errors import StateError

SCHEMA = 2

# A backend's hand-over record: a JSON object whose keys the backend defines.
Record = Mapping[str, object]

_DDL = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leases(
    id TEXT PRIMARY KEY, grp INTEGER NOT NULL UNIQUE, uid INTEGER NOT NULL, owner TEXT,
    backend TEXT NOT NULL, target TEXT NOT NULL, created REAL NOT NULL, expires REAL NOT NULL,
    persistent INTEGER NOT NULL, state TEXT NOT NULL, rule TEXT, memlock INTEGER,
    reset INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS held(
    lease TEXT NOT NULL, pos INTEGER NOT NULL, addr TEXT NOT NULL, driver TEXT, override TEXT,
    role TEXT NOT NULL DEFAULT 'endpoint', PRIMARY KEY(lease, pos));
CREATE TABLE IF NOT EXISTS steps(
    lease TEXT NOT NULL, seq INTEGER NOT NULL, action TEXT NOT NULL, addr TEXT, record TEXT,
    status TEXT NOT NULL, error TEXT, PRIMARY KEY(lease, seq));
CREATE TABLE IF NOT EXISTS audit(
    ts REAL NOT NULL, event TEXT NOT NULL, uid INTEGER, target TEXT, lease TEXT, rule TEXT,
    outcome TEXT, detail TEXT);
"""


@attrs.frozen
class LeaseRow:
    id: str
    group: int
    uid: int
    owner: str | None
    backend: str
    target: str
    created: float
    expires: float          # 0: none
    persistent: bool
    state: str
    rule: str | None
    memlock: int | None
    reset: bool = False     # reset each endpoint before it goes back to the host

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> "LeaseRow":
        """From a ``SELECT * FROM leases`` row (sqlite3 gives its values untyped)."""
        return cls(id=row[0], group=row[1], uid=row[2], owner=row[3], backend=row[4], target=row[5],
                   created=row[6], expires=row[7], persistent=bool(row[8]), state=row[9],
                   rule=row[10], memlock=row[11], reset=bool(row[12]))


@attrs.frozen
class Held:
    """What a device was before the lease: its original driver and override."""

    addr: str
    driver: str | None
    override: str | None
    role: str = "endpoint"


@attrs.frozen
class Step:
    seq: int
    action: str
    addr: str | None
    record: Record
    status: str
    error: str | None


class Journal:
    def __init__(self, path: str):
        self.path = path
        self._lock = threading.RLock()
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, mode=0o700, exist_ok=True)
        existed = os.path.exists(path)
        if existed:
            self._check_header(path)
        try:
            self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            version = None
            if existed:
                try:
                    row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
                    version = int(row[0]) if row else None
                except sqlite3.DatabaseError as e:
                    raise StateError(f"state file {path} is not a vfiod journal ({e}); "
                                     "it was left untouched") from None
                if version is None:
                    raise StateError(f"state file {path} has no schema version; it was left untouched")
                if version > SCHEMA:
                    raise StateError(f"state file {path} is from a newer vfiod (schema {version}, "
                                     f"this one knows {SCHEMA}); it was left untouched")
                if version == 1:
                    with self.tx():
                        self.db.execute("ALTER TABLE leases ADD COLUMN reset INTEGER NOT NULL DEFAULT 0")
                        self.db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA),))
            else:
                with self.tx():
                    for stmt in _DDL.strip().split(";"):
                        if stmt.strip():
                            self.db.execute(stmt)
                    self.db.execute("INSERT INTO meta VALUES('schema', ?)", (str(SCHEMA),))
        except sqlite3.DatabaseError as e:
            raise StateError(f"state file {path} cannot be used: {e}; it was left untouched") from None
        try:
            os.chmod(path, 0o600)
        except OSError:
            pass

    @staticmethod
    def _check_header(path: str) -> None:
        with open(path, "rb") as f:
            head = f.read(16)
        if head and head != b"SQLite format 3\x00":
            raise StateError(f"state file {path} is corrupt (not an SQLite database); "
                             "it was left untouched")

    def tx(self) -> _Tx:
        """``with journal.tx():`` one transaction, committed unless the block raises."""
        return _Tx(self)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # ---- leases

    def create(self, lease: LeaseRow, held: list[Held]) -> None:
        with self.tx():
            self.db.execute("INSERT INTO leases VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)", (
                lease.id, lease.group, lease.uid, lease.owner, lease.backend, lease.target,
                lease.created, lease.expires, int(lease.persistent), lease.state, lease.rule,
                lease.memlock, int(lease.reset)))
            self.db.executemany("INSERT INTO held VALUES(?,?,?,?,?,?)", [
                (lease.id, i, h.addr, h.driver, h.override, h.role) for i, h in enumerate(held)])

    def set_state(self, lease_id: str, state: str) -> None:
        with self.tx():
            self.db.execute("UPDATE leases SET state=? WHERE id=?", (state, lease_id))

    def set_expires(self, lease_id: str, expires: float) -> None:
        with self.tx():
            self.db.execute("UPDATE leases SET expires=? WHERE id=?", (expires, lease_id))

    def set_owner(self, lease_id: str, owner: str | None) -> None:
        with self.tx():
            self.db.execute("UPDATE leases SET owner=? WHERE id=?", (owner, lease_id))

    def delete(self, lease_id: str) -> None:
        with self.tx():
            for table, col in (("steps", "lease"), ("held", "lease"), ("leases", "id")):
                self.db.execute(f"DELETE FROM {table} WHERE {col}=?", (lease_id,))

    def leases(self) -> list[LeaseRow]:
        with self._lock:
            rows = self.db.execute("SELECT * FROM leases ORDER BY created, id").fetchall()
        return [LeaseRow.from_row(r) for r in rows]

    def lease(self, lease_id: str) -> LeaseRow | None:
        with self._lock:
            row = self.db.execute("SELECT * FROM leases WHERE id=?", (lease_id,)).fetchone()
        return LeaseRow.from_row(row) if row else None

    def lease_for_group(self, group: int) -> LeaseRow | None:
        with self._lock:
            row = self.db.execute("SELECT * FROM leases WHERE grp=?", (group,)).fetchone()
        return LeaseRow.from_row(row) if row else None

    def held(self, lease_id: str) -> list[Held]:
        with self._lock:
            rows = self.db.execute("SELECT addr, driver, override, role FROM held WHERE lease=? ORDER BY pos",
                                   (lease_id,)).fetchall()
        return [Held(*r) for r in rows]

    def holdings(self) -> dict[str, tuple[LeaseRow, Held]]:
        """Every device some lease holds: its address -> (the lease, what it was before)."""
        return {h.addr: (lease, h) for lease in self.leases() for h in self.held(lease.id)}

    # ---- steps

    def intent(self, lease_id: str, action: str, addr: str | None, record: Record | None = None) -> int:
        with self.tx():
            row = self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM steps WHERE lease=?",
                                  (lease_id,)).fetchone()
            seq: int = row[0]
            self.db.execute("INSERT INTO steps VALUES(?,?,?,?,?,?,NULL)",
                            (lease_id, seq, action, addr, json.dumps(record or {}), "intent"))
        return seq

    def done(self, lease_id: str, seq: int, record: Record | None = None) -> None:
        with self.tx():
            if record is None:
                self.db.execute("UPDATE steps SET status='done' WHERE lease=? AND seq=?", (lease_id, seq))
            else:
                self.db.execute("UPDATE steps SET status='done', record=? WHERE lease=? AND seq=?",
                                (json.dumps(record), lease_id, seq))

    def failed(self, lease_id: str, seq: int, error: str) -> None:
        with self.tx():
            self.db.execute("UPDATE steps SET status='failed', error=? WHERE lease=? AND seq=?",
                            (error, lease_id, seq))

    def steps(self, lease_id: str) -> list[Step]:
        with self._lock:
            rows = self.db.execute("SELECT seq, action, addr, record, status, error FROM steps "
                                   "WHERE lease=? ORDER BY seq", (lease_id,)).fetchall()
        return [Step(r[0], r[1], r[2], json.loads(r[3] or "{}"), r[4], r[5]) for r in rows]

    # ---- audit

    def audit(self, event: str, uid: int | None, target: str | None, lease: str | None,
              rule: str | None, outcome: str, detail: str = "") -> None:
        with self.tx():
            self.db.execute("INSERT INTO audit VALUES(?,?,?,?,?,?,?,?)",
                            (time.time(), event, uid, target, lease, rule, outcome, detail))

    def audit_rows(self) -> list[tuple[Any, ...]]:
        """(event, uid, target, lease, rule, outcome, detail) of every audit record, oldest first."""
        with self._lock:
            rows: list[tuple[Any, ...]] = self.db.execute(
                "SELECT event, uid, target, lease, rule, outcome, detail FROM audit ORDER BY rowid").fetchall()
        return rows


class _Tx:
    """One journal transaction under the journal's lock (see `Journal.tx`)."""

    def __init__(self, journal: Journal):
        self.journal = journal

    def __enter__(self) -> None:
        self.journal._lock.acquire()
        self.journal.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        try:
            self.journal.db.execute("COMMIT" if et is None else "ROLLBACK")
        finally:
            self.journal._lock.release()
        return False
