"""Audit records as structured entries of the systemd journal.

journald's native protocol, by hand: one datagram to ``/run/systemd/journal/socket``
per entry, made of ``KEY=value`` lines; a value that holds a newline is sent as
``KEY``, a newline, its length as a little-endian 64-bit number, the bytes and a
newline.  Keys are upper-case letters, digits and underscores, not starting with
an underscore.  journald adds the trusted fields itself (``_PID``,
``_SYSTEMD_UNIT``, …), so ``journalctl -u vfiod VFIOD_OUTCOME=granted`` finds
a grant.

The fields of an audit record come with the log record (``extra=
{"journal_fields": {...}}``, see `vfiod.leases`); `JournalHandler` sends them with
``MESSAGE=`` (the usual log line), ``PRIORITY=`` and ``SYSLOG_IDENTIFIER=``.  If
the datagram cannot be sent, the record goes to the fallback handler as the
usual log line, so no audit record is lost to a missing journal.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct

JOURNAL_SOCKET = "/run/systemd/journal/socket"
# Every vfiod audit entry carries this id (`journalctl MESSAGE_ID=...`).
AUDIT_MESSAGE_ID = "5f1c0b6e8a2d4c79b3e1d7a9c4f06b28"
_KEY = re.compile(r"[A-Z0-9][A-Z0-9_]*\Z")
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def encode(fields: dict[str, object]) -> bytes:
    """One journal entry in the native protocol; `ValueError` for a key journald would drop."""
    out = bytearray()
    for key, value in fields.items():
        if not _KEY.match(key) or len(key) > 64:
            raise ValueError(f"not a journal field name: {key!r}")
        data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
        name = key.encode()
        if b"\n" in data:
            out += name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name + b"=" + data + b"\n"
    return bytes(out)


def decode(datagram: bytes) -> dict[str, str]:
    """The fields of one entry (what journald reads; the tests check `encode` with it)."""
    fields, pos = {}, 0
    while pos < len(datagram):
        end = datagram.index(b"\n", pos)
        line = datagram[pos:end]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            pos = end + 1
        else:
            key = line
            (n,) = struct.unpack("<Q", datagram[end + 1:end + 9])
            value = datagram[end + 9:end + 9 + n]
            pos = end + 9 + n + 1
        fields[key.decode()] = value.decode("utf-8", "replace")
    return fields


class JournalHandler(logging.Handler):
    """Sends each record to journald with its structured fields; falls back to `fallback`."""

    def __init__(self, path: str = JOURNAL_SOCKET, identifier: str = "vfiod",
                 fallback: logging.Handler | None = None):
        super().__init__()
        self.path = path
        self.identifier = identifier
        self.fallback = fallback
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def fields(self, record: logging.LogRecord) -> dict[str, object]:
        fields = {"MESSAGE": self.format(record), "PRIORITY": _PRIORITY.get(record.levelno, 6),
                  "SYSLOG_IDENTIFIER": self.identifier, "MESSAGE_ID": AUDIT_MESSAGE_ID}
        fields.update(getattr(record, "journal_fields", None) or {})
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sock.sendto(encode(self.fields(record)), self.path)
        except (OSError, ValueError):
            # No journald (or an entry too large for one datagram): the usual log line.
            if self.fallback is not None:
                self.fallback.handle(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


def send_audit_to_journal(logger: logging.Logger, stderr_handler: logging.Handler | None,
                          path: str = JOURNAL_SOCKET) -> JournalHandler | None:
    """Send `logger`'s records (the audit records) to journald natively where it runs.

    Under systemd ($JOURNAL_STREAM) they go to the journal only, with the log line as
    their MESSAGE; where journald runs but stderr goes elsewhere (a terminal), the log
    line is printed too.  Without journald nothing changes."""
    under_journal = bool(os.environ.get("JOURNAL_STREAM"))
    if not (under_journal or os.path.exists(path)):
        return None
    for h in logger.handlers:
        if isinstance(h, JournalHandler):       # serve() ran before in this process
            return h
    handler = JournalHandler(path, fallback=stderr_handler if under_journal else None)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = not under_journal
    return handler
