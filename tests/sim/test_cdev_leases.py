"""Leases on a host whose kernel has VFIO device cdevs and iommufd (CONFIG_VFIO_DEVICE_CDEV):
the simulated kernel is given what the real one makes when a device binds to vfio-pci
(``BDF/vfio-dev/vfioX/dev`` and the character device ``/dev/vfio/devices/vfioX``), and
``/dev/iommu`` (root 0660).  The guest tier proves the same on a real kernel
(tests/guest/test_modern_vfio_guest.py); these check the bookkeeping fast.

Character devices are made with mknod, which needs root (CI runs as root)."""

import os
import stat

import pytest

from vfiod.address import PciAddress
from vfiod.errors import InvalidArgument, KernelError
from vfiod.sysfs import acl
from vfiod.sysfs.cdev import DevNodes, cdev_node

from .leasekit import Caller, Kit

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mknod of character devices needs root")

USER = Caller(1000)
#: Stand-ins that open anywhere: the memory devices (null, zero, full, random, urandom).
MAJOR, MINORS = 1, (3, 5, 7, 8, 9)


def _with_cdevs(kit):
    """Give the simulated kernel cdevs: each device bound to vfio-pci gets the next
    vfioX (sysfs entry and node), like the real kernel; /dev/iommu is there."""
    iommu = os.path.join(kit.roots.dev, "iommu")
    os.mknod(iommu, stat.S_IFCHR | 0o660, os.makedev(MAJOR, 3))
    os.chmod(iommu, 0o660)
    counter = [0]
    bind = kit.kernel.bind

    def bind_and_cdev(addr, driver):
        bind(addr, driver)
        if driver != "vfio-pci":
            return
        name = f"vfio{counter[0]}"
        counter[0] += 1
        sysdir = os.path.join(kit.roots.sysfs, "bus/pci/devices", addr.sysfs_name, "vfio-dev", name)
        os.makedirs(sysdir)
        minor = MINORS[counter[0] - 1]
        with open(os.path.join(sysdir, "dev"), "w") as f:
            f.write(f"{MAJOR}:{minor}\n")
        os.makedirs(os.path.join(kit.roots.dev, "vfio/devices"), exist_ok=True)
        path = os.path.join(kit.roots.dev, "vfio/devices", name)
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(MAJOR, minor))
    kit.kernel.bind = bind_and_cdev
    return iommu


def _state(path):
    st = os.stat(path)
    try:
        xattr = os.getxattr(path, acl.XATTR)
    except OSError:
        xattr = None
    return st.st_uid, st.st_gid, st.st_mode & 0o7777, xattr


def test_a_lease_hands_over_each_cdev_and_iommufd_and_gives_them_back_as_they_were(tmp_path):
    kit = Kit(tmp_path, "bridge")
    iommu = _with_cdevs(kit)
    before = _state(iommu)
    lease = kit.manager.request(USER, "group:2", "vfio", {})
    ctx = kit.manager.context(lease)
    cdevs = {a: kit.kernel.nodes.device_cdev(a) for a in ctx.endpoints}
    assert all(cdevs.values()) and len(set(cdevs.values())) == len(cdevs) == 2
    for path in cdevs.values():
        assert _state(path)[:3] == (1000, 0, 0o600)
    assert acl.user_perm(iommu, 1000) == 6 and _state(iommu)[:2] == (0, 0)
    be = kit.manager.backends["vfio"]
    for a in ctx.endpoints:
        fd = be.open_device(ctx, a)
        assert os.fstat(fd).st_rdev == os.stat(cdevs[a]).st_rdev
        os.close(fd)
    os.close(be.open_iommu(ctx))
    with pytest.raises(InvalidArgument):
        be.open_device(ctx, PciAddress.parse("0000:00:1f.2"))
    legacy = Kit(tmp_path / "legacy", "bridge")
    old = legacy.manager.request(USER, "group:2", "vfio", {})
    old_ctx = legacy.manager.context(old)
    with pytest.raises(InvalidArgument, match="no VFIO device cdev"):
        be.open_device(old_ctx, old_ctx.endpoints[0])
    with pytest.raises(InvalidArgument, match="no VFIO device cdevs"):
        be.open_iommu(old_ctx)
    legacy.manager.release(old.id, USER)
    kit.manager.release(lease.id, USER)
    assert _state(iommu) == before


def test_iommufd_access_is_shared_by_two_leases_of_one_user_and_an_admins_entry_stays(tmp_path):
    kit = Kit(tmp_path, "sriov")
    iommu = _with_cdevs(kit)
    acl.set_user(iommu, 1234, 4)                       # the admin's own entry
    before = _state(iommu)
    groups = (4, 5)
    a = kit.manager.request(USER, f"group:{groups[0]}", "vfio", {})
    b = kit.manager.request(USER, f"group:{groups[1]}", "vfio", {})
    kit.manager.release(a.id, USER)
    assert acl.user_perm(iommu, 1000) == 6             # b still uses it
    kit.manager.release(b.id, USER)
    assert acl.user_perm(iommu, 1000) is None and acl.user_perm(iommu, 1234) == 4
    assert _state(iommu) == before


def test_a_cdev_is_named_only_when_its_node_is_that_device(tmp_path):
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    addr = PciAddress.parse("0000:01:00.0")
    d = sysfs / "bus/pci/devices" / addr.sysfs_name / "vfio-dev/vfio3"
    d.mkdir(parents=True)
    (d / "dev").write_text(f"{MAJOR}:3\n")
    (dev / "vfio/devices").mkdir(parents=True)
    from vfiod.sysfs import Roots
    roots = Roots(str(sysfs), str(tmp_path / "proc"), str(dev))
    node = dev / "vfio/devices/vfio3"
    assert cdev_node(roots, addr) is None                 # no node
    node.write_text("")
    assert cdev_node(roots, addr) is None                 # not a character device
    node.unlink()
    os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(MAJOR, 4))
    assert cdev_node(roots, addr) is None                 # another device's number
    node.unlink()
    os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(MAJOR, 3))
    assert cdev_node(roots, addr) == str(node)
    other = tmp_path / "dev/sda"
    other.write_text("")
    with pytest.raises(KernelError):
        DevNodes(roots).acl(str(other), 1000, True)


class _Crash(BaseException):
    """The process dies here: nothing after it runs, the journal stays as it was."""


@pytest.mark.parametrize("at", ["cdev-chown", "iommu-acl"])
def test_a_crash_in_the_middle_of_the_hand_over_is_undone_on_restart(tmp_path, at):
    kit = Kit(tmp_path, "bridge")
    iommu = _with_cdevs(kit)
    before = _state(iommu)
    if at == "cdev-chown":
        chown = kit.kernel.set_node_owner

        def crash_after_cdev(path, uid, gid, mode):
            chown(path, uid, gid, mode)
            if "/vfio/devices/" in path:
                raise _Crash()
        kit.kernel.set_node_owner = crash_after_cdev
    else:
        acl_set = kit.kernel.nodes.acl

        def crash_after_acl(path, uid, grant):
            acl_set(path, uid, grant)
            if path == iommu:
                raise _Crash()
        kit.kernel.nodes.acl = crash_after_acl
    with pytest.raises(_Crash):
        kit.manager.request(USER, "group:2", "vfio", {})
    (lease,) = kit.journal.leases()
    cdevs = [kit.kernel.nodes.device_cdev(a) for a in kit.manager.endpoints(lease.id)]
    assert any(_state(p)[0] == 1000 for p in cdevs if p), at     # the crash left them handed over
    assert acl.user_perm(iommu, 1000) == (6 if at == "iommu-acl" else None)

    again = Kit(tmp_path, "bridge", owner_alive=lambda lease: True)
    again.manager.reconcile()
    assert again.journal.leases() == []
    assert all(_state(p)[:3] == (0, 0, 0o600) for p in cdevs if p), at
    assert _state(iommu) == before
