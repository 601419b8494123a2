"""The policy in force: resolving targets and deciding requests."""

from __future__ import annotations

import threading
from ..terms import LeaseTerms
from typing import TYPE_CHECKING, Iterable, Mapping

import attrs

from ..address import PciAddress
from ..errors import InvalidArgument, NotFound, PermissionDenied, PolicyError
from .files import TRUSTED_OWNERS, read_directory
from .load import Loader
from .model import (K8S_NAMESPACE, AdminGroup, Refusal, Caller, Claim, DEFAULT_DENY, DEFAULT_REVOKE_GRACE, DEFAULT_DIR,
                    Decision, DeviceDecision, KNOWN_BACKENDS, Pool, PoolMember, Resource, Rule, Target, parse_target)
from .units import MAX_LEASE_SECONDS, _short, format_duration
from ..sysfs.mdev import MdevKind
from .users import UserDb, system_users

if TYPE_CHECKING:
    from ..topology import Device, Host


# ---------------------------------------------------------------- the policy

@attrs.frozen(eq=False)
class Policy:
    """A loaded policy: rules in order, named resources, boot claims, and the files they came from."""

    rules: tuple[Rule, ...] = ()
    resources: Mapping[str, Resource] = attrs.field(factory=dict)
    pools: Mapping[str, Pool] = attrs.field(factory=dict)
    #: the unix groups whose members are delegated admins (``admin_groups``)
    admin_groups: tuple[AdminGroup, ...] = ()
    claims: tuple[Claim, ...] = ()
    files: tuple[str, ...] = ()
    backends: tuple[str, ...] = KNOWN_BACKENDS
    directory: str | None = None
    #: why no policy is in force (`PolicyStore` sets it when the first load is refused):
    #: every "no rule matched" says it, so nobody mistakes a broken policy for a denial
    unloaded: str = ""

    # -- loading

    @classmethod
    def load(cls, directory: str = DEFAULT_DIR, backends: Iterable[str] = KNOWN_BACKENDS,
             users: UserDb | None = None, owners: tuple[int, ...] = TRUSTED_OWNERS) -> "Policy":
        """Every ``*.toml`` of `directory`, in name order; `PolicyError` if any is broken.

        `backends`: the backend names files may use (plugins add theirs);
        `users`: the user and group database (default: the system's);
        `owners`: the uids that may own the files and every directory above them
        (root; see `read_directory`)."""
        sources = read_directory(directory, owners)
        return attrs.evolve(cls.from_sources(sources, backends=backends, users=users), directory=directory)

    @classmethod
    def from_sources(cls, sources: Iterable[tuple[str, str | bytes]],
                     backends: Iterable[str] = KNOWN_BACKENDS, users: UserDb | None = None) -> "Policy":
        """A policy from ``(path, content)`` pairs, in the order given (`load` reads them from disk)."""
        loader = Loader(backends, users if users is not None else system_users())
        paths = []
        for path, content in sources:
            loader.add(path, content)
            paths.append(path)
        loader.finish()
        return cls(rules=tuple(loader.rules), resources=dict(loader.resources), pools=dict(loader.pools),
                   admin_groups=tuple(loader.admin_groups.values()), claims=tuple(loader.claims),
                   files=tuple(paths), backends=loader.backends)

    @classmethod
    def empty(cls, unloaded: str = "") -> "Policy":
        """No rules: every request is denied (`unloaded`: why, said with every denial)."""
        return cls(unloaded=unloaded)

    # -- targets

    def resolve(self, host: Host, target: str) -> Target:
        """The group and devices `target` names (``0000:04:00.0``, ``04:00.0``, ``group:8``, ``name:RES``).

        `InvalidArgument` (or `InvalidAddress`) for text that is none of
        these and for a resource spread over several groups; `NotFound` for
        what is not on this host or not in the policy, and for a resource
        whose hardware changed (saying what changed)."""
        parsed = parse_target(target)
        if parsed[0] == "mdev":
            raise InvalidArgument(f"{target} names a type of mediated device, not an IOMMU group: a lease of it "
                                  "creates an instance with a group of its own (`vfioctl check` and `vfioctl lease` "
                                  "take it; `vfiod inspect` lists the types)")
        if parsed[0] == "group":
            number = parsed[1]
            g = host.groups.get(number)
            if g is None:
                raise NotFound(f"no IOMMU group {number} on this host")
            return Target(group=g.number, addresses=tuple(g.members))
        if parsed[0] == "interface":
            parsed = "address", self.interface_device(host, parsed[1])
        if parsed[0] == "address":
            addr = parsed[1]
            if addr not in host.devices:
                raise NotFound(f"no PCI device {addr} on this host")
            g = host.group_of(addr)
            if g is None:
                raise NotFound(f"{addr} is in no IOMMU group: {host.no_group_reason()}")
            return Target(group=g.number, addresses=(addr,))
        if parsed[0] == "pool":
            raise InvalidArgument(f"{target} stands for any one of its members' groups: name a member "
                                  f"(`vfioctl check {target}` says which one a lease would take)")
        value = parsed[1]
        res = self.resources.get(value)
        if res is None:
            known = ", ".join(sorted(self.resources)) or "the policy names none"
            raise NotFound(f"no resource named {value!r} (known: {known})")
        return self.resolve_resource(host, res)

    def resolve_resource(self, host: Host, res: Resource) -> Target:
        """The one group of `res`'s devices; `NotFound` when its hardware changed or a device
        is in no group, `InvalidArgument` when it spans several groups."""
        problems = res.problems(host)
        if problems:
            raise NotFound("; ".join(problems))
        groups: dict[int, list[str]] = {}
        for d in res.devices:
            g = host.group_of(d.address)
            if g is None:
                raise NotFound(f"resource {res.name}: {d.address} is in no IOMMU group: {host.no_group_reason()}")
            groups.setdefault(g.number, []).append(str(d.address))
        if len(groups) > 1:
            where = "; ".join(f"group {n}: {', '.join(a)}" for n, a in sorted(groups.items()))
            raise InvalidArgument(f"resource {res.name} spans several IOMMU groups ({where}); "
                                  "a lease takes one group: split the resource")
        return Target(group=next(iter(groups)), addresses=tuple(d.address for d in res.devices),
                      resource=res.name)

    @staticmethod
    def interface_device(host: Host, name: str) -> PciAddress:
        """The PCI device whose network interface `name` is (`NotFound` if none is)."""
        for addr, dev in host.devices.items():
            if name in dev.raw.net:
                return addr
        raise NotFound(f"no network interface {name!r} on a PCI device of this host (an interface goes "
                       "away when its device leaves its driver: name the device by address then)")

    def addresses_named(self, target: str) -> tuple[PciAddress, ...]:
        """The devices `target` names by address, resource or pool (every member's; none for
        ``group:N``, an unknown name or a device that is gone); `InvalidArgument`/
        `InvalidAddress` for text that is no target."""
        parsed = parse_target(target)
        if parsed[0] == "address":
            return (parsed[1],)
        if parsed[0] == "name":
            res = self.resources.get(parsed[1])
            return tuple(d.address for d in res.devices) if res else ()
        if parsed[0] == "pool":
            pool = self.pools.get(parsed[1])
            return tuple(d.address for m in pool.members for d in m.resource.devices) if pool else ()
        return ()

    def admin_group_of(self, caller: Caller, users: UserDb) -> str:
        """The ``admin_groups`` group that makes `caller` a delegated admin now ("" if none).

        Both must hold at the time of the call: the caller's process carries the group
        (the bus's credentials: a process that dropped the group, say a service sandboxed
        without supplementary groups, is no admin), and the user database still lists the
        user in it (`users.groups_of`, read afresh: a user removed from the group stops
        being an admin at once, though their login sessions still carry the group)."""
        if caller.uid == 0 or not self.admin_groups:
            return ""
        carried = [g for g in self.admin_groups if g.gid in caller.gids]
        if not carried:
            return ""
        now = users.groups_of(caller.uid)
        return next((g.name for g in carried if g.gid in now), "")

    def pool(self, name: str) -> Pool:
        """The pool `name` (`NotFound`, naming the pools there are, if the policy has none such)."""
        pool = self.pools.get(name)
        if pool is None:
            known = ", ".join(sorted(self.pools)) or "the policy names none"
            raise NotFound(f"no pool named {name!r} (known: {known})")
        return pool

    def pool_candidates(self, host: Host, name: str) -> list[tuple[PoolMember, Target | None, str]]:
        """Each member of pool `name`, in order, with its target (None and why not, when its
        hardware changed, it is gone, or it spans several groups: such a member is never
        leased).  A member in the group of an earlier one is the same lease: it is left out."""
        pool = self.pool(name)
        out: list[tuple[PoolMember, Target | None, str]] = []
        groups: dict[int, str] = {}
        for m in pool.members:
            try:
                t = self.resolve_resource(host, m.resource)
            except (NotFound, InvalidArgument) as e:
                out.append((m, None, e.message.removeprefix(f"resource {m.resource.name}: ")))
                continue
            if t.group in groups:
                out.append((m, None, f"in IOMMU group {t.group} with member {groups[t.group]}"))
                continue
            groups[t.group] = m.target
            out.append((m, attrs.evolve(t, resource=None, pool=pool.name, member=m.target), ""))
        return out

    def group_named(self, target: str) -> int | None:
        """N for ``group:N``, else None (`InvalidArgument` for text that is no target)."""
        parsed = parse_target(target)
        return parsed[1] if parsed[0] == "group" else None

    # -- decisions

    def decide_device(self, dev: Device, caller: Caller) -> tuple[DeviceDecision, Rule | None]:
        """The first rule naming both `dev` and `caller` decides; returns the verdict and that rule."""
        notes: list[str] = []
        for rule in self.rules:
            if not rule.covers(caller) or rule.max_vfs is not None:   # a VF-count rule grants no lease
                continue
            matched, note = rule.match(dev, self.resources)
            if note:
                notes.append(f"rule {rule.source} did not apply: {note}")
            if not matched:
                continue
            if not rule.allows:
                why = f" ({rule.comment})" if rule.comment else ""
                return DeviceDecision(dev.addr, False, rule.source, f"denied by rule {rule.source}{why}",
                                      Refusal.DENIED), rule
            if dev.protected and not (rule.allow_protected and rule.names(dev.addr, self.resources)):
                return DeviceDecision(dev.addr, False, rule.source, (
                    f"protected ({dev.protected}): rule {rule.source} would have to name it by address "
                    "or resource and set allow_protected = true"), Refusal.PROTECTED), rule
            return DeviceDecision(dev.addr, True, rule.source, f"allowed by rule {rule.source}"), rule
        deny = DEFAULT_DENY
        if caller.k8s_namespace is not None:
            deny = f"no rule matched Kubernetes namespace {caller.k8s_namespace} (deny by default)"
        if self.unloaded:
            deny = f"{deny}: {self.unloaded}"
        return DeviceDecision(dev.addr, False, "", "; ".join([deny, *notes]), Refusal.NO_RULE), None

    def decide_vf_count(self, dev: Device, caller: Caller, count: int) -> tuple[bool, str]:
        """May `caller` set PF `dev`'s number of VFs to `count`?  The first deny rule or
        ``max_vfs`` rule naming both decides (other allow rules grant leases, not this);
        a protected PF needs the rule to name it and set allow_protected.  Returns the
        verdict and why."""
        for rule in self.rules:
            if not rule.covers(caller) or (rule.allows and rule.max_vfs is None):
                continue
            if not rule.match(dev, self.resources)[0]:
                continue
            if not rule.allows:
                why = f" ({rule.comment})" if rule.comment else ""
                return False, f"denied by rule {rule.source}{why}"
            assert rule.max_vfs is not None
            if dev.protected and not (rule.allow_protected and rule.names(dev.addr, self.resources)):
                return False, (f"protected ({dev.protected}): rule {rule.source} would have to name it "
                               "by address and set allow_protected = true")
            if count > rule.max_vfs:
                return False, f"rule {rule.source} allows at most {rule.max_vfs} VFs on {dev.addr}"
            return True, f"allowed by rule {rule.source}"
        return False, f"no rule with max_vfs names {dev.addr} for you (only root may change the number of VFs)"

    def _checked_terms(self, caller: Caller, backend: str,
                       options: LeaseTerms | Mapping[str, object] | None) -> tuple[Caller, LeaseTerms]:
        """The request's terms, checked (`InvalidArgument`), and the caller as the policy
        judges it (speaking for a Kubernetes namespace where the terms say so)."""
        terms = LeaseTerms.from_options(options)
        if terms.duration > MAX_LEASE_SECONDS:
            raise InvalidArgument(f"a lease lasts at most {format_duration(MAX_LEASE_SECONDS)} "
                                  f"({MAX_LEASE_SECONDS} s) at a time, not {_short(terms.duration)} s; renew it later")
        if not isinstance(backend, str) or (backend and backend not in self.backends):
            raise InvalidArgument(f"unknown backend {_short(backend)} (known: {', '.join(sorted(self.backends))})")
        if terms.k8s_namespace is not None:
            caller = self.delegate(caller, terms.k8s_namespace)
        return caller, terms

    def decide_mdev(self, caller: Caller, kind: MdevKind, backend: str = "",
                    options: LeaseTerms | Mapping[str, object] | None = None) -> Decision:
        """May `caller` lease a new instance of mdev type `kind` with `backend`?  The first
        rule with ``mdev_types`` naming both the type and the caller decides; rules for PCI
        devices never do.  Errors as `decide`'s."""
        caller, terms = self._checked_terms(caller, backend, options)
        for rule in self.rules:
            if rule.mdev_types is None or not rule.covers(caller) or not rule.match_mdev(kind.parent, kind.type):
                continue
            if not rule.allows:
                why = f" ({rule.comment})" if rule.comment else ""
                return Decision(False, rule.source, f"mdev type {kind}: denied by rule {rule.source}{why}",
                                refusal=Refusal.DENIED)
            refusal = _refusal(rule, backend, terms.duration, terms.persistent)
            if refusal:
                return Decision(False, rule.source, f"mdev type {kind}: {refusal}", refusal=Refusal.TERMS)
            chosen = backend or rule.default_backend
            return Decision(
                allowed=True, rule=rule.source, reason=f"mdev type {kind} allowed by rule {rule.source} "
                                                       f"(backend {chosen})",
                backend=chosen, max_duration=rule.max_duration, persistent=rule.persistent, memlock=rule.memlock,
                revoke_grace=rule.revoke_grace or DEFAULT_REVOKE_GRACE, on_revoke=rule.on_revoke or "kill",
                revoke_others=rule.revoke_others)
        deny = f"mdev type {kind}: no rule with mdev_types matched (deny by default; rules for PCI devices never " \
               "allow mdevs)"
        if caller.k8s_namespace is not None:
            deny = f"mdev type {kind}: no rule matched Kubernetes namespace {caller.k8s_namespace} (deny by default)"
        if self.unloaded:
            deny = f"{deny}: {self.unloaded}"
        return Decision(False, "", deny, refusal=Refusal.NO_RULE)

    def decide(self, host: Host, caller: Caller, group: int, backend: str = "",
               options: LeaseTerms | Mapping[str, object] | None = None) -> Decision:
        """May `caller` lease IOMMU group `group` with `backend` ("" = the rules' default)?

        `options`: the request's `LeaseTerms` (or the options they are made from):
        the duration asked for, persistence, and the Kubernetes namespace a delegate
        speaks for.  `InvalidArgument` for an unknown backend or malformed options,
        `NotFound` for a group that is not there; every other "no" is a
        `Decision` with a reason."""
        caller, terms = self._checked_terms(caller, backend, options)
        duration, persistent = terms.duration, terms.persistent
        g = host.groups.get(group)
        if g is None:
            raise NotFound(f"no IOMMU group {group} on this host")

        verdicts: list[DeviceDecision] = []
        endpoints: list[DeviceDecision] = []
        deciding: list[Rule] = []
        for addr in g.members:
            dev = host.devices[addr]
            if dev.is_bridge:
                verdicts.append(DeviceDecision(addr, True, "", "bridge or port: exempt (VFIO does not hand it out)"))
                continue
            verdict, rule = self.decide_device(dev, caller)
            if verdict.allowed:
                assert rule is not None        # an allowing verdict always comes from a rule
                refusal = _refusal(rule, backend, duration, persistent)
                if refusal:
                    verdict = DeviceDecision(addr, False, rule.source, refusal, Refusal.TERMS)
                else:
                    deciding.append(rule)
            verdicts.append(verdict)
            endpoints.append(verdict)
        devices = tuple(verdicts)
        if not endpoints:
            return Decision(False, "", f"group {g.number} has no endpoint to lease (only bridges and ports)",
                            devices=devices, refusal=Refusal.NO_ENDPOINT)
        denied = [v for v in endpoints if not v.allowed]
        if denied:
            reason = f"group {g.number}: " + "; ".join(f"{v.address}: {v.reason}" for v in denied)
            if len(denied) < len(endpoints):
                reason += " (a lease takes the whole group, so every endpoint in it must be allowed)"
            # The group's kind of "no": protected wins (the host needs a device), then the first.
            kinds = [v.refusal for v in denied]
            kind = Refusal.PROTECTED if Refusal.PROTECTED in kinds else kinds[0]
            return Decision(False, ", ".join(dict.fromkeys(v.rule for v in denied if v.rule)), reason,
                            devices=devices, refusal=kind)

        rules = list(dict.fromkeys(deciding))
        sources = ", ".join(r.source for r in rules)
        chosen = backend or next((r.default_backend for r in rules
                                  if all(r.default_backend in other.backends for other in rules)), None)
        if chosen is None:
            what = "; ".join(f"rule {r.source} allows {', '.join(r.backends)} (default {r.default_backend})"
                             for r in rules)
            return Decision(False, sources, f"group {g.number}: its rules agree on no default backend "
                                            f"({what}); ask for a backend they all allow", devices=devices,
                            refusal=Refusal.NO_BACKEND)
        caps = [r.max_duration for r in rules if r.max_duration]
        grants = [r.memlock for r in rules if r.memlock]
        return Decision(
            allowed=True, rule=sources, reason=f"group {g.number} allowed by rule {sources} (backend {chosen})",
            backend=chosen, max_duration=min(caps) if caps else None,
            persistent=all(r.persistent for r in rules),
            memlock=min(grants) if len(grants) == len(rules) else None,
            reset_on_release=any(r.reset_on_release for r in rules), devices=devices,
            # The revoke terms most protective of the host: the shortest grace, "wait"
            # only if every rule says so, other uids' processes only if every rule allows it.
            revoke_grace=min((r.revoke_grace for r in rules if r.revoke_grace), default=DEFAULT_REVOKE_GRACE),
            on_revoke="wait" if all(r.on_revoke == "wait" for r in rules) else "kill",
            revoke_others=all(r.revoke_others for r in rules))

    def delegate(self, caller: Caller, namespace: object) -> Caller:
        """`caller` speaking for Kubernetes namespace `namespace` (the ``k8s_namespace``
        request option).  `InvalidArgument` for a malformed namespace, `PermissionDenied`
        unless some rule names the caller in its ``k8s_delegates``: only a delegate of the
        policy may speak for a namespace, whatever the namespace is."""
        if not isinstance(namespace, str) or not K8S_NAMESPACE.fullmatch(namespace):
            raise InvalidArgument(f"k8s_namespace must be a Kubernetes namespace name, got {_short(namespace)}")
        if not any(caller.uid in r.delegate_uids for r in self.rules):
            raise PermissionDenied(f"uid {caller.uid} may not speak for Kubernetes namespaces: "
                                   "no rule of the policy names it in k8s_delegates")
        return attrs.evolve(caller, k8s_namespace=namespace)

    def kubernetes_rules(self, delegate_uid: int) -> tuple[Rule, ...]:
        """The Kubernetes rules that name `delegate_uid` as a delegate, in order."""
        return tuple(r for r in self.rules if r.for_kubernetes and delegate_uid in r.delegate_uids)

    def kubernetes_view(self, host: Host, delegate_uid: int, group: int) -> tuple[list[str], list[str]]:
        """What a ResourceSlice says of IOMMU group `group`: the namespace patterns of the
        Kubernetes allow rules naming `delegate_uid` that match every endpoint of the group
        (a deny rule before them may still refuse a particular namespace: requests are
        decided one namespace at a time), and the resources with a member in the group."""
        g = host.groups.get(group)
        if g is None:
            raise NotFound(f"no IOMMU group {group} on this host")
        endpoints = [host.devices[a] for a in g.members if not host.devices[a].is_bridge]
        patterns: list[str] = []
        for rule in self.kubernetes_rules(delegate_uid):
            if rule.allows and endpoints and all(rule.match(d, self.resources)[0] for d in endpoints):
                patterns.extend(p for p in rule.k8s_namespaces or () if p not in patterns)
        named = sorted(n for n, r in self.resources.items() if any(r.member(a) for a in g.members))
        return patterns, named

    def decide_target(self, host: Host, caller: Caller, target: str, backend: str = "",
                      options: LeaseTerms | Mapping[str, object] | None = None) -> tuple[Target, Decision]:
        """`resolve`, then `decide` on its group."""
        resolved = self.resolve(host, target)
        return resolved, self.decide(host, caller, resolved.group, backend, options)


def _refusal(rule: Rule, backend: str, duration: int, persistent: bool) -> str:
    """Why the allow rule `rule` refuses these terms ("" if it accepts them)."""
    if backend and backend not in rule.backends:
        return f"rule {rule.source} does not allow the {backend} backend (it allows {', '.join(rule.backends)})"
    if duration and rule.max_duration and duration > rule.max_duration:
        return (f"asked for {format_duration(duration)}, rule {rule.source} allows at most "
                f"{format_duration(rule.max_duration)}")
    if persistent and not rule.persistent:
        return f"rule {rule.source} does not allow persistent leases"
    return ""


class PolicyStore:
    """The policy in force: `reload` replaces `current` only with a policy that loads.

    `current` is `Policy.empty()` (deny everything) until the first good load;
    `error` is the message of the last refused load (None after a good one)."""

    #: how a refused reload is said (ReloadPolicy's error: this line, then every error)
    REFUSED = "the new policy was refused; the policy in force stays"

    def __init__(self, directory: str = DEFAULT_DIR, backends: Iterable[str] = KNOWN_BACKENDS,
                 users: UserDb | None = None, owners: tuple[int, ...] = TRUSTED_OWNERS):
        self.directory = directory
        self.owners = owners
        self.backends = tuple(backends)
        self.users = users
        self.current: Policy = Policy.empty()
        self.error: str | None = None
        self._lock = threading.Lock()

    def preview(self) -> Policy:
        """The policy the directory holds now, without taking it (`PolicyError` if broken)."""
        return Policy.load(self.directory, backends=self.backends, users=self.users, owners=self.owners)

    def reload(self) -> Policy:
        """Load the directory again; on `PolicyError` re-raise it and keep `current`."""
        with self._lock:
            try:
                policy = Policy.load(self.directory, backends=self.backends, users=self.users, owners=self.owners)
            except PolicyError as e:
                self.error = str(e)
                if self.current.directory is None:      # nothing loaded yet: say so with every denial
                    count = len(e.message.splitlines())
                    self.current = Policy.empty(
                        f"vfiod's policy is not loaded: {self.directory} was refused "
                        f"({count} error{'s' if count != 1 else ''}; `sudo vfioctl reload` or "
                        f"`vfioctl policy check {self.directory}` lists them), so every request is denied")
                raise
            self.current, self.error = policy, None
            return policy
