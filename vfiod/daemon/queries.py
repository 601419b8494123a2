"""What callers ask that changes nothing: explain, check, the groups' JSON, what an
object shows.  Each answer reads the kernel fresh for the group asked about, and
the last whole scan (`Snapshot`) for what needs the whole host."""

from __future__ import annotations

import asyncio
from typing import Callable, TypeVar, TypeVarTuple

import attrs

from .. import report
from ..address import PciAddress
from ..errors import Busy, InvalidArgument, NotFound, NotViable, PermissionDenied, PolicyError, Protected, VfiodError
from ..leases.manager import pool_refusal
from ..leases import LeaseManager
from ..pciids import PciIds
from ..policy import (ADMIN_GROUPS_HINT, BUSY_PREFIX, Caller, Decision, PolicyStore, Refusal, format_size, hide_sources,
                      parse_target)
from ..sysfs.mdev import MdevKind
from ..sysfs.procs import memlock_of
from ..topology import Host
from .snapshot import Snapshot


_T = TypeVar("_T")
_Args = TypeVarTuple("_Args")


class Queries:
    def __init__(self, manager: LeaseManager, policy_store: PolicyStore, snapshot: Snapshot, names: PciIds) -> None:
        self.manager = manager
        self.policy_store = policy_store
        self.snapshot = snapshot
        self.names = names
        self.kernel = manager.kernel
        self.journal = manager.journal

    @property
    def host(self) -> Host:
        return self.snapshot.host

    async def _run(self, fn: Callable[[*_Args], _T], *args: *_Args) -> _T:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def _target_group(self, target: str) -> tuple[Host, int]:
        """A fresh snapshot of the group `target` names (any target form), and its number."""
        policy = self.policy_store.current
        host = await self._run(self.manager.host_for, target, policy)
        return host, policy.resolve(host, target).group

    async def explain(self, caller: Caller, target: str) -> str:
        # Drivers and blockers fresh from the target's group; why the group is shared
        # from the last whole scan (it needs the bridges above, in other groups).
        policy = self.policy_store.current
        host = await self._run(self.manager.host_for, target, policy)
        unplaced = [a for a in policy.addresses_named(target) if a in host.devices and host.group_of(a) is None]
        if unplaced:        # there, but in no group: say why rather than refuse
            return "\n".join([f"{a} is in no IOMMU group, so VFIO cannot take it: {host.no_group_reason()}"
                               for a in unplaced])
        number = policy.resolve(host, target).group
        g = host.groups[number]
        whole = self.host.groups.get(number)
        if whole is not None and whole.members == g.members:
            g = attrs.evolve(g, isolation=whole.isolation, isolation_text=whole.isolation_text)
        else:
            host = await self._run(self.manager.scan)     # the topology changed: explain it afresh
            g = host.groups[number]
        lease = self.manager.lease_for_group(number)
        return report.explain_text(target, g, lease, self.host.findings,
                                   viewer=None if caller.is_admin else caller.uid)

    async def groups_json(self, caller: Caller, targets: list[str]) -> list[report.Json]:
        """The groups `targets` name (every group when none), in the one group JSON."""
        if len(targets) > 64:
            raise InvalidArgument(f"at most 64 targets at a time, not {len(targets)}")
        numbers: list[int] | None = None
        if targets:
            numbers = []
            policy = self.policy_store.current
            for t in targets:
                named = policy.group_named(t)
                if named is not None and named in self.host.groups:
                    numbers.append(named)       # what is printed is the snapshot's: no scan to name it
                    continue
                _, n = await self._target_group(t)
                numbers.append(n)
        host = self.host
        out = []
        for n in (numbers if numbers is not None else sorted(host.groups)):
            g = host.groups.get(n)
            if g is None:
                continue
            lease = self.manager.lease_for_group(n)
            out.append(report.group_json(host, g, self.names, lease=lease.id if lease else None,
                                         state=self.group_state(n), lease_owner=lease.uid if lease else None,
                                         lease_memlock=(lease.memlock or None) if lease else None,
                                         lease_state=lease.state if lease else None,
                                         original_driver=self.original_driver))
        return out

    def tree_json(self) -> list[report.Json]:
        """The PCI tree of the last whole scan (every function, IOMMU group or not)."""
        return report.tree_json(self.host, self.names, original_driver=self.original_driver)

    async def check(self, caller: Caller, target: str, backend: str) -> Decision:
        parsed = parse_target(target)
        if parsed[0] == "pool":
            return self._for_caller(caller, await self._run(self._check_pool, caller, target, backend))
        if parsed[0] == "mdev":
            d, busy = await self._run(self._check_mdev, caller, parsed[1], backend)
        else:
            host, number = await self._target_group(target)
            d = self.policy_store.current.decide(host, caller, number, backend, {})
            # What a lease would meet besides the policy: a lease already there, the host using it.
            busy = await self._run(self._busy_now, caller, host, number) if d.allowed else ""
        if d.allowed and busy:
            d = attrs.evolve(d, allowed=False, reason=f"{BUSY_PREFIX}{busy} (the policy allows it: {d.reason})")
        if d.allowed:
            reset = "; each device is reset before it goes back to the host" if d.reset_on_release else ""
            d = attrs.evolve(d, reason=d.reason + self._memlock_advice(caller, d) + reset)
        return self._for_caller(caller, d)

    @staticmethod
    def _for_caller(caller: Caller, d: Decision) -> Decision:
        """Where the policy says so (file:line) is for admins: it maps the policy for anyone."""
        return d if caller.is_admin else attrs.evolve(d, rule="", reason=hide_sources(d.reason))

    def _check_pool(self, caller: Caller, target: str, backend: str) -> Decision:
        """What `check` says of ``pool:NAME``: the member a lease would take now, or why each
        member would be passed over (the order a lease tries them in)."""
        policy = self.policy_store.current
        name = target[len("pool:"):]
        host = self.manager.host_for(target, policy)
        skipped: list[tuple[str, VfiodError]] = []
        for member, resolved, why in policy.pool_candidates(host, name):
            if resolved is None:
                skipped.append((member.target, NotFound(why)))
                continue
            d = policy.decide(host, caller, resolved.group, backend, {})
            if d.allowed:
                now = self._busy_now(caller, host, resolved.group)
                if not now:
                    return attrs.evolve(d, reason=f"pool {name}: a lease would take member {member.target} "
                                                  f"(IOMMU group {resolved.group}): {d.reason}"
                                                  + self._memlock_advice(caller, d))
                skipped.append((member.target, Busy(now)))
            else:
                kind = Protected if d.refusal is Refusal.PROTECTED else PermissionDenied
                skipped.append((member.target, kind(d.reason)))
        e = pool_refusal(name, skipped)
        busy = isinstance(e, Busy)
        return Decision(False, "", (BUSY_PREFIX if busy else "") + e.message,
                        refusal=None if busy else Refusal.DENIED)

    def _check_mdev(self, caller: Caller, kind: MdevKind, backend: str) -> tuple[Decision, str]:
        """The policy's word on a new instance of `kind`, and why a lease would be refused
        now whatever it says ("" if not); `NotFound` for a type the host does not have."""
        found = self.kernel.mdev.type(kind)
        if found is None:
            raise NotFound(f"no mdev type {kind} on this host (`vfiod inspect` lists the parents and their types)")
        d = self.policy_store.current.decide_mdev(caller, kind, backend, {})
        busy = (f"mdev type {kind}: its parent can make no more instances now (available_instances is 0)"
                if found.available == 0 else "")
        return d, busy

    def _busy_now(self, caller: Caller, host: Host, number: int) -> str:
        """Why a lease of group `number` would be refused now whatever the policy says ("" if not)."""
        lease = self.manager.lease_for_group(number)
        if lease is not None:
            whose = f" (lease {lease.id})" if caller.is_admin or caller.uid == lease.uid else " by another user"
            return f"IOMMU group {number} is already leased{whose}"
        try:
            self.manager.check_free(host, number, caller)
        except (Busy, NotViable) as e:
            return str(e)
        return ""

    def _memlock_advice(self, caller: Caller, decision: Decision) -> str:
        """What the lease will do to the caller's locked-memory limit, said before it matters:
        VFIO pins every page the lessee maps for DMA, and fails (DPDK: "DMA remapping failed")
        once RLIMIT_MEMLOCK is exhausted."""
        cur = memlock_of(caller.pid) if caller.pid else None
        have = "unknown" if cur is None else ("unlimited" if cur[0] < 0 else format_size(cur[0]))
        if decision.memlock:
            return (f"; the lease raises RLIMIT_MEMLOCK of your process to {format_size(decision.memlock)} "
                    f"(now {have})")
        if cur is not None and 0 <= cur[0] < (256 << 20):
            return (f"; warning: no memlock grant in the policy and your RLIMIT_MEMLOCK is {have}: "
                    "a VFIO user that pins memory (DPDK, QEMU) will fail to map DMA beyond it")
        return ""

    async def preview_policy(self, caller: Caller) -> tuple[list[str], list[tuple[str, int, str]]]:
        """What a reload would do, changing nothing (root or a delegated admin): every error of the policy
        directory as it is now, or the leases the policy there would revoke (id, lessee, why)."""
        if not caller.is_admin:
            raise PermissionDenied(f"only root {ADMIN_GROUPS_HINT} may preview a policy reload")
        try:
            policy = await self._run(self.policy_store.preview)
        except PolicyError as e:
            return e.message.splitlines(), []
        gone = await self._run(self.manager.disallowed, policy)
        return [], [(lease.id, lease.uid, why) for lease, why in gone]

    async def kubernetes_access(self, caller: Caller, target: str) -> tuple[list[str], list[str]]:
        host, number = await self._target_group(target)
        return self.policy_store.current.kubernetes_view(host, caller.uid, number)

    async def kubernetes_access_all(self, caller: Caller) -> list[tuple[int, list[str], list[str]]]:
        """`kubernetes_access` of every group at once, from the snapshot (vfiod keeps it
        current): what a ResourceSlice needs, in one call instead of one per group."""
        host, policy = self.host, self.policy_store.current
        return [(n, *policy.kubernetes_view(host, caller.uid, n)) for n in host.groups]

    # ------------------------------------------------------------ what objects show

    def group_state(self, n: int) -> str:
        if self.manager.lease_for_group(n):
            return "leased"
        g = self.host.groups.get(n)
        return g.state if g else "gone"

    def original_driver(self, addr: PciAddress) -> str | None:
        dev = self.host.devices.get(addr)
        if dev is None or dev.group is None:
            return None
        lease = self.manager.lease_for_group(dev.group)
        if lease:
            for h in self.journal.held(lease.id):
                if h.addr == str(addr):
                    return h.driver
        return dev.driver
