"""What every part of a lease's life shares: the kernel, the journal, the backends,
one lock per group, the journaled step, the audit record and the callbacks.

`LeaseCore` holds them; `vfiod.leases.manager.LeaseManager` is one (it adds the
lifecycle's entry points), and the parts of the lifecycle (`moves`, `ladder`,
`reconcile`, `memlock`, `sriov`) each get it at construction."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Callable, Iterable, Iterator

import attrs

from ..address import PciAddress
from ..errors import InvalidArgument, VfiodError
from ..hookspecs import Backend, LeaseContext
from ..policy import Caller, Decision, Policy
from ..state import Journal, LeaseRow, Record
from ..sysfs import Holder, Kernel, SysfsReader
from ..sysfs.mdev import MdevKind
from ..terms import LeaseTerms
from ..topology import Host
from .audit import Audit

log = logging.getLogger("vfiod.leases")


@attrs.frozen
class Ended:
    """A lease that ended, and why (released, expired, disconnected, removed, …)."""

    lease: LeaseRow
    reason: str


@attrs.frozen
class Revoking:
    """A lease on the revoke ladder, and who still holds its group."""

    lease: LeaseRow
    holders: tuple[Holder, ...]


#: Seconds between the SIGTERM and the SIGKILL of a holder the ladder ends.
KILL_AFTER = 3.0
#: Why a lease may end; a revoke for another reason (an admin's words, "policy") ends it as "revoked".
END_REASONS = ("released", "expired", "disconnected", "owner-gone", "removed", "tampered", "shutdown",
               "interrupted")


class OpenStep:
    """A journaled step under way: what `LeaseCore.step` records as done (`record`)."""

    def __init__(self, seq: int, record: Record | None) -> None:
        self.seq = seq
        self.record = record


class LeaseCore:
    """The state the lifecycle shares; every method is thread-safe.

    Requests for one group are serialised (`group_lock`); requests for different
    groups run in parallel.  `on_step(name)` is called after each journaled step
    (the crash tests kill the process there)."""

    def __init__(self, kernel: Kernel, journal: Journal, policy_source: Callable[[], Policy],
                 backends: dict[str, Backend], owner_alive: Callable[[LeaseRow], bool] | None = None,
                 on_step: Callable[[str], None] | None = None, clock: Callable[[], float] = time.time,
                 on_ended: Callable[[Ended], None] | None = None):
        self.kernel = kernel
        self.reader = SysfsReader(kernel.roots)      # one reader: it remembers what cannot change
        self.journal = journal
        self.policy_source = policy_source
        self.backends = backends
        self.owner_alive = owner_alive or (lambda lease: False)
        self.on_step = on_step or (lambda name: None)
        self.on_ended = on_ended or (lambda ended: None)
        self.on_revoking: Callable[[LeaseRow], None] = lambda lease: None
        # The processes of a lease's transient scope, as they are now (the daemon asks systemd;
        # none where it cannot).
        self.scope_members: Callable[[str], list[Holder]] = lambda scope: []
        # Processes the ladder never signals, whatever they hold: vfiod, and the bus daemon (the daemon adds it).
        self.protected_pids: set[int] = {os.getpid()}
        self.clock = clock
        self.kill_after = KILL_AFTER
        self.audit = Audit(journal)
        self._locks: dict[int, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # ------------------------------------------------------------ the host, groups and backends

    def scan(self) -> Host:
        return Host.scan(self.reader)

    def scan_groups(self, groups: Iterable[int]) -> Host:
        return Host.scan_groups(self.reader, groups)

    def group_of(self, addr: PciAddress) -> int | None:
        return self.reader.group_of(addr)

    def group_lock(self, group: int) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(group, threading.Lock())

    def is_busy(self, group: int) -> bool:
        """Is a grant or release of `group` under way (its devices are moving on purpose)?"""
        with self._locks_guard:
            lock = self._locks.get(group)
        return lock is not None and lock.locked()

    def backend(self, name: str) -> Backend:
        try:
            return self.backends[name]
        except KeyError:
            raise InvalidArgument(f"unknown backend {name!r} (known: {', '.join(sorted(self.backends))})") from None

    def redecide(self, policy: Policy, lease: LeaseRow, caller: Caller | None = None,
                 terms: LeaseTerms | None = None) -> Decision:
        """`policy`'s decision on `lease` now (a renewal, a reload, a cap): its group as the
        kernel shows it, or for an mdev lease the type its instance was made of."""
        caller = caller or Caller.from_uid(lease.uid)
        terms = terms or lease.terms
        held = self.journal.mdev.of(lease.id)
        if held is not None:
            return policy.decide_mdev(caller, MdevKind(held.parent, held.type), lease.backend, terms)
        return policy.decide(self.scan_groups([lease.group]), caller, lease.group, lease.backend, terms)

    # ------------------------------------------------------------ what a backend is told

    def context(self, lease: LeaseRow, host: Host | None = None, decision: Decision | None = None) -> LeaseContext:
        """The `LeaseContext` of `lease`: its endpoints as the journal holds them, its
        last hand-over record, and the container ACL entries other leases share."""
        if host is None:
            host = Host.from_raw([], self.reader.facts())
        handed = [s.record for s in self.journal.steps(lease.id) if s.action == "hand-over"]
        return LeaseContext(lease=lease, endpoints=self.endpoints(lease.id), kernel=self.kernel, decision=decision,
                            host=host, handed_over=handed[-1] if handed else None,
                            container_acl_uids=self._acl_uids(lease.id, "acl"),
                            iommu_acl_uids=self._acl_uids(lease.id, "iommu_acl"))

    def endpoints(self, lease_id: str) -> tuple[PciAddress, ...]:
        """The endpoints a lease holds (its journaled devices, bridges left out)."""
        return tuple(h.address for h in self.journal.held(lease_id) if h.role == "endpoint")

    def _acl_uids(self, lease_id: str, key: str) -> frozenset[int]:
        """The uids whose ACL entry, added by vfiod, a lease other than `lease_id` holds
        (its hand-over record, journaled or done, says `key`: ``acl`` for the container,
        ``iommu_acl`` for /dev/iommu)."""
        uids = set()
        for other in self.journal.leases():
            if other.id == lease_id:
                continue
            for st in self.journal.steps(other.id):
                acl = st.record.get(key) if st.action == "hand-over" else None
                if isinstance(acl, int) and not isinstance(acl, bool):
                    uids.add(acl)
        return frozenset(uids)

    def sync_locked(self) -> None:
        """Tell the reader which devices the ladder unbinds (their device lock may be held
        for as long as their holders hold on): every endpoint of a ``revoking`` lease."""
        self.reader.locked = frozenset(a for lease in self.journal.leases() if lease.state == "revoking"
                                       for a in self.endpoints(lease.id))

    # ------------------------------------------------------------ one journaled step

    @contextlib.contextmanager
    def step(self, lease_id: str, action: str, addr: str | None = None, record: Record | None = None,
             name: str | None = None, what: str | None = None) -> Iterator[OpenStep]:
        """Journal, act, verify: the step's intent is committed before the body runs and
        its done (with `OpenStep.record`, if the body set one) after; `on_step` hears
        ``NAME-intent`` and ``NAME-done`` (``name`` is ``action[:suffix]``).  A
        `VfiodError` in the body marks the step failed and is raised again as
        ``step N (WHAT): …``; an uncommitted step counts as failed."""
        label, _, suffix = (name or action).partition(":")
        suffix = f":{suffix}" if suffix else ""
        seq = self.journal.intent(lease_id, action, addr, record)
        self.on_step(f"{label}-intent{suffix}")
        done = OpenStep(seq, None)
        try:
            yield done
        except VfiodError as e:
            self.journal.failed(lease_id, seq, str(e))
            raise type(e)(f"step {seq} ({what or action}): {e}") from None
        self.journal.done(lease_id, seq, done.record)
        self.on_step(f"{label}-done{suffix}")
