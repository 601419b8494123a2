"""Who holds a VFIO group or its devices open, and ending them: the revoke ladder's eyes and hands.

VFIO has no revoke.  While a process holds a device fd, an unbind from
vfio-pci waits in the kernel (which asks the holder through the device's
request eventfd every 10 s); while it holds the group node, the group can be
handed to nobody else without that process keeping its way in.  So a lease
that must end finds its holders here, in every process's ``/proc/PID/fd``:

* the group node ``/dev/vfio/N`` (also once the node was removed: ``(deleted)``);
* a device's own node ``/dev/vfio/devices/vfioX`` (kernels with the VFIO
  device cdev; ``BDF/vfio-dev/vfioX`` names it);
* anonymous ``[vfio-device]`` fds (from ``VFIO_GROUP_GET_DEVICE_FD``), also
  those passed to other processes over ``SCM_RIGHTS``.  Newer kernels name the
  device in the fd's fdinfo (``vfio-device-syspath:``); older ones (Debian 12's
  6.1) do not, and such a holder is only `Holder.sure` when its uid holds no
  other VFIO lease (`find_holders` is told which uids may).

Processes are real even on a simulated host, so this reads the system's
``/proc`` (the group node's path is the roots' ``dev``, fake or not).
"""

from __future__ import annotations

import os
import signal

import attrs

from ..address import PciAddress
from .read import Roots, _readlink, _text
from .write import _process_identity

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
    for line in (_text(f"/proc/{pid}/fdinfo/{fd}") or "").splitlines():
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
    me = str(os.getpid())
    out = []
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and p != me]
    except OSError:
        return []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue                  # gone, or not ours to read
        what: list[str] = []
        unnamed = False
        for fd in fds:
            link = _readlink(f"/proc/{pid}/fd/{fd}")
            if link is None:
                continue
            if link in wanted:
                what.append(link.removesuffix(" (deleted)"))
            elif link == ANON_DEVICE:
                dev = _syspath_of(pid, fd)
                if dev is None:
                    unnamed = True
                elif dev in names:
                    what.append(f"[vfio-device] {PciAddress.from_sysfs_name(dev)}")
        if unnamed:
            what.append(_UNNAMED)
        if not what:
            continue
        who = _process_identity(int(pid))
        if who is None:
            continue
        comm = (_text(f"/proc/{pid}/comm") or "?").strip()
        sure = who[0][0] not in unsure_uids or any(w != _UNNAMED for w in what)
        out.append(Holder(pid=int(pid), start=who[1], uid=who[0][0], comm=comm,
                          what=tuple(dict.fromkeys(what)), sure=sure))
    return sorted(out, key=lambda h: h.pid)


def signal_holder(holder: Holder, sig: int) -> bool:
    """Send `sig` to `holder`'s process if it is still that process (pid and start time,
    checked through a pidfd, so a reused pid is never hit).  False if it is gone."""
    try:
        pidfd = os.pidfd_open(holder.pid)
    except (ProcessLookupError, OSError):
        return False
    try:
        who = _process_identity(holder.pid)
        if who is None or who[1] != holder.start:
            return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)


def alive(holder: Holder) -> bool:
    who = _process_identity(holder.pid)
    return who is not None and who[1] == holder.start
