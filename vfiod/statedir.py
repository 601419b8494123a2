"""The state directory: one daemon per journal, and the host the journal describes.

``STATE_DIR/lock`` is held with an exclusive ``flock`` for as long as the daemon
runs; it holds the holder's pid, so a second vfiod on the same directory refuses
to start and names it.  The kernel drops the lock when the holder's process ends
(however it ends): a stale file never keeps a daemon from starting.

The host a journal describes is recorded in the journal (``meta.host``, see
`vfiod.state`): ``machine-id:ID`` for a real host (``/etc/machine-id``), and
``simulated:TOPOLOGY:SIM_DIR`` for a simulated one.  A journal of another host
is refused, naming both: its leases name devices of a machine this is not.
"""

from __future__ import annotations

import errno
import fcntl
import os

from .errors import StateError

LOCK_NAME = "lock"
MACHINE_ID = "/etc/machine-id"


class StateDirLock:
    """The exclusive lock of a state directory (`acquire`; `release` at exit)."""

    def __init__(self, state_dir: str, fd: int):
        self.state_dir = state_dir
        self.fd = fd

    @classmethod
    def acquire(cls, state_dir: str) -> "StateDirLock":
        """Lock `state_dir` (created 0700 if missing) for this process, or raise `StateError`
        naming the directory and the pid of the vfiod that holds it."""
        state_dir = os.path.abspath(state_dir)
        try:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(state_dir, LOCK_NAME),
                         os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StateError(f"cannot use the state directory {state_dir}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                who = f"pid {holder}" if holder else "a process that did not say its pid yet"
                raise StateError(f"the state directory {state_dir} is in use by another vfiod ({who}); "
                                 "one daemon per journal") from None
            raise StateError(f"cannot lock the state directory {state_dir}: {e.strerror or e}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(state_dir, fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)         # closing the last fd drops the flock
            self.fd = -1


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def machine_host(path: str = MACHINE_ID) -> str:
    """This machine as its journal records it: ``machine-id:ID`` from `path`."""
    try:
        with open(path, "rb") as f:
            text = f.read(256).decode("ascii", "replace").strip()
    except OSError as e:
        raise StateError(f"cannot read {path} ({e.strerror or e}): vfiod records which host its "
                         "journal describes by it") from None
    if not text or not all(c in "0123456789abcdef" for c in text):
        raise StateError(f"{path} holds no machine id ({text[:40]!r}): vfiod records which host its "
                         "journal describes by it (systemd-machine-id-setup writes one)")
    return f"machine-id:{text}"


def simulated_host(topology: str, sim_dir: str) -> str:
    """A simulated host as its journal records it: its name and where it is laid out."""
    return f"simulated:{topology}:{os.path.realpath(sim_dir)}"


def describe_host(host: str) -> str:
    """`host` (as recorded) for a person."""
    kind, _, rest = host.partition(":")
    if kind == "simulated":
        name, _, where = rest.partition(":")
        return f"the simulated host {name!r} in {where}"
    if kind == "machine-id":
        return f"the machine with machine id {rest}"
    return repr(host)
