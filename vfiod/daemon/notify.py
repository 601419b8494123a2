"""Telling systemd how the daemon is: READY=1, STOPPING=1, and STATUS= lines."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("vfiod")


def sd_notify(state: str) -> bool:
    """Send `state` to systemd's notify socket, if there is one."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(state.encode())
    except OSError as e:       # the manager went away: nothing to tell, and no reason to fail
        log.warning("cannot notify the service manager (%s): %s", state.split("=")[0], e)
        return False
    return True


def count_of(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def status_line(groups: int, leases: int, persistent: int, files: int | None, refused: bool) -> str:
    """What `systemctl status vfiod` shows: what the daemon holds.

    `files` is the number of policy files in force (None: no policy loaded yet, so
    every request is denied); `refused` says the last reload was refused."""
    if files is None:
        policy = "none loaded, denying every request"
    else:
        policy = count_of(files, "file")
    if refused:
        policy += " (the last reload was refused; see the log)"
    return f"{count_of(groups, 'group')}, {count_of(leases, 'lease')} ({persistent} persistent), policy: {policy}"
