"""Writing the kernel: the one table of writable attributes, and `Kernel`, which writes them."""

from __future__ import annotations

import errno
import os
import re
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:
    import subprocess

import attrs

from ..address import PciAddress
from ..errors import InvalidAddress, InvalidArgument, KernelError
from .device import VFIO_DRIVERS
from .read import Roots, SysfsReader, _int, _readlink, _text
from .cdev import DEV_WRITABLE, DevNodes
from .mdev import UUID, InstanceNow, MdevKind, MdevType, instance_now, mdevctl_defined, mdevctl_dir, read_type
from .procs import Holder, MemlockGrant, Search, find_holders, grant_memlock, restore_memlock, signal_holder
from .usage import device_usage


# Every write vfiod makes to the kernel goes through `Kernel._write`, which
# accepts only the attributes of `WRITABLE`; everything else is refused before
# a file is opened.  `vfiod.sim.kernel.SimKernel` dispatches on the same table
# to give a fake tree the kernel's semantics, so one binding logic runs on both.

_BDF = r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]"
_DRIVER = r"[A-Za-z0-9_.-]{1,64}"
_MDEV_NAME = r"[A-Za-z0-9_.:+-]{1,64}"


@attrs.frozen
class Writable:
    """One kind of sysfs attribute vfiod writes: `op` names what the kernel does on a
    write, `path` matches the attribute (relative to the sysfs root), and the device it
    acts on is named in the path (``bdf`` group) or, where the path has none, by the
    data written (unbind, drivers_probe)."""

    op: str
    path: re.Pattern[str]

    def device(self, rel: str, data: str) -> PciAddress:
        m = self.path.fullmatch(rel)
        assert m is not None
        bdf = m.groupdict().get("bdf") or data.strip()
        return PciAddress.from_sysfs_name(bdf)


#: What vfiod may write under /sys, and what each write does:
#:   override  BDF/driver_override: the only driver a probe may bind ("\n" clears it)
#:   reset     BDF/reset: reset the function with the methods of BDF/reset_method
#:   numvfs    BDF/sriov_numvfs: an SR-IOV PF's number of VFs (through 0)
#:   unbind    drivers/NAME/unbind: detach BDF (the data) from NAME
#:   probe     drivers_probe: let the driver core bind BDF (the data), honouring its override
WRITABLE: tuple[Writable, ...] = (
    Writable("override", re.compile(rf"bus/pci/devices/(?P<bdf>{_BDF})/driver_override")),
    Writable("reset", re.compile(rf"bus/pci/devices/(?P<bdf>{_BDF})/reset")),
    Writable("numvfs", re.compile(rf"bus/pci/devices/(?P<bdf>{_BDF})/sriov_numvfs")),
    Writable("unbind", re.compile(rf"bus/pci/drivers/(?P<driver>{_DRIVER})/unbind")),
    Writable("probe", re.compile(r"bus/pci/drivers_probe")),
)


#: What vfiod may write for mediated devices (the instance is named by the data or the path):
#:   mdev-create  class/mdev_bus/PARENT/mdev_supported_types/TYPE/create: make instance UUID (the data)
#:   mdev-remove  bus/mdev/devices/UUID/remove (data: 1): remove the instance (waits while it is open)
MDEV_WRITABLE: tuple[Writable, ...] = (
    Writable("mdev-create", re.compile(rf"class/mdev_bus/(?P<parent>{_MDEV_NAME})/mdev_supported_types/"
                                       rf"(?P<type>{_MDEV_NAME})/create")),
    Writable("mdev-remove", re.compile(rf"bus/mdev/devices/(?P<uuid>{UUID.pattern})/remove")),
)


def classify_mdev_write(rel: str, data: str) -> tuple[Writable, str]:
    """The `MDEV_WRITABLE` entry a write to `rel` falls under, and the instance's UUID;
    `KernelError` for anything else (a name of ``.`` or ``..`` included)."""
    for w in MDEV_WRITABLE:
        m = w.path.fullmatch(rel)
        if m is None or any(v in (".", "..") for v in m.groupdict().values()):
            continue
        uuid = m.groupdict().get("uuid") or data.strip()
        if UUID.fullmatch(uuid) and (w.op == "mdev-create" or data.strip() == "1"):
            return w, uuid
    raise KernelError(f"refusing to write {rel!r}: not a path vfiod writes")


def classify_write(rel: str, data: str) -> tuple[Writable, PciAddress]:
    """The table entry a write to `rel` falls under, and the device it acts on;
    `KernelError` for anything vfiod does not write."""
    for w in WRITABLE:
        if w.path.fullmatch(rel):
            try:
                return w, w.device(rel, data)
            except InvalidAddress:
                break
    raise KernelError(f"refusing to write {rel!r}: not a path vfiod writes")


#: The driver_override that matches no driver: a probe binds nothing.
NO_DRIVER = "none"
#: The "original driver" of a device udev bound early (`vfiod.sysfs.early`): it never had a
#: host driver in this boot, so it goes back to whatever the kernel's own probe binds.
KERNELS_CHOICE = "(kernel's choice)"


def _check_driver_name(name: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(_DRIVER, name) or name in (".", ".."):
        raise InvalidArgument(f"not a driver name: {name!r}")
    return name


class Kernel:
    """Writes to the real kernel (below `roots`), with a timeout on each write.

    A write to ``unbind`` can block for as long as a process holds the device
    open, so each write runs in a worker thread and a write that has not
    returned after `write_timeout` seconds fails with the device named.
    """

    def __init__(self, roots: Roots | None = None, write_timeout: float = 10.0,
                 bind_timeout: float = 10.0):
        self.roots = roots or Roots()
        self.reader = SysfsReader(self.roots)
        self.nodes = DevNodes(self.roots)        # the cdevs and iommufd, and ACLs on VFIO nodes
        self.mdev = MdevControl(self.roots, self._write)    # mediated device instances
        self.write_timeout = write_timeout
        self.bind_timeout = bind_timeout

    # ---- primitives (the simulated kernel overrides these)

    def _write_file(self, rel: str, data: str) -> None:
        fd = os.open(os.path.join(self.roots.sysfs, rel), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)

    def _write(self, rel: str, data: str, what: str, timeout: float | None = None) -> None:
        if rel.startswith(("class/mdev_bus/", "bus/mdev/")):
            classify_mdev_write(rel, data)
        else:
            classify_write(rel, data)
        timeout = self.write_timeout if timeout is None else timeout
        result: list[OSError | None] = []

        def work() -> None:
            try:
                self._write_file(rel, data)
                result.append(None)
            except OSError as e:
                result.append(e)

        t = threading.Thread(target=work, name=f"sysfs-write {rel}", daemon=True)
        t.start()
        t.join(timeout)
        if not result:
            raise KernelError(f"{what}: the kernel did not answer within {timeout:g} s "
                               f"(writing {rel}; is a process holding the device?)")
        e = result[0]
        if e is not None:
            raise KernelError(f"{what}: the kernel refused (writing {rel}: {e.strerror or e})")

    def driver_of(self, addr: PciAddress) -> str | None:
        target = _readlink(os.path.join(self.roots.sysfs, "bus/pci/devices", addr.sysfs_name, "driver"))
        return os.path.basename(target) if target else None

    def override_of(self, addr: PciAddress) -> str | None:
        text = _text(os.path.join(self.roots.sysfs, "bus/pci/devices", addr.sysfs_name, "driver_override"))
        return None if text in (None, "", "(null)") else text

    def exists(self, addr: PciAddress) -> bool:
        return os.path.isdir(os.path.join(self.roots.sysfs, "bus/pci/devices", addr.sysfs_name))

    def driver_loaded(self, driver: str) -> bool:
        return os.path.isdir(os.path.join(self.roots.sysfs, "bus/pci/drivers", _check_driver_name(driver)))

    def load_driver(self, driver: str) -> None:
        """modprobe the module behind `driver` (vfio-pci, pci-stub) if it is not there yet."""
        if self.driver_loaded(driver):
            return
        import subprocess

        module = driver if driver in VFIO_DRIVERS else None
        if module is None:
            raise KernelError(f"driver {driver} is not loaded and vfiod does not load it")
        p = subprocess.run(["modprobe", module], capture_output=True, text=True, timeout=30)
        if p.returncode != 0 or not self.driver_loaded(driver):
            raise KernelError(f"cannot load {module}: {p.stderr.strip() or 'modprobe failed'}")

    # ---- the steps

    def set_override(self, addr: PciAddress, driver: str | None) -> None:
        value = "\n" if driver is None else _check_driver_name(driver)
        self._write(f"bus/pci/devices/{addr.sysfs_name}/driver_override", value,
                    f"{addr}: setting driver_override")

    def unbind(self, addr: PciAddress) -> None:
        drv = self.driver_of(addr)
        if drv is None:
            return
        self._write(f"bus/pci/drivers/{_check_driver_name(drv)}/unbind", addr.sysfs_name,
                    f"{addr}: unbinding from {drv}")

    def start_unbind(self, addr: PciAddress) -> Unbinding | None:
        """Begin unbinding `addr` from its driver without waiting for it (None: it has none).

        The revoke ladder's way of asking a VFIO device's holders to let go: the
        kernel's unbind from vfio-pci fires the device's request eventfd and then
        waits, uninterruptibly, until every fd of the device is closed.  So the
        write runs in a child process of its own (``sh``), not in vfiod: a vfiod
        that is killed meanwhile exits at once and drops its bus connection, and
        the write completes whenever the holders let go."""
        import subprocess

        drv = self.driver_of(addr)
        if drv is None:
            return None
        rel = f"bus/pci/drivers/{_check_driver_name(drv)}/unbind"
        classify_write(rel, addr.sysfs_name)
        proc = subprocess.Popen(["/bin/sh", "-c", 'printf %s "$1" > "$2"', "vfiod-unbind", addr.sysfs_name,
                                 os.path.join(self.roots.sysfs, rel)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                close_fds=True, start_new_session=True)
        return _ChildUnbind(proc)

    def probe(self, addr: PciAddress) -> None:
        self._write("bus/pci/drivers_probe", addr.sysfs_name, f"{addr}: probing")

    def wait_driver(self, addr: PciAddress, want: str | None, timeout: float | None = None) -> str | None:
        deadline = time.monotonic() + (self.bind_timeout if timeout is None else timeout)
        delay = 0.001
        while True:
            have = self.driver_of(addr)
            if have == want or time.monotonic() >= deadline:
                return have
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def bind(self, addr: PciAddress, driver: str) -> None:
        """Bind `addr` to `driver` through driver_override (never new_id) and verify it."""
        _check_driver_name(driver)
        if not self.exists(addr):
            raise KernelError(f"{addr}: the device is gone")
        if self.driver_of(addr) == driver:
            return
        self.set_override(addr, driver)
        self.unbind(addr)
        self.probe(addr)
        have = self.wait_driver(addr, driver)
        if have != driver:
            raise KernelError(f"{addr}: probing bound {have or 'no driver'}, not {driver}")

    def detach(self, addr: PciAddress) -> None:
        """Leave `addr` with no driver, and keep it so: driver_override names no
        driver ("none"), so a later probe binds nothing."""
        if not self.exists(addr):
            raise KernelError(f"{addr}: the device is gone")
        if self.override_of(addr) != NO_DRIVER:
            self.set_override(addr, NO_DRIVER)
        self.unbind(addr)
        have = self.wait_driver(addr, None)
        if have is not None:
            raise KernelError(f"{addr}: still on {have} after unbinding")

    def restore(self, addr: PciAddress, driver: str | None, override: str | None) -> None:
        """Give `addr` back its recorded driver and driver_override, and verify it.

        While the device is moved, driver_override names the recorded driver,
        so the probe binds exactly that one; a device that had no driver is
        unbound and not probed.  The recorded override is written last."""
        if not self.exists(addr):
            raise KernelError(f"{addr}: the device is gone")
        if driver == KERNELS_CHOICE:
            # An early-bound device: the recorded override (none, for the udev helper's
            # own), unbind, and let the kernel's probe choose, as it would have at boot.
            # Any driver it binds, or none where no driver matches, is the kernel's answer.
            if self.override_of(addr) != override:
                self.set_override(addr, override)
            self.unbind(addr)
            self.probe(addr)
            return
        if self.driver_of(addr) != driver:
            self.set_override(addr, driver if driver is not None else override)
            self.unbind(addr)
            if driver is not None:
                self.probe(addr)
            have = self.wait_driver(addr, driver)
            if have != driver:
                raise KernelError(f"{addr}: restoring {driver or 'no driver'} failed, it is on "
                                   f"{have or 'no driver'}")
        if self.override_of(addr) != override:
            self.set_override(addr, override)

    def numvfs(self, pf: PciAddress) -> int | None:
        return _int(os.path.join(self.roots.sysfs, "bus/pci/devices", pf.sysfs_name, "sriov_numvfs"), 10)

    def set_numvfs(self, pf: PciAddress, count: int) -> None:
        """Enable `count` VFs on `pf`.  The kernel changes a non-zero count only
        through 0, which removes every VF first."""
        now = self.numvfs(pf)
        if now is None:
            raise KernelError(f"{pf}: not an SR-IOV physical function")
        if now == count:
            return
        rel = f"bus/pci/devices/{pf.sysfs_name}/sriov_numvfs"
        # The kernel adds or removes each VF (and its driver) before the write returns:
        # allow a tenth of a second per VF beyond the usual wait.
        if now and count:
            self._write(rel, "0", f"{pf}: disabling its {now} VFs", self.write_timeout + 0.1 * now)
        self._write(rel, str(count), f"{pf}: setting {count} VFs", self.write_timeout + 0.1 * max(now, count))

    def reset_methods(self, addr: PciAddress) -> tuple[str, ...]:
        text = _text(os.path.join(self.roots.sysfs, "bus/pci/devices", addr.sysfs_name, "reset_method"))
        return tuple(text.split()) if text else ()

    def reset(self, addr: PciAddress) -> str:
        """Reset one function (``BDF/reset``: the kernel tries the methods of
        ``reset_method`` in order, saving and restoring its config space).
        Returns the methods the kernel had to choose from."""
        if not self.exists(addr):
            raise KernelError(f"{addr}: the device is gone")
        methods = self.reset_methods(addr)
        if not methods:
            raise KernelError(f"{addr}: the kernel knows no way to reset it (reset_method is empty: "
                               "no FLR, PM or bus reset)")
        self._write(f"bus/pci/devices/{addr.sysfs_name}/reset", "1", f"{addr}: resetting")
        return " ".join(methods)

    # ---- /dev/vfio

    def vfio_group_path(self, group: int) -> str:
        return os.path.join(self.roots.dev, "vfio", str(int(group)))

    def vfio_container_path(self) -> str:
        return os.path.join(self.roots.dev, "vfio", "vfio")

    def wait_vfio_node(self, group: int, timeout: float = 5.0) -> os.stat_result:
        path = self.vfio_group_path(group)
        deadline = time.monotonic() + timeout
        while True:
            try:
                return os.stat(path)
            except FileNotFoundError:
                if time.monotonic() >= deadline:
                    raise KernelError(f"{path} did not appear after binding group {group} to vfio-pci")
                time.sleep(0.01)

    def node_owner(self, path: str) -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return st.st_uid, st.st_gid, st.st_mode & 0o7777

    def set_node_owner(self, path: str, uid: int, gid: int, mode: int) -> None:
        rel = os.path.relpath(path, self.roots.dev)
        if not any(p.fullmatch(rel) for p in DEV_WRITABLE):
            raise KernelError(f"refusing to change {path!r}: not a VFIO node")
        try:
            os.chown(path, uid, gid)
            os.chmod(path, mode)
        except OSError as e:
            raise KernelError(f"cannot hand over {path}: {e.strerror}") from None

    def open_vfio_group(self, group: int) -> int:
        return os.open(self.vfio_group_path(group), os.O_RDWR | os.O_CLOEXEC)

    def claim_group(self, group: int) -> GroupClaim | None:
        """Open the group's node for vfiod itself: the kernel's proof that no file of the
        group exists anywhere (the legacy node opens once at a time: a file in a process,
        in flight over SCM_RIGHTS or queued in another daemon's message makes the open
        fail with EBUSY), and, while vfiod keeps it, that nobody else opens it.  None
        where there is no node (no member on vfio-pci: no group to hold);
        `GroupHeld` with the kernel's word otherwise."""
        try:
            return GroupClaim(self.open_vfio_group(group))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise GroupHeld(group, e) from None

    def open_vfio_container(self) -> int:
        return os.open(self.vfio_container_path(), os.O_RDWR | os.O_CLOEXEC)

    def container_acl_needed(self, uid: int) -> bool:
        """Would `uid` need an ACL entry on /dev/vfio/vfio, having none now?  (False
        where the node is world read-write or gone, or `uid` has an entry already.)"""
        return self.nodes.acl_needed(self.vfio_container_path(), uid)

    def container_acl(self, uid: int, grant: bool) -> bool:
        """Add (or remove) a POSIX ACL entry rw for `uid` on /dev/vfio/vfio.

        Only where the node is not already world read-write (systemd >= 254
        makes it 0600).  Returns whether an entry was added/removed."""
        return self.nodes.acl(self.vfio_container_path(), uid, grant)

    # ---- processes (`vfiod.sysfs.procs`: the system's /proc, real even on a simulated host)

    def grant_memlock(self, pid: int, limit: int, uid: int, start: int | None = None) -> MemlockGrant | None:
        return grant_memlock(pid, limit, uid, start)

    def restore_memlock(self, pid: int, start: int, limits: tuple[int, int]) -> bool:
        return restore_memlock(pid, start, limits)

    def holders(self, group: int, addrs: tuple[PciAddress, ...], uids: frozenset[int] | None,
                pids: frozenset[int] = frozenset(), owner: int | None = None,
                unsure_uids: frozenset[int] = frozenset(), handed: frozenset[str] = frozenset()) -> Search:
        """Which candidate processes hold VFIO group `group` or a device of `addrs`
        (`vfiod.sysfs.procs.find_holders`: the processes of `uids`, and `pids`)."""
        return find_holders(self.roots, group, addrs, uids, pids, owner, unsure_uids, handed)

    def signal_holder(self, holder: Holder, sig: int) -> bool:
        return signal_holder(holder, sig)

    # ---- in use

    def usage(self, addr: PciAddress) -> list[str]:
        """What on the host uses `addr` right now (empty: nothing we can see)."""
        return device_usage(self.roots, addr)




class MdevControl:
    """Mediated device instances (`vfiod.sysfs.mdev`): what the kernel shows now, and the
    two writes, each through `Kernel._write` (the `MDEV_WRITABLE` table)."""

    def __init__(self, roots: Roots, write: Callable[[str, str, str], None]):
        self.roots = roots
        self._write = write

    def type(self, kind: MdevKind) -> MdevType | None:
        """The type as sysfs shows it now (None: the parent has no such type)."""
        return read_type(self.roots, kind)

    def instance(self, uuid: str) -> InstanceNow | None:
        """The instance named `uuid` as sysfs shows it now (None: there is none)."""
        return instance_now(self.roots, uuid)

    def mdevctl_defined(self) -> frozenset[str]:
        """The UUIDs mdevctl defines persistently: the admin's, never vfiod's to remove."""
        return mdevctl_defined(mdevctl_dir(self.roots))

    def create(self, kind: MdevKind, uuid: str) -> None:
        """Make an instance of `kind` named `uuid` (the kernel adds and probes it before
        the write returns)."""
        self._write(kind.create_rel, uuid, f"mdev {kind}: creating {uuid}")

    def remove(self, uuid: str) -> None:
        """Remove instance `uuid` (the kernel waits while a device fd of it is open)."""
        self._write(self.remove_rel(uuid), "1", f"mdev {uuid}: removing")

    @staticmethod
    def remove_rel(uuid: str) -> str:
        rel = f"bus/mdev/devices/{uuid}/remove"
        classify_mdev_write(rel, "1")
        return rel

    def start_remove(self, uuid: str) -> Unbinding:
        """Begin removing instance `uuid` without waiting (the revoke ladder's ask, as
        `Kernel.start_unbind` is for a PCI device): a child process writes, so a vfiod
        killed meanwhile leaves nothing blocked in itself."""
        import subprocess

        proc = subprocess.Popen(["/bin/sh", "-c", 'printf 1 > "$1"', "vfiod-mdev-remove",
                                 os.path.join(self.roots.sysfs, self.remove_rel(uuid))],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                close_fds=True, start_new_session=True)
        return _ChildUnbind(proc)


def claim_covers_devices(roots: Roots, addrs: Iterable[PciAddress]) -> bool:
    """Does a claim of the group of `addrs` (`Kernel.claim_group`) also prove that none
    of them is open or mapped anywhere?  Where none of them has a VFIO device cdev (sysfs
    gives it no ``vfio-dev/vfioX/dev``, and there is no ``/dev/vfio/devices``), yes:
    every device fd is had through the group's file and holds it (Linux >= 5.19; before,
    the group's container, which the open refuses while it is set), and a mapping holds
    its device fd's file, so the single open fails while any exists, in a process or in
    flight.  Where the kernel makes cdevs (``CONFIG_VFIO_DEVICE_CDEV``), no: a cdev
    opened and not yet bound to an iommufd holds its device without the group."""
    if os.path.isdir(os.path.join(roots.dev, "vfio/devices")):
        return False
    for a in addrs:
        base = os.path.join(roots.sysfs, "bus/pci/devices", a.sysfs_name, "vfio-dev")
        try:
            names = os.listdir(base)
        except OSError:
            continue
        if any(os.path.exists(os.path.join(base, n, "dev")) for n in names):
            return False
    return True


class GroupClaim:
    """vfiod's own open file of a group's node (`Kernel.claim_group`): while it is open,
    nobody else can open the node; `close` lets it go (`on_close` is told)."""

    def __init__(self, fd: int, on_close: Callable[[], None] | None = None):
        self.fd = fd
        self.on_close = on_close

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            if self.on_close is not None:
                self.on_close()


class GroupHeld(KernelError):
    """The kernel refused vfiod's open of a group's node: somebody holds the group."""

    def __init__(self, group: int, err: OSError):
        self.group = group
        why = ("a file of it is open somewhere" if err.errno == errno.EBUSY else
               "it has no device any more but is still held" if err.errno == errno.ENODEV else
               err.strerror or str(err))
        self.words = f"the kernel refuses to open /dev/vfio/{group} ({errno.errorcode.get(err.errno or 0, '?')}: {why})"
        super().__init__(self.words)


class Unbinding:
    """An unbind under way (`Kernel.start_unbind`)."""

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds; True once the write has returned."""
        raise NotImplementedError


class _ChildUnbind(Unbinding):
    def __init__(self, proc: subprocess.Popen[bytes]):
        self.proc = proc

    def wait(self, timeout: float) -> bool:
        import subprocess
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False


class ThreadUnbind(Unbinding):
    """An unbind written by a thread (the simulated kernel's, which has no child to spare)."""

    def __init__(self, write: Callable[[], None]):
        def run() -> None:
            try:
                write()
            except Exception:          # the ladder reads the outcome from sysfs, not from here
                pass
        self.thread = threading.Thread(target=run, name="unbind", daemon=True)
        self.thread.start()

    def wait(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()
