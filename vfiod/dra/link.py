"""vfiod-dra's side of vfiod's bus: the few calls it makes, and vfiod's signals.

The driver runs as its own user (the policy's ``k8s_delegates``): every lease
that user holds in vfiod is the driver's, which is what lets a restart find
leases no checkpoint record names."""

from __future__ import annotations

import os
from typing import Any, Callable

import attrs

from ..client import Client, NotFound
from ..wire import ROOT, group_number

MANAGER = "org.vfiod1.Manager"
LEASE = "org.vfiod1.Lease"


@attrs.frozen
class HeldLease:
    path: str
    group: int


class Vfiod:
    def __init__(self, bus: str = "system", timeout: float = 60.0):
        self.client = Client(bus, timeout)
        self.uid = os.getuid()

    async def connect(self) -> "Vfiod":
        await self.client.connect()
        return self

    def close(self) -> None:
        self.client.close()

    async def groups(self, targets: list[str] | None = None) -> list[dict[str, Any]]:
        """The IOMMU groups `targets` name (all when None) as vfiod's group JSON (docs/json.md)."""
        return await self.client.groups_json(targets or [])

    async def kubernetes_access(self) -> dict[int, tuple[list[str], list[str]]]:
        """For every group: the namespace patterns the policy grants it to through this
        user, and the resources with a member in it (one call for the whole host)."""
        reply = await self.client.call(ROOT, MANAGER, "KubernetesAccessAll")
        return {int(n): (list(namespaces), list(resources)) for n, namespaces, resources in reply.body[0]}

    async def request(self, group: int, namespace: str) -> str:
        """A persistent vfio lease of `group` for Kubernetes namespace `namespace`; its path.
        vfiod's errors (`PermissionDenied` naming the rule, `Busy`, …) pass through."""
        return await self.client.request_lease(f"group:{group}", "vfio", persistent=True, k8s_namespace=namespace)

    async def end(self, path: str) -> None:
        """End a lease: every device of its group goes back to its driver.

        The one place a lease ends.  Release is the owner's call (Revoke is root's);
        if processes still hold the group, vfiod runs its revoke ladder on them
        (reason ``released``: signalled, a grace, then ended) before the return."""
        await self.client.call(path, LEASE, "Release")

    async def held(self) -> dict[int, HeldLease]:
        """The leases this user holds, by group: the Manager's lease list and each lease's
        properties (not every object of the host: GetManagedObjects of a big host is MBs)."""
        paths = (await self.client.properties(ROOT, MANAGER)).get("Leases") or []
        out = {}
        for path in paths:
            try:
                props = await self.client.properties(str(path), LEASE)
            except NotFound:
                continue                      # ended since the list was read
            if props.get("Owner") != self.uid:
                continue
            group = group_number(str(props["Group"]))
            out[group] = HeldLease(str(path), group)
        return out

    async def watch(self, changed: Callable[[str], None]) -> None:
        """Call `changed(member)` for every signal vfiod sends (objects added and removed,
        properties changed, leases granted and ended, the policy reloaded) and when vfiod
        (re)appears on the bus."""
        await self.client.watch(changed)
