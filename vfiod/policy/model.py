"""The policy's values: callers, decisions, targets, resources, claims and rules."""

from __future__ import annotations

import enum
import fnmatch
import re
from typing import TYPE_CHECKING, Literal, Mapping

import attrs

from ..address import INTERFACE_NAME, PciAddress
from ..errors import InvalidAddress, InvalidArgument
from ..sysfs.mdev import MdevKind
from .units import _hex4, _short, format_duration, format_size
from .users import UserDb, system_users

if TYPE_CHECKING:
    from ..topology import Device, Host


DEFAULT_DIR = "/etc/vfiod/policy.d"
#: The backends every vfiod knows; plugins add more (the loader's ``backends``).
KNOWN_BACKENDS = ("vfio", "libvirt", "pci-stub")
MAX_FILE_SIZE = 1 << 20
MAX_TARGET_LEN = 256
DEFAULT_DENY = "no rule matched (deny by default)"
#: How a check says the policy allows a group that a lease would find busy now (leased, in use).
BUSY_PREFIX = "busy now: "
_SOURCE = re.compile(r"(?:rules? )?\S+\.toml:[0-9]+(?:, \S+\.toml:[0-9]+)*")


def hide_sources(text: str) -> str:
    """`text` without policy file:line references (``rule /etc/…/10-x.toml:7`` → ``a rule``):
    where the policy says so is for admins, since it maps the policy for anyone."""
    return _SOURCE.sub(lambda m: "a rule" if m.group(0).startswith("rule") else "the policy", text)
#: What a revoked lease's holders face once the grace is over: ended, or waited for.
ON_REVOKE = ("kill", "wait")
#: The grace a revoked lease's holders get when no rule sets ``revoke_grace`` (seconds).
DEFAULT_REVOKE_GRACE = 30

MAX_UID = (1 << 32) - 2
MAX_GROUP = (1 << 31) - 1

_ID_PATTERN = re.compile(r"([0-9a-fA-F]{4}|\*):([0-9a-fA-F]{4}|\*)")
_EXACT_ID = re.compile(r"([0-9a-fA-F]{4}):([0-9a-fA-F]{4})")
_CLASS = re.compile(r"[0-9a-fA-F]{2}(?:[0-9a-fA-F]{2}){0,2}")
_DRIVER = re.compile(r"[A-Za-z0-9_.+-]{1,64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: a Kubernetes namespace (an RFC 1123 label) and a pattern of them (``*`` and ``?`` globs)
K8S_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
K8S_NAMESPACE_PATTERN = re.compile(r"[-a-z0-9*?]{1,63}")

# ---------------------------------------------------------------- value objects

@attrs.frozen
class Caller:
    """Who asks: a uid and its unix groups (from the bus's credentials, or the system)."""

    uid: int
    gids: frozenset[int] = frozenset()
    pid: int | None = None
    #: the Kubernetes namespace a delegate speaks for (request option ``k8s_namespace``);
    #: set only after `Policy.decide` checked that the policy names `uid` as a delegate
    k8s_namespace: str | None = None
    #: when vfiod first heard from the caller's bus connection (seconds since boot): its
    #: process started before that
    since: float | None = attrs.field(default=None, eq=False)
    #: a pidfd of the process that opened the caller's connection, where the bus gives one
    #: (``ProcessFD``, dbus >= 1.15); vfiod's, kept while the connection is known
    pidfd: int | None = attrs.field(default=None, eq=False, repr=False)
    #: the policy's ``admin_groups`` group that makes the caller a delegated admin ("" if
    #: none): set afresh for each call (`vfiod.daemon.callers`), never cached with the caller
    admin_group: str = attrs.field(default="", eq=False)

    @classmethod
    def from_uid(cls, uid: int, users: UserDb | None = None) -> "Caller":
        """The uid with the groups the user database gives it (none for an unknown uid)."""
        db = users if users is not None else system_users()
        return cls(uid=int(uid), gids=db.groups_of(int(uid)))

    @property
    def is_root(self) -> bool:
        """uid 0: every right, the ones no policy can delegate (``force``, VF counts beyond
        the policy, the fds of another's lease) included."""
        return self.uid == 0

    @property
    def is_admin(self) -> bool:
        """root, or a member of one of the policy's ``admin_groups``: may reload the policy,
        revoke and release others' leases and see them in full; never more devices than the
        rules give it."""
        return self.uid == 0 or bool(self.admin_group)


#: who besides root holds an admin's rights, for refusals
ADMIN_GROUPS_HINT = "or a member of the policy's admin_groups"


def describe_caller(caller: Caller) -> str:
    """``uid 1000`` or ``uid 1000 (admin group vfio-admins)``, for the log."""
    return f"uid {caller.uid}" + (f" (admin group {caller.admin_group})" if caller.admin_group else "")


class Refusal(enum.Enum):
    """What kind of "no" a decision is, apart from the words (`DeviceDecision.reason`)."""

    NO_RULE = "no-rule"            # no rule named the device and the caller: deny by default
    DENIED = "denied"              # a deny rule decided
    PROTECTED = "protected"        # the host needs the device and no rule may hand it out
    TERMS = "terms"                # an allow rule, but not for this backend, duration or persistence
    NO_ENDPOINT = "no-endpoint"    # the group holds only bridges and ports
    NO_BACKEND = "no-backend"      # the deciding rules agree on no default backend


@attrs.frozen
class DeviceDecision:
    """The verdict on one member of a group; `rule` is ``file:line`` ("" when no rule decided)."""

    address: PciAddress
    allowed: bool
    rule: str
    reason: str
    refusal: Refusal | None = None      # None when allowed


@attrs.frozen
class Decision:
    """The verdict on a whole group.

    `rule`: the deciding rules' ``file:line`` (comma-separated), "" if none
    decided; `reason`: a sentence for people.  The grant fields (`backend`,
    `max_duration`, `persistent`, `memlock`) are set only when `allowed`;
    see the module's documentation for how they combine the rules."""

    allowed: bool
    rule: str
    reason: str
    backend: str | None = None
    max_duration: int | None = None
    persistent: bool = False
    memlock: int | None = None
    reset_on_release: bool = False
    devices: tuple[DeviceDecision, ...] = ()
    refusal: Refusal | None = None                # None when allowed
    revoke_grace: int = DEFAULT_REVOKE_GRACE      # the revoke ladder's terms (see `Rule`)
    on_revoke: str = "kill"
    revoke_others: bool = False


@attrs.frozen
class Target:
    """What a target text names: its IOMMU group, the devices it names, the resource (if any).

    `addresses`: the one address, the resource's devices, or for ``group:N``
    every member; a lease always takes the whole group."""

    group: int
    addresses: tuple[PciAddress, ...]
    resource: str | None = None
    #: a pool's member: the pool and the member's own target (``name:RES`` or its address)
    pool: str | None = None
    member: str | None = None


@attrs.frozen
class IdPattern:
    """``vendor:device`` with ``*`` (None here) for either side."""

    vendor: int | None
    device: int | None

    @classmethod
    def parse(cls, text: str) -> "IdPattern":
        m = _ID_PATTERN.fullmatch(text)
        if not m:
            raise ValueError(f"not a vendor:device id: {_short(text)} (expected e.g. \"8086:10d3\" or \"8086:*\")")
        return cls(*(None if g == "*" else int(g, 16) for g in m.groups()))

    def matches(self, vendor: int | None, device: int | None) -> bool:
        if vendor is None or device is None:
            return False
        return self.vendor in (None, vendor) and self.device in (None, device)

    def __str__(self) -> str:
        return ":".join("*" if v is None else f"{v:04x}" for v in (self.vendor, self.device))


@attrs.frozen
class ResourceDevice:
    """One device of a named resource, as the admin saw it."""

    address: PciAddress
    vendor: int
    device: int
    subsystem: tuple[int, int] | None = None

    @property
    def ids(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"

    def problem(self, dev: Device | None) -> str | None:
        """What differs between this record and `dev` (a topology.Device or None); None if nothing."""
        if dev is None:
            return f"{self.address} is not on this host (card removed?)"
        raw = dev.raw
        if (raw.vendor, raw.device) != (self.vendor, self.device):
            if raw.vendor is None or raw.device is None:
                return f"the ids of {self.address} cannot be read, the policy names {self.ids}"
            return (f"{self.address} is now {raw.vendor:04x}:{raw.device:04x}, "
                    f"the policy names {self.ids} (card swapped?)")
        if self.subsystem is not None and (raw.subsystem_vendor, raw.subsystem_device) != self.subsystem:
            now = f"{_hex4(raw.subsystem_vendor)}:{_hex4(raw.subsystem_device)}"
            want = f"{self.subsystem[0]:04x}:{self.subsystem[1]:04x}"
            return (f"{self.address} is now {self.ids} subsystem {now}, "
                    f"the policy names subsystem {want} (card swapped?)")
        return None

    def describe(self) -> str:
        sub = f" subsystem {self.subsystem[0]:04x}:{self.subsystem[1]:04x}" if self.subsystem else ""
        return f"{self.address} {self.ids}{sub}"


@attrs.frozen
class Resource:
    """A named set of devices (``name:NAME``), pinned to the hardware the admin saw."""

    name: str
    devices: tuple[ResourceDevice, ...]
    source: str                      # file:line of its [[resource]] header
    comment: str = ""

    def member(self, addr: PciAddress) -> ResourceDevice | None:
        return next((d for d in self.devices if d.address == addr), None)

    def problems(self, host: Host) -> list[str]:
        """``resource NAME: …`` for every device whose hardware is not what the policy names."""
        out = []
        for d in self.devices:
            p = d.problem(host.devices.get(d.address))
            if p:
                out.append(f"resource {self.name}: {p}")
        return out


@attrs.frozen
class PoolMember:
    """One member of a pool: one IOMMU group's worth of devices, pinned to the hardware the
    admin saw.  `target` is how one names the member alone: ``name:RES`` for a resource, the
    address for a device given inline (its `resource` is then named by that address)."""

    target: str
    resource: Resource


@attrs.frozen
class Pool:
    """A named pool of interchangeable groups (``pool:NAME``): a lease takes its first free
    member the caller may have."""

    name: str
    members: tuple[PoolMember, ...]
    source: str                      # file:line of its [[pool]] header
    comment: str = ""

    def member_of(self, addr: PciAddress) -> PoolMember | None:
        return next((m for m in self.members if m.resource.member(addr) is not None), None)


@attrs.frozen
class AdminGroup:
    """A unix group of the policy's ``admin_groups``: its members are delegated admins."""

    name: str
    gid: int
    source: str                      # file:line of the admin_groups key


@attrs.frozen
class Claim:
    """A persistent lease the daemon takes when it starts."""

    target: str
    uid: int
    user: str
    backend: str                     # "" = the policy's default
    source: str                      # file:line of its [[claim]] header
    comment: str = ""
    early: bool = False              # bound by udev before a host driver probes (`vfiod.early`)

    @property
    def early_driver(self) -> str:
        """The driver udev's early binding gives the claim's devices."""
        return EARLY_BACKENDS[self.backend]


#: The backends an early claim may name ("": the policy's default), and the driver udev binds for each.
EARLY_BACKENDS = {"": "vfio-pci", "vfio": "vfio-pci", "pci-stub": "pci-stub"}


@attrs.frozen
class Rule:
    """One ``[[rule]]``: which devices, who, and (allow rules) what it grants.

    A device matcher that is None was not given; a given one is non-empty."""

    source: str                                  # file:line of its [[rule]] header
    action: str                                  # "allow" or "deny"
    comment: str = ""
    addresses: frozenset[PciAddress] | None = None
    iommu_groups: frozenset[int] | None = None
    ids: tuple[IdPattern, ...] | None = None
    classes: tuple[str, ...] | None = None       # lower-case hex prefixes of the 6-digit class code
    drivers: frozenset[str] | None = None
    vf_of: frozenset[PciAddress] | None = None
    resources: tuple[str, ...] | None = None
    pools: tuple[str, ...] | None = None
    #: the pools it names, filled in once every file is read (pools may come later)
    pool_defs: tuple[Pool, ...] = ()
    users: tuple[str, ...] = ()                  # as written, for people
    user_uids: tuple[int, ...] = ()              # what `users` resolved to
    unix_groups: tuple[str, ...] = ()            # as written, for people
    uids: frozenset[int] = frozenset()           # the users' uids and the uids key
    gids: frozenset[int] = frozenset()
    everyone: bool = False
    backends: tuple[str, ...] = ()
    default_backend: str | None = None
    max_duration: int | None = None
    persistent: bool = False
    memlock: int | None = None
    allow_protected: bool = False
    reset_on_release: bool = False
    # The revoke ladder: how long holders of a revoked lease get to let go (None: the
    # default), then whether they are ended ("kill") or waited for ("wait"), and whether
    # processes of other uids than the lessee's (root's included) may be ended too.
    revoke_grace: int | None = None
    on_revoke: str | None = None
    revoke_others: bool = False
    # SR-IOV: the rule's users may set a matched PF's number of VFs, up to this many.
    max_vfs: int | None = None
    # A Kubernetes rule names namespaces and the delegates that may speak for them, not users.
    k8s_namespaces: tuple[str, ...] | None = None   # glob patterns, as written
    k8s_delegates: tuple[str, ...] = ()             # as written, for people
    delegate_uids: frozenset[int] = frozenset()
    # Mediated devices: the rule names types of mdev parents ("PARENT/TYPE" globs), and no PCI device.
    mdev_types: tuple[str, ...] | None = None

    @property
    def allows(self) -> bool:
        return self.action == "allow"

    @property
    def for_kubernetes(self) -> bool:
        return self.k8s_namespaces is not None

    def covers(self, caller: Caller) -> bool:
        """Does the rule name this caller?  A request made for a Kubernetes namespace is
        covered only by Kubernetes rules naming both the namespace and the delegate; any
        other request only by the other rules."""
        if caller.k8s_namespace is not None:
            return self.for_kubernetes and caller.uid in self.delegate_uids and \
                self.names_namespace(caller.k8s_namespace)
        if self.for_kubernetes:
            return False
        return self.everyone or caller.uid in self.uids or not self.gids.isdisjoint(caller.gids)

    def names_namespace(self, namespace: str) -> bool:
        return any(fnmatch.fnmatchcase(namespace, p) for p in self.k8s_namespaces or ())

    def match_mdev(self, parent: str, mdev_type: str) -> bool:
        """Does the rule name this type of mediated device (``PARENT/TYPE``, each side a glob)?"""
        return any(fnmatch.fnmatchcase(parent, p) and fnmatch.fnmatchcase(mdev_type, t)
                   for p, _, t in (pattern.partition("/") for pattern in self.mdev_types or ()))

    def match(self, dev: Device, resources: Mapping[str, Resource]) -> tuple[bool, str]:
        """Does the rule name this device?  Also why a resource it names did not ("" if n/a).
        A rule for mdev types names no PCI device."""
        if self.mdev_types is not None:
            return False, ""
        raw = dev.raw
        if self.addresses is not None and dev.addr not in self.addresses:
            return False, ""
        if self.iommu_groups is not None and raw.iommu_group not in self.iommu_groups:
            return False, ""
        if self.ids is not None and not any(p.matches(raw.vendor, raw.device) for p in self.ids):
            return False, ""
        if self.classes is not None:
            if raw.class_code is None:
                return False, ""
            code = f"{raw.class_code:06x}"
            if not any(code.startswith(c) for c in self.classes):
                return False, ""
        if self.drivers is not None and raw.driver not in self.drivers:
            return False, ""
        if self.vf_of is not None and raw.physfn not in self.vf_of:
            return False, ""
        notes: list[str] = []
        for kind, named in (("resource", self.resources), ("pool", self.pools)):
            if named is None:
                continue
            found, why = self._named_match(kind, named, dev, resources)
            if not found:
                notes.extend(why)
                return False, "; ".join(notes)
        return True, ""

    def _named_match(self, kind: str, named: tuple[str, ...], dev: Device,
                     resources: Mapping[str, Resource]) -> tuple[bool, list[str]]:
        """Is `dev` a device of one of the resources (or pools) `named`, with the hardware
        the policy names?  Also why a resource (pool member) holding its address did not match."""
        pools = {p.name: p for p in self.pool_defs}
        notes = []
        for name in named:
            if kind == "resource":
                res = resources.get(name)
            else:
                found = pools[name].member_of(dev.addr) if name in pools else None
                res = found.resource if found else None
            member = res.member(dev.addr) if res else None
            if member is None:
                continue
            problem = member.problem(dev)
            if problem is None:
                return True, []
            notes.append(f"{kind} {name}: {problem}")
        return False, notes

    def names(self, addr: PciAddress, resources: Mapping[str, Resource]) -> bool:
        """Does the rule name `addr` explicitly (by address or resource)?"""
        if self.addresses is not None and addr in self.addresses:
            return True
        return (any(n in resources and resources[n].member(addr) is not None for n in self.resources or ())
                or any(p.member_of(addr) is not None for p in self.pool_defs))

    # -- for people (`vfioctl policy check`)

    def describe_devices(self) -> str:
        parts = []
        if self.addresses is not None:
            parts.append("address " + ", ".join(map(str, sorted(self.addresses))))
        if self.iommu_groups is not None:
            parts.append("IOMMU group " + ", ".join(map(str, sorted(self.iommu_groups))))
        if self.ids is not None:
            parts.append("ids " + ", ".join(map(str, self.ids)))
        if self.classes is not None:
            parts.append("class " + ", ".join(self.classes))
        if self.drivers is not None:
            parts.append("driver " + ", ".join(sorted(self.drivers)))
        if self.vf_of is not None:
            parts.append("VFs of " + ", ".join(map(str, sorted(self.vf_of))))
        if self.resources is not None:
            parts.append("resource " + ", ".join(self.resources))
        if self.pools is not None:
            parts.append("pool " + ", ".join(self.pools))
        if self.mdev_types is not None:
            parts.append("mdev type " + ", ".join(self.mdev_types))
        return "; ".join(parts)

    def describe_who(self) -> str:
        if self.for_kubernetes:
            return (f"Kubernetes namespace {', '.join(self.k8s_namespaces or ())} "
                    f"through delegate {', '.join(self.k8s_delegates)}")
        if self.everyone:
            return "everyone"
        parts = []
        if self.users:
            parts.append("user " + ", ".join(self.users))
        extra = sorted(self.uids - set(self.user_uids))
        if extra:
            parts.append("uid " + ", ".join(map(str, extra)))
        if self.unix_groups:
            parts.append("group " + ", ".join(self.unix_groups))
        return "; ".join(parts)

    def describe_grant(self) -> str:
        if not self.allows:
            return "nothing (deny)"
        parts = ["backend " + ", ".join(f"{b} (default)" if b == self.default_backend else b
                                        for b in self.backends)]
        parts.append(f"at most {format_duration(self.max_duration)}" if self.max_duration else "no duration cap")
        parts.append("persistent leases" if self.persistent else "no persistent leases")
        if self.memlock:
            parts.append(f"memlock {format_size(self.memlock)}")
        if self.allow_protected:
            parts.append("the protected devices it names")
        if self.reset_on_release:
            parts.append("reset on release")
        if self.max_vfs is not None:
            parts.append(f"up to {self.max_vfs} VFs on the PFs it names")
        if self.revoke_grace or self.on_revoke or self.revoke_others:
            parts.append(revoke_terms(self.revoke_grace or DEFAULT_REVOKE_GRACE, self.on_revoke or "kill",
                                      self.revoke_others))
        return "; ".join(parts)


def revoke_terms(grace: int, on_revoke: str, others: bool) -> str:
    """The revoke ladder's terms for people: ``revoke: 30s grace, then end the lessee's holders``."""
    then = ("wait for the holders" if on_revoke == "wait" else
            "end the holders, whoever runs them" if others else "end the lessee's holders")
    return f"revoke: {format_duration(grace)} grace, then {then}"


# What `parse_target` makes of a target: test ``parsed[0]`` to narrow ``parsed[1]``.
ParsedTarget = (tuple[Literal["group"], int] | tuple[Literal["name"], str] | tuple[Literal["pool"], str]
                | tuple[Literal["interface"], str] | tuple[Literal["address"], PciAddress]
                | tuple[Literal["mdev"], MdevKind])


def parse_target(target: str) -> ParsedTarget:
    """("group", N) | ("name", NAME) | ("pool", NAME) | ("address", PciAddress) | ("interface",
    NAME) (a network interface of a PCI device, as dpdk-devbind takes them) | ("mdev", MdevKind)
    (a new instance of a type of mediated device); InvalidArgument/InvalidAddress."""
    if not isinstance(target, str) or not target:
        raise InvalidArgument("empty target (expected 0000:04:00.0, 04:00.0, group:N, name:RESOURCE, pool:POOL "
                              "or mdev:PARENT/TYPE)")
    if len(target) > MAX_TARGET_LEN:
        raise InvalidArgument(f"the target is too long ({len(target)} characters)")
    if target.startswith("group:"):
        number = target[6:]
        if not re.fullmatch(r"[0-9]{1,10}", number) or int(number) > MAX_GROUP:
            raise InvalidArgument(f"not an IOMMU group: {_short(target)} (expected group:N, e.g. group:8)")
        return "group", int(number)
    if target.startswith("name:"):
        name = target[5:]
        if not _NAME.fullmatch(name):
            raise InvalidArgument(f"not a resource name: {_short(target)} (expected name:RESOURCE)")
        return "name", name
    if target.startswith("pool:"):
        name = target[5:]
        if not _NAME.fullmatch(name):
            raise InvalidArgument(f"not a pool name: {_short(target)} (expected pool:POOL)")
        return "pool", name
    if target.startswith("mdev:"):
        try:
            return "mdev", MdevKind.parse(target[5:])
        except InvalidArgument:
            raise InvalidArgument(f"not an mdev target: {_short(target)} (expected mdev:PARENT/TYPE, "
                                  "e.g. mdev:mtty/mtty-2; `vfiod inspect` lists the types)") from None
    try:
        return "address", PciAddress.parse(target)
    except InvalidAddress:
        if INTERFACE_NAME.fullmatch(target):
            return "interface", target
        raise InvalidAddress(f"not a target: {_short(target)} (expected a PCI address such as "
                             "0000:04:00.0 or 04:00.0, group:N, name:RESOURCE, pool:POOL or a network "
                             "interface such as enp4s0)") from None


