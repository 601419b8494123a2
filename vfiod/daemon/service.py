"""The lease façade the bus edge calls.

Every method takes the `Caller` the edge resolved from the bus, runs the
blocking domain work (sysfs, the journal) in a worker thread, and keeps the
snapshot and the bus objects in step.  Who calls (`callers`), the object tree
(`objects`), hotplug (`hotplug`) and the snapshot (`snapshot`) are their own
classes; this one only decides what to do and in which order."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable, Iterable, Mapping, TypeVar, TypeVarTuple

from dbus_next import Message

from .claims import publish_early
from .connection import VfiodBus
from .queries import Queries
from .scopes import Scopes
from ..address import PciAddress
from ..leases.caps import apply_caps
from ..errors import BackendFailed, Busy, InvalidArgument, NotFound, PermissionDenied, PolicyError, Protected, VfiodError
from ..hookspecs import Backend
from ..leases import Ended, LeaseManager
from ..pciids import PciIds
from ..policy import ADMIN_GROUPS_HINT, Caller, PolicyStore, describe_caller, format_size, hide_sources, system_users
from ..state import Journal, LeaseRow
from ..terms import LeaseTerms
from ..sysfs import Kernel
from ..sysfs.procs import Proven, still
from ..topology import Host
from .callers import Callers
from .hotplug import Hotplug
from .notify import count_of, sd_notify, status_line
from .objects import ObjectTree
from .snapshot import Snapshot

log = logging.getLogger("vfiod")

_T = TypeVar("_T")
_Args = TypeVarTuple("_Args")


SYSTEMD = "org.freedesktop.systemd1"
class Service:
    def __init__(self, kernel: Kernel, journal: Journal, policy_store: PolicyStore, backends: dict[str, Backend]):
        self.kernel = kernel
        self.journal = journal
        self.policy_store = policy_store
        self.backends = backends
        #: where the loaded policy's early claims are written for udev (None: nowhere)
        self.early_dir: str | None = None
        self.names = PciIds()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.manager = LeaseManager(kernel, journal, lambda: self.policy_store.current, backends,
                                    on_ended=self._on_loop(self._ended))
        self.manager.on_revoking = self._on_loop(self._revoking)
        self.scopes = Scopes(lambda: self.bus, lambda: self.loop)
        self.manager.scope_members = self.scopes.members_in_thread
        self.snapshot = Snapshot(self.manager)
        self.snapshot.on_change = self._changed_in_thread
        self.queries = Queries(self.manager, policy_store, self.snapshot, self.names)
        self.callers = Callers()
        self.callers.admin_of = lambda caller: self.policy_store.current.admin_group_of(
            caller, self.policy_store.users or system_users())
        self.monitor: object | None = None            # the udev monitor, kept alive with the service
        self.objects = ObjectTree(self)
        self.hotplug = Hotplug(self.manager, self.snapshot, self.end_soon, self.is_ending, self.refresh_soon,
                               self.turn_ladders)
        self._ending: set[str] = set()
        self._warnings: dict[str, list[str]] = {}     # lease id -> what was promised and not done
        self._status: str | None = None               # the last STATUS= told to systemd

    # ------------------------------------------------------------ wiring

    def attach(self, bus: VfiodBus) -> None:
        self.callers.bus = bus
        self.objects.bus = bus

    @property
    def bus(self) -> VfiodBus | None:
        return self.objects.bus

    @property
    def host(self) -> Host:
        return self.snapshot.host

    @property
    def scans(self) -> dict[str, int]:
        return self.snapshot.scans

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

    #: seconds between a grant's or release's end and the rescan of its group: time for the
    #: reply to go out first, so the rescan's thread does not compete with it for the
    #: interpreter (hotplug events are rescanned at once)
    REFRESH_AFTER = 0.05

    def refresh_soon(self, groups: Iterable[int] | None = None, after_reply: bool = False) -> None:
        """Refresh in a worker: callers do not wait for the rescan (`after_reply`: not
        before `REFRESH_AFTER` has passed)."""
        loop = asyncio.get_running_loop()
        loop.call_later(self.REFRESH_AFTER if after_reply else 0, loop.run_in_executor, None,
                        self.snapshot.refresh, groups)

    def _changed_in_thread(self, old: Host, new: Host, groups: list[int] | None) -> None:
        if self.loop:
            self.loop.call_soon_threadsafe(self.objects.publish, old, new, groups)

    def stop(self) -> None:
        """The daemon stops: nothing the workers still finish reaches the bus or the journal."""
        self.loop = None
        self.objects.stopped = True
        self.hotplug.stopped = True

    def is_ending(self, lease_id: str) -> bool:
        return lease_id in self._ending

    def end_soon(self, lease: LeaseRow, reason: str, why: str, work: Callable[[], object] | None = None) -> None:
        """End `lease` in a worker (hotplug: removed, tampered, replaced), by `work` or else
        by a release, then refresh its group."""
        self._ending.add(lease.id)
        log.warning("lease %s of uid %s ends (%s): %s", lease.id, lease.uid, reason, why)

        def end() -> None:
            try:
                if work is None:
                    self.manager.release(lease.id, None, reason)
                else:
                    work()
            except Exception as e:          # one lease's end must never stop the loop
                log.error("ending lease %s (%s): %s: %s", lease.id, reason, type(e).__name__, e)
            finally:
                self._ending.discard(lease.id)
            self.snapshot.refresh([lease.group])
        asyncio.get_running_loop().run_in_executor(None, end)

    # ------------------------------------------------------------ the Manager

    async def request(self, caller: Caller, target: str, backend: str, options: LeaseTerms | Mapping[str, object],
                      owner: str | None = None) -> LeaseRow:
        if not isinstance(target, str) or len(target) > 256:
            raise InvalidArgument("the target is too long")
        terms = LeaseTerms.from_options(options)
        # The caller's process, proven now, where something will act on it: a scope (before
        # the grant: a caller vfiod cannot confine is refused), or the policy's memlock grant
        # (after it: only the grant says whether there is one).  A process vfiod cannot prove
        # is the caller's own is never moved, raised or signalled.
        pidfd: int | None = None
        proven: Proven | None = None
        unproven = ""
        try:
            if terms.scope:
                pidfd, proven, unproven = self.callers.prove(caller, terms.pidfd)
                if proven is None and unproven:
                    self.manager.audit("request", caller.uid, target, None, None, "refused", unproven)
                    raise PermissionDenied(f"vfiod cannot run the caller in a scope: {unproven}")
            try:
                lease = await self._run(self.manager.request, caller, target, backend, terms, owner)
            except (PermissionDenied, Protected, Busy, NotFound) as e:
                # (Busy, NotFound: a pool's answer carries each member's refusal.)
                # As `check` says it: where the policy says so (file:line) is for admins, and for
                # a delegate the policy names speaking for a namespace (vfiod-dra), whose claim's
                # error names the deciding rule (docs/kubernetes.md).
                if caller.is_admin or (terms.k8s_namespace is not None
                                       and self.policy_store.current.kubernetes_rules(caller.uid)):
                    raise
                raise type(e)(hide_sources(e.message)) from None
            if owner and not lease.persistent and not self.callers.still_here(owner):
                # The caller left while the grant ran: its disconnect found nothing to end yet,
                # so end the lease now rather than leave it held for nobody.  (A disconnect not
                # heard yet ends the lease when it is: it is in the journal now.)
                log.warning("lease %s: uid %s left the bus before the grant finished; undoing it", lease.id,
                            caller.uid)
                await self._run(self.manager.release, lease.id, None, "disconnected")
                self.refresh_soon([lease.group])
                raise BackendFailed("the caller left the bus before the grant finished; the lease was undone")
            if lease.memlock and terms.k8s_namespace is None and not terms.scope:
                pidfd, proven, unproven = self.callers.prove(caller, terms.pidfd)
            warnings = await self._grant_memlock(lease, terms, pidfd, proven, unproven)
            if terms.scope and pidfd is not None and proven is not None:
                try:
                    scope = await self.scopes.confine(lease, pidfd, proven)
                except VfiodError:
                    await self._run(self.manager.release, lease.id, None, "released")
                    self.refresh_soon([lease.group])
                    raise
                if scope:
                    await self._run(self.journal.set_scope, lease.id, scope)
        finally:
            if pidfd is not None and pidfd not in (caller.pidfd, terms.pidfd):
                os.close(pidfd)            # opened here; the bus's and the caller's are closed by their owners
        self._warnings[lease.id] = warnings
        self.refresh_soon([lease.group], after_reply=True)
        self.objects.lease_granted(lease)
        self.update_status()
        return lease

    async def _grant_memlock(self, lease: LeaseRow, terms: LeaseTerms, pidfd: int | None, proven: Proven | None,
                             unproven: str) -> list[str]:
        """The policy's memlock grant, to the caller's proven process (vfioctl lease -- CMD: CMD
        inherits it), before the lessee pins any memory; what was not done, for the caller."""
        # A delegate's lease is for a container not yet started: its grant travels in the CDI spec.
        if not lease.memlock or terms.k8s_namespace is not None:
            return []
        why = unproven
        if proven is not None and pidfd is not None:
            try:
                got = await self._run(self.manager.grant_memlock, lease, proven.pid, proven.start)
                log.info("lease %s: RLIMIT_MEMLOCK of pid %s is now %s", lease.id, proven.pid, got)
                if got is None or not still(pidfd, proven):
                    why = f"process {proven.pid} is gone"
            except VfiodError as e:
                why = str(e)
        if not why:
            return []
        log.error("lease %s: the memlock grant of %s was not applied: %s", lease.id, format_size(lease.memlock), why)
        return [f"memlock: the policy's RLIMIT_MEMLOCK grant of {format_size(lease.memlock)} was not applied: {why}"]

    async def set_vf_count(self, caller: Caller, pf: str, count: int) -> int:
        addr = PciAddress.parse(pf)
        before = await self._run(self.manager.set_vf_count, caller, addr, count)
        log.info("%s: %d -> %d VFs (uid %s)", addr, before, count, caller.uid)
        self.refresh_soon()              # VFs come and go with their groups
        return before

    async def reload_policy(self, caller: Caller | None) -> None:
        """Load the policy directory again: ReloadPolicy (root or a delegated admin), or SIGHUP
        (`caller` None).  A refused policy raises `PolicyError` with every error, and the policy in
        force stays; an accepted one revokes (reason ``policy``) the leases it no longer allows."""
        if caller is not None and not caller.is_admin:
            raise PermissionDenied(f"only root {ADMIN_GROUPS_HINT} may reload the policy")
        who = "SIGHUP" if caller is None else describe_caller(caller)
        try:
            policy = await self._run(self.policy_store.reload)
        except PolicyError as e:
            problems = e.message.splitlines()
            log.error("policy reload by %s refused, the policy in force stays: %s", who, "; ".join(problems))
            raise PolicyError(f"{self.policy_store.REFUSED} ({len(problems)} error{'s' if len(problems) != 1 else ''}):\n"
                              + e.message) from None
        finally:
            self.update_status()
        publish_early(self.policy_store, self.early_dir)
        log.info("policy reloaded by %s: %s, %s", who, count_of(len(policy.files), "file"), count_of(len(policy.rules), "rule"))
        self.objects.policy_reloaded(len(policy.files), len(policy.rules))
        await self.revoke_disallowed(0 if caller is None else caller.uid)

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

    async def open_fd(self, caller: Caller, lease_id: str, which: str, address: str = "") -> int:
        """An fd for the lease's owner: of its group, the container, iommufd, or the cdev
        of its endpoint `address`."""
        lease = self.manager.owned(lease_id, caller, "open")
        be = self.backends[lease.backend]
        ctx = self.manager.context(lease, host=self.host)
        if which == "device":
            return be.open_device(ctx, PciAddress.parse(address))
        if which == "iommu":
            return be.open_iommu(ctx)
        return be.open_group(ctx) if which == "group" else be.open_container(ctx)

    def keep_fd_for_send(self, fd: int) -> int:
        assert self.bus is not None
        self.bus.close_after_send.add(fd)
        return fd

    async def hostdev_xml(self, caller: Caller, lease_id: str) -> str:
        lease = self.manager.owned(lease_id, caller, "read")
        be = self.backends[lease.backend]
        return be.hostdev_xml(self.manager.context(lease, host=self.host))

    async def renew(self, caller: Caller, lease_id: str, seconds: int) -> LeaseRow:
        return await self._run(self.manager.renew, lease_id, caller, int(seconds))

    async def release(self, caller: Caller, lease_id: str) -> None:
        lease = self.manager.get(lease_id)
        await self._run(self.manager.release, lease_id, caller)
        self.refresh_soon([lease.group], after_reply=True)

    def _on_loop(self, fn: Callable[[_T], None]) -> Callable[[_T], None]:
        """`fn`, called from a worker thread, run on the event loop (not once the daemon stopped)."""
        def call(arg: _T) -> None:
            if self.loop:
                self.loop.call_soon_threadsafe(fn, arg)
        return call

    def _revoking(self, lease: LeaseRow) -> None:
        self.objects.lease_revoking(lease)
        self.update_status()

    async def revoke(self, caller: Caller, lease_id: str, reason: str) -> None:
        """Root or a delegated admin: take a lease back through the ladder (`LeaseManager.revoke` checks who asks)."""
        got = await self._run(self.manager.revoke, lease_id, reason or "revoked", caller)
        self.refresh_soon([got.lease.group])

    async def turn_ladders(self) -> None:
        """One turn of the revoke ladder for every lease on it (the daemon's tick)."""
        ended = await self._run(self.manager.advance_all)
        if ended:
            self.refresh_soon([e.lease.group for e in ended])

    async def revoke_disallowed(self, uid: int | None = None) -> None:
        """After a policy reload (by `uid`): revoke (reason ``policy``) the leases it no longer
        allows, and apply its caps to the rest (`vfiod.leases.caps`)."""
        got = await self._run(self.manager.revoke_disallowed, self.policy_store.current, uid)
        got += await self._run(apply_caps, self.manager, self.policy_store.current, uid)     # vfiod.leases.caps
        if got:
            self.refresh_soon([g.lease.group for g in got])

    def warnings(self, lease_id: str) -> list[str]:
        """What the grant of `lease_id` promised and could not do (the memlock grant, say)."""
        return self._warnings.get(lease_id, [])

    def _ended(self, ended: Ended) -> None:
        self._warnings.pop(ended.lease.id, None)
        self.objects.lease_ended(ended)
        self.update_status()

    # ------------------------------------------------------------ bus events

    async def owner_gone(self, name: str) -> None:
        """A client left the bus: forget who it was, end its plain leases."""
        self.callers.forget(name)
        ended = await self._run(self.manager.end_owned_by, name)
        if ended:
            self.refresh_soon([e.lease.group for e in ended])
