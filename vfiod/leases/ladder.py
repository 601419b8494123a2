"""The revoke ladder: how a lease whose group processes may still hold comes to an end.

1. **Tell.** The lease is marked ``revoking`` with its deadline (now + the policy's
   grace) and `on_revoking` is told (the bus signals ``LeaseRevoking``).
2. **Ask.** The node goes back to root, and each endpoint's unbind begins (the
   kernel fires the device's request eventfd: QEMU unplugs it from its guest,
   DPDK runs its removal handling); an mdev lease's instance removal begins, which
   the kernel holds back as it does an unbind.
3. **End.** At the deadline, if the policy says ``on_revoke = "kill"``, the holders
   are ended: SIGTERM, then SIGKILL `kill_after` seconds later.  Only the lease's
   own: the members of its scope and the processes found holding its group that
   run as the lessee (other users' too where the policy's ``revoke_others`` says
   so); never PID 1, the bus daemon, a system service or a system user's process,
   nor a process whose bare 6.1 ``[vfio-device]`` fd may be another lease's.
4. **Give back.** Once the kernel says nobody holds the group (its single-open
   node opens, every unbind the ladder began returned), the release completes as
   any release does.  A holder vfiod cannot find (an fd in flight over
   SCM_RIGHTS, queued in another daemon's message, or in a process it does not
   search) keeps the lease ``revoking``, and `waiting` says so.

The holder search (`search`) reads only candidate processes (the lessee's, the
scope's; every process only where ``revoke_others`` is set), at most once a
`SEARCH_EVERY` seconds per lease, and never under the group lock.  It serves to
find whom to signal and to tell the admin; what ends the ladder is the kernel's word.

Steps 3 and 4 happen in `Ladder.advance`, which the daemon calls every second;
every step is journaled, and a restart resumes the ladder where it was."""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Mapping

import attrs

from ..errors import Busy, InvalidArgument, NotFound, PermissionDenied, VfiodError
from ..hookspecs import Backend, LeaseContext
from ..policy import ADMIN_GROUPS_HINT, Caller, Decision, Policy
from ..state import LeaseRow
from ..sysfs import USER_UIDS, GroupClaim, GroupHeld, Holder, Search, Unbinding, claim_covers_devices
from .core import END_REASONS, Ended, LeaseCore, Revoking
from .mdev import OURS, handed_record, instance_state
from .moves import Moves

log = logging.getLogger("vfiod.leases")

#: How long a revoked lease whose holders are gone may wait for its unbinds to return.
_SETTLE = 2.0
#: The least time between two holder searches of one lease (the ladder turns every second).
SEARCH_EVERY = 1.0


class Ladder:
    def __init__(self, core: LeaseCore, moves: Moves) -> None:
        self.core = core
        self.moves = moves
        self._unbinds: dict[str, list[Unbinding]] = {}     # lease id -> the unbinds the ladder began
        self._told: set[tuple[str, str]] = set()            # (lease id, what) already logged
        self._searches: dict[str, tuple[float, Search]] = {}  # lease id -> (when, the last search)
        self.waiting: dict[str, str] = {}                   # lease id -> why its revoke has not ended yet
        self._claims: dict[str, GroupClaim | None] = {}     # lease id -> vfiod's own file of its group node

    def search(self, lease: LeaseRow, fresh: bool = False) -> Search:
        """The candidate processes holding `lease`'s group or its devices (vfiod excepted):
        the lessee's and its scope's (everyone's where ``revoke_others`` allows ending them).
        Reused for `SEARCH_EVERY` seconds unless `fresh`; call it without the group lock."""
        core = self.core
        now = time.monotonic()
        last = self._searches.get(lease.id)
        if last is not None and not fresh and now - last[0] < SEARCH_EVERY:
            return last[1]
        # A [vfio-device] fd the kernel does not name is this lease's for sure only if
        # its holder's uid holds no other lease through VFIO.
        vfio_uids = frozenset(o.uid for o in core.journal.leases() if o.id != lease.id
                              and (be := core.backends.get(o.backend)) is not None and be.uses_vfio)
        pids = frozenset(m.pid for m in core.scope_members(lease.scope)) if lease.scope else frozenset()
        # The cdevs the lease handed over (its hand-over records), found even once removed.
        handed = frozenset(path for st in core.journal.steps(lease.id) if st.action == "hand-over"
                           for path in _cdev_paths(st.record.get("cdevs"), core.kernel.roots.dev))
        found = core.kernel.holders(lease.group, core.endpoints(lease.id),
                                    None if lease.revoke_others else frozenset({lease.uid}), pids, lease.uid,
                                    vfio_uids, handed)
        self._searches[lease.id] = (now, found)
        return found

    def holders(self, lease: LeaseRow) -> list[Holder]:
        """The candidate processes holding `lease`'s group or its devices open (a fresh search)."""
        return self.search(lease, fresh=True).holders

    def release(self, lease: LeaseRow, reason: str, uid: int | None = None) -> Ended | None:
        """End a lease (its group lock is held; `search` ran just before, without it, unless
        the claim of the group answers for its devices too): at once if the kernel says
        nobody holds its group, else through the ladder (None: it ends later, with
        `on_ended`)."""
        if lease.state == "revoking":
            return None                     # the ladder has it already
        be = self.core.backend(lease.backend)
        held = self.core.journal.mdev.of(lease.id)
        if not be.uses_vfio or (held is not None and instance_state(self.core, held, lease.group)[0] != OURS):
            # Nothing can hold it (an mdev lease whose instance is gone: its group's number
            # may be another group's now, so neither its node nor its holders are this lease's).
            return self.moves.give_back(lease, reason, uid, be)
        ctx = self._take_back(lease, be)    # nobody opens it again while the kernel is asked
        busy = self._claim(lease)
        # vfiod's own open of the group's node is the kernel's word that nobody holds the
        # group; where it speaks for the devices too, no process needs to be looked for.
        # (Where it would have, `LeaseManager.release` searched no process before the lock:
        # if the claim failed after all, the holders are looked for now, afresh.)
        covers = claim_covers_devices(self.core.kernel.roots, ctx.endpoints)
        claimed = busy is None and self._claims.get(lease.id) is not None
        holders = [] if claimed and covers else self.search(lease, fresh=covers).holders
        if holders or busy:
            # Somebody holds the group or its devices: an unbind would wait for them in
            # the kernel, and a group on vfio-pci would stay theirs.  The ladder asks them.
            self._unclaim(lease)
            self._start(lease, reason, uid, holders, busy)
            return None
        try:
            return self.moves.give_back(lease, reason, uid, be, ctx.host)
        finally:
            self._unclaim(lease)

    def revoke(self, lease_id: str, reason: str, caller: Caller | None = None) -> Ended | Revoking:
        """Take a lease back whether or not its holders let go (root, a delegated admin, or
        vfiod itself)."""
        core = self.core
        if caller is not None and not caller.is_admin:
            raise PermissionDenied(f"only root {ADMIN_GROUPS_HINT} may revoke a lease")
        if not isinstance(reason, str) or len(reason) > 200 or not reason.isprintable():
            raise InvalidArgument("a revoke reason is one line of at most 200 printable characters")
        lease = core.journal.lease(lease_id) if isinstance(lease_id, str) else None
        if lease is None:
            raise NotFound(f"no lease {lease_id!r}")
        with core.group_lock(lease.group):
            current = core.journal.lease(lease_id)
            if current is None:
                raise NotFound(f"no lease {lease_id!r}")
            if current.state == "granting":
                raise Busy(f"lease {lease_id} is still being granted")
            if current.state != "revoking":
                self._start(current, reason or "revoked", caller.uid if caller else None)
        got = self.advance(lease_id)
        if got is not None:
            return got
        now = core.journal.lease(lease_id)
        if now is None:
            # Ended meanwhile by another turn of its ladder (the unbind's uevent, the tick):
            # this revoke started it, so it ended as this revoke says.
            said = current.revoke_reason or reason or "revoked"
            return Ended(current, said if said in END_REASONS else "revoked")
        return Revoking(now, ())

    def _start(self, lease: LeaseRow, reason: str, uid: int | None, holders: list[Holder] | None = None,
               busy: str | None = None) -> LeaseRow:
        """Steps 1 and 2 (the group lock is held)."""
        core = self.core
        deadline = core.clock() + lease.grace
        core.journal.start_revoke(lease.id, reason, deadline)
        core.sync_locked()
        lease = attrs.evolve(lease, state="revoking", revoke_reason=reason, deadline=deadline)
        seq = core.journal.intent(lease.id, "revoke", None, {"reason": reason, "deadline": deadline})
        core.journal.done(lease.id, seq)
        core.on_step("revoke")
        held = "; ".join(h.describe() for h in holders or []) or (busy or "")
        core.audit("revoke", uid, lease.target, lease.id, lease.rule, "revoking",
                   f"{reason}; grace {lease.grace:g} s" + (f"; held by {held}" if held else ""), group=lease.group)
        log.warning("lease %s of uid %s is being revoked (%s): its holders have %g s to let go%s", lease.id,
                    lease.uid, reason, lease.grace, f" ({held})" if held else "")
        try:
            core.on_revoking(lease)
        except Exception as e:          # telling must never stop the taking
            log.error("lease %s: telling of the revoke failed: %s", lease.id, e)
        self._ask(lease)
        return lease

    def _take_back(self, lease: LeaseRow, be: Backend) -> LeaseContext:
        """Nobody opens the group again: every hand-over of the lease is taken back.
        Returns the lease's context it was done with."""
        ctx = self.core.context(lease)
        for st in self.core.journal.steps(lease.id):
            if st.action == "hand-over":
                try:
                    be.take_back(ctx, handed_record(self.core, lease, st.record))
                except Exception as e:
                    log.warning("lease %s: taking back the hand-over: %s", lease.id, e)
        return ctx

    def _ask(self, lease: LeaseRow) -> None:
        """Step 2: nobody opens the group again, and each endpoint's unbind begins."""
        core = self.core
        be = core.backends.get(lease.backend)
        if be is None:
            return
        ctx = core.context(lease)
        self._take_back(lease, be)
        if not be.uses_vfio:
            return
        begun = []
        with core.step(lease.id, "ask", None, {"endpoints": [str(a) for a in ctx.endpoints]}):
            for addr in ctx.endpoints:
                if core.kernel.exists(addr) and core.kernel.driver_of(addr) == be.driver:
                    try:
                        u = core.kernel.start_unbind(addr)
                    except (OSError, VfiodError) as e:
                        log.error("lease %s: cannot begin unbinding %s: %s", lease.id, addr, e)
                        continue
                    if u is not None:
                        begun.append(u)
            held = core.journal.mdev.of(lease.id)
            if held is not None and instance_state(core, held, lease.group)[0] == OURS:
                try:                # the instance's removal waits for its holders, as an unbind does
                    begun.append(core.kernel.mdev.start_remove(held.uuid))
                except (OSError, VfiodError) as e:
                    log.error("lease %s: cannot begin removing mdev %s: %s", lease.id, held.uuid, e)
            self._unbinds[lease.id] = begun

    def advance(self, lease_id: str) -> Ended | Revoking | None:
        """One turn of the ladder for a ``revoking`` lease (None if it is not one): end the
        holders whose grace is over; finish the release once the kernel says nobody holds it."""
        core = self.core
        lease = core.journal.lease(lease_id)
        if lease is None or lease.state != "revoking":
            return None
        be = core.backends.get(lease.backend)
        found = self.search(lease) if be is not None and be.uses_vfio else Search()
        with core.group_lock(lease.group):
            current = core.journal.lease(lease_id)
            if current is None or current.state != "revoking":
                return None
            lease = current
            if be is None:
                return Revoking(lease, ())
            holders = found.holders
            if not be.uses_vfio:
                return self._finish(lease, be)
            if lease.id not in self._unbinds:
                self._ask(lease)            # after a restart: ask again
            busy = self._claim(lease)
            settle = 0.0 if holders or busy else _SETTLE
            pending = [u for u in self._unbinds.get(lease.id, []) if not u.wait(settle)]
            if not pending and busy is None:
                return self._finish(lease, be)     # the kernel's word: nobody holds it
            ending = lease.on_revoke == "kill" and core.clock() >= lease.deadline
            if ending:
                self._end_holders(lease, holders)
            self._tell_waiting(lease, holders, pending, busy)
            return Revoking(lease, tuple(holders))

    def _claim(self, lease: LeaseRow) -> str | None:
        """Open the group's node for vfiod, once the kernel lets it (then no file of the group
        exists anywhere, and none can appear until the release is done); None once vfiod
        holds it or there is no node, else the kernel's words."""
        if self._claims.get(lease.id) is not None:
            return None
        try:
            self._claims[lease.id] = self.core.kernel.claim_group(lease.group)
        except GroupHeld as e:
            return e.words
        return None

    def _unclaim(self, lease: LeaseRow) -> None:
        claim = self._claims.pop(lease.id, None)
        if claim is not None:
            claim.close()

    def _tell_waiting(self, lease: LeaseRow, holders: list[Holder], pending: list[Unbinding],
                      busy: str | None) -> None:
        """Say why the revoke has not ended (`waiting`, the log and the audit, once per change)."""
        parts, stuck = [], False
        for h in holders:
            spared = self._spared(lease, h)
            stuck = stuck or spared is not None or lease.on_revoke == "wait"
            parts.append(h.describe() + (f" ({spared})" if spared else ""))
        if not holders:
            kernel = busy or ("the kernel's unbind of its devices has not returned: a device fd is still open"
                              if pending else "")
            if kernel:
                stuck = True
                parts.append(f"{kernel}; held by a process vfiod cannot find: an fd in flight (SCM_RIGHTS) or in "
                             "another daemon's queue, or a process vfiod does not search (not the lessee's)")
        why = "; ".join(parts)
        if self.waiting.get(lease.id) == why:
            return
        self.waiting[lease.id] = why
        if why and stuck:       # what vfiod will not end itself: the admin hears of it, once per change
            self.core.audit("revoke", None, lease.target, lease.id, lease.rule, "waiting", why, group=lease.group)
            log.warning("lease %s: the revoke waits: %s", lease.id, why)

    def advance_all(self) -> list[Ended]:
        """One turn of the ladder for every ``revoking`` lease; the leases that ended."""
        out = []
        for lease in self.core.journal.leases():
            if lease.state != "revoking":
                continue
            try:
                got = self.advance(lease.id)
            except Exception as e:          # one lease must never stop the others' ladders
                self._tell_once(lease.id, f"error:{e}", logging.ERROR, "lease %s: the revoke ladder failed: %s: %s",
                                lease.id, type(e).__name__, e)
                continue
            if isinstance(got, Ended):
                out.append(got)
        return out

    def _tell_once(self, lease_id: str, what: str, level: int, fmt: str, *args: object) -> None:
        if (lease_id, what) not in self._told:
            self._told.add((lease_id, what))
            log.log(level, fmt, *args)

    def _end_holders(self, lease: LeaseRow, holders: list[Holder]) -> None:
        """Step 3: SIGTERM each holder the policy lets vfiod end, SIGKILL it `kill_after` later."""
        core = self.core
        sent: dict[tuple[int, int], dict[str, float]] = {}
        for st in core.journal.steps(lease.id):
            r = st.record
            pid, start, sig, at = r.get("pid"), r.get("start"), r.get("signal"), r.get("at")
            # Only signals known sent: one whose step was cut short by a crash is sent again.
            if (st.action == "end-holder" and st.status == "done" and isinstance(pid, int) and isinstance(start, int)
                    and isinstance(sig, str) and isinstance(at, (int, float))):
                sent.setdefault((pid, start), {})[sig] = float(at)
        now = core.clock()
        if lease.scope:
            self._end_scope(lease, now)
        for h in holders:
            spared = self._spared(lease, h)
            if spared:
                self._tell_once(lease.id, f"spared:{h.pid}:{h.start}", logging.WARNING, "lease %s: %s; %s",
                                lease.id, h.describe(), spared)
                continue
            nxt = self._next_signal(sent.get((h.pid, h.start), {}), now)
            if nxt is None:
                continue
            sig, name = nxt
            with core.step(lease.id, "end-holder", None, {"pid": h.pid, "start": h.start, "uid": h.uid,
                                                          "comm": h.comm, "signal": name, "at": now},
                           f"end-holder:{name}"):
                if core.kernel.signal_holder(h, sig):
                    core.audit("revoke", None, lease.target, lease.id, lease.rule, "ended",
                               f"SIG{name} to {h.describe()} ({lease.revoke_reason})", group=lease.group)
                    log.warning("lease %s: SIG%s to %s (%s)", lease.id, name, h.describe(), lease.revoke_reason)

    def _next_signal(self, sent: Mapping[str, float], now: float) -> tuple[int, str] | None:
        """What the ladder sends next to a holder (or a scope) that got the signals `sent`
        (name -> when): SIGTERM first, SIGKILL `kill_after` seconds later, then nothing."""
        if "TERM" not in sent:
            return signal.SIGTERM, "TERM"
        if "KILL" not in sent and now - sent["TERM"] >= self.core.kill_after:
            return signal.SIGKILL, "KILL"
        return None

    def _spared(self, lease: LeaseRow, h: Holder) -> str | None:
        """Why the ladder never signals `h` for `lease` (None: it may).  Only the lease's
        own processes are ended: the lessee's (others' too where the policy's
        ``revoke_others`` says so, but never a system user's), never PID 1, vfiod, the
        bus daemon or a system service, nor a holder the kernel's words do not tie to it."""
        core = self.core
        if not h.sure:
            return (f"this kernel does not say which device it is and uid {h.uid} holds another VFIO lease, "
                    "so vfiod does not end it")
        if h.pid == 1 or h.pid in core.protected_pids:
            return ("it is PID 1, vfiod or the bus daemon, which vfiod never ends (an fd queued in a message "
                    "stays there until its receiver reads it or leaves the bus)")
        uids = set(h.uids or (h.uid,))
        if uids == {lease.uid} and lease.uid != 0:
            return None                 # the lessee's own (the policy named its uid), wherever it runs
        if h.system_service:
            return f"it runs as a system service ({h.cgroup}), which vfiod never ends"
        if uids == {lease.uid}:
            return None                 # root's own lease: root's processes outside system services
        if not lease.revoke_others:
            return (f"the policy lets vfiod end only the lessee's (uid {lease.uid}) processes, "
                    "so the revoke waits for it")
        system = sorted(u for u in uids if u not in USER_UIDS)
        if system:
            return f"it runs as a system user (uid {system[0]}), which vfiod never ends"
        return None

    def _end_scope(self, lease: LeaseRow, now: float) -> None:
        """The lessee's command ran in a transient scope (`vfioctl lease -- CMD`): end every
        process of it at once, SIGTERM then SIGKILL, as the holders are ended; each is
        checked as a holder is (a process of another uid that got into the scope, say
        through a set-uid program, is spared unless the policy allows ending it)."""
        core = self.core
        sent = {str(st.record.get("signal")): float(at) for st in core.journal.steps(lease.id)
                if st.action == "end-scope" and st.status == "done"
                and isinstance(at := st.record.get("at"), (int, float))}
        nxt = self._next_signal(sent, now)
        if nxt is None or lease.scope is None:
            return
        sig, name = nxt
        seq = core.journal.intent(lease.id, "end-scope", None, {"scope": lease.scope, "signal": name, "at": now})
        ended = []
        for member in core.scope_members(lease.scope):
            spared = self._spared(lease, member)
            if spared:
                self._tell_once(lease.id, f"spared:{member.pid}:{member.start}", logging.WARNING, "lease %s: %s; %s",
                                lease.id, member.describe(), spared)
            elif core.kernel.signal_holder(member, sig):
                ended.append(f"pid {member.pid} ({member.comm})")
        if ended:
            core.audit("revoke", None, lease.target, lease.id, lease.rule, "ended",
                       f"SIG{name} to every process of {lease.scope}: {', '.join(ended)} ({lease.revoke_reason})",
                       group=lease.group)
            log.warning("lease %s: SIG%s to every process of %s: %s (%s)", lease.id, name, lease.scope,
                        ", ".join(ended), lease.revoke_reason)
        core.journal.done(lease.id, seq)

    def _finish(self, lease: LeaseRow, be: Backend) -> Ended | Revoking:
        """Step 4: nobody holds the group: the release completes (a failure is retried)."""
        reason = lease.revoke_reason or "revoked"
        self._unbinds.pop(lease.id, None)
        try:
            ended = self.moves.give_back(lease, reason if reason in END_REASONS else "revoked", None, be)
        except VfiodError as e:
            self._tell_once(lease.id, f"finish:{e}", logging.ERROR, "lease %s: finishing the revoke: %s", lease.id, e)
            return Revoking(lease, ())
        finally:
            self._unclaim(lease)
            self.core.sync_locked()
        self.waiting.pop(lease.id, None)
        self._searches.pop(lease.id, None)
        return ended

    def disallowed(self, policy: Policy) -> list[tuple[LeaseRow, str]]:
        """The granted leases `policy` no longer allows, each with why (nothing is changed)."""
        core = self.core
        out: list[tuple[LeaseRow, str]] = []
        for lease in core.journal.leases():
            if lease.state != "granted":
                continue
            try:
                decision = core.redecide(policy, lease)
            except VfiodError as e:
                decision = Decision(False, "", str(e))
            if not decision.allowed:
                out.append((lease, decision.reason))
        return out

    def revoke_disallowed(self, policy: Policy, uid: int | None = None) -> list[Ended | Revoking]:
        """Revoke (reason ``policy``) every granted lease `policy` no longer allows; `uid`: who
        reloaded it (the audit record's uid)."""
        out: list[Ended | Revoking] = []
        for lease, why in self.disallowed(policy):
            log.warning("lease %s of uid %s: the policy no longer allows it (%s)", lease.id, lease.uid, why)
            try:
                out.append(self.revoke(lease.id, "policy", Caller.from_uid(uid) if uid is not None else None))
            except VfiodError as e:
                log.error("revoking lease %s: %s", lease.id, e)
        return out


def _cdev_paths(pairs: object, dev: str) -> list[str]:
    """The cdev paths of a hand-over record's ``cdevs`` ([[BDF, path], ...]; journal values: checked)."""
    if not isinstance(pairs, list):
        return []
    return [p[1] for p in pairs if isinstance(p, list) and len(p) == 2 and isinstance(p[1], str)
            and p[1].startswith(os.path.join(dev, "vfio/devices/"))]
