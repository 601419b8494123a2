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
    from vfiod.hookspecs import LeaseContext
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
        return {"node": ctx.kernel.vfio_group_path(ctx.lease.group),
                "orig": [0, 0, ROOT_MODE], "uid": uid, "acl": uid if ours else None}

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


def _acl_of(record: Record | None) -> int | None:
    """The uid whose container ACL entry `record` says is vfiod's (journal values: checked)."""
    acl = record.get("acl") if record else None
    return acl if isinstance(acl, int) and not isinstance(acl, bool) else None


@hookimpl
def vfiod_register_backends(register: Register) -> None:
    register(VfioBackend())
