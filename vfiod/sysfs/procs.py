"""Processes: who holds a VFIO group or its devices open, ending them, and their memlock limit.

Processes are real even on a simulated host, so everything here reads the
system's ``/proc`` (`PROC`); the proc root of `Roots` holds only host facts
(the command line, mounts, routes, swaps).  `open_files` is the one walk over
every process's open files: the revoke ladder's holder search and the in-use
check (a DRM node held open) both use it.  A process is named by its pid and
start time, read through a pidfd, so a pid that was reused is never acted on.

Holders: VFIO has no revoke.  While a process holds a device fd, an unbind from
vfio-pci waits in the kernel (which asks the holder through the device's
request eventfd every 10 s); while it holds the group node, the group can be
handed to nobody else without that process keeping its way in.  So a lease
that must end finds its holders in every process's ``/proc/PID/fd``:

* the group node ``/dev/vfio/N`` (also once the node was removed: ``(deleted)``);
* a device's own node ``/dev/vfio/devices/vfioX`` (kernels with the VFIO
  device cdev; ``BDF/vfio-dev/vfioX`` names it);
* anonymous ``[vfio-device]`` fds (from ``VFIO_GROUP_GET_DEVICE_FD``), also
  those passed to other processes over ``SCM_RIGHTS``.  Newer kernels name the
  device in the fd's fdinfo (``vfio-device-syspath:``); older ones (Debian 12's
  6.1) do not, and such a holder is only `Holder.sure` when its uid holds no
  other VFIO lease (`find_holders` is told which uids may).
"""

from __future__ import annotations

import os
import signal
from typing import Callable, Iterator

import attrs

from ..address import PciAddress
from ..errors import KernelError, PermissionDenied
from .read import Roots, _readlink, _text

#: Where processes are read: the system's /proc, on every host.
PROC = "/proc"

ANON_DEVICE = "anon_inode:[vfio-device]"
_UNNAMED = "[vfio-device] (this kernel does not say which device)"


@attrs.frozen
class Holder:
    """One process holding the group or one of its devices.

    `start` (clock ticks after boot) with `pid` names the process: one that
    ended and whose pid was reused is never signalled.  `sure` is False when
    all it holds is ``[vfio-device]`` fds the kernel does not name and its uid
    holds another VFIO lease too (it may be that lease's process)."""

    pid: int
    start: int
    uid: int
    comm: str
    what: tuple[str, ...]
    sure: bool = True

    def describe(self) -> str:
        return f"pid {self.pid} ({self.comm}, uid {self.uid}) holding {', '.join(self.what)}"


def _device_names(roots: Roots, addrs: tuple[PciAddress, ...]) -> tuple[set[str], set[str]]:
    """The cdev nodes (``/dev/vfio/devices/vfioX``) of `addrs`, and their BDF names."""
    nodes = set()
    for a in addrs:
        try:
            for name in os.listdir(os.path.join(roots.sysfs, "bus/pci/devices", a.sysfs_name, "vfio-dev")):
                nodes.add(os.path.join(roots.dev, "vfio/devices", name))
        except OSError:
            pass
    return nodes, {a.sysfs_name for a in addrs}


def _syspath_of(pid: str, fd: str) -> str | None:
    """The device a ``[vfio-device]`` fd is, where the kernel says (its BDF name), else None."""
    for line in (_text(f"{PROC}/{pid}/fdinfo/{fd}") or "").splitlines():
        if line.startswith("vfio-device-syspath:"):
            return os.path.basename(line.split(":", 1)[1].strip())
    return None


def find_holders(roots: Roots, group: int, addrs: tuple[PciAddress, ...],
                 unsure_uids: frozenset[int] = frozenset()) -> list[Holder]:
    """Every process that holds group `group` or a device of `addrs` open (vfiod excepted).

    `unsure_uids`: the uids that hold another VFIO lease; a process of theirs
    that holds only ``[vfio-device]`` fds the kernel does not name may be that
    lease's, so it is not `Holder.sure` (the caller knows the leases)."""
    node = os.path.join(roots.dev, "vfio", str(int(group)))
    wanted = {node, node + " (deleted)"}
    cdevs, names = _device_names(roots, addrs)
    wanted |= cdevs | {c + " (deleted)" for c in cdevs}
    held: dict[int, list[str]] = {}
    for pid, fd, link in open_files(lambda link: link in wanted or link == ANON_DEVICE):
        what = held.setdefault(pid, [])
        if link != ANON_DEVICE:
            what.append(link.removesuffix(" (deleted)"))
            continue
        dev = _syspath_of(str(pid), fd)
        if dev is None:
            what.append(_UNNAMED)
        elif dev in names:
            what.append(f"[vfio-device] {PciAddress.from_sysfs_name(dev)}")
    out = []
    for pid, what in held.items():
        if not what:
            continue
        who = process_identity(pid)
        if who is None:
            continue
        comm = (_text(f"{PROC}/{pid}/comm") or "?").strip()
        sure = who[0][0] not in unsure_uids or any(w != _UNNAMED for w in what)
        what = sorted(set(what), key=lambda w: (w == _UNNAMED, what.index(w)))
        out.append(Holder(pid=pid, start=who[1], uid=who[0][0], comm=comm, what=tuple(what), sure=sure))
    return sorted(out, key=lambda h: h.pid)


def signal_holder(holder: Holder, sig: int) -> bool:
    """Send `sig` to `holder`'s process if it is still that process (pid and start time,
    checked through a pidfd, so a reused pid is never hit).  False if it is gone."""
    try:
        pidfd = os.pidfd_open(holder.pid)
    except (ProcessLookupError, OSError):
        return False
    try:
        who = process_identity(holder.pid)
        if who is None or who[1] != holder.start:
            return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)


def alive(holder: Holder) -> bool:
    who = process_identity(holder.pid)
    return who is not None and who[1] == holder.start


def open_files(wanted: Callable[[str], bool]) -> Iterator[tuple[int, str, str]]:
    """(pid, fd, link) of every open file, in every process but this one, whose link
    `wanted` accepts: the one walk over ``/proc/*/fd``."""
    me = str(os.getpid())
    try:
        pids = [p for p in os.listdir(PROC) if p.isdigit() and p != me]
    except OSError:
        return
    for pid in pids:
        try:
            fds = os.listdir(f"{PROC}/{pid}/fd")
        except OSError:
            continue                  # gone, or not ours to read
        for fd in fds:
            link = _readlink(f"{PROC}/{pid}/fd/{fd}")
            if link is not None and wanted(link):
                yield int(pid), fd, link


def memlock_of(pid: int) -> tuple[int, int] | None:
    """(soft, hard) RLIMIT_MEMLOCK of `pid` (-1: unlimited), or None if it is gone.

    From /proc/PID/limits, which anyone may read (prlimit on another user's
    process needs CAP_SYS_RESOURCE).  Processes are real even when the host
    is simulated, so this is the system's /proc, not the proc root."""
    text = _text(f"{PROC}/{int(pid)}/limits")
    for line in (text or "").splitlines():
        if line.startswith("Max locked memory"):
            fields = line.split()
            try:
                soft, hard = (-1 if v == "unlimited" else int(v) for v in fields[3:5])
                return soft, hard
            except ValueError:
                return None
    return None

def grant_memlock(pid: int, limit: int, uid: int) -> MemlockGrant | None:
    """Raise the RLIMIT_MEMLOCK (soft and hard) of process `pid` to at least `limit`
    (never lowering it), only if that process runs as `uid` (real and effective).

    The process is held through a pidfd while it is checked and changed, so a pid
    that was reused meanwhile is seen: its /proc entry is read only between
    opening the pidfd and finding the process still alive through it.  Returns
    what was done (the limits before, after, and the process's start time, to
    know it again at release), or None if the process is gone; `PermissionDenied`
    for a process of another uid."""
    import resource
    inf = resource.RLIM_INFINITY
    pidfd = _pidfd(pid)
    if pidfd is None:
        return None
    try:
        who = process_identity(pid)
        if who is None or not _alive(pidfd):
            return None
        uids, start = who
        if any(u != uid for u in uids):
            raise PermissionDenied(f"process {pid} runs as uid {uids[1]}, not as the lessee (uid {uid}): "
                                   "the memlock grant goes only to the caller's own process")
        try:
            cur = resource.prlimit(pid, resource.RLIMIT_MEMLOCK)
            soft, hard = cur
            new = (soft if soft == inf or soft >= limit else limit, hard if hard == inf or hard >= limit else limit)
            if new != cur:
                resource.prlimit(pid, resource.RLIMIT_MEMLOCK, new)
        except ProcessLookupError:
            return None
        except OSError as e:
            raise KernelError(f"cannot raise RLIMIT_MEMLOCK of process {pid}: {e.strerror} "
                              "(vfiod needs CAP_SYS_RESOURCE)") from None
        if not _alive(pidfd):
            return None
        return MemlockGrant(pid=pid, start=start, before=(soft, hard), after=new)
    finally:
        os.close(pidfd)

def restore_memlock(pid: int, start: int, limits: tuple[int, int]) -> bool:
    """Set RLIMIT_MEMLOCK of process `pid` back to `limits`, if it is still the process
    that was granted (same start time, checked through a pidfd); False if it is gone."""
    import resource
    pidfd = _pidfd(pid)
    if pidfd is None:
        return False
    try:
        who = process_identity(pid)
        if who is None or who[1] != start or not _alive(pidfd):
            return False
        try:
            resource.prlimit(pid, resource.RLIMIT_MEMLOCK, limits)
        except ProcessLookupError:
            return False
        except OSError as e:
            raise KernelError(f"cannot restore RLIMIT_MEMLOCK of process {pid}: {e.strerror}") from None
        return True
    finally:
        os.close(pidfd)


@attrs.frozen
class MemlockGrant:
    """A memlock grant as applied: the process (pid and start time, in clock ticks after
    boot: together they name one process) and its (soft, hard) limits before and after."""

    pid: int
    start: int
    before: tuple[int, int]
    after: tuple[int, int]


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (ProcessLookupError, ValueError, OverflowError):
        return None


def _alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
        return True
    except ProcessLookupError:
        return False


def process_identity(pid: int) -> tuple[tuple[int, int, int], int] | None:
    """(real, effective, saved uid) and start time of process `pid` (the system's /proc:
    processes are real even on a simulated host), or None if it is gone."""
    status = _text(f"{PROC}/{int(pid)}/status")
    stat = _text(f"{PROC}/{int(pid)}/stat")
    if not status or not stat:
        return None
    uids = next((line.split()[1:4] for line in status.splitlines() if line.startswith("Uid:")), None)
    try:
        start = int(stat.rsplit(")", 1)[1].split()[19])
        if uids is None or len(uids) != 3:
            return None
        real, effective, saved = (int(u) for u in uids)
    except (IndexError, ValueError):
        return None
    return (real, effective, saved), start
