"""``vfiod-dra cdi-writer``: the root-owned writer of vfiod-dra's CDI specs.

A container runtime reads CDI specs only from its spec directories (``/etc/cdi``,
``/var/run/cdi``; the files directly in them), runs their hooks as root and puts
their device nodes and mounts into containers: whoever writes there is root on
the node.  So vfiod-dra, which runs as an unprivileged user, does not; it writes a
request per prepared claim in a directory of its own (`cdi.write_request`), and
this writer, running as root beside it, turns each request into a spec:

* every group the request names must be leased, now, by the delegate's user (the
  policy's ``k8s_delegates``), as vfiod says; a request naming any other group is
  refused whole and gets no spec (a container's copy of ``/dev/vfio/N`` is open to
  the pod's user, so a spec for a group the delegate does not lease would hand out
  someone else's device);
* the spec's content comes from vfiod (each group's endpoints, each lease's memlock
  grant) and from this writer's own options (the hook program, ``/dev``): the
  request gives only the claim's uid and which request names which groups;
* a spec whose request is gone, or whose leases ended (a revoke, a removed
  device), is deleted.

It syncs when a request appears, changes or goes, and on vfiod's signals."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from ..client import NotFound, VfiodError
from . import cdi
from .dirwatch import DirWatch
from .link import Vfiod

log = logging.getLogger("vfiod-dra")

#: how often the request directory is looked at where it cannot be watched (`DirWatch`),
#: and, where it is, how often all the same (a change the watch could miss: the
#: directory made again)
POLL = 0.1
WATCHED_POLL = 2.0
#: The states of a lease whose group is the lessee's: granted, or on the revoke ladder
#: (its spec goes when the lease ends).  A lease still ``granting`` may be rolled back.
HELD_STATES = ("granted", "revoking")


class SpecWriter:
    def __init__(self, vfiod: Vfiod, delegate_uid: int, requests_dir: str, cdi_dir: str = cdi.DEFAULT_DIR,
                 dev_root: str = "/dev", hook: str | None = None):
        self.vfiod, self.delegate_uid = vfiod, delegate_uid
        self.requests_dir, self.cdi_dir, self.dev_root, self.hook = requests_dir, cdi_dir, dev_root, hook
        self.dirty = asyncio.Event()
        #: claim uid → why its request was refused (logged once per distinct reason)
        self.refused: dict[str, str] = {}

    def poke(self, _why: str = "") -> None:
        self.dirty.set()

    def _requests(self) -> dict[str, cdi.SpecRequest]:
        out = {}
        for uid in cdi.spec_claims(self.requests_dir):
            try:
                out[uid] = cdi.read_request(self.requests_dir, uid)
            except FileNotFoundError:
                continue                          # gone since the listing
            except cdi.RequestError as e:
                self._refuse(uid, str(e))
        return out

    def _refuse(self, uid: str, why: str) -> None:
        if self.refused.get(uid) != why:
            log.error("no CDI spec for claim %s: %s", uid, why)
        self.refused[uid] = why

    def _spec(self, req: cdi.SpecRequest, groups: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
        """The spec of `req`, from `groups` (vfiod's group JSON by number); None if refused."""
        missing = [n for n in req.groups if n not in groups]
        if missing:
            self._refuse(req.claim, f"IOMMU group {', '.join(map(str, missing))} is gone from this node")
            return None
        foreign = [n for n in req.groups if groups[n].get("lease") is None
                   or groups[n].get("lease_owner") != self.delegate_uid
                   or groups[n].get("lease_state") not in HELD_STATES]
        if foreign:
            self._refuse(req.claim, f"IOMMU group {', '.join(map(str, foreign))} is not leased by uid "
                                    f"{self.delegate_uid} (the delegate)")
            return None
        grants = {}
        for n in req.groups:
            members = [d for d in groups[n]["devices"] if not d["bridge"]]
            grants[n] = cdi.GroupGrant(n, tuple(d["address"] for d in members),
                                       int(groups[n].get("lease_memlock") or 0) or None,
                                       tuple(d["cdev"] for d in members if d.get("cdev")))
        self.refused.pop(req.claim, None)
        return cdi.build_spec(req.claim, {r: [grants[n] for n in ns] for r, ns in req.requests.items()},
                              self.dev_root, self.hook)

    async def _groups(self, numbers: set[int]) -> dict[int, dict[str, Any]]:
        """vfiod's word now on `numbers`: each group's members and lease (its owner, its
        memlock grant), in one call per 64 groups (GroupsJson's most).  A group gone from
        the node is left out (a call naming it fails whole: each of its batch is then asked
        alone)."""
        ordered = sorted(numbers)
        out: dict[int, dict[str, Any]] = {}
        for i in range(0, len(ordered), 64):
            batch = ordered[i:i + 64]
            try:
                found = await self.vfiod.groups([f"group:{n}" for n in batch])
            except NotFound:
                found = []
                for n in batch:
                    try:
                        found += await self.vfiod.groups([f"group:{n}"])
                    except NotFound:
                        continue
            out.update((g["group"], g) for g in found)
        return out

    async def sync(self) -> list[str]:
        """Make the spec directory say what the requests and vfiod's leases say; returns
        what changed, in words."""
        done = []
        requests = self._requests()
        groups = await self._groups({n for r in requests.values() for n in r.groups}) if requests else {}
        keep = []
        for uid, req in sorted(requests.items()):
            spec = self._spec(req, groups)
            if spec is None:
                continue
            keep.append(uid)
            if cdi.read_spec(self.cdi_dir, uid) != json.loads(json.dumps(spec)):
                cdi.write_spec(self.cdi_dir, uid, spec)
                done.append(f"claim {uid}: spec written (groups {', '.join(map(str, req.groups))})")
        for uid in cdi.remove_strays(self.cdi_dir, keep):
            done.append(f"claim {uid}: spec deleted")
        for uid in set(self.refused) - set(cdi.spec_claims(self.requests_dir)):
            del self.refused[uid]
        for line in done:
            log.info("%s", line)
        return done

    async def run(self) -> None:
        """Sync now, then whenever the requests change or vfiod signals; never returns."""
        await self.vfiod.watch(self.poke)
        watch = DirWatch(self.requests_dir, self.poke)
        poll = WATCHED_POLL if watch.start() else POLL
        try:
            seen = None
            self.dirty.set()
            while True:
                now = cdi.listing(self.requests_dir)
                if now != seen:
                    seen = now
                    self.dirty.set()
                    if poll == POLL and watch.start():      # the directory is there now
                        poll = WATCHED_POLL
                if self.dirty.is_set():
                    self.dirty.clear()
                    try:
                        await self.sync()
                    except (VfiodError, OSError) as e:
                        log.error("CDI specs not synced, retrying in 1 s: %s", e)
                        await asyncio.sleep(1)
                        self.dirty.set()
                try:
                    await asyncio.wait_for(self.dirty.wait(), poll)
                except asyncio.TimeoutError:
                    pass
        finally:
            watch.close()
