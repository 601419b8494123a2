"""The ``vfio`` backend: raw VFIO userspace, DPDK-style.

Binds every endpoint to vfio-pci (loading the module if needed), then makes
/dev/vfio/N owned by the lessee (0600) for the lease — DPDK's EAL and QEMU
open it by path — and, where the host made the container /dev/vfio/vfio
root-only (systemd >= 254 does), adds a POSIX ACL entry for the lessee.
Both are undone when the lease ends.  The daemon never keeps the group open
itself: a group opens only once, and the lessee needs that open.

Where the kernel has VFIO device cdevs (``CONFIG_VFIO_DEVICE_CDEV``), the lease
also hands over each endpoint's cdev (``/dev/vfio/devices/vfioX``, owned by the
lessee, 0600, checked against the device number sysfs gives the endpoint) and an
ACL entry rw on ``/dev/iommu``, counted per user like the container's: the lessee
picks the interface, legacy (group and container) or iommufd (cdev and
``/dev/iommu``); the kernel lets a device be opened one way at a time, and the
group stays the unit of isolation either way.  Each is given back as it was.

A lease of a mediated device (``mdev:PARENT/TYPE``, `vfiod.leases.mdev`) holds no
PCI endpoint: its instance's emulated group is handed over as above (no cdev), and
the lessee uses it through the group and the container.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

from vfiod.backends import BackendBase
from vfiod.address import PciAddress
from vfiod.errors import BackendFailed, Busy, InvalidAddress, InvalidArgument, Unsafe
from vfiod.hookspecs import Register, hookimpl

if TYPE_CHECKING:
    from vfiod.hookspecs import LeaseContext
    from vfiod.state import Record

ROOT_MODE = 0o600


class HandOver(TypedDict):
    """The vfio backend's hand-over record (journaled as JSON)."""

    node: str                  # /dev/vfio/N
    orig: list[int]            # its owner before the lease: uid, gid, mode
    uid: int                   # the lessee
    acl: int | None            # the uid given an ACL entry on the container, if one was added
    cdevs: list[list[str]]     # [[BDF, /dev/vfio/devices/vfioX], ...] handed to the lessee (root 0600 before)
    iommu_acl: int | None      # the uid given an ACL entry on /dev/iommu, if one was added


class VfioBackend(BackendBase):
    name = "vfio"
    driver = "vfio-pci"
    uses_vfio = True

    def check(self, ctx: LeaseContext) -> None:
        if ctx.host.noiommu:
            raise Unsafe("VFIO's no-IOMMU mode is on: a group would give DMA to all of memory, "
                         "which no policy can make safe; vfiod does not lease noiommu groups")

    def plan_hand_over(self, ctx: LeaseContext) -> HandOver:
        # "acl": the lessee's entry on the container is vfiod's: one it adds now (there is
        # none yet, so any entry there at take-back is vfiod's), shares with another lease
        # of the same user, or added before for this lease.  An entry an admin made is not.
        uid = ctx.lease.uid
        ours = (uid in ctx.container_acl_uids or _acl_of(ctx.handed_over) == uid
                or ctx.kernel.container_acl_needed(uid))
        cdevs = [[str(a), path] for a in ctx.endpoints if (path := ctx.kernel.nodes.device_cdev(a))]
        iommu = ctx.kernel.nodes.iommu_path()
        iommu_ours = bool(cdevs) and (uid in ctx.iommu_acl_uids or _acl_of(ctx.handed_over, "iommu_acl") == uid
                                      or ctx.kernel.nodes.acl_needed(iommu, uid))
        return {"node": ctx.kernel.vfio_group_path(ctx.lease.group),
                "orig": [0, 0, ROOT_MODE], "uid": uid, "acl": uid if ours else None,
                "cdevs": cdevs, "iommu_acl": uid if iommu_ours else None}

    def hand_over(self, ctx: LeaseContext) -> HandOver:
        record = self.plan_hand_over(ctx)
        # /dev/vfio/N is (re)created when the first member binds: own it only now, and check.
        ctx.kernel.wait_vfio_node(ctx.lease.group)
        ctx.kernel.set_node_owner(record["node"], ctx.lease.uid, 0, ROOT_MODE)
        owner = ctx.kernel.node_owner(record["node"])
        if owner is None or owner[0] != ctx.lease.uid:
            raise BackendFailed(f"{record['node']} is not owned by uid {ctx.lease.uid} after chown")
        added = ctx.kernel.container_acl(ctx.lease.uid, True)
        if not added and record["acl"] is not None and not (
                ctx.lease.uid in ctx.container_acl_uids or _acl_of(ctx.handed_over) == ctx.lease.uid):
            record["acl"] = None        # there was an entry after all, and not vfiod's
        for bdf, path in record["cdevs"]:
            ctx.kernel.set_node_owner(path, ctx.lease.uid, 0, ROOT_MODE)
            if ctx.kernel.nodes.device_cdev(PciAddress.parse(bdf)) != path or (ctx.kernel.node_owner(path) or [None])[0] \
                    != ctx.lease.uid:
                raise BackendFailed(f"{path} is not {bdf}'s cdev owned by uid {ctx.lease.uid} after chown")
        if record["cdevs"]:
            added = ctx.kernel.nodes.acl(ctx.kernel.nodes.iommu_path(), ctx.lease.uid, True)
            if not added and record["iommu_acl"] is not None and not (
                    ctx.lease.uid in ctx.iommu_acl_uids or _acl_of(ctx.handed_over, "iommu_acl") == ctx.lease.uid):
                record["iommu_acl"] = None
        return record

    def take_back(self, ctx: LeaseContext, record: Record) -> None:
        # The record comes back from the journal: trust only values of the right type.
        node = record.get("node")
        if isinstance(node, str) and node and ctx.kernel.node_owner(node) is not None:
            orig = record.get("orig")
            uid, gid, mode = (orig if isinstance(orig, list) and len(orig) == 3
                              and all(isinstance(v, int) for v in orig) else [0, 0, ROOT_MODE])
            ctx.kernel.set_node_owner(node, uid, gid, mode)
        # The container's ACL entry goes only if vfiod added it and no other lease of
        # the same user still shares it; an admin's own entry is never touched.
        lessee = _acl_of(record)
        if lessee is not None and lessee not in ctx.container_acl_uids:
            ctx.kernel.container_acl(lessee, False)
        # A cdev goes back to root 0600 only while it is still that device's (the kernel
        # numbers cdevs anew as devices bind: the path may name another device by now).
        cdevs = record.get("cdevs")
        for pair in cdevs if isinstance(cdevs, list) else []:
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) for v in pair)):
                continue
            try:
                addr = PciAddress.parse(pair[0])
            except InvalidAddress:
                continue
            if ctx.kernel.nodes.device_cdev(addr) == pair[1]:
                ctx.kernel.set_node_owner(pair[1], 0, 0, ROOT_MODE)
        lessee = _acl_of(record, "iommu_acl")
        if lessee is not None and lessee not in ctx.iommu_acl_uids:
            ctx.kernel.nodes.acl(ctx.kernel.nodes.iommu_path(), lessee, False)

    def open_group(self, ctx: LeaseContext) -> int:
        try:
            return ctx.kernel.open_vfio_group(ctx.lease.group)
        except OSError as e:
            if e.errno == 16:
                raise Busy(f"/dev/vfio/{ctx.lease.group} is already open (a group opens only once): "
                           "close the other fd first") from None
            raise BackendFailed(f"cannot open /dev/vfio/{ctx.lease.group}: {e.strerror}") from None

    def open_container(self, ctx: LeaseContext) -> int:
        try:
            return ctx.kernel.open_vfio_container()
        except OSError as e:
            raise BackendFailed(f"cannot open /dev/vfio/vfio: {e.strerror}") from None

    def open_device(self, ctx: LeaseContext, addr: PciAddress) -> int:
        _no_mdev_cdev(ctx)
        if addr not in ctx.endpoints:
            raise InvalidArgument(f"{addr} is not an endpoint of lease {ctx.lease.id} "
                                  f"(its endpoints: {', '.join(map(str, ctx.endpoints))})")
        if ctx.kernel.nodes.device_cdev(addr) is None:
            raise InvalidArgument(f"this kernel has no VFIO device cdev for {addr} (CONFIG_VFIO_DEVICE_CDEV): "
                                  "use the group and the container")
        try:
            return ctx.kernel.nodes.open_device_cdev(addr)
        except OSError as e:
            raise BackendFailed(f"cannot open the cdev of {addr}: {e.strerror}") from None

    def open_iommu(self, ctx: LeaseContext) -> int:
        _no_mdev_cdev(ctx)
        if not any(ctx.kernel.nodes.device_cdev(a) for a in ctx.endpoints):
            raise InvalidArgument("this kernel has no VFIO device cdevs for the lease's devices "
                                  "(CONFIG_VFIO_DEVICE_CDEV): use the group and the container")
        try:
            return ctx.kernel.nodes.open_iommu()
        except OSError as e:
            raise BackendFailed(f"cannot open {ctx.kernel.nodes.iommu_path()}: {e.strerror}") from None


def _no_mdev_cdev(ctx: LeaseContext) -> None:
    """An mdev lease (it holds no PCI endpoint) is used through its group and the container."""
    if not ctx.endpoints:
        raise InvalidArgument(f"lease {ctx.lease.id} is of a mediated device ({ctx.lease.target}): it is used "
                              "through its group and the container (OpenGroup, OpenContainer), the legacy "
                              "interface; vfiod hands over no cdev or iommufd for it")


def _acl_of(record: Record | None, key: str = "acl") -> int | None:
    """The uid whose ACL entry (`key`: ``acl`` the container's, ``iommu_acl`` /dev/iommu's)
    `record` says is vfiod's (journal values: checked)."""
    acl = record.get(key) if record else None
    return acl if isinstance(acl, int) and not isinstance(acl, bool) else None


@hookimpl
def vfiod_register_backends(register: Register) -> None:
    register(VfioBackend())
