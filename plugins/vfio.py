"""The ``vfio`` backend: raw VFIO userspace, DPDK-style.

Binds every endpoint to vfio-pci (loading the module if needed), then makes
/dev/vfio/N owned by the lessee (0600) for the lease — DPDK's EAL and QEMU
open it by path — and, where the host made the container /dev/vfio/vfio
root-only (systemd >= 254 does), adds a POSIX ACL entry for the lessee.
Both are undone when the lease ends.  The daemon never keeps the group open
itself: a group opens only once, and the lessee needs that open.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

from vfiod.backends import BackendBase
from vfiod.errors import BackendFailed, Busy, Unsafe
from vfiod.hookspecs import Register, hookimpl

if TYPE_CHECKING:
    from vfiod.leases import LeaseContext
    from vfiod.state import Record

ROOT_MODE = 0o600


class HandOver(TypedDict):
    """The vfio backend's hand-over record (journaled as JSON)."""

    node: str                  # /dev/vfio/N
    orig: list[int]            # its owner before the lease: uid, gid, mode
    uid: int                   # the lessee
    acl: int | None            # the uid given an ACL entry on the container, if one was added


class VfioBackend(BackendBase):
    name = "vfio"
    driver = "vfio-pci"

    def check(self, ctx: LeaseContext) -> None:
        if ctx.host.noiommu:
            raise Unsafe("VFIO's no-IOMMU mode is on: a group would give DMA to all of memory, "
                         "which no policy can make safe; vfiod does not lease noiommu groups")

    def plan_hand_over(self, ctx: LeaseContext) -> HandOver:
        return {"node": ctx.kernel.vfio_group_path(ctx.lease.group),
                "orig": [0, 0, ROOT_MODE], "uid": ctx.lease.uid, "acl": None}

    def hand_over(self, ctx: LeaseContext) -> HandOver:
        record = self.plan_hand_over(ctx)
        # /dev/vfio/N is (re)created when the first member binds: own it only now, and check.
        ctx.kernel.wait_vfio_node(ctx.lease.group)
        ctx.kernel.set_node_owner(record["node"], ctx.lease.uid, 0, ROOT_MODE)
        owner = ctx.kernel.node_owner(record["node"])
        if owner is None or owner[0] != ctx.lease.uid:
            raise BackendFailed(f"{record['node']} is not owned by uid {ctx.lease.uid} after chown")
        if ctx.kernel.container_acl(ctx.lease.uid, True):
            record["acl"] = ctx.lease.uid
        return record

    def take_back(self, ctx: LeaseContext, record: Record) -> None:
        # The record comes back from the journal: trust only values of the right type.
        node = record.get("node")
        if isinstance(node, str) and node and ctx.kernel.node_owner(node) is not None:
            orig = record.get("orig")
            uid, gid, mode = (orig if isinstance(orig, list) and len(orig) == 3
                              and all(isinstance(v, int) for v in orig) else [0, 0, ROOT_MODE])
            ctx.kernel.set_node_owner(node, uid, gid, mode)
        # An ACL entry may exist even if the record did not get to say so.
        lessee = record.get("uid")
        ctx.kernel.container_acl(lessee if isinstance(lessee, int) else ctx.lease.uid, False)

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


@hookimpl
def vfiod_register_backends(register: Register) -> None:
    register(VfioBackend())
