"""This node's ResourceSlice (``resource.k8s.io/v1``): one device per leasable IOMMU group.

A group is what VFIO hands out, so it is the device the scheduler allocates:
``group-N``, with the attributes of its first endpoint (``resource.kubernetes.io/
pciBusID``, vendor, device and class ids) and of the whole group (its number,
every endpoint's address, the policy's ``name:`` resources in it, and whether
and for which namespaces the policy lets Kubernetes have it).  A group with no
endpoint, or with a device the host needs (vfiod's ``protected``), is left out.

The slice is named after the node and replaced, with the pool generation raised,
when vfiod says something changed that the slice shows (`Publisher.poke`): objects
added or removed, the policy reloaded, vfiod restarted; leases and drivers, which
the slice does not show, are not a reason to read the host again.  Building it
takes two calls (`GroupsJson`, `KubernetesAccessAll`), whatever the host's size."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from ..client import VfiodError
from . import DRIVER_NAME
from .kube import Kube, KubeError
from .link import Vfiod

log = logging.getLogger("vfiod-dra")
#: how long to gather a burst of vfiod's signals into one update
SETTLE = 0.1


def slice_name(node: str) -> str:
    return re.sub(r"[^a-z0-9.-]", "-", f"{node}-{DRIVER_NAME}".lower())[:253]


def _s(v: str) -> dict[str, str]:
    return {"string": v}


def group_device(group: dict[str, Any], namespaces: list[str], resources: list[str]) -> dict[str, Any] | None:
    """The slice's device for one group of vfiod's group JSON; None if it is not leasable."""
    endpoints = [d for d in group["devices"] if not d["bridge"]]
    if not endpoints or any(d.get("protected") for d in group["devices"]):
        return None
    first = endpoints[0]
    attrs: dict[str, Any] = {
        "resource.kubernetes.io/pciBusID": _s(first["address"]),
        "vendorID": _s(first.get("vendor") or ""),
        "deviceID": _s(first.get("device") or ""),
        "class": _s(first.get("class") or ""),
        "iommuGroup": {"int": group["group"]},
        "members": _s(",".join(d["address"] for d in endpoints)),
        "endpoints": {"int": len(endpoints)},
        "resources": _s(",".join(resources)),
        "kubernetes": {"bool": bool(namespaces)},
        "namespaces": _s(",".join(namespaces)),
    }
    if first.get("physfn"):
        attrs["physfn"] = _s(first["physfn"])
    return {"name": f"group-{group['group']}", "attributes": attrs}


async def build_slice(vfiod: Vfiod, node: str) -> dict[str, Any]:
    """The slice's body (without resourceVersion or generation)."""
    devices = []
    access = await vfiod.kubernetes_access()
    for g in await vfiod.groups():
        namespaces, resources = access.get(g["group"], ([], []))
        dev = group_device(g, namespaces, resources)
        if dev is not None:
            devices.append(dev)
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
            "metadata": {"name": slice_name(node)},
            "spec": {"driver": DRIVER_NAME, "nodeName": node,
                     "pool": {"name": node, "generation": 0, "resourceSliceCount": 1},
                     "devices": devices}}


class Publisher:
    """Keeps the node's slice current: `poke` after any change, `run` does the writing."""

    def __init__(self, vfiod: Vfiod, kube: Kube, node: str):
        self.vfiod, self.kube, self.node = vfiod, kube, node
        self.dirty = asyncio.Event()
        self.published: dict[str, Any] | None = None

    #: vfiod's signals that cannot change the slice: leases come and go and drivers move,
    #: but a slice lists groups and what the policy lets Kubernetes have.
    IRRELEVANT = frozenset({"LeaseGranted", "LeaseEnded", "LeaseRevoking", "PropertiesChanged"})

    def poke(self, why: str = "") -> None:
        if why not in self.IRRELEVANT:
            self.dirty.set()

    async def publish(self) -> None:
        body = await build_slice(self.vfiod, self.node)
        old = await self.kube.get_slice(body["metadata"]["name"])
        if old is not None:
            if old.get("spec", {}).get("devices") == body["spec"]["devices"]:
                self.published = old
                return
            body["metadata"]["resourceVersion"] = old["metadata"].get("resourceVersion", "")
            body["spec"]["pool"]["generation"] = int(old["spec"]["pool"].get("generation", 0)) + 1
        self.published = await self.kube.put_slice(body)
        log.info("ResourceSlice %s: %d devices (generation %d)", body["metadata"]["name"],
                 len(body["spec"]["devices"]), body["spec"]["pool"]["generation"])

    async def run(self) -> None:
        self.dirty.set()
        while True:
            await self.dirty.wait()
            await asyncio.sleep(SETTLE)
            self.dirty.clear()
            try:
                await self.publish()
            except (KubeError, VfiodError) as e:
                log.error("ResourceSlice not published, retrying in 5 s: %s", e)
                await asyncio.sleep(5)
                self.dirty.set()
