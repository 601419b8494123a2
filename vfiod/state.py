"""The journal: one SQLite file that lets vfiod survive its own crash.

File: ``STATE_DIR/state.db`` (WAL, ``synchronous=FULL``: a committed row is on
disk before the sysfs write it announces).  Schema version 8:

``meta(key, value)``
    ``schema`` = 8.  A file with a higher number is from a newer vfiod and is
    refused, untouched; an older file is upgraded in place (version 2 added
    ``leases.reset``, version 3 ``audit.count``, ``audit.last`` and ``quarantine``,
    version 4 the revoke columns of ``leases``, version 5 ``leases.k8s_namespace``,
    version 6 ``identity`` and ``membership``, version 7 ``leases.member``, version 8 ``mdevs``).
    A table or column that is missing is recreated empty (and logged).
    ``host`` names the host the journal describes (`vfiod.statedir`): a journal of
    another host is refused, untouched.  ``boot_id`` is the kernel's boot id when
    the daemon last reconciled the journal with the kernel (`vfiod.leases.identity`).
``leases(id, grp, uid, owner, backend, target, created, expires, persistent, state, rule, memlock, reset,
revoke_reason, deadline, grace, on_revoke, revoke_others, cap, scope, k8s_namespace, member)``
    one row per lease; ``grp`` is UNIQUE (one lease per group).  ``state`` is
    ``granting`` (devices are being moved; a crash here rolls back),
    ``granted`` (handed over), ``revoking`` (taken back from holders that may
    not let go: the revoke ladder, which a restart resumes), or ``releasing``
    (being returned; a crash here finishes the return).  ``owner`` is the bus
    name of the lessee.  ``reset`` is 1 when the policy asks for a function
    reset of each endpoint before it goes back to its host driver.
    ``revoke_reason`` and ``deadline`` are set when the ladder starts (why,
    and when the grace ends); ``grace``, ``on_revoke`` and ``revoke_others``
    are the policy's revoke terms at the grant; ``cap`` is when the rule's
    ``max_duration`` ends the lease whatever its renewals (0: no cap);
    ``scope`` the transient systemd scope of the lessee's command, if any;
    ``k8s_namespace`` the Kubernetes namespace a delegate leased it for (NULL: none),
    so that a renewal or a policy reload judges it as it was granted; ``member`` the pool
    member a ``pool:NAME`` lease took (``name:RES`` or an address; NULL for other targets).
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
``audit(ts, event, uid, target, lease, rule, outcome, detail, count, last)``
    every grant, denial, release and rollback.  Refusals (`AGGREGATED`
    outcomes) of the same event, uid, target and outcome within
    `AUDIT_WINDOW` seconds of the row's first one add to its ``count`` and
    move ``last`` instead of adding a row.  The table keeps at most
    `MAX_AUDIT_ROWS` rows: past that the oldest refusals go first, and other
    records (grants, releases, rollbacks) only when no refusal is left.
``grants(lease, pid, start, soft, hard)``
    the memlock grant of a lease: the process it went to (pid and start time)
    and its RLIMIT_MEMLOCK before the first grant to that process, restored
    when the last lease granted to it ends.
``identity(lease, addr, data)``
    what identified each held device when it was leased (JSON: ids, subsystem
    ids, class, Device Serial Number): at start and when a device is added, a
    device that is not the one recorded ends the lease and is left alone
    (`vfiod.leases.identity`).  A lease from before version 6 has no rows here.
``membership(lease, grp, members)``
    the addresses the kernel listed in the lease's IOMMU group at the grant (JSON).
``mdevs(lease, uuid, parent, type, boot)``
    the mediated device instance a lease of ``mdev:PARENT/TYPE`` creates: its UUID
    (chosen by vfiod) and type, and the kernel's boot id, committed *before* the
    write to ``create``, and before the lease's own row (whose group is the one the
    kernel gives the instance).  A row whose lease has no row is a grant cut short:
    at start the instance of that UUID, if the kernel shows it with that type in
    this boot and mdevctl does not define it, is removed, and the row goes.  A
    lease with a row here holds no PCI device (``held`` has none).
``quarantine(ts, tbl, lease, data, why)``
    rows found unusable when the journal is opened (an address that does not
    parse, a value of the wrong type, a lease whose device records are gone),
    moved here whole (``data``: the row as JSON) and logged once, so that
    the daemon serves the rest; an admin reads them with ``sqlite3``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
import time
from typing import Any, Mapping

import attrs

from .address import PciAddress
from .errors import StateError
from .quarantine import quarantine_bad_rows
from .statedir import describe_host
from .terms import LeaseTerms
from .txn import Tx

SCHEMA = 8

log = logging.getLogger("vfiod.state")

#: Audit outcomes that are refusals: repeated ones are counted on one row.
AGGREGATED = frozenset({"denied", "refused", "busy"})
#: Seconds during which a repeated refusal adds to its first row's count.
AUDIT_WINDOW = 600.0
#: The most audit rows kept (the oldest refusals go first).
MAX_AUDIT_ROWS = 20_000

# A backend's hand-over record: a JSON object whose keys the backend defines.
Record = Mapping[str, object]

_DDL = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leases(
    id TEXT PRIMARY KEY, grp INTEGER NOT NULL UNIQUE, uid INTEGER NOT NULL, owner TEXT,
    backend TEXT NOT NULL, target TEXT NOT NULL, created REAL NOT NULL, expires REAL NOT NULL,
    persistent INTEGER NOT NULL, state TEXT NOT NULL, rule TEXT, memlock INTEGER,
    reset INTEGER NOT NULL DEFAULT 0, revoke_reason TEXT, deadline REAL NOT NULL DEFAULT 0,
    grace REAL NOT NULL DEFAULT 30, on_revoke TEXT NOT NULL DEFAULT 'kill',
    revoke_others INTEGER NOT NULL DEFAULT 0, cap REAL NOT NULL DEFAULT 0, scope TEXT, k8s_namespace TEXT,
    member TEXT);
CREATE TABLE IF NOT EXISTS held(
    lease TEXT NOT NULL, pos INTEGER NOT NULL, addr TEXT NOT NULL, driver TEXT, override TEXT,
    role TEXT NOT NULL DEFAULT 'endpoint', PRIMARY KEY(lease, pos));
CREATE TABLE IF NOT EXISTS steps(
    lease TEXT NOT NULL, seq INTEGER NOT NULL, action TEXT NOT NULL, addr TEXT, record TEXT,
    status TEXT NOT NULL, error TEXT, PRIMARY KEY(lease, seq));
CREATE TABLE IF NOT EXISTS audit(
    ts REAL NOT NULL, event TEXT NOT NULL, uid INTEGER, target TEXT, lease TEXT, rule TEXT,
    outcome TEXT, detail TEXT, count INTEGER NOT NULL DEFAULT 1, last REAL);
CREATE TABLE IF NOT EXISTS quarantine(
    ts REAL NOT NULL, tbl TEXT NOT NULL, lease TEXT, data TEXT NOT NULL, why TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS identity(
    lease TEXT NOT NULL, addr TEXT NOT NULL, data TEXT NOT NULL, PRIMARY KEY(lease, addr));
CREATE TABLE IF NOT EXISTS membership(lease TEXT PRIMARY KEY, grp INTEGER NOT NULL, members TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS mdevs(
    lease TEXT PRIMARY KEY, uuid TEXT NOT NULL UNIQUE, parent TEXT NOT NULL, type TEXT NOT NULL, boot TEXT);
CREATE TABLE IF NOT EXISTS grants(
    lease TEXT PRIMARY KEY, pid INTEGER NOT NULL, start INTEGER NOT NULL, soft INTEGER NOT NULL,
    hard INTEGER NOT NULL);
"""

# Columns added after version 1, created where a file lacks them: (table, column, definition).
_ADDED_COLUMNS = (("leases", "reset", "INTEGER NOT NULL DEFAULT 0"),
                  ("audit", "count", "INTEGER NOT NULL DEFAULT 1"),
                  ("audit", "last", "REAL"),
                  ("leases", "revoke_reason", "TEXT"), ("leases", "deadline", "REAL NOT NULL DEFAULT 0"),
                  ("leases", "grace", "REAL NOT NULL DEFAULT 30"),
                  ("leases", "on_revoke", "TEXT NOT NULL DEFAULT 'kill'"),
                  ("leases", "revoke_others", "INTEGER NOT NULL DEFAULT 0"),
                  ("leases", "cap", "REAL NOT NULL DEFAULT 0"), ("leases", "scope", "TEXT"),
                  ("leases", "k8s_namespace", "TEXT"), ("leases", "member", "TEXT"))
_TABLES = ("meta", "leases", "held", "steps", "audit", "quarantine", "grants", "identity", "membership", "mdevs")
_NEW_IN = {"quarantine": 3, "grants": 3, "identity": 6, "membership": 6, "mdevs": 8}   # added after version 1


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
    revoke_reason: str | None = None   # why the revoke ladder runs (None: it does not)
    deadline: float = 0.0              # when the ladder's grace ends
    grace: float = 30.0                # the policy's revoke terms, recorded at the grant
    on_revoke: str = "kill"
    revoke_others: bool = False
    cap: float = 0.0                   # the rule's max_duration ends the lease here (0: no cap)
    scope: str | None = None           # the transient scope of the lessee's command
    k8s_namespace: str | None = None   # the Kubernetes namespace a delegate leased it for
    member: str | None = None          # the member a pool:NAME lease took (its own target)

    @property
    def terms(self) -> LeaseTerms:
        """The request's terms a renewal or a policy reload judges the lease by again."""
        return LeaseTerms(persistent=self.persistent, k8s_namespace=self.k8s_namespace)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "LeaseRow":
        """From a row of ``leases`` by column name (sqlite3 gives its values untyped)."""
        return cls(id=row["id"], group=row["grp"], uid=row["uid"], owner=row["owner"], backend=row["backend"],
                   target=row["target"], created=row["created"], expires=row["expires"],
                   persistent=bool(row["persistent"]), state=row["state"], rule=row["rule"], memlock=row["memlock"],
                   reset=bool(row["reset"]), revoke_reason=row["revoke_reason"], deadline=row["deadline"],
                   grace=row["grace"], on_revoke=row["on_revoke"], revoke_others=bool(row["revoke_others"]),
                   cap=row["cap"], scope=row["scope"], k8s_namespace=row["k8s_namespace"],
                   member=row["member"])


@attrs.frozen
class HeldDevice:
    """What a device was before the lease: its original driver and override."""

    addr: str
    driver: str | None
    override: str | None
    role: str = "endpoint"

    @property
    def address(self) -> PciAddress:
        """`addr` as the `PciAddress` it is (the journal checked it parses when it was opened)."""
        return PciAddress.parse(self.addr)


@attrs.frozen
class HeldMdev:
    """The instance an mdev lease creates, as journaled before the write to ``create``."""

    lease: str
    uuid: str
    parent: str
    type: str
    boot: str | None        # the kernel's boot id when it was created (None: unknown)

    @property
    def kind(self) -> str:
        return f"{self.parent}/{self.type}"


@attrs.frozen
class Step:
    seq: int
    action: str
    addr: str | None
    record: Record
    status: str
    error: str | None


class Journal:
    def __init__(self, path: str, host: str | None = None):
        """Open (or create) the journal at `path`.  With `host` (see `vfiod.statedir`), a
        journal recorded for another host is refused untouched, and one that names no
        host yet is recorded as this host's."""
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
                if host is not None:
                    self._check_host(host)
                self._repair_schema(version)
            else:
                with self.tx():
                    for stmt in _DDL.strip().split(";"):
                        if stmt.strip():
                            self.db.execute(stmt)
                    self.db.execute("INSERT INTO meta VALUES('schema', ?)", (str(SCHEMA),))
            if host is not None:
                with self.tx():
                    self.db.execute("INSERT OR IGNORE INTO meta VALUES('host', ?)", (host,))
        except sqlite3.DatabaseError as e:
            raise StateError(f"state file {path} cannot be used: {e}; it was left untouched") from None
        try:
            os.chmod(path, 0o600)
        except OSError:
            pass
        self._audit_inserts = 0
        self.mdev = MdevRows(self)              # the ``mdevs`` table
        self.quarantined: list[str] = []    # what was moved aside on opening, one line a lease
        if existed:
            self.quarantined = quarantine_bad_rows(self)

    def _check_host(self, host: str) -> None:
        row = self.db.execute("SELECT value FROM meta WHERE key='host'").fetchone()
        if row is not None and row[0] != host:
            self.db.close()
            raise StateError(f"state file {self.path} describes {describe_host(str(row[0]))}, and this is "
                             f"{describe_host(host)}; it was left untouched (its leases name another "
                             "host's devices: give this host a state directory of its own)")

    def meta(self, key: str) -> str | None:
        """A value of the ``meta`` table (None: not recorded)."""
        with self._lock:
            row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self.tx():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES(?, ?)", (key, value))

    def _repair_schema(self, version: int) -> None:
        """Upgrade an older file in place; recreate (empty) a table or column that is gone."""
        with self.tx():
            present = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            for stmt in _DDL.strip().split(";"):
                if stmt.strip():
                    self.db.execute(stmt)
            for table in _TABLES:
                if table not in present and version >= _NEW_IN.get(table, 1):
                    log.error("journal %s: table %s was missing; recreated empty", self.path, table)
            for table, column, definition in _ADDED_COLUMNS:
                columns = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
                if column not in columns:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            if version < SCHEMA:
                self.db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA),))

    @staticmethod
    def _check_header(path: str) -> None:
        with open(path, "rb") as f:
            head = f.read(16)
        if head and head != b"SQLite format 3\x00":
            raise StateError(f"state file {path} is corrupt (not an SQLite database); "
                             "it was left untouched")

    def tx(self) -> Tx:
        """``with journal.tx():`` one transaction, committed unless the block raises (inside
        another of the same thread: part of it; see `vfiod.txn.Tx`)."""
        return Tx(self.db, self._lock)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # ---- leases

    def create(self, lease: LeaseRow, held: list[HeldDevice]) -> None:
        with self.tx():
            self.db.execute("INSERT INTO leases VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", (
                lease.id, lease.group, lease.uid, lease.owner, lease.backend, lease.target,
                lease.created, lease.expires, int(lease.persistent), lease.state, lease.rule,
                lease.memlock, int(lease.reset), lease.revoke_reason, lease.deadline, lease.grace,
                lease.on_revoke, int(lease.revoke_others), lease.cap, lease.scope, lease.k8s_namespace,
                lease.member))
            self.db.executemany("INSERT INTO held VALUES(?,?,?,?,?,?)", [
                (lease.id, i, h.addr, h.driver, h.override, h.role) for i, h in enumerate(held)])

    def set_state(self, lease_id: str, state: str) -> None:
        with self.tx():
            self.db.execute("UPDATE leases SET state=? WHERE id=?", (state, lease_id))

    def start_revoke(self, lease_id: str, reason: str, deadline: float) -> None:
        """The revoke ladder starts: state ``revoking``, why, and when the grace ends."""
        with self.tx():
            self.db.execute("UPDATE leases SET state='revoking', revoke_reason=?, deadline=? WHERE id=?",
                            (reason, deadline, lease_id))

    def set_scope(self, lease_id: str, scope: str | None) -> None:
        with self.tx():
            self.db.execute("UPDATE leases SET scope=? WHERE id=?", (scope, lease_id))

    def set_expires(self, lease_id: str, expires: float) -> None:
        with self.tx():
            self.db.execute("UPDATE leases SET expires=? WHERE id=?", (expires, lease_id))

    def set_cap(self, lease_id: str, cap: float, expires: float) -> None:
        """A reloaded policy's cap (`vfiod.leases.caps`), and the expiry it moves."""
        with self.tx():
            self.db.execute("UPDATE leases SET cap=?, expires=? WHERE id=?", (cap, expires, lease_id))

    def set_owner(self, lease_id: str, owner: str | None) -> None:
        with self.tx():
            self.db.execute("UPDATE leases SET owner=? WHERE id=?", (owner, lease_id))

    def delete(self, lease_id: str) -> None:
        with self.tx():
            for table, col in (("steps", "lease"), ("held", "lease"), ("grants", "lease"), ("identity", "lease"),
                               ("membership", "lease"), ("mdevs", "lease"), ("leases", "id")):
                self.db.execute(f"DELETE FROM {table} WHERE {col}=?", (lease_id,))

    def _lease_rows(self, where: str = "", args: tuple[object, ...] = ()) -> list[LeaseRow]:
        with self._lock:
            cur = self.db.execute(f"SELECT * FROM leases {where}", args)
            names = [d[0] for d in cur.description]
            rows = cur.fetchall()
        return [LeaseRow.from_row(dict(zip(names, r))) for r in rows]

    def leases(self) -> list[LeaseRow]:
        return self._lease_rows("ORDER BY created, id")

    def lease(self, lease_id: str) -> LeaseRow | None:
        found = self._lease_rows("WHERE id=?", (lease_id,))
        return found[0] if found else None

    def lease_for_group(self, group: int) -> LeaseRow | None:
        found = self._lease_rows("WHERE grp=?", (group,))
        return found[0] if found else None

    def held(self, lease_id: str) -> list[HeldDevice]:
        with self._lock:
            rows = self.db.execute("SELECT addr, driver, override, role FROM held WHERE lease=? ORDER BY pos",
                                   (lease_id,)).fetchall()
        return [HeldDevice(*r) for r in rows]

    def holdings(self, addr: str | None = None) -> dict[str, tuple[LeaseRow, HeldDevice]]:
        """Every device some lease holds (or only `addr`, if a lease holds it: every PCI
        uevent asks): its address -> (the lease, what it was before); one query."""
        with self._lock:
            cur = self.db.execute("SELECT leases.*, held.addr, held.driver, held.override, held.role FROM held "
                                  "JOIN leases ON leases.id = held.lease" + (" WHERE held.addr=?" if addr else "")
                                  + " ORDER BY leases.created, leases.id, held.pos", (addr,) if addr else ())
            names = [d[0] for d in cur.description][:-4]
            rows = cur.fetchall()
        return {r[-4]: (LeaseRow.from_row(dict(zip(names, r[:-4]))), HeldDevice(*r[-4:])) for r in rows}

    # ---- what the held devices were (`vfiod.leases.identity`)

    def record_identity(self, lease_id: str, group: int, members: list[str], devices: Mapping[str, str]) -> None:
        """Record the group's membership and each held device's identity (JSON text)."""
        with self.tx():
            self.db.execute("INSERT OR REPLACE INTO membership VALUES(?,?,?)", (lease_id, group, json.dumps(members)))
            self.db.executemany("INSERT OR REPLACE INTO identity VALUES(?,?,?)",
                                [(lease_id, addr, data) for addr, data in devices.items()])

    def identity_of(self, lease_id: str) -> tuple[list[str], dict[str, str]] | None:
        """(members, address -> identity JSON) as recorded at the grant; None where none was
        (a lease from before schema 6)."""
        with self._lock:
            row = self.db.execute("SELECT members FROM membership WHERE lease=?", (lease_id,)).fetchone()
            rows = self.db.execute("SELECT addr, data FROM identity WHERE lease=?", (lease_id,)).fetchall()
        if row is None:
            return None
        try:
            members = json.loads(row[0])
        except (TypeError, ValueError):
            members = None
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            members = []             # unreadable: no membership matches it, so the lease ends
        return members, {str(a): str(d) for a, d in rows}

    # ---- memlock grants

    def record_grant(self, lease_id: str, pid: int, start: int, before: tuple[int, int]) -> None:
        """Record a memlock grant; a process granted for another lease already keeps the
        limits it had before the first grant (those are what its last release restores)."""
        with self.tx():
            first = self.db.execute("SELECT soft, hard FROM grants WHERE pid=? AND start=? ORDER BY rowid LIMIT 1",
                                    (pid, start)).fetchone()
            soft, hard = (first[0], first[1]) if first else before
            self.db.execute("INSERT OR REPLACE INTO grants VALUES(?,?,?,?,?)", (lease_id, pid, start, soft, hard))

    def grant_of(self, lease_id: str) -> tuple[int, int, tuple[int, int], bool] | None:
        """(pid, start, limits before, shared) of the memlock grant of `lease_id`; `shared`:
        another lease's grant went to the same process."""
        with self._lock:
            row = self.db.execute("SELECT pid, start, soft, hard FROM grants WHERE lease=?", (lease_id,)).fetchone()
            if row is None:
                return None
            others = self.db.execute("SELECT COUNT(*) FROM grants WHERE pid=? AND start=? AND lease<>?",
                                     (row[0], row[1], lease_id)).fetchone()[0]
        return row[0], row[1], (row[2], row[3]), bool(others)

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
              rule: str | None, outcome: str, detail: str = "") -> bool:
        """Record one audit event; returns False when it was a repeated refusal, counted on
        the row of its first (see the module's docstring), True when it has a row of its own."""
        now = time.time()
        with self.tx():
            if outcome in AGGREGATED:
                row = self.db.execute(
                    "SELECT rowid FROM audit WHERE event=? AND uid IS ? AND target IS ? AND outcome=? "
                    "AND ts>=? ORDER BY rowid DESC LIMIT 1",
                    (event, uid, target, outcome, now - AUDIT_WINDOW)).fetchone()
                if row is not None:
                    self.db.execute("UPDATE audit SET count=count+1, last=?, detail=? WHERE rowid=?",
                                    (now, detail, row[0]))
                    return False
            self.db.execute("INSERT INTO audit VALUES(?,?,?,?,?,?,?,?,1,?)",
                            (now, event, uid, target, lease, rule, outcome, detail, now))
            self._audit_inserts += 1
            if self._audit_inserts % 100 == 1:
                self._rotate_audit()
        return True

    def _rotate_audit(self) -> None:
        """Keep at most MAX_AUDIT_ROWS rows: the oldest refusals go first."""
        (total,) = self.db.execute("SELECT COUNT(*) FROM audit").fetchone()
        excess = total - MAX_AUDIT_ROWS
        if excess <= 0:
            return
        marks = ",".join("?" * len(AGGREGATED))
        cur = self.db.execute(f"DELETE FROM audit WHERE rowid IN (SELECT rowid FROM audit WHERE outcome IN ({marks}) "
                              "ORDER BY rowid LIMIT ?)", (*sorted(AGGREGATED), excess))
        excess -= cur.rowcount
        if excess > 0:
            self.db.execute("DELETE FROM audit WHERE rowid IN (SELECT rowid FROM audit ORDER BY rowid LIMIT ?)",
                            (excess,))

    def audit_counts(self) -> list[tuple[Any, ...]]:
        """(event, uid, target, outcome, count) of every audit row, oldest first."""
        with self._lock:
            rows: list[tuple[Any, ...]] = self.db.execute(
                "SELECT event, uid, target, outcome, count FROM audit ORDER BY rowid").fetchall()
        return rows

    def quarantine_rows(self) -> list[tuple[Any, ...]]:
        """(tbl, lease, data, why) of every quarantined row."""
        with self._lock:
            rows: list[tuple[Any, ...]] = self.db.execute(
                "SELECT tbl, lease, data, why FROM quarantine ORDER BY rowid").fetchall()
        return rows

    def audit_rows(self) -> list[tuple[Any, ...]]:
        """(event, uid, target, lease, rule, outcome, detail) of every audit record, oldest first."""
        with self._lock:
            rows: list[tuple[Any, ...]] = self.db.execute(
                "SELECT event, uid, target, lease, rule, outcome, detail FROM audit ORDER BY rowid").fetchall()
        return rows


class MdevRows:
    """The ``mdevs`` table: the instances grants made (`vfiod.leases.mdev`)."""

    def __init__(self, journal: Journal):
        self.journal = journal

    def intent(self, held: HeldMdev) -> None:
        """Journal the instance a grant is about to create (before the write to ``create``)."""
        with self.journal.tx():
            self.journal.db.execute("INSERT INTO mdevs VALUES(?,?,?,?,?)",
                                    (held.lease, held.uuid, held.parent, held.type, held.boot))

    def all(self) -> list[HeldMdev]:
        """Every journaled instance (those whose lease has no row too)."""
        with self.journal._lock:
            rows = self.journal.db.execute("SELECT lease, uuid, parent, type, boot FROM mdevs ORDER BY rowid").fetchall()
        return [HeldMdev(*r) for r in rows if all(isinstance(v, str) for v in r[:4])]

    def of(self, lease_id: str) -> HeldMdev | None:
        return next((m for m in self.all() if m.lease == lease_id), None)

    def forget(self, lease_id: str) -> None:
        """The instance is gone (or never was): its row goes."""
        with self.journal.tx():
            self.journal.db.execute("DELETE FROM mdevs WHERE lease=?", (lease_id,))
