"""Preparing and unpreparing claims: the steps, the checkpoint, and reconciling after a restart.

Prepare, for one claim (each step is recorded before the next):

1. Read the claim from the API server; keep the allocation results of this
   driver and this node's pool (``group-N`` devices).
2. Record the claim as ``preparing``.
3. For each group: ask vfiod for a persistent vfio lease on behalf of the claim's
   namespace (vfiod's policy decides), and record it.
4. Ask for the CDI spec: write the claim's request for the spec writer (root; see
   `cdiwriter`) and wait until the spec is in the runtime's directory.
5. Record the claim as ``prepared``, with the answer for the kubelet.

A failure undoes steps 3–4 in reverse and answers with the error for that claim
alone.  Asking again for a prepared claim returns the recorded answer.
Unprepare ends the claim's leases, withdraws its request (the writer deletes the
spec) and forgets it; an unknown claim is already unprepared."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from typing import Any

import attrs

from ..client import NotFound, VfiodError
from . import DRIVER_NAME, cdi
from .checkpoint import Checkpoint, ClaimRecord
from .dirwatch import DirWatch
from .kube import Kube, KubeError
from .link import Vfiod

log = logging.getLogger("vfiod-dra")


_DEVICE_NAME = re.compile(r"group-(0|[1-9][0-9]{0,5})")


def parse_device_name(device: str) -> int | None:
    """The IOMMU group number of a slice device name ``group-N``; None for anything else.

    Only ASCII digits, as this driver writes them: ``str.isdigit`` and ``int`` also take
    superscripts (``²``, which ``int`` then refuses) and other scripts' digits (``٨`` is 8),
    so a name no slice of this driver lists could otherwise name a group."""
    m = _DEVICE_NAME.fullmatch(device)
    return int(m.group(1)) if m else None


class ClaimError(Exception):
    """Why one claim could not be prepared or unprepared: the kubelet's per-claim error."""


@attrs.frozen
class ClaimRef:
    namespace: str
    uid: str
    name: str


@attrs.frozen
class Answer:
    devices: tuple[dict[str, Any], ...] = ()
    error: str = ""


#: the test suite's fault points (``after-grant``: a lease granted, not yet recorded;
#: ``after-lease``: every lease recorded, no CDI spec yet): the driver stops dead there
CRASH_AT = os.environ.get("VFIOD_DRA_CRASH_AT", "")


#: how long a prepare waits for the spec writer
SPEC_TIMEOUT = 10.0


def _crash_point(name: str) -> None:
    if CRASH_AT == name:
        log.warning("stopping at %s (VFIOD_DRA_CRASH_AT)", name)
        os._exit(70)


class Driver:
    def __init__(self, vfiod: Vfiod, kube: Kube, node: str, state_dir: str, cdi_dir: str = cdi.DEFAULT_DIR,
                 requests_dir: str = cdi.DEFAULT_REQUESTS_DIR, spec_timeout: float = SPEC_TIMEOUT):
        self.vfiod, self.kube, self.node = vfiod, kube, node
        self.cdi_dir, self.requests_dir, self.spec_timeout = cdi_dir, requests_dir, spec_timeout
        self.checkpoint = Checkpoint(state_dir).load()
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, uid: str) -> asyncio.Lock:
        return self._locks.setdefault(uid, asyncio.Lock())

    # ------------------------------------------------------------ prepare

    async def prepare(self, claim: ClaimRef) -> Answer:
        async with self._lock(claim.uid):
            try:
                return Answer(devices=await self._prepare(claim))
            except (ClaimError, VfiodError, KubeError, OSError) as e:
                # (VfiodError, OSError: the undo of a failed prepare failed too; the next
                # prepare, unprepare or restart finishes it from the checkpoint)
                log.warning("claim %s/%s (%s) not prepared: %s", claim.namespace, claim.name, claim.uid, e)
                return Answer(error=str(e))

    async def _prepare(self, claim: ClaimRef) -> tuple[dict[str, Any], ...]:
        rec = self.checkpoint.claims.get(claim.uid)
        if (rec is not None and rec.state == "prepared"
                and os.path.exists(cdi.request_path(self.requests_dir, claim.uid))
                and self._has_spec(claim.uid, [int(n) for n in rec.leases])):
            return rec.devices
        # Step 1: the allocation.
        by_request = await self._allocation(claim)
        groups = sorted({n for ns in by_request.values() for n in ns})
        # Step 2.
        self.checkpoint.put(claim.uid, ClaimRecord(claim.namespace, claim.name, "preparing",
                                                   dict(rec.leases) if rec else {}))
        try:
            # Step 3: a lease per group.
            leases = await self._lease_all(claim, groups)
            _crash_point("after-lease")
            # Step 4: the spec, from the writer.
            cdi.write_request(self.requests_dir, claim.uid, by_request)
            await self._wait_spec(claim.uid, groups)
        except (ClaimError, VfiodError, KubeError, OSError) as e:
            await self._undo(claim.uid)
            if isinstance(e, ClaimError):
                raise
            raise ClaimError(str(e)) from None
        # Step 5.
        devices = tuple({"request_names": sorted(r for r, ns in by_request.items() if n in ns),
                         "pool_name": self.node, "device_name": f"group-{n}",
                         "cdi_device_ids": [cdi.device_id(claim.uid, n)]} for n in groups)
        self.checkpoint.put(claim.uid, ClaimRecord(claim.namespace, claim.name, "prepared",
                                                   {str(n): leases[n] for n in groups}, devices))
        log.info("claim %s/%s (%s) prepared: groups %s", claim.namespace, claim.name, claim.uid,
                 ", ".join(map(str, groups)))
        return devices

    async def _allocation(self, claim: ClaimRef) -> dict[str, list[int]]:
        """Request name → the group numbers this driver and node were allocated for it."""
        try:
            doc = await self.kube.get_claim(claim.namespace, claim.name)
        except KubeError as e:
            raise ClaimError(str(e)) from None
        uid = (doc.get("metadata") or {}).get("uid")
        if uid != claim.uid:
            raise ClaimError(f"ResourceClaim {claim.namespace}/{claim.name} has uid {uid}, "
                             f"not {claim.uid}: it was deleted and made again")
        results = (((doc.get("status") or {}).get("allocation") or {}).get("devices") or {}).get("results") or []
        by_request: dict[str, list[int]] = {}
        for r in results:
            if r.get("driver") != DRIVER_NAME or r.get("pool") != self.node:
                continue
            device = str(r.get("device", ""))
            number = parse_device_name(device)
            if number is None:
                raise ClaimError(f"ResourceClaim {claim.namespace}/{claim.name}: {DRIVER_NAME} has no "
                                 f"device {device!r} (its devices are group-N, N in ASCII digits)")
            by_request.setdefault(str(r.get("request", "")), []).append(number)
        if not by_request:
            raise ClaimError(f"ResourceClaim {claim.namespace}/{claim.name} has no allocation for "
                             f"{DRIVER_NAME} on node {self.node}")
        return by_request

    async def _lease_all(self, claim: ClaimRef, groups: list[int]) -> dict[int, str]:
        # Leases recorded for this claim before (a spec lost since) are reused if vfiod still has them.
        held = await self.vfiod.held() if self.checkpoint.claims[claim.uid].leases else {}
        leases: dict[int, str] = {}
        for n in groups:
            rec = self.checkpoint.claims[claim.uid]
            if str(n) in rec.leases and n in held and held[n].path == rec.leases[str(n)]:
                leases[n] = rec.leases[str(n)]      # taken before a crash: still ours
                continue
            try:
                leases[n] = await self.vfiod.request(n, claim.namespace)
            except VfiodError as e:
                raise ClaimError(str(e)) from None     # vfiod names the group
            _crash_point("after-grant")
            self.checkpoint.put(claim.uid, attrs.evolve(rec, leases={**rec.leases, str(n): leases[n]}))
        return leases

    def _has_spec(self, uid: str, groups: list[int]) -> bool:
        spec = cdi.read_spec(self.cdi_dir, uid)
        return spec is not None and sorted(d.get("name") for d in spec.get("devices", [])) == sorted(
            cdi.device_name(uid, n) for n in groups)

    async def _wait_spec(self, uid: str, groups: list[int]) -> None:
        """Until the spec writer has written the claim's spec: woken by the spec directory's
        changes where it can be watched, else looking every 20 ms."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec_timeout
        changed = asyncio.Event()
        with DirWatch(self.cdi_dir, changed.set) as watch:
            step = 0.5 if watch.start() else 0.02
            while not self._has_spec(uid, groups):
                left = deadline - loop.time()
                if left <= 0:
                    raise ClaimError(f"no CDI spec for claim {uid} in {self.cdi_dir} after {self.spec_timeout:g} s: "
                                     f"the spec writer (vfiod-dra cdi-writer, as root) did not write it; "
                                     f"its log says why")
                try:
                    await asyncio.wait_for(changed.wait(), min(step, left))
                except asyncio.TimeoutError:
                    pass
                changed.clear()

    # ------------------------------------------------------------ unprepare

    async def unprepare(self, claim: ClaimRef) -> Answer:
        async with self._lock(claim.uid):
            try:
                await self._undo(claim.uid)
            except (VfiodError, OSError) as e:
                log.warning("claim %s/%s (%s) not unprepared: %s", claim.namespace, claim.name, claim.uid, e)
                return Answer(error=str(e))
            log.info("claim %s/%s (%s) unprepared", claim.namespace, claim.name, claim.uid)
            return Answer()

    async def _undo(self, uid: str) -> None:
        """End the claim's leases, withdraw its spec request, forget it (each part only if there).
        A lease vfiod no longer has (ended by a removal, or by an undo a crash cut short)
        is already undone."""
        cdi.remove_request(self.requests_dir, uid)
        rec = self.checkpoint.claims.get(uid)
        for _group, path in sorted((rec.leases if rec else {}).items(), reverse=True):
            try:
                await self.vfiod.end(path)
            except NotFound:
                pass
        self.checkpoint.drop(uid)

    # ------------------------------------------------------------ after a restart

    async def reconcile(self) -> list[str]:
        """Finish what a crash left: unprepare ``preparing`` claims, end leases no record names,
        delete specs of claims not prepared.  Returns what was done, in words."""
        done = []
        if self.checkpoint.damaged:
            done.append(f"checkpoint unreadable, set aside: {self.checkpoint.damaged}")
        for uid, rec in list(self.checkpoint.claims.items()):
            if rec.state == "preparing":
                await self._undo(uid)
                done.append(f"claim {rec.namespace}/{rec.name} ({uid}) was half prepared: undone")
        known = {p for r in self.checkpoint.claims.values() for p in r.leases.values()}
        for held in (await self.vfiod.held()).values():
            if held.path not in known:
                await self.vfiod.end(held.path)
                done.append(f"lease {held.path} (group {held.group}) named by no claim: ended")
        for uid in cdi.remove_strays(self.requests_dir, [u for u, r in self.checkpoint.claims.items()
                                                         if r.state == "prepared"]):
            done.append(f"CDI spec request of claim {uid} with no prepared claim: withdrawn")
        for line in done:
            log.warning("reconciled: %s", line)
        return done
