"""A simulated kernel: the kernel's bind/unbind/probe semantics over a fake tree.

It implements `vfiod.sysfs.Kernel`'s write primitives, so every layer above
runs unchanged on a fake host (``vfiod --simulate``, tiers 1 and 2 of the
tests).  The plan — each file it watches and what a write to it does:

``bus/pci/devices/BDF/driver_override``
    stores the text; a lone newline clears it (reads back ``(null)``).
``bus/pci/drivers/NAME/unbind`` (data: BDF)
    if BDF is bound to NAME: removes ``BDF/driver`` and ``drivers/NAME/BDF``
    (and the ``DRIVER=`` line of ``BDF/uevent``);
    if NAME was vfio-pci and BDF was the last member of its group on
    vfio-pci, ``/dev/vfio/N`` disappears.  Otherwise ENODEV.
``bus/pci/devices/BDF/reset`` (data: 1)
    counts a reset in `resets` (ENOTTY where ``reset_method`` is empty: the
    kernel has no method to offer); the driver stays as it is.
``bus/pci/devices/BDF/sriov_numvfs`` (data: N)
    0 removes every VF of the PF (as hot-unplug does); N > 0 from 0 adds the
    first N VFs of the host table back and probes them; changing a non-zero
    count to another is EBUSY, as in the kernel.
``bus/pci/drivers_probe`` (data: BDF)
    if BDF is unbound: with an override, binds that driver if it is loaded
    (nothing otherwise); without one, binds the device's native driver (its
    driver in the host table), if any (a bind writes ``DRIVER=NAME`` into
    ``BDF/uevent``).  Binding vfio-pci creates
    ``/dev/vfio/N`` (root, 0600) when it is the group's first member there.

``class/mdev_bus/PARENT/mdev_supported_types/TYPE/create`` (data: UUID)
    adds the instance as the mdev core does: ``PARENTNODE/UUID`` with its
    ``mdev_type`` link and ``remove``, ``bus/mdev/devices/UUID``, the type's
    ``devices/UUID``, a new emulated IOMMU group (the lowest free number) and its
    node ``/dev/vfio/N`` (root, 0600); ``available_instances`` goes down by one.
    EEXIST for a UUID that exists, ENOSPC when no instance is available.
``bus/mdev/devices/UUID/remove`` (data: 1)
    waits while a process holds the instance's group open (as the kernel waits for
    its device fds), then takes all of that away again.

Holders: as in the kernel, an unbind from vfio-pci waits while a process
holds the device's group open (here: any fd on the fake ``/dev/vfio/N``, found
in the system's ``/proc``); the kernel's request to the holder has no
counterpart.  `start_unbind` writes from a thread.

The single-open group node: ``/dev/vfio/N`` opens once at a time, as the
legacy VFIO group does.  The simulated kernel knows of the files vfiod itself
opened and keeps (`claim_group`) and of the real processes holding the fake
node (their ``/proc/PID/fd``); an open while either exists fails with EBUSY.
What it cannot see is a file no process has: one in flight over SCM_RIGHTS,
or queued in another daemon's message (the real kernel counts those too).
Tests say such a file exists with `in_flight` (group -> how many; the node
stays while one exists, and opens fail with EBUSY) and a device fd in flight
with `device_in_flight` (its unbind from vfio-pci waits); the real kernel's
word on them is the guest tier's (tests/guest/test_kernels_word_guest.py).

Fault injection is data: ``sim.inject(op, addr, fault)`` with op one of
``override``, ``unbind``, ``probe``, ``reset`` (or ``mdev-create`` with ``PARENT/TYPE``,
``mdev-remove`` with a UUID, for `addr`) and a `Fault`: ``error`` (the write fails
with EIO), ``block`` (the write hangs for `delay` seconds, so the caller's
timeout fires), ``nobind`` (the probe binds nothing), ``vanish`` (the device
disappears before the write), ``slow`` (the write succeeds after `delay`).
Each fault fires `count` times (default once).  Every write is recorded in
`writes` as (relative path, data) so tests can check what was touched.
"""

from __future__ import annotations

import collections
import errno
import os
import shutil
import threading
import time
from typing import TYPE_CHECKING, Callable

import attrs

from ..address import PciAddress
from ..sysfs import Kernel, Roots, classify_mdev_write, classify_write
from ..sysfs.mdev import instance_group as mdev_instance_group
from ..sysfs.write import GroupClaim, MdevControl, ThreadUnbind, Unbinding
from ..sysfs.procs import open_files
from ..sysfs.read import _readlink

if TYPE_CHECKING:
    from ..udev import EventHandler
    from .hosts.builder import Fn, HostSpec


class _SimMdev(MdevControl):
    """The simulated kernel's instances: a removal begun by the ladder is written by a thread."""

    def __init__(self, roots: Roots, write: Callable[[str, str, str], None],
                 write_file: Callable[[str, str], None]):
        super().__init__(roots, write)
        self._write_file = write_file

    def start_remove(self, uuid: str) -> Unbinding:
        rel = self.remove_rel(uuid)
        return ThreadUnbind(lambda: self._write_file(rel, "1"))


@attrs.define
class Fault:
    kind: str                    # error | block | nobind | vanish | slow
    delay: float = 0.0
    count: int = 1


class SimKernel(Kernel):
    def __init__(self, roots: Roots, native: dict[PciAddress, str | None],
                 write_timeout: float = 2.0, bind_timeout: float = 0.5):
        super().__init__(roots, write_timeout=write_timeout, bind_timeout=bind_timeout)
        self.native = dict(native)
        self.faults: dict[tuple[str, PciAddress | str], Fault] = {}
        self.writes: list[tuple[str, str]] = []
        self.resets: list[PciAddress] = []
        self.vf_table: dict[PciAddress, list[Fn]] = {}    # PF -> the VFs its hardware can show (host table)
        self.iommu = True
        self.loaded_modules: list[str] = []
        self.after_write: Callable[[str, str], None] | None = None   # called with (rel, data) after each write took effect
        self.write_log: str | None = None  # a file that gets one "path<TAB>data" line per write
        self.event_sink: EventHandler | None = None   # called with (action, addr, driver), as a uevent would be
        self._lock = threading.RLock()
        self.holders_block = True          # an unbind from vfio-pci waits for the group's holders
        self.claimed: collections.Counter[int] = collections.Counter()     # vfiod's own opens of a group node
        self.in_flight: collections.Counter[int] = collections.Counter()   # group files no process has
        self.device_in_flight: set[PciAddress] = set()                     # device fds no process has
        self.mdev = _SimMdev(self.roots, self._write, self._write_file)

    @classmethod
    def for_spec(cls, spec: HostSpec, roots: Roots, **kw: float) -> "SimKernel":
        k = cls(roots, {fn.addr: fn.driver for fn in spec.functions}, **kw)
        k.iommu = spec.iommu
        for fn in sorted(spec.functions, key=lambda f: f.addr):
            if fn.vf_of:
                k.vf_table.setdefault(fn.vf_of, []).append(fn)
        return k

    def inject(self, op: str, addr: PciAddress | str, fault: Fault) -> None:
        self.faults[(op, addr)] = fault

    def _fault(self, op: str, addr: PciAddress | str) -> Fault | None:
        f = self.faults.get((op, addr))
        if f is None or f.count <= 0:
            return None
        f.count -= 1
        return f

    def _fire(self, op: str, addr: PciAddress | str) -> Fault | None:
        """The fault injected for this write, if any: ``error`` and ``block`` fail it here,
        ``slow`` delays it; the caller acts on the others."""
        fault = self._fault(op, addr)
        if fault and fault.kind == "error":
            raise OSError(errno.EIO, "Input/output error (injected)")
        if fault and fault.kind in ("block", "slow"):
            time.sleep(fault.delay)
            if fault.kind == "block":
                raise OSError(errno.EINTR, "interrupted after blocking (injected)")
        return fault

    # ---- paths

    def _dev(self, addr: PciAddress) -> str:
        return os.path.realpath(os.path.join(self.roots.sysfs, "bus/pci/devices", addr.sysfs_name))

    def _drv(self, name: str) -> str:
        return os.path.join(self.roots.sysfs, "bus/pci/drivers", name)

    def _group(self, addr: PciAddress) -> int | None:
        t = _readlink(os.path.join(self._dev(addr), "iommu_group"))
        return int(os.path.basename(t)) if t else None

    # ---- the primitive

    def _write_file(self, rel: str, data: str) -> None:
        self._apply(rel, data)
        if self.after_write:
            self.after_write(rel, data)

    def _apply(self, rel: str, data: str) -> None:
        self.writes.append((rel, data))
        if self.write_log:
            with open(self.write_log, "a") as f:
                f.write(f"{rel}\t{data.strip()}\n")
        if rel.startswith(("class/mdev_bus/", "bus/mdev/")):
            self._apply_mdev(rel, data)
            return
        parts = rel.split("/")
        writable, addr = classify_write(rel, data)
        op = writable.op
        fault = self._fire(op, addr)
        if fault and fault.kind == "vanish":
            self.remove_device(addr)
        if op == "unbind" and parts[3] == "vfio-pci" and self.holders_block:
            self._wait_for_holders(addr)
        with self._lock:
            if not os.path.isdir(os.path.join(self.roots.sysfs, "bus/pci/devices", addr.sysfs_name)):
                raise OSError(errno.ENODEV, "No such device")
            if op == "override":
                text = data.strip()
                with open(os.path.join(self._dev(addr), "driver_override"), "w") as f:
                    f.write((text or "(null)") + "\n")
            elif op == "numvfs":
                self._set_numvfs(addr, int(data.strip()))
            elif op == "reset":
                if not self.reset_methods(addr):
                    raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")
                self.resets.append(addr)
            elif op == "unbind":
                if self.driver_of(addr) != parts[3]:
                    raise OSError(errno.ENODEV, "No such device")
                self._unbind(addr)
            else:
                if self.driver_of(addr) is not None:
                    return
                if fault and fault.kind == "nobind":
                    return
                override = self.override_of(addr)
                target = override if override is not None else self.native.get(addr)
                if target and os.path.isdir(self._drv(target)):
                    self._bind(addr, target)

    def _wait_for_holders(self, addr: PciAddress) -> None:
        group = self._group(addr)
        while group is not None and (self._files_in_processes(group) or addr in self.device_in_flight):
            time.sleep(0.05)

    def _files_in_processes(self, group: int) -> list[int]:
        """The processes (this one excepted) holding the fake node of `group` open."""
        node = self.vfio_group_path(group)
        return [pid for pid, _fd, _link in open_files(lambda link: link in (node, node + " (deleted)"))]

    def _held(self, group: int) -> bool:
        return bool(self.claimed[group] or self.in_flight[group] or self._files_in_processes(group))

    # ---- the single-open group node

    def open_vfio_group(self, group: int) -> int:
        if self._held(group):
            raise OSError(errno.EBUSY, "Device or resource busy")
        return super().open_vfio_group(group)

    def claim_group(self, group: int) -> GroupClaim | None:
        claim = super().claim_group(group)
        if claim is not None:
            self.claimed[group] += 1

            def let_go() -> None:
                self.claimed[group] -= 1
            claim.on_close = let_go
        return claim

    def start_unbind(self, addr: PciAddress) -> Unbinding | None:
        drv = self.driver_of(addr)
        if drv is None:
            return None
        rel = f"bus/pci/drivers/{drv}/unbind"
        classify_write(rel, addr.sysfs_name)
        return ThreadUnbind(lambda: self._write_file(rel, addr.sysfs_name))

    def _event(self, action: str, addr: PciAddress, driver: str | None) -> None:
        if self.event_sink:
            self.event_sink(action, addr, driver)

    def _bind(self, addr: PciAddress, driver: str) -> None:
        self._bind_links(addr, driver)
        self._event("bind", addr, driver)

    def _bind_links(self, addr: PciAddress, driver: str) -> None:
        node = self._dev(addr)
        drv = self._drv(driver)
        os.symlink(os.path.relpath(node, drv), os.path.join(drv, addr.sysfs_name))
        os.symlink(os.path.relpath(drv, node), os.path.join(node, "driver"))
        from .hosts.builder import set_uevent_driver
        set_uevent_driver(node, driver)
        if driver == "vfio-pci":
            group = self._group(addr)
            path = self.vfio_group_path(group) if group is not None else None
            if path and not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
                os.close(fd)
                os.chmod(path, 0o600)

    def _unbind(self, addr: PciAddress) -> None:
        driver = self.driver_of(addr)
        self._unbind_links(addr)
        self._event("unbind", addr, driver)

    def _unbind_links(self, addr: PciAddress) -> None:
        node = self._dev(addr)
        driver = self.driver_of(addr)
        os.unlink(os.path.join(node, "driver"))
        from .hosts.builder import set_uevent_driver
        set_uevent_driver(node, None)
        if driver is None:           # the link was there but named nothing: no back link
            return
        try:
            os.unlink(os.path.join(self._drv(driver), addr.sysfs_name))
        except FileNotFoundError:
            pass
        if driver == "vfio-pci":
            group = self._group(addr)
            if group is not None and not self._vfio_members(group) and not self.in_flight[group]:
                try:
                    os.unlink(self.vfio_group_path(group))
                except FileNotFoundError:
                    pass

    def _vfio_members(self, group: int) -> list[str]:
        gdir = os.path.join(self.roots.sysfs, "kernel/iommu_groups", str(group), "devices")
        try:
            names = os.listdir(gdir)
        except OSError:
            return []
        return [n for n in names if self.driver_of(PciAddress.from_sysfs_name(n)) == "vfio-pci"]

    # ---- mediated devices

    def _apply_mdev(self, rel: str, data: str) -> None:
        writable, uuid = classify_mdev_write(rel, data)
        parts = rel.split("/")
        key = f"{parts[2]}/{parts[4]}" if writable.op == "mdev-create" else uuid
        self._fire(writable.op, key)
        if writable.op == "mdev-create":
            self._mdev_create(os.path.join(self.roots.sysfs, os.path.dirname(rel)), uuid)
            return
        group = mdev_instance_group(self.roots, uuid)
        while group is not None and self.holders_block and self._files_in_processes(group):
            time.sleep(0.05)
        self._mdev_remove(uuid)

    def _mdev_create(self, type_dir: str, uuid: str) -> None:
        with self._lock:
            bus = os.path.join(self.roots.sysfs, "bus/mdev/devices")
            if not os.path.isdir(type_dir):
                raise OSError(errno.ENOENT, "No such file or directory")
            if os.path.lexists(os.path.join(bus, uuid)):
                raise OSError(errno.EEXIST, "File exists")
            avail_path = os.path.join(type_dir, "available_instances")
            with open(avail_path) as f:
                available = int(f.read().strip() or 0)
            if available <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            parent = os.path.dirname(os.path.dirname(os.path.realpath(type_dir)))
            node = os.path.join(parent, uuid)
            os.makedirs(node)
            open(os.path.join(node, "remove"), "w").close()
            os.symlink(os.path.relpath(os.path.realpath(type_dir), node), os.path.join(node, "mdev_type"))
            groups = os.path.join(self.roots.sysfs, "kernel/iommu_groups")
            used = {int(n) for n in os.listdir(groups) if n.isdigit()} if os.path.isdir(groups) else set()
            group = next(n for n in range(len(used) + 1) if n not in used)
            gdir = os.path.join(groups, str(group), "devices")
            os.makedirs(gdir)
            os.symlink(os.path.relpath(os.path.join(groups, str(group)), node), os.path.join(node, "iommu_group"))
            os.symlink(os.path.relpath(node, gdir), os.path.join(gdir, uuid))
            os.symlink(os.path.relpath(node, bus), os.path.join(bus, uuid))
            devs = os.path.join(os.path.realpath(type_dir), "devices")
            os.symlink(os.path.relpath(node, devs), os.path.join(devs, uuid))
            with open(avail_path, "w") as f:
                f.write(f"{available - 1}\n")
            path = self.vfio_group_path(group)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            os.chmod(path, 0o600)

    def _mdev_remove(self, uuid: str) -> None:
        with self._lock:
            link = os.path.join(self.roots.sysfs, "bus/mdev/devices", uuid)
            if not os.path.lexists(link):
                raise OSError(errno.ENODEV, "No such device")
            node = os.path.realpath(link)
            type_dir = os.path.realpath(os.path.join(node, "mdev_type"))
            group = mdev_instance_group(self.roots, uuid)
            for gone in (link, os.path.join(type_dir, "devices", uuid)):
                try:
                    os.unlink(gone)
                except FileNotFoundError:
                    pass
            if group is not None:
                shutil.rmtree(os.path.join(self.roots.sysfs, "kernel/iommu_groups", str(group)), ignore_errors=True)
                try:
                    os.unlink(self.vfio_group_path(group))
                except FileNotFoundError:
                    pass
            shutil.rmtree(node, ignore_errors=True)
            avail_path = os.path.join(type_dir, "available_instances")
            with open(avail_path) as f:
                available = int(f.read().strip() or 0)
            with open(avail_path, "w") as f:
                f.write(f"{available + 1}\n")

    def create_mdev_behind_vfiods_back(self, kind: str, uuid: str) -> None:
        """Someone else (an admin, ``mdevctl start``) makes an instance of ``PARENT/TYPE``."""
        parent, mtype = kind.split("/")
        self._mdev_create(os.path.join(self.roots.sysfs, "class/mdev_bus", parent, "mdev_supported_types", mtype),
                          uuid)

    def mdev_instances(self) -> dict[str, int | None]:
        """Every instance now: its UUID -> its group (what tests compare before and after)."""
        bus = os.path.join(self.roots.sysfs, "bus/mdev/devices")
        names = sorted(os.listdir(bus)) if os.path.isdir(bus) else []
        return {u: mdev_instance_group(self.roots, u) for u in names}

    # ---- the rest of the kernel's behaviour

    def load_driver(self, driver: str) -> None:
        if not self.driver_loaded(driver):
            self.loaded_modules.append(driver)
            d = self._drv(driver)
            os.makedirs(d)
            for f in ("bind", "unbind", "new_id", "remove_id"):
                open(os.path.join(d, f), "w").close()

    def remove_device(self, addr: PciAddress) -> None:
        """The device disappears (hot-unplug, or sysfs ``remove``)."""
        with self._lock:
            link = os.path.join(self.roots.sysfs, "bus/pci/devices", addr.sysfs_name)
            if not os.path.lexists(link):
                return
            node = self._dev(addr)
            if self.driver_of(addr):
                self._unbind(addr)
            group = self._group(addr)
            if group is not None:
                try:
                    os.unlink(os.path.join(self.roots.sysfs, "kernel/iommu_groups", str(group),
                                           "devices", addr.sysfs_name))
                except FileNotFoundError:
                    pass
            os.unlink(link)
            shutil.rmtree(node, ignore_errors=True)
        self._event("remove", addr, None)

    def _set_numvfs(self, pf: PciAddress, count: int) -> None:
        from .hosts.builder import add_function
        node = self._dev(pf)
        now = self.numvfs(pf) or 0
        if count == now:
            return
        if now and count:
            raise OSError(errno.EBUSY, "Device or resource busy")
        if count == 0:
            for i in reversed(range(now)):
                link = os.path.join(node, f"virtfn{i}")
                target = _readlink(link)
                if target:
                    self.remove_device(PciAddress.from_sysfs_name(os.path.basename(target)))
                    os.unlink(link)
        else:
            table = self.vf_table.get(pf, [])
            if count > len(table):
                raise OSError(errno.ERANGE, "Numerical result out of range")
            for i, fn in enumerate(table[:count]):
                parent = self._dev(fn.parent) if fn.parent else None
                vf_node = add_function(self.roots.sysfs, fn, parent, self.iommu, driver="")
                os.symlink(os.path.relpath(node, vf_node), os.path.join(vf_node, "physfn"))
                os.symlink(os.path.relpath(vf_node, node), os.path.join(node, f"virtfn{i}"))
                self._event("add", fn.addr, None)
                target = self.override_of(fn.addr) or self.native.get(fn.addr)
                if target and os.path.isdir(self._drv(target)):
                    self._bind(fn.addr, target)
        with open(os.path.join(node, "sriov_numvfs"), "w") as f:
            f.write(f"{count}\n")

    def bind_behind_vfiods_back(self, addr: PciAddress, driver: str) -> None:
        """Someone else moves `addr` to `driver` (an admin's echo into sysfs, say)."""
        with self._lock:
            if self.driver_of(addr):
                self._unbind(addr)
            self._bind(addr, driver)

    def state(self) -> dict[str, tuple[str | None, str | None]]:
        """(driver, driver_override) of every device: what tests compare before and after."""
        out = {}
        for name in sorted(os.listdir(os.path.join(self.roots.sysfs, "bus/pci/devices"))):
            a = PciAddress.from_sysfs_name(name)
            out[name] = (self.driver_of(a), self.override_of(a))
        return out

    def vfio_nodes(self) -> dict[str, tuple[int, int, int]]:
        d = os.path.join(self.roots.dev, "vfio")
        out = {}
        for n in sorted(os.listdir(d)):
            st = os.stat(os.path.join(d, n))
            out[n] = (st.st_uid, st.st_gid, st.st_mode & 0o7777)
        return out
