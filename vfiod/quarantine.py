"""Rows of the journal that cannot be used: found when the journal is opened, moved whole
into the ``quarantine`` table and logged once, so that the daemon serves the rest."""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import time
import threading
from typing import Any, ContextManager, Protocol


class _Journal(Protocol):
    """What of `vfiod.state.Journal` this needs (the journal calls it while it opens)."""

    db: sqlite3.Connection
    path: str
    _lock: threading.RLock

    def tx(self) -> ContextManager[None]: ...

log = logging.getLogger("vfiod.state")

_LEASE_ID = re.compile(r"[A-Za-z0-9_]{1,64}")
_ADDR = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")


def quarantine_bad_rows(journal: _Journal) -> list[str]:
    """Move every lease with an unusable row (its own, a device record or a step)
    aside into ``quarantine``, and orphaned device records and steps too; log each
    once.  The rest of the journal is served as usual."""
    bad: dict[str, str] = {}            # lease id -> why
    with journal._lock:
        leases = journal.db.execute("SELECT * FROM leases").fetchall()
        held = journal.db.execute("SELECT * FROM held").fetchall()
        steps = journal.db.execute("SELECT * FROM steps").fetchall()
        mdevs = {r[0] for r in journal.db.execute("SELECT lease FROM mdevs").fetchall()}
    ids = {r[0] for r in leases}
    endpoints: dict[object, int] = dict.fromkeys(mdevs, 1)     # an mdev lease holds its instance
    for r in held:
        why = _bad_held(r)
        if why:
            bad.setdefault(r[0], f"device record {r[1]!r}: {why}")
        elif r[5] == "endpoint":
            endpoints[r[0]] = endpoints.get(r[0], 0) + 1
    for r in steps:
        why = _bad_step(r)
        if why:
            bad.setdefault(r[0], f"step {r[1]!r}: {why}")
    for r in leases:
        why = _bad_lease(r)
        if why or not endpoints.get(r[0]):
            bad[r[0]] = why or "no device record (what would a release give back?)"
    orphans = {r[0] for r in (*held, *steps)} - ids
    if not bad and not orphans:
        return []
    now = time.time()
    lines = []
    with journal.tx():
        for lease_id in (*bad, *sorted(orphans, key=repr)):
            why = bad.get(lease_id, "records of no lease")
            for table, col in (("leases", "id"), ("held", "lease"), ("steps", "lease")):
                rows = journal.db.execute(f"SELECT * FROM {table} WHERE {col} IS ?", (lease_id,)).fetchall()
                for row in rows:
                    journal.db.execute("INSERT INTO quarantine VALUES(?,?,?,?,?)",
                                    (now, table, repr(lease_id), json.dumps(row, default=repr), why))
                journal.db.execute(f"DELETE FROM {table} WHERE {col} IS ?", (lease_id,))
            line = (f"lease {lease_id!r}: {why}; its rows were moved to the quarantine table "
                    "(its devices may still be on the lease's driver: check them)")
            log.error("journal %s: %s", journal.path, line)
            lines.append(line)
    return lines


def _is_int(v: object, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _is_time(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e18


def _bad_lease(r: tuple[Any, ...]) -> str:
    """Why a ``leases`` row cannot be used ("" if it can)."""
    if len(r) != 22:
        return f"{len(r)} columns"
    checks = ((isinstance(r[0], str) and _LEASE_ID.fullmatch(r[0]) is not None, "id"),  # its object path
              (_is_int(r[1], 0, (1 << 31) - 1), "group"), (_is_int(r[2], 0, (1 << 32) - 2), "uid"),
              (r[3] is None or isinstance(r[3], str), "owner"), (isinstance(r[4], str), "backend"),
              (isinstance(r[5], str), "target"), (_is_time(r[6]), "created"), (_is_time(r[7]), "expires"),
              (r[8] in (0, 1), "persistent"), (r[9] in ("granting", "granted", "revoking", "releasing"), "state"),
              (r[10] is None or isinstance(r[10], str), "rule"),
              (r[11] is None or _is_int(r[11], 0, (1 << 63) - 1), "memlock"), (r[12] in (0, 1), "reset"),
              (r[13] is None or isinstance(r[13], str), "revoke reason"), (_is_time(r[14]), "deadline"),
              (_is_time(r[15]), "grace"), (r[16] in ("kill", "wait"), "on_revoke"), (r[17] in (0, 1), "revoke_others"),
              (_is_time(r[18]), "cap"), (r[19] is None or isinstance(r[19], str), "scope"),
              (r[20] is None or isinstance(r[20], str), "k8s namespace"),
              (r[21] is None or isinstance(r[21], str), "pool member"))
    for column, (ok, what) in enumerate(checks):
        if not ok:
            return f"its {what} is not usable ({r[column]!r})"[:300]
    return ""


def _bad_held(r: tuple[Any, ...]) -> str:
    if not (isinstance(r[2], str) and _ADDR.fullmatch(r[2])):
        return f"the address {r[2]!r} does not parse"[:300]
    if not all(v is None or isinstance(v, str) for v in (r[3], r[4])):
        return "a driver or override that is not text"
    if r[5] not in ("endpoint", "bridge"):
        return f"role {r[5]!r}"[:300]
    return ""


def _bad_step(r: tuple[Any, ...]) -> str:
    if not _is_int(r[1], 1, 1 << 31) or not isinstance(r[2], str) or not isinstance(r[5], str):
        return "its number, action or status is not usable"
    if r[3] is not None and not (isinstance(r[3], str) and _ADDR.fullmatch(r[3])):
        return f"the address {r[3]!r} does not parse"[:300]
    try:
        record = json.loads(r[4] or "{}")
    except (TypeError, ValueError):
        return "its record is not JSON"
    if not isinstance(record, dict):
        return "its record is not a JSON object"
    return ""
