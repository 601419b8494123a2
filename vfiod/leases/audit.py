"""The audit record: one event, three ways (the journal's audit table, a log line,
structured fields for the systemd journal)."""

from __future__ import annotations

import logging

from ..state import Journal

log = logging.getLogger("vfiod.leases")
audit_log = logging.getLogger("vfiod.audit")


def short(text: str | None, limit: int = 200) -> str:
    """`text` for a log line: quoted, and cut where a caller sent a lot of it."""
    return "-" if text is None else repr(text if len(text) <= limit else text[:limit] + "…")


class Audit:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def __call__(self, event: str, caller_uid: int | None, target: str | None, lease_id: str | None,
                 rule: str | None, outcome: str, detail: str = "", group: int | None = None) -> None:
        # A row of the journal's audit table (a repeated refusal counted on its first row), a
        # log line, and structured fields for the systemd journal (``journalctl
        # VFIOD_OUTCOME=denied``; the daemon sends them where journald runs).
        try:
            first = self.journal.audit(event, caller_uid, target, lease_id, rule, outcome, detail)
        except Exception as e:     # the audit trail must never turn a success into a failure
            log.error("cannot write the audit record: %s: %s", type(e).__name__, e)
            first = True
        if first:                  # a repeated refusal is counted on its first row, and logged once
            fields = {"VFIOD_EVENT": event, "VFIOD_UID": caller_uid, "VFIOD_TARGET": target,
                      "VFIOD_LEASE": lease_id, "VFIOD_GROUP": group, "VFIOD_RULE": rule,
                      "VFIOD_OUTCOME": outcome, "VFIOD_DETAIL": detail or None}
            audit_log.info("%s uid=%s target=%s lease=%s rule=%s outcome=%s%s", event,
                           "-" if caller_uid is None else caller_uid, short(target),
                           lease_id or "-", rule or "-", outcome, f" detail={short(detail)}" if detail else "",
                           extra={"journal_fields": {k: v for k, v in fields.items() if v is not None}})
