"""Audit records reach the systemd journal as structured fields (journald's native protocol)."""

import logging
import socket

import pytest

from vfiod.daemon import journald

from .leasekit import Caller, Kit


def test_encode_and_decode_agree_on_plain_and_multiline_values():
    fields = {"MESSAGE": "grant uid=1000", "VFIOD_GROUP": 8, "VFIOD_DETAIL": "two\nlines", "VFIOD_UID": 0}
    data = journald.encode(fields)
    assert b"VFIOD_GROUP=8\n" in data
    assert b"VFIOD_DETAIL\n" + (9).to_bytes(8, "little") + b"two\nlines\n" in data
    assert journald.decode(data) == {k: str(v) for k, v in fields.items()}
    for bad in ("_PID", "lower", "WITH-DASH", ""):
        with pytest.raises(ValueError):
            journald.encode({bad: "x"})


@pytest.fixture
def journal_socket(tmp_path):
    path = str(tmp_path / "journal.socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    yield path, s
    s.close()


def entries(sock):
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(journald.decode(sock.recv(65536)))
    except BlockingIOError:
        return out


def test_grant_denial_and_release_are_journal_entries_with_their_fields(tmp_path, journal_socket, monkeypatch):
    path, sock = journal_socket
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    logger = logging.getLogger("vfiod.audit")
    logger.setLevel(logging.INFO)
    fallback = logging.StreamHandler()
    handler = journald.send_audit_to_journal(logger, fallback, path=path)
    try:
        assert handler is not None and logger.propagate is False
        kit = Kit(tmp_path)
        kit.deny(2000)
        with pytest.raises(Exception):
            kit.manager.request(Caller(2000), "group:8", "vfio")
        lease = kit.manager.request(Caller(1000), "group:8", "vfio")
        kit.manager.release(lease.id, Caller(1000))
        got = entries(sock)
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.propagate = True
    outcomes = [(e["VFIOD_EVENT"], e["VFIOD_OUTCOME"], e["VFIOD_UID"]) for e in got]
    assert outcomes == [("request", "denied", "2000"), ("grant", "granted", "1000"),
                        ("release", "released", "1000")]
    granted = got[1]
    assert granted["VFIOD_LEASE"] == lease.id and granted["VFIOD_GROUP"] == "8"
    assert granted["VFIOD_TARGET"] == "group:8" and granted["VFIOD_RULE"].startswith("test.toml:")
    assert granted["SYSLOG_IDENTIFIER"] == "vfiod" and granted["PRIORITY"] == "6"
    assert granted["MESSAGE_ID"] == journald.AUDIT_MESSAGE_ID
    assert "outcome=granted" in granted["MESSAGE"] and f"lease={lease.id}" in granted["MESSAGE"]
    assert got[0]["VFIOD_GROUP"] == "8" and "VFIOD_LEASE" not in got[0]
    # the audit table has the same records
    assert [r[5] for r in kit.journal.audit_rows()][-3:] == ["denied", "granted", "released"]


def test_without_journald_the_record_is_the_usual_log_line(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    logger = logging.getLogger("vfiod.audit")
    assert journald.send_audit_to_journal(logger, None, path=str(tmp_path / "none")) is None
    # journald went away under a running daemon: the fallback handler gets the line
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(self.format(record))
    h = journald.JournalHandler(str(tmp_path / "gone"), fallback=Keep())
    try:
        logger.addHandler(h)
        logger.propagate = False
        logger.info("grant uid=%s outcome=%s", 1000, "granted", extra={"journal_fields": {"VFIOD_OUTCOME": "granted"}})
    finally:
        logger.removeHandler(h)
        logger.propagate = True
        h.close()
    assert seen == ["grant uid=1000 outcome=granted"]
