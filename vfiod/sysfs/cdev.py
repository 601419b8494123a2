"""VFIO device cdevs and iommufd: what the kernel shows of them, each answer checked.

Kernels built with ``CONFIG_VFIO_DEVICE_CDEV`` (6.6 and newer; not Debian's) give each
device bound to vfio-pci a character device of its own besides the group node::

    SYSFS/bus/pci/devices/BDF/vfio-dev/vfioX/dev      "MAJOR:MINOR"
    DEV/vfio/devices/vfioX                            root 0600, made by devtmpfs
    DEV/iommu                                         iommufd (CONFIG_IOMMUFD): root 0660

A process opens the cdev, binds it to an iommufd (``VFIO_DEVICE_BIND_IOMMUFD``) and
attaches it to an IO address space allocated there: the group node and the container
are not involved.  The numbers X are handed out as devices bind and reused as they
go, so a path alone names no device: `cdev_node` answers only when the node's
device number is the one sysfs gives the device now.
"""

from __future__ import annotations

import os
import re
import stat

from ..address import PciAddress
from ..errors import KernelError
from .acl import set_user as acl_set_user, user_perm as acl_user_perm
from .read import Roots, _text

IOMMU_NODE = "iommu"
_CDEV_NAME = re.compile(r"vfio[0-9]{1,6}")
#: The device nodes vfiod may hand over (chown, chmod, ACL entries), relative to the dev root:
#: a group's node, the container, a device's cdev, and iommufd.
DEV_WRITABLE = (re.compile(r"vfio/[0-9]{1,6}"), re.compile(r"vfio/vfio"), re.compile(r"vfio/devices/vfio[0-9]{1,6}"),
                re.compile(IOMMU_NODE))


def cdev_name(roots: Roots, addr: PciAddress) -> str | None:
    """``vfioX``, the cdev the kernel made for `addr` (bound to a VFIO driver), or None."""
    try:
        names = [n for n in os.listdir(os.path.join(roots.sysfs, "bus/pci/devices", addr.sysfs_name, "vfio-dev"))
                 if _CDEV_NAME.fullmatch(n)]
    except OSError:
        return None
    return names[0] if len(names) == 1 else None


def _rdev(roots: Roots, addr: PciAddress, name: str) -> int | None:
    text = _text(os.path.join(roots.sysfs, "bus/pci/devices", addr.sysfs_name, "vfio-dev", name, "dev"))
    m = re.fullmatch(r"([0-9]+):([0-9]+)", text or "")
    return os.makedev(int(m.group(1)), int(m.group(2))) if m else None


def cdev_node(roots: Roots, addr: PciAddress) -> str | None:
    """The path of `addr`'s cdev, where the node there is the character device sysfs
    names for it now; None where the kernel has no cdev for it (or the node is not it)."""
    name = cdev_name(roots, addr)
    if name is None:
        return None
    want = _rdev(roots, addr, name)
    path = os.path.join(roots.dev, "vfio/devices", name)
    try:
        st = os.stat(path)
    except OSError:
        return None
    return path if want is not None and stat.S_ISCHR(st.st_mode) and st.st_rdev == want else None


def iommu_path(roots: Roots) -> str:
    return os.path.join(roots.dev, IOMMU_NODE)


def has_iommufd(roots: Roots) -> bool:
    """Is there an iommufd (``/dev/iommu``, a character device)?"""
    try:
        return stat.S_ISCHR(os.stat(iommu_path(roots)).st_mode)
    except OSError:
        return False


class DevNodes:
    """The VFIO device cdevs and iommufd of a host (`Kernel.nodes`), and ACL entries on
    the VFIO nodes of `DEV_WRITABLE`."""

    def __init__(self, roots: Roots):
        self.roots = roots

    def device_cdev(self, addr: PciAddress) -> str | None:
        """``/dev/vfio/devices/vfioX`` of `addr`, checked against sysfs's device number; None
        where the kernel has no cdev for it."""
        return cdev_node(self.roots, addr)

    def open_device_cdev(self, addr: PciAddress) -> int:
        path = self.device_cdev(addr)
        if path is None:
            raise KernelError(f"{addr}: this kernel has no VFIO device cdev for it (CONFIG_VFIO_DEVICE_CDEV)")
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def iommu_path(self) -> str:
        return iommu_path(self.roots)

    def open_iommu(self) -> int:
        return os.open(self.iommu_path(), os.O_RDWR | os.O_CLOEXEC)

    def acl_needed(self, path: str, uid: int) -> bool:
        """Would `uid` need an ACL entry on `path` to open it read-write, having none now?
        (False where the node is world read-write or gone, or `uid` has an entry already.)"""
        try:
            st = os.stat(path)
            return st.st_mode & 0o006 != 0o006 and acl_user_perm(path, uid) is None
        except OSError:
            return False

    def acl(self, path: str, uid: int, grant: bool) -> bool:
        """Add (or remove) a POSIX ACL entry rw for `uid` on the VFIO node `path` (not
        where it is world read-write already).  Returns whether an entry changed."""
        rel = os.path.relpath(path, self.roots.dev)
        if not any(p.fullmatch(rel) for p in DEV_WRITABLE):
            raise KernelError(f"refusing to change {path!r}: not a VFIO node")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        if grant and st.st_mode & 0o006 == 0o006:
            return False
        try:
            return acl_set_user(path, uid, 0o6 if grant else None)
        except OSError as e:
            raise KernelError(f"cannot set an ACL on {path}: {e.strerror}") from None
