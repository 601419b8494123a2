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

The search is bounded: only candidate processes (those of the uids it is
given, and the pids it is given: the lease's scope) have their fds read, so
another user's thousands of fds cost nothing; `Search` counts the work done.
Mapped device regions (``/proc/PID/maps`` of a candidate) count as holding.
None of this is the proof that nobody holds a group: a file in flight over
``SCM_RIGHTS`` or queued in another daemon's message is in no ``/proc/PID/fd``.
The proof is the kernel's (`group_node_free`: the single-open group node
opens; an unbind from vfio-pci returned).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable, Iterator

import attrs

from ..address import PciAddress
from ..errors import KernelError, PermissionDenied
from .read import Roots, _readlink, _text

#: Where processes are read: the system's /proc, on every host.
PROC = "/proc"

ANON_DEVICE = "anon_inode:[vfio-device]"
_UNNAMED = "[vfio-device] (this kernel does not say which device)"
_MAPPED_UNNAMED = "mapped [vfio-device] (this kernel does not say which device)"


#: The uids of people (login.defs' UID_MIN..UID_MAX): a uid outside is a system user's
#: (a daemon's, or a service user such as libvirt-qemu's, 64055 on Debian).
USER_UIDS = range(1000, 60000)
#: Where systemd runs system services: a process there is no user's, unless it is in a
#: lease's own scope (``vfiod-lease-ID.scope``, which vfiod made for the lessee).
_SYSTEM_CGROUPS = ("/system.slice/", "/machine.slice/", "/init.scope")


@attrs.frozen
class Holder:
    """One process holding the group or one of its devices.

    `start` (clock ticks after boot) with `pid` names the process: one that
    ended and whose pid was reused is never signalled.  `sure` is False when
    all it holds is ``[vfio-device]`` fds the kernel does not name and its uid
    holds another VFIO lease too (it may be that lease's process).  `uids` are
    its real, effective and saved uids; `cgroup` where it runs."""

    pid: int
    start: int
    uid: int
    comm: str
    what: tuple[str, ...]
    sure: bool = True
    uids: tuple[int, ...] = ()
    cgroup: str = ""

    def describe(self) -> str:
        return f"pid {self.pid} ({self.comm}, uid {self.uid}) holding {', '.join(self.what)}"

    @property
    def system_service(self) -> bool:
        """Does it run as a system service (a systemd unit of the system, not a user's session)?"""
        c = self.cgroup
        return any(m in c + "/" for m in _SYSTEM_CGROUPS) and "/vfiod-lease-" not in c


@attrs.define
class Search:
    """What a holder search found, and the work it did: `listed` processes of the
    system, `examined` of them (their fds and mappings read), `fds` fd links read."""

    holders: list[Holder] = attrs.field(factory=list)
    listed: int = 0
    examined: int = 0
    fds: int = 0
    seen: set[int] = attrs.field(factory=set, repr=False)     # the pids examined


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


def _uids_of(pid: int) -> tuple[int, int, int] | None:
    """(real, effective, saved) uid of `pid` from its status (readable for every process,
    also one that made itself non-dumpable and so owns no /proc entry of its own); None
    for a kernel thread (the kernel's ``Kthread: 1``, Linux >= 5.19), which has no file
    table of its own and no user mappings, so holds no file and maps no device."""
    uids: tuple[int, int, int] | None = None
    for line in (_text(f"{PROC}/{pid}/status") or "").splitlines():
        if line.startswith("Uid:"):
            try:
                real, effective, saved = (int(u) for u in line.split()[1:4])
            except ValueError:
                return None
            uids = real, effective, saved
        elif line.startswith("Kthread:"):
            return None if line.split()[1:2] == ["1"] else uids
        elif line.startswith(("VmPeak:", "Threads:")):
            break                   # past where the kernel puts Kthread, if it says
    return uids


def cgroup_of(pid: int) -> str:
    """The cgroup `pid` runs in (the unified hierarchy's, else systemd's own), or ""."""
    lines = (_text(f"{PROC}/{pid}/cgroup") or "").splitlines()
    for prefix in ("0::", "1:name=systemd:"):
        for line in lines:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
    return ""


def _mapped(pid: int, wanted: set[str]) -> list[str]:
    """The VFIO files `pid` has mapped (a device's BARs keep the device held after its fd is closed)."""
    out: list[str] = []
    for line in (_text(f"{PROC}/{pid}/maps") or "").splitlines():
        parts = line.split(None, 5)
        path = parts[5].strip() if len(parts) == 6 else ""
        what = _MAPPED_UNNAMED if path == ANON_DEVICE else f"mapped {path.removesuffix(' (deleted)')}"
        if (path == ANON_DEVICE or path in wanted) and what not in out:
            out.append(what)
    return out


def find_holders(roots: Roots, group: int, addrs: tuple[PciAddress, ...], uids: frozenset[int] | None,
                 pids: frozenset[int] = frozenset(), owner: int | None = None,
                 unsure_uids: frozenset[int] = frozenset(), handed: frozenset[str] = frozenset()) -> Search:
    """The processes among the candidates that hold group `group` or a device of `addrs`
    open or mapped (vfiod excepted).

    Candidates: the processes any of whose uids is in `uids` (None: every process)
    and the processes `pids`.  A ``[vfio-device]`` fd the kernel does not name is
    counted only for a process of `owner` or of `pids` (a 6.1 kernel's bare device
    fd of anyone else may be any device: it never makes its process a holder of
    every lease); it is `Holder.sure` only when its uid holds no other VFIO lease
    (`unsure_uids`).

    `handed` are the cdev nodes the lease handed over: once an unbind from vfio-pci has
    begun, the kernel has removed a device's cdev (node and sysfs entry) while its
    holders still have it open, as ``/dev/vfio/devices/vfioX (deleted)``; such a
    removed node of the lease's still counts (a live node only while sysfs names it
    for one of `addrs`: the number may be another device's by now)."""
    node = os.path.join(roots.dev, "vfio", str(int(group)))
    wanted = {node, node + " (deleted)"}
    cdevs, names = _device_names(roots, addrs)
    wanted |= cdevs | {c + " (deleted)" for c in cdevs | handed}
    search = Search()
    ids: dict[int, tuple[int, int, int]] = {}

    def candidate(pid: int) -> bool:
        search.listed += 1
        who = _uids_of(pid)
        if who is None:
            return False
        ids[pid] = who
        return pid in pids or uids is None or any(u in uids for u in who)

    held: dict[int, list[str]] = {}
    for pid, fd, link in open_files(lambda link: link in wanted or link == ANON_DEVICE, candidate, search):
        what = held.setdefault(pid, [])
        if link != ANON_DEVICE:
            what.append(link.removesuffix(" (deleted)"))
            continue
        if owner is not None and ids[pid][0] != owner and pid not in pids:
            continue
        dev = _syspath_of(str(pid), fd)
        if dev is None:
            what.append(_UNNAMED)
        elif dev in names:
            what.append(f"[vfio-device] {PciAddress.from_sysfs_name(dev)}")
    for pid, who in ids.items():
        if pid not in held and pid in search.seen:
            mapped = [m for m in _mapped(pid, wanted) if owner is None or who[0] == owner or pid in pids
                      or m != _MAPPED_UNNAMED]
            if mapped:
                held[pid] = mapped
    for pid, what in held.items():
        if not what:
            continue
        ident = process_identity(pid)
        if ident is None:
            continue
        comm = (_text(f"{PROC}/{pid}/comm") or "?").strip()
        unnamed = (_UNNAMED, _MAPPED_UNNAMED)
        sure = ident[0][0] not in unsure_uids or any(w not in unnamed for w in what)
        what = sorted(set(what), key=lambda w: (w in unnamed, what.index(w)))
        search.holders.append(Holder(pid=pid, start=ident[1], uid=ident[0][0], comm=comm, what=tuple(what),
                                     sure=sure, uids=ident[0], cgroup=cgroup_of(pid)))
    search.holders.sort(key=lambda h: h.pid)
    return search


def describe_process(pid: int, what: str) -> Holder | None:
    """The process `pid` as a `Holder` of `what` (a member of a lease's scope), or None if it is gone."""
    ident = process_identity(pid)
    if ident is None:
        return None
    comm = (_text(f"{PROC}/{pid}/comm") or "?").strip()
    return Holder(pid=pid, start=ident[1], uid=ident[0][0], comm=comm, what=(what,), uids=ident[0],
                  cgroup=cgroup_of(pid))


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


def open_files(wanted: Callable[[str], bool], candidate: Callable[[int], bool] | None = None,
               tally: Search | None = None) -> Iterator[tuple[int, str, str]]:
    """(pid, fd, link) of every open file, in every process but this one (or only those
    `candidate` accepts), whose link `wanted` accepts: the one walk over ``/proc/*/fd``.
    `tally` counts the processes examined and the fds read."""
    me = str(os.getpid())
    try:
        pids = [p for p in os.listdir(PROC) if p.isdigit() and p != me]
    except OSError:
        return
    for pid in pids:
        if candidate is not None and not candidate(int(pid)):
            continue
        try:
            fds = os.listdir(f"{PROC}/{pid}/fd")
        except OSError:
            continue                  # gone, or not ours to read
        if tally is not None:
            tally.examined += 1
            tally.seen.add(int(pid))
            tally.fds += len(fds)
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

def grant_memlock(pid: int, limit: int, uid: int, start: int | None = None) -> MemlockGrant | None:
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
        uids, started = who
        if start is not None and started != start:
            return None                 # not the process that was proven: that one is gone
        start = started
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


@attrs.frozen
class Proven:
    """A process proven now through a pidfd held open meanwhile: its pid, start time
    (clock ticks after boot) and its real, effective and saved uids."""

    pid: int
    start: int
    uids: tuple[int, int, int]


def boottime() -> float:
    """Seconds since boot, as process start times count them."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def pid_of_pidfd(pidfd: int) -> int | None:
    """The pid a pidfd refers to, as the kernel says (None: not a pidfd, or its process is gone)."""
    for line in (_text(f"{PROC}/self/fdinfo/{int(pidfd)}") or "").splitlines():
        if line.startswith("Pid:"):
            try:
                pid = int(line.split()[1])
            except (IndexError, ValueError):
                return None
            return pid if pid > 0 else None
    return None


def prove_process(pidfd: int, uid: int, started_by: float | None) -> Proven:
    """The process of `pidfd`, if it runs as `uid` (real, effective and saved) and started
    no later than `started_by` (seconds since boot: when its bus connection first called);
    `PermissionDenied` (why) otherwise.  Its /proc entry is read only between finding its
    pid through the pidfd and finding it still alive through the same pidfd, so what was
    read is that process's, whatever became of the pid later."""
    pid = pid_of_pidfd(pidfd)
    who = process_identity(pid) if pid is not None else None
    if pid is None or who is None or not _alive(pidfd):
        raise PermissionDenied("the calling process is gone (its bus connection outlived it)")
    uids, start = who
    if any(u != uid for u in uids):
        raise PermissionDenied(f"process {pid} runs as uid {'/'.join(map(str, uids))}, not as the lessee "
                               f"(uid {uid}): it is not the caller's own")
    if started_by is not None and start / os.sysconf("SC_CLK_TCK") > started_by:
        raise PermissionDenied(f"process {pid} started after its bus connection first called vfiod: "
                               "it is not the process that called")
    return Proven(pid=pid, start=start, uids=uids)


def still(pidfd: int, proven: Proven) -> bool:
    """Is the proven process alive, and still the process its pid names (a pid is reused
    only after its process died, and the pidfd says whether it did)?"""
    who = process_identity(proven.pid)
    return _alive(pidfd) and who is not None and who[1] == proven.start and pid_of_pidfd(pidfd) == proven.pid


def open_pidfd(pid: int) -> int | None:
    """A pidfd for `pid` (None if there is no such process)."""
    return _pidfd(pid)
