"""The lease façade the bus edge calls.

Every method takes the `Caller` the edge resolved from the bus, runs the
blocking domain work (sysfs, the journal) in a worker thread, and keeps the
snapshot and the bus objects in step.  Who calls (`callers`), the object tree
(`objects`), hotplug (`hotplug`) and the snapshot (`snapshot`) are their own
classes; this one only decides what to do and in which order."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Callable, Iterable, Mapping, TypeVar, TypeVarTuple

import attrs
from dbus_next import Message, MessageType, Variant

from .. import bus as busmod
from .. import report
from ..address import PciAddress
from ..caps import apply_caps
from ..errors import BackendFailed, InvalidArgument, PermissionDenied, PolicyError, VfiodError
from ..hookspecs import Backend
from ..leases import Ended, LeaseManager
from ..pciids import PciIds
from ..policy import Caller, Decision, PolicyStore, format_size
from ..state import Journal, LeaseRow
from ..sysfs import Kernel
from ..topology import Host
from .callers import Callers
from .hotplug import Hotplug
from .notify import sd_notify, status_line
from .objects import ObjectTree
from .snapshot import Snapshot

log = logging.getLogger("vfiod")

_T = TypeVar("_T")
_Args = TypeVarTuple("_Args")


SYSTEMD = "org.freedesktop.systemd1"
_SOURCE = re.compile(r"(?:rules? )?\S+\.toml:[0-9]+(?:, \S+\.toml:[0-9]+)*")


def _hide_sources(text: str) -> str:
    """`text` without policy file:line references (``rule /etc/…/10-x.toml:7`` → ``a rule``)."""
    return _SOURCE.sub(lambda m: "a rule" if m.group(0).startswith("rule") else "the policy", text)


class Service:
    def __init__(self, kernel: Kernel, journal: Journal, policy_store: PolicyStore, backends: dict[str, Backend]):
        self.kernel = kernel
        self.journal = journal
        self.policy_store = policy_store
        self.backends = backends
        self.names = PciIds()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.manager = LeaseManager(kernel, journal, lambda: self.policy_store.current, backends,
                                    on_ended=self._ended_in_thread)
        self.manager.on_revoking = self._revoking_in_thread
        self.manager.end_scope = self._end_scope_in_thread
        self.snapshot = Snapshot(self.manager)
        self.snapshot.on_change = self._changed_in_thread
        self.callers = Callers()
        self.monitor: object | None = None            # the udev monitor, kept alive with the service
        self.objects = ObjectTree(self)
        self.hotplug = Hotplug(self)
        self._ending: set[str] = set()
        self._warnings: dict[str, list[str]] = {}     # lease id -> what was promised and not done
        self._status: str | None = None               # the last STATUS= told to systemd

    # ------------------------------------------------------------ wiring

    def attach(self, bus: busmod.VfiodBus) -> None:
        self.callers.bus = bus
        self.objects.bus = bus

    @property
    def bus(self) -> busmod.VfiodBus | None:
        return self.objects.bus

    @property
    def host(self) -> Host:
        return self.snapshot.host

    @property
    def scans(self) -> dict[str, int]:
        return self.snapshot.scans

    @property
    def manager_iface(self) -> busmod.ManagerInterface:
        return self.objects.manager_iface

    async def caller_of(self, msg: Message | None) -> Caller:
        return await self.callers.of(msg)

    def on_pci_event(self, action: str, addr: PciAddress, driver: str | None) -> None:
        self.hotplug.on_event(action, addr, driver)

    def exported_leases(self) -> list[str]:
        return self.objects.exported_leases()

    def export_all(self) -> None:
        self.objects.export_all(self.host, self.manager.leases())

    # ------------------------------------------------------------ blocking work

    async def _run(self, fn: Callable[[*_Args], _T], *args: *_Args) -> _T:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def refresh(self, groups: Iterable[int] | None = None) -> None:
        self.snapshot.refresh(groups)

    def refresh_soon(self, groups: Iterable[int] | None = None) -> None:
        """Refresh after the reply has gone out: callers do not wait for the rescan."""
        asyncio.get_running_loop().run_in_executor(None, self.snapshot.refresh, groups)

    def _changed_in_thread(self, old: Host, new: Host, groups: list[int] | None) -> None:
        if self.loop:
            self.loop.call_soon_threadsafe(self.objects.publish, old, new, groups)

    def is_ending(self, lease_id: str) -> bool:
        return lease_id in self._ending

    def end_soon(self, lease: LeaseRow, reason: str, why: str) -> None:
        """End `lease` in a worker (hotplug: removed, tampered), then refresh its group."""
        self._ending.add(lease.id)
        log.warning("lease %s of uid %s ends (%s): %s", lease.id, lease.uid, reason, why)

        def end() -> None:
            try:
                self.manager.release(lease.id, None, reason)
            except VfiodError as e:
                log.error("ending lease %s (%s): %s", lease.id, reason, e)
            finally:
                self._ending.discard(lease.id)
            self.snapshot.refresh([lease.group])
        asyncio.get_running_loop().run_in_executor(None, end)

    # ------------------------------------------------------------ the Manager

    async def request(self, caller: Caller, target: str, backend: str, options: Mapping[str, object],
                      owner: str | None = None) -> LeaseRow:
        if not isinstance(target, str) or len(target) > 256:
            raise InvalidArgument("the target is too long")
        lease = await self._run(self.manager.request, caller, target, backend, options, owner)
        if owner and not lease.persistent and not await self.callers.present(owner):
            # The caller left while the grant ran: its disconnect found nothing to end yet,
            # so end the lease now rather than leave it held for nobody.
            log.warning("lease %s: uid %s left the bus before the grant finished; undoing it", lease.id, caller.uid)
            await self._run(self.manager.release, lease.id, None, "disconnected")
            self.refresh_soon([lease.group])
            raise BackendFailed("the caller left the bus before the grant finished; the lease was undone")
        warnings: list[str] = []
        # A delegate's lease is for a container not yet started: its grant travels in the CDI spec.
        if lease.memlock and "k8s_namespace" not in options:
            # The policy's grant goes to the calling process (vfioctl lease -- CMD: CMD inherits it),
            # before the lessee pins any memory.  If it cannot be applied, the caller is told.
            why = "vfiod does not know the calling process" if not caller.pid else ""
            if caller.pid:
                try:
                    got = await self._run(self.manager.grant_memlock, lease, caller.pid)
                    log.info("lease %s: RLIMIT_MEMLOCK of pid %s is now %s", lease.id, caller.pid, got)
                    if got is None:
                        why = f"process {caller.pid} is gone"
                except VfiodError as e:
                    why = str(e)
            if why:
                log.error("lease %s: the memlock grant of %s was not applied: %s", lease.id,
                          format_size(lease.memlock), why)
                warnings.append(f"memlock: the policy's RLIMIT_MEMLOCK grant of {format_size(lease.memlock)} "
                                f"was not applied: {why}")
        if options.get("scope") and caller.pid:
            await self._confine(lease, caller.pid)
        self._warnings[lease.id] = warnings
        self.refresh_soon([lease.group])
        self.objects.export_lease(lease)
        self.manager_iface.LeaseGranted(busmod.lease_path(lease.id))
        self.update_status()
        return lease

    async def _target_group(self, target: str) -> tuple[Host, int]:
        """A fresh snapshot of the group `target` names (any target form), and its number."""
        policy = self.policy_store.current
        host = await self._run(self.manager.host_for, target, policy)
        return host, policy.resolve(host, target).group

    async def explain(self, caller: Caller, target: str) -> str:
        # Drivers and blockers fresh from the target's group; why the group is shared
        # from the last whole scan (it needs the bridges above, in other groups).
        host, number = await self._target_group(target)
        g = host.groups[number]
        whole = self.host.groups.get(number)
        if whole is not None and whole.members == g.members:
            g = attrs.evolve(g, isolation=whole.isolation, isolation_text=whole.isolation_text)
        else:
            host = await self._run(self.manager.scan)     # the topology changed: explain it afresh
            g = host.groups[number]
        lease = self.manager.lease_for_group(number)
        return report.explain_text(target, g, lease, self.host.findings, viewer=caller.uid)

    async def groups_json(self, caller: Caller, targets: list[str]) -> list[report.Json]:
        """The groups `targets` name (every group when none), in the one group JSON."""
        if len(targets) > 64:
            raise InvalidArgument(f"at most 64 targets at a time, not {len(targets)}")
        numbers: list[int] | None = None
        if targets:
            numbers = []
            for t in targets:
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
                                         original_driver=self.original_driver))
        return out

    async def check(self, caller: Caller, target: str, backend: str) -> Decision:
        host, number = await self._target_group(target)
        d = self.policy_store.current.decide(host, caller, number, backend, {})
        if d.allowed:
            reset = "; each device is reset before it goes back to the host" if d.reset_on_release else ""
            d = attrs.evolve(d, reason=d.reason + self._memlock_advice(caller, d) + reset)
        if not caller.is_admin:
            # Where the policy says so (file:line) is for admins: it maps the policy for anyone.
            d = attrs.evolve(d, rule="", reason=_hide_sources(d.reason))
        return d

    def _memlock_advice(self, caller: Caller, decision: Decision) -> str:
        """What the lease will do to the caller's locked-memory limit, said before it matters:
        VFIO pins every page the lessee maps for DMA, and fails (DPDK: "DMA remapping failed")
        once RLIMIT_MEMLOCK is exhausted."""
        cur = self.kernel.memlock_of(caller.pid) if caller.pid else None
        have = "unknown" if cur is None else ("unlimited" if cur[0] < 0 else format_size(cur[0]))
        if decision.memlock:
            return (f"; the lease raises RLIMIT_MEMLOCK of your process to {format_size(decision.memlock)} "
                    f"(now {have})")
        if cur is not None and 0 <= cur[0] < (256 << 20):
            return (f"; warning: no memlock grant in the policy and your RLIMIT_MEMLOCK is {have}: "
                    "a VFIO user that pins memory (DPDK, QEMU) will fail to map DMA beyond it")
        return ""

    async def kubernetes_access(self, caller: Caller, target: str) -> tuple[list[str], list[str]]:
        host, number = await self._target_group(target)
        return self.policy_store.current.kubernetes_view(host, caller.uid, number)

    async def set_vf_count(self, caller: Caller, pf: str, count: int) -> int:
        addr = PciAddress.parse(pf)
        before = await self._run(self.manager.set_vf_count, caller, addr, count)
        log.info("%s: %d -> %d VFs (uid %s)", addr, before, count, caller.uid)
        self.refresh_soon()              # VFs come and go with their groups
        return before

    async def reload_policy(self, caller: Caller) -> None:
        if not caller.is_admin:
            raise PermissionDenied("only root may reload the policy")
        try:
            policy = await self._run(self.policy_store.reload)
        except PolicyError as e:
            problems = e.message.splitlines()
            log.error("policy reload by uid %s refused, the policy in force stays: %s", caller.uid,
                      "; ".join(problems))
            raise PolicyError(f"{self.policy_store.REFUSED} ({len(problems)} error{'s' if len(problems) != 1 else ''}):\n"
                              + e.message) from None
        finally:
            self.update_status()
        log.info("policy reloaded by uid %s: %d files, %d rules", caller.uid, len(policy.files), len(policy.rules))
        self.manager_iface.PolicyReloaded(len(policy.files), len(policy.rules))
        await self.revoke_disallowed()

    # ------------------------------------------------------------ what systemd shows

    def status_text(self) -> str:
        leases = self.manager.leases()
        store = self.policy_store
        files = None if store.current.directory is None else len(store.current.files)
        return status_line(len(self.host.groups), len(leases), sum(1 for lease in leases if lease.persistent),
                           files, store.error is not None)

    def update_status(self) -> None:
        """Tell systemd what the daemon holds (`systemctl status` shows it), when it changed."""
        text = self.status_text()
        if text != self._status:
            self._status = text
            sd_notify(f"STATUS={text}")

    # ------------------------------------------------------------ leases

    def _lease_of(self, caller: Caller, lease_id: str, action: str) -> LeaseRow:
        lease = self.manager.get(lease_id)
        if not caller.is_admin and caller.uid != lease.uid:
            raise PermissionDenied(f"lease {lease.id} belongs to uid {lease.uid}; you may not {action} it")
        return lease

    async def open_fd(self, caller: Caller, lease_id: str, which: str) -> int:
        lease = self._lease_of(caller, lease_id, "open")
        be = self.backends[lease.backend]
        ctx = self.manager.context(lease, host=self.host)
        return be.open_group(ctx) if which == "group" else be.open_container(ctx)

    def keep_fd_for_send(self, fd: int) -> int:
        assert self.bus is not None
        self.bus.close_after_send.add(fd)
        return fd

    async def hostdev_xml(self, caller: Caller, lease_id: str) -> str:
        lease = self._lease_of(caller, lease_id, "read")
        be = self.backends[lease.backend]
        return be.hostdev_xml(self.manager.context(lease, host=self.host))

    async def renew(self, caller: Caller, lease_id: str, seconds: int) -> LeaseRow:
        self._lease_of(caller, lease_id, "renew")
        return await self._run(self.manager.renew, lease_id, caller, int(seconds))

    async def release(self, caller: Caller, lease_id: str) -> None:
        lease = self._lease_of(caller, lease_id, "release")
        await self._run(self.manager.release, lease_id, caller)
        self.refresh_soon([lease.group])

    def _ended_in_thread(self, ended: Ended) -> None:
        if self.loop:
            self.loop.call_soon_threadsafe(self._ended, ended)

    def _revoking_in_thread(self, lease: LeaseRow) -> None:
        if self.loop:
            self.loop.call_soon_threadsafe(self._revoking, lease)

    def _revoking(self, lease: LeaseRow) -> None:
        self.objects.update_lease(lease)
        self.manager_iface.LeaseRevoking(busmod.lease_path(lease.id), lease.revoke_reason or "",
                                         max(0, int(lease.deadline)))
        self.update_status()

    # ------------------------------------------------------------ transient scopes (systemd)

    async def _systemd(self, member: str, signature: str, body: list[object]) -> bool:
        """Call systemd's Manager on vfiod's bus; False where there is no systemd (or it said no)."""
        if self.bus is None:
            return False
        msg = Message(destination=SYSTEMD, path="/org/freedesktop/systemd1", interface=SYSTEMD + ".Manager",
                      member=member, signature=signature, body=body)
        try:
            reply = await asyncio.wait_for(self.bus.call(msg), 10)
        except (asyncio.TimeoutError, OSError) as e:
            log.info("systemd did not answer %s: %s", member, e)
            return False
        if reply is None or reply.message_type == MessageType.ERROR:
            why = (reply.body[0] if reply and reply.body else reply.error_name if reply else "no reply")
            log.info("systemd refused %s: %s", member, why)
            return False
        return True

    async def _confine(self, lease: LeaseRow, pid: int) -> None:
        """Where systemd runs: move the caller (vfioctl lease -- CMD, before it starts CMD) into
        a transient scope of its own, so the revoke ladder can end the whole tree at once."""
        scope = f"vfiod-lease-{lease.id}.scope"
        if await self._systemd("StartTransientUnit", "ssa(sv)a(sa(sv))", [
                scope, "fail", [["PIDs", Variant("au", [pid])],
                                ["Description", Variant("s", f"vfiod lease {lease.id} of uid {lease.uid}")],
                                ["CollectMode", Variant("s", "inactive-or-failed")]], []]):
            await self._run(self.journal.set_scope, lease.id, scope)
            log.info("lease %s: pid %s runs in %s", lease.id, pid, scope)

    def _end_scope_in_thread(self, scope: str, sig: int) -> bool:
        loop = self.loop
        if loop is None:
            return False
        fut = asyncio.run_coroutine_threadsafe(self._systemd("KillUnit", "ssi", [scope, "all", int(sig)]), loop)
        try:
            return fut.result(15)
        except Exception as e:
            log.error("ending %s: %s", scope, e)
            return False

    async def revoke(self, caller: Caller, lease_id: str, reason: str) -> None:
        """Root: take a lease back through the ladder (`LeaseManager.revoke`)."""
        if not caller.is_admin:
            raise PermissionDenied("only root may revoke a lease")
        lease = self.manager.get(lease_id)
        await self._run(self.manager.revoke, lease_id, reason or "revoked", caller)
        self.refresh_soon([lease.group])

    async def turn_ladders(self) -> None:
        """One turn of the revoke ladder for every lease on it (the daemon's tick)."""
        ended = await self._run(self.manager.advance_all)
        if ended:
            self.refresh_soon([e.lease.group for e in ended])

    async def revoke_disallowed(self) -> None:
        """After a policy reload: revoke (reason ``policy``) the leases it no longer allows, and
        apply its caps to the rest (`vfiod.caps`)."""
        got = await self._run(self.manager.revoke_disallowed, self.policy_store.current)
        got += await self._run(apply_caps, self.manager, self.policy_store.current)     # vfiod.caps
        if got:
            self.refresh_soon([g.lease.group for g in got])

    def warnings(self, lease_id: str) -> list[str]:
        """What the grant of `lease_id` promised and could not do (the memlock grant, say)."""
        return self._warnings.get(lease_id, [])

    def _ended(self, ended: Ended) -> None:
        self._warnings.pop(ended.lease.id, None)
        self.objects.drop_lease(ended.lease.id)
        self.manager_iface.LeaseEnded(busmod.lease_path(ended.lease.id), ended.reason)
        self.update_status()

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

    # ------------------------------------------------------------ bus events

    async def owner_gone(self, name: str) -> None:
        """A client left the bus: forget who it was, end its plain leases."""
        self.callers.forget(name)
        ended = await self._run(self.manager.end_owned_by, name)
        if ended:
            self.refresh_soon([e.lease.group for e in ended])

    async def apply_claims(self) -> None:
        """The policy's boot claims, as persistent leases; one that fails is logged and skipped."""
        for claim in self.policy_store.current.claims:
            caller = Caller.from_uid(claim.uid)
            try:
                existing = [lease for lease in self.manager.leases()
                            if lease.target == claim.target and lease.uid == claim.uid]
                if existing:
                    log.info("claim %s for uid %s: already held (lease %s)", claim.target, claim.uid,
                             existing[0].id)
                    continue
                lease = await self._run(self.manager.request, caller, claim.target, claim.backend,
                                        {"persistent": True}, None)
                log.info("claim %s for %s applied: lease %s", claim.target, claim.user, lease.id)
            except VfiodError as e:
                log.error("claim %s for %s (%s) not applied: %s", claim.target, claim.user, claim.source, e)
            except Exception:
                # A claim must never keep the daemon from starting: log it and go on.
                log.exception("claim %s for %s (%s) not applied: internal error", claim.target, claim.user,
                              claim.source)
        await self._run(self.snapshot.refresh)
