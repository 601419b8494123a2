"""Admin policy: which IOMMU groups may be leased by whom, with which backend, for how long.

Pure domain code: it reads the policy files and the user and group database,
and judges requests against a `vfiod.topology.Host` snapshot; it never
touches sysfs, the bus or udev.  Deny by default.

Files
=====

vfiod reads every ``*.toml`` file of the policy directory
(``/etc/vfiod/policy.d``; dotfiles and other names are skipped) in name order
(byte order: give files two-digit prefixes, ``10-nics.toml``).  A file holds
three kinds of tables, each any number of times: ``[[rule]]``,
``[[resource]]`` and ``[[claim]]``.  Resource names and claims are shared by
all files.  If any file is broken the whole policy is refused, with file, line
and key in the message (``policy.d/10-x.toml:7: key 'backnds': unknown key``),
and the daemon keeps the policy it had.  A policy directory or file anyone may
write is refused too.  Unknown keys, wrong types, unknown backends, users or
groups that do not exist and addresses that do not parse are all errors, so a
typo never widens access.

Rules
=====

For each device, the rules are tried in order (file name, then position in
the file); the first rule that matches both the device and the caller decides,
allow or deny.  No matching rule: denied.  A group is allowed only if every
endpoint in it is allowed (bridges and ports are exempt: VFIO does not hand
them out).  uid 0 gets nothing implicitly; admins write rules for themselves
too.  Every list-valued key also takes a single value::

    [[rule]]
    comment = "NICs for DPDK"     # optional; shown by `vfioctl policy check`
    action = "allow"              # or "deny" (default "allow")

    # Which devices.  At least one key; every key given must match the device,
    # and a key matches if any of its values does.
    address = ["0000:04:00.0"]    # DDDD:BB:DD.F, BB:DD.F or pci_DDDD_BB_DD_F
    group = [8]                   # IOMMU group numbers (may change with the kernel or firmware)
    ids = ["8086:10d3", "8086:*"] # vendor:device, "*" for any (never matches unreadable ids)
    class = ["02", "0300"]        # class code prefix: class (02 = network), + subclass, + prog-if
    driver = ["e1000e"]           # the driver bound *now* (a leased device is on vfio-pci or
                                  # pci-stub, so a renewal is judged on that driver)
    vf_of = "0000:01:00.0"        # the SR-IOV virtual functions of this physical function
    resource = "fast-nic"         # the devices of a [[resource]], while the hardware still matches

    # Who.  At least one key; the caller matches if any of them does.
    users = ["alice"]             # user names (must exist)
    uids = [1000]
    groups = ["dpdk"]             # unix group names (must exist): primary or supplementary
    everyone = true

    # What an allow rule grants (these keys are errors in a deny rule).
    backends = ["vfio", "libvirt"]  # known: vfio, libvirt, pci-stub (+ plugins); default ["vfio"],
                                    # or [default_backend] when only that is given
    default_backend = "vfio"      # the backend of a request that names none; default: the first
    max_duration = "8h"           # cap on a lease's length: "90s", "30m", "8h", "2d", "1w",
                                  # "1h30m" or seconds; default: no cap
    persistent = false            # may a lease outlive its client and daemon restarts (default no)
    memlock = "1G"                # RLIMIT_MEMLOCK to grant: bytes or "512K", "256M", "1G", "1T"
                                  # (powers of 1024); default: none
    allow_protected = false       # see "Protected devices"
    reset_on_release = false      # reset each endpoint (BDF/reset) before it goes back to the host

A group's decision combines the rules that decided its endpoints:

* backend: a request that names a backend needs every deciding rule to allow
  it.  A request that names none gets the first deciding rule's
  ``default_backend`` that every deciding rule allows (endpoints in address
  order); if there is none, it is denied and must name a backend.
* ``duration`` (seconds) above any deciding rule's ``max_duration`` is denied,
  naming the cap.  `Decision.max_duration` is the smallest cap: a request that
  gives no duration is allowed, and the lease manager must not let its lease
  run longer than that.
* ``persistent`` is allowed only if every deciding rule allows it.
* `Decision.memlock` is the smallest grant of the deciding rules, and none if
  any of them grants none: a grant is a privilege, and each rule is the most
  its admin agreed to for its devices.
* ``reset_on_release`` holds if any deciding rule asks for it: it protects
  the host, so one rule's request is enough.

Protected devices
=================

Devices the host needs (`Device.protected`: the boot VGA, the root disk's
controller, the default route's NIC) are denied unless the deciding rule names
them explicitly, by ``address`` or by ``resource``, and has
``allow_protected = true``; the denial quotes why the device is protected.
(``allow_protected`` is an error in a rule that names no device that way.)

Named resources
===============

Like Proxmox VE's resource mappings: the admin names a set of devices by
address and ids, rules grant it with ``resource = "NAME"``, and users lease
``name:NAME``::

    [[resource]]
    name = "fast-nic"
    comment = "the 82574L in slot 4"        # optional
    devices = [{ address = "0000:04:00.0", ids = "8086:10d3", subsystem = "8086:a01f" }]

``ids`` (vendor:device) is required, ``subsystem`` (subsystem
vendor:device) optional.  If the hardware at an address changed (a card
swapped), the resource refuses, saying what changed, and rules naming it no
longer match that device.  A resource's devices must share one IOMMU group.

Claims
======

Persistent leases the daemon takes when it starts, e.g. a DPDK service's NICs;
the policy only checks and lists them (`Policy.claims`)::

    [[claim]]
    target = "name:fast-nic"      # an address, group:N or name:RESOURCE
    user = "dpdk-svc"             # must exist
    backend = "vfio"              # optional: the policy's default
    comment = "testpmd at boot"   # optional

The lease is still judged by the rules (as a persistent lease for that user)
when the daemon applies the claim.
"""

from __future__ import annotations

import difflib
import grp
import os
import pwd
import re
import threading
import tomllib
from datetime import date, datetime, time
from typing import Iterable, Mapping

import attrs

from .address import PciAddress
from .errors import InvalidAddress, InvalidArgument, NotFound, PolicyError

DEFAULT_DIR = "/etc/vfiod/policy.d"
#: The backends every vfiod knows; plugins add more (the loader's ``backends``).
KNOWN_BACKENDS = ("vfio", "libvirt", "pci-stub")
MAX_FILE_SIZE = 1 << 20
MAX_TARGET_LEN = 256
DEFAULT_DENY = "no rule matched (deny by default)"

MATCH_KEYS = ("address", "group", "ids", "class", "driver", "vf_of", "resource")
WHO_KEYS = ("users", "uids", "groups", "everyone")
GRANT_KEYS = ("backends", "default_backend", "max_duration", "persistent", "memlock", "allow_protected",
              "reset_on_release")
RULE_KEYS = ("action", "comment") + MATCH_KEYS + WHO_KEYS + GRANT_KEYS
RESOURCE_KEYS = ("name", "comment", "devices")
RESOURCE_DEVICE_KEYS = ("address", "ids", "subsystem")
CLAIM_KEYS = ("target", "user", "backend", "comment")
TABLES = ("rule", "resource", "claim")

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_DURATION = 100 * 366 * 86400
MAX_MEMLOCK = (1 << 63) - 1
MAX_UID = (1 << 32) - 2
MAX_GROUP = (1 << 31) - 1

_ID_PATTERN = re.compile(r"([0-9a-fA-F]{4}|\*):([0-9a-fA-F]{4}|\*)")
_EXACT_ID = re.compile(r"([0-9a-fA-F]{4}):([0-9a-fA-F]{4})")
_CLASS = re.compile(r"[0-9a-fA-F]{2}(?:[0-9a-fA-F]{2}){0,2}")
_DRIVER = re.compile(r"[A-Za-z0-9_.+-]{1,64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SIZE = re.compile(r"(\d{1,20})\s*([kKmMgGtT]?)(?:i?B)?")
_DURATION_PART = re.compile(r"(\d{1,9})([smhdw])")


# ---------------------------------------------------------------- values

def parse_duration(value: object) -> int:
    """Seconds from an integer or "90s", "30m", "8h", "2d", "1w", "1h30m" ("90": seconds).

    Raises `ValueError` with a message for people."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a duration (\"8h\", \"30m\" or seconds), got {_describe(value)}")
    if isinstance(value, int):
        seconds = value
    elif re.fullmatch(r"\d{1,12}", value):
        seconds = int(value)
    else:
        parts = _DURATION_PART.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise ValueError(f"not a duration: {_short(value)} (try \"90s\", \"30m\", \"8h\", \"2d\", \"1h30m\")")
        seconds = sum(int(n) * _SECONDS[u] for n, u in parts)
    if not 0 < seconds <= MAX_DURATION:
        raise ValueError(f"a duration must be between 1 second and 100 years, got {seconds} s")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from an integer or "512K", "256M", "1G", "1T" (powers of 1024; "MiB"/"MB" too)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a size (\"256M\", \"1G\" or bytes), got {_describe(value)}")
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE.fullmatch(value.strip())
        if not m:
            raise ValueError(f"not a size: {_short(value)} (try \"256M\", \"1G\" or a number of bytes)")
        size = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if not 0 < size <= MAX_MEMLOCK:
        raise ValueError(f"a size must be positive and below 8 EiB, got {size}")
    return size


def format_size(size: int) -> str:
    """"1G", "256M", … (the largest unit that divides `size`), or "N bytes"."""
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size} bytes"


def format_duration(seconds: int) -> str:
    """"8h", "1h30m", "90s" → "1m30s", …"""
    out = []
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= factor:
            out.append(f"{seconds // factor}{unit}")
            seconds %= factor
    return "".join(out) or "0s"


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 4] + "...'"


def _describe(value: object) -> str:
    """`value` in the words of TOML: "the string 'x'", "an array", …"""
    if isinstance(value, bool):
        return f"the boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"the integer {value}" if abs(value) < 10 ** 20 else "a huge integer"
    if isinstance(value, float):
        return f"the float {value!r}"
    if isinstance(value, str):
        return f"the string {_short(value)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime):
        return "a date-time"
    if isinstance(value, date):
        return "a date"
    if isinstance(value, time):
        return "a time"
    return f"a {type(value).__name__}"


def _hex4(v: int | None) -> str:
    return "????" if v is None else f"{v:04x}"


# ---------------------------------------------------------------- users and groups

class UserDb:
    """Who exists: the system's users and groups (pwd, grp, getgrouplist).

    The loader takes one as ``users``; tests pass a `StaticUserDb`."""

    _ERRORS = (KeyError, ValueError, OverflowError, TypeError)

    def uid(self, name: str) -> int | None:
        try:
            return pwd.getpwnam(name).pw_uid
        except self._ERRORS:
            return None

    def gid(self, name: str) -> int | None:
        try:
            return grp.getgrnam(name).gr_gid
        except self._ERRORS:
            return None

    def user_name(self, uid: int) -> str | None:
        try:
            return pwd.getpwuid(uid).pw_name
        except self._ERRORS:
            return None

    def group_name(self, gid: int) -> str | None:
        try:
            return grp.getgrgid(gid).gr_name
        except self._ERRORS:
            return None

    def groups_of(self, uid: int) -> frozenset[int]:
        """Every gid of the user, the primary one included; none for an unknown uid."""
        try:
            pw = pwd.getpwuid(uid)
            return frozenset(os.getgrouplist(pw.pw_name, pw.pw_gid))
        except (*self._ERRORS, OSError):
            return frozenset()


@attrs.frozen
class StaticUserDb(UserDb):
    """A fixed user and group database.

    `users` maps a name to its uid, or to (uid, primary gid) (default: a
    user-private group with gid = uid); `groups` maps a name to (gid, member
    names)."""

    users: Mapping[str, int | tuple[int, int]] = attrs.field(factory=dict)
    groups: Mapping[str, tuple[int, Iterable[str]]] = attrs.field(factory=dict)

    def _entry(self, name: str) -> tuple[int, int] | None:
        v = self.users.get(name)
        if v is None:
            return None
        return (v, v) if isinstance(v, int) else (v[0], v[1])

    def uid(self, name):
        e = self._entry(name) if isinstance(name, str) else None
        return e[0] if e else None

    def gid(self, name):
        g = self.groups.get(name) if isinstance(name, str) else None
        return g[0] if g else None

    def user_name(self, uid):
        return next((n for n in self.users if self._entry(n)[0] == uid), None)

    def group_name(self, gid):
        return next((n for n, (g, _) in self.groups.items() if g == gid), None)

    def groups_of(self, uid):
        name = self.user_name(uid)
        if name is None:
            return frozenset()
        gids = {self._entry(name)[1]}
        gids.update(g for g, members in self.groups.values() if name in members)
        return frozenset(gids)


def system_users() -> UserDb:
    """The database used when a caller passes none: the system's."""
    return UserDb()


# ---------------------------------------------------------------- value objects

@attrs.frozen
class Caller:
    """Who asks: a uid and its unix groups (from the bus's credentials, or the system)."""

    uid: int
    gids: frozenset[int] = frozenset()
    pid: int | None = None

    @classmethod
    def from_uid(cls, uid: int, users: UserDb | None = None) -> "Caller":
        """The uid with the groups the user database gives it (none for an unknown uid)."""
        db = users if users is not None else system_users()
        return cls(uid=int(uid), gids=db.groups_of(int(uid)))

    @property
    def is_admin(self) -> bool:
        return self.uid == 0


@attrs.frozen
class DeviceDecision:
    """The verdict on one member of a group; `rule` is ``file:line`` ("" when no rule decided)."""

    address: PciAddress
    allowed: bool
    rule: str
    reason: str


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


@attrs.frozen
class Target:
    """What a target text names: its IOMMU group, the devices it names, the resource (if any).

    `addresses`: the one address, the resource's devices, or for ``group:N``
    every member; a lease always takes the whole group."""

    group: int
    addresses: tuple[PciAddress, ...]
    resource: str | None = None


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

    def problem(self, dev) -> str | None:
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

    def problems(self, host) -> list[str]:
        """``resource NAME: …`` for every device whose hardware is not what the policy names."""
        out = []
        for d in self.devices:
            p = d.problem(host.devices.get(d.address))
            if p:
                out.append(f"resource {self.name}: {p}")
        return out


@attrs.frozen
class Claim:
    """A persistent lease the daemon takes when it starts."""

    target: str
    uid: int
    user: str
    backend: str                     # "" = the policy's default
    source: str                      # file:line of its [[claim]] header
    comment: str = ""


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

    @property
    def allows(self) -> bool:
        return self.action == "allow"

    def covers(self, caller: Caller) -> bool:
        """Does the rule name this caller?"""
        return self.everyone or caller.uid in self.uids or not self.gids.isdisjoint(caller.gids)

    def match(self, dev, resources: Mapping[str, Resource]) -> tuple[bool, str]:
        """Does the rule name this device?  Also why a resource it names did not ("" if n/a)."""
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
        if self.resources is not None:
            notes = []
            for name in self.resources:
                res = resources.get(name)
                member = res.member(dev.addr) if res else None
                if member is None:
                    continue
                problem = member.problem(dev)
                if problem is None:
                    return True, ""
                notes.append(f"resource {name}: {problem}")
            return False, "; ".join(notes)
        return True, ""

    def names(self, addr: PciAddress, resources: Mapping[str, Resource]) -> bool:
        """Does the rule name `addr` explicitly (by address or resource)?"""
        if self.addresses is not None and addr in self.addresses:
            return True
        return any(n in resources and resources[n].member(addr) is not None for n in self.resources or ())

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
        return "; ".join(parts)

    def describe_who(self) -> str:
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
        return "; ".join(parts)


# ---------------------------------------------------------------- where keys are

@attrs.define
class _KeyPos:
    line: int
    elements: list[int] = attrs.field(factory=list)   # lines where array elements start


class _Locator:
    """Line numbers of tables, keys and array elements in a TOML text (tomllib gives none).

    A small scanner over text tomllib already accepted: it follows strings,
    comments and bracket nesting, and records each ``[[table]]`` header, each
    key at the start of a line (per table occurrence) and where each element
    of an array value starts."""

    def __init__(self, text: str):
        self.headers: dict[str, list[int]] = {}
        self.keys: dict[tuple[str, int], dict[str, _KeyPos]] = {}
        self._scan(text)

    def header(self, kind: str, index: int) -> int:
        """The line of the `index`-th ``[[kind]]`` table (or of its element in ``kind = [...]``)."""
        lines = self.headers.get(kind, [])
        if 0 <= index < len(lines):
            return lines[index]
        root = self.keys.get(("", 0), {}).get(kind)
        if root is not None:
            return root.elements[index] if 0 <= index < len(root.elements) else root.line
        return 1

    def line(self, kind: str, index: int, key: str | None = None, element: int | None = None) -> int:
        """The line of `key` (its `element`-th array element) in that table; its header if unknown."""
        if kind == "":
            pos = self.keys.get(("", 0), {}).get(key)
            return pos.line if pos else 1
        pos = self.keys.get((kind, index), {}).get(key) if key is not None else None
        if pos is None:
            return self.header(kind, index)
        if element is not None and 0 <= element < len(pos.elements):
            return pos.elements[element]
        return pos.line

    def _key(self, ctx: tuple[str, int], name: str, line: int) -> _KeyPos:
        table = self.keys.setdefault(ctx, {})
        if name not in table:
            table[name] = _KeyPos(line)
        return table[name]

    def _scan(self, text: str) -> None:
        n, i, line = len(text), 0, 1
        ctx: tuple[str, int] = ("", 0)
        cur: _KeyPos | None = None
        depth, line_start, expect_element = 0, True, False
        while i < n:
            c = text[i]
            if c == "\n":
                line += 1
                i += 1
                line_start = line_start or depth == 0
                continue
            if c in " \t\r":
                i += 1
                continue
            if c == "#":
                j = text.find("\n", i)
                i = n if j < 0 else j
                continue
            if depth == 0 and line_start:
                line_start = False
                if c == "[":
                    double = text.startswith("[[", i)
                    path, i = _key_path(text, i + (2 if double else 1))
                    j = text.find("\n", i)
                    i = n if j < 0 else j
                    ctx, cur = self._header(path, double, line)
                    continue
                path, j = _key_path(text, i)
                if path:
                    i = j
                    cur = self._key(ctx, path[0], line)
                    while i < n and text[i] in " \t":
                        i += 1
                    if i < n and text[i] == "=":
                        i += 1
                    continue
            if depth == 1 and expect_element and c != "]":
                if cur is not None:
                    cur.elements.append(line)
                expect_element = False
            if c in "\"'":
                i, line = _skip_string(text, i, line)
                continue
            if c in "[{":
                depth += 1
                expect_element = depth == 1 and c == "["
            elif c in "]}":
                depth = max(0, depth - 1)
            elif c == "," and depth == 1:
                expect_element = True
            i += 1

    def _header(self, path: tuple[str, ...], double: bool, line: int):
        """Record a table header; returns the table the following keys belong to, and None."""
        if not path:
            return ("", -1), None
        name = path[0]
        self._key(("", 0), name, line)
        if len(path) == 1:
            lines = self.headers.setdefault(name, [])
            if double or not lines:
                lines.append(line)
            return (name, len(lines) - 1), None
        # [[rule.sub]] / [rule.sub]: key `sub` of the last `rule`, one element per [[...]] header
        index = len(self.headers.get(name, [])) - 1
        pos = self._key((name, index), path[1], line)
        if double:
            pos.elements.append(line)
        return ("", -1), None


def _key_path(text: str, i: int) -> tuple[tuple[str, ...], int]:
    """The dotted key at `i` (bare or quoted parts); returns its parts and the index after it."""
    n, parts = len(text), []
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] in "\"'":
            q = text[i]
            j = i + 1
            while j < n and text[j] != q and text[j] != "\n":
                j += 2 if (q == '"' and text[j] == "\\") else 1
            parts.append(text[i + 1:min(j, n)])
            i = min(j + 1, n)
        else:
            j = i
            while j < n and (text[j].isalnum() or text[j] in "_-"):
                j += 1
            if j == i:
                break
            parts.append(text[i:j])
            i = j
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == ".":
            i += 1
            continue
        break
    return tuple(parts), i


def _skip_string(text: str, i: int, line: int) -> tuple[int, int]:
    """Skip the string starting at `i`; returns the index after it and the line there."""
    n, q = len(text), text[i]
    if text.startswith(q * 3, i):
        j = i + 3
        while j < n:
            c = text[j]
            if c == "\\" and q == '"':
                if j + 1 < n and text[j + 1] == "\n":
                    line += 1
                j += 2
                continue
            if c == "\n":
                line += 1
            if text.startswith(q * 3, j):
                j += 3
                extra = 0
                while j < n and text[j] == q and extra < 2:
                    j += 1
                    extra += 1
                return j, line
            j += 1
        return n, line
    j = i + 1
    while j < n and text[j] != q and text[j] != "\n":
        j += 2 if (q == '"' and text[j] == "\\") else 1
    return min(j + 1, n), line


# ---------------------------------------------------------------- reading files

class _Bad(Exception):
    """A problem with one value; `_Table` adds file, line and key."""

    def __init__(self, message: str, element: int | None = None):
        super().__init__(message)
        self.message = message
        self.element = element


class _Table:
    """One ``[[kind]]`` table of one file, for error messages with its file and lines."""

    def __init__(self, path: str, loc: _Locator, kind: str, index: int, data: dict):
        self.path, self.loc, self.kind, self.index, self.data = path, loc, kind, index, data

    @property
    def source(self) -> str:
        return f"{self.path}:{self.loc.header(self.kind, self.index)}"

    def error(self, key: str, message: str, element: int | None = None) -> PolicyError:
        line = self.loc.line(self.kind, self.index, key, element)
        return PolicyError(f"{self.path}:{line}: key '{key}': {message}")

    def table_error(self, message: str) -> PolicyError:
        return PolicyError(f"{self.source}: [[{self.kind}]]: {message}")

    def check_keys(self, known: tuple[str, ...]) -> None:
        for key in self.data:
            if key not in known:
                raise self.error(key, "unknown key" + _did_you_mean(key, known))

    def get(self, key: str, parse, *args):
        """`parse(value, *args)` of the key's value; `_Bad` becomes a located PolicyError."""
        try:
            return parse(self.data[key], *args)
        except _Bad as e:
            raise self.error(key, e.message, e.element) from None


def _did_you_mean(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.7)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"


def _one_or_many(value, item, what: str) -> tuple:
    """A value or an array of values, each through `item` (whose ValueError becomes `_Bad`)."""
    if isinstance(value, list):
        if not value:
            raise _Bad(f"an empty array names nothing: give at least one {what} or remove the key")
        items = value
    else:
        items = [value]
    out = []
    for j, v in enumerate(items):
        try:
            out.append(item(v))
        except ValueError as e:
            raise _Bad(str(e), j if isinstance(value, list) else None) from None
    return tuple(out)


def _bad(v, fn):
    """`fn(v)` with its ValueError as `_Bad` (for `_Table.get`)."""
    try:
        return fn(v)
    except ValueError as e:
        raise _Bad(str(e)) from None


def _string(v, what: str) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected {what}, got {_describe(v)}")
    return v


def _text(v) -> str:
    if not isinstance(v, str):
        raise _Bad(f"expected a string, got {_describe(v)}")
    return v


def _bool(v) -> bool:
    if not isinstance(v, bool):
        raise _Bad(f"expected true or false, got {_describe(v)}")
    return v


def _address(v) -> PciAddress:
    text = _string(v, "a PCI address such as \"0000:04:00.0\"")
    try:
        return PciAddress.parse(text)
    except InvalidAddress as e:
        raise ValueError(str(e)) from None


def _iommu_group(v) -> int:
    if isinstance(v, str):
        raise ValueError(f"expected an IOMMU group number, got {_describe(v)} (unix groups go in 'groups')")
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_GROUP:
        raise ValueError(f"expected an IOMMU group number (0 or more), got {_describe(v)}")
    return v


def _unix_group_name(v) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        raise ValueError(f"expected a unix group name, got {_describe(v)} (IOMMU groups go in 'group')")
    return _string(v, "a unix group name")


def _uid(v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_UID:
        raise ValueError(f"expected a uid (0 or more), got {_describe(v)}")
    return v


def _class(v) -> str:
    text = _string(v, "a class code prefix such as \"02\" or \"0300\"")
    if not _CLASS.fullmatch(text):
        raise ValueError(f"not a class code prefix: {_short(text)} (2, 4 or 6 hex digits: "
                         "\"02\" network, \"0300\" VGA, \"0c0330\" xHCI)")
    return text.lower()


def _driver(v) -> str:
    text = _string(v, "a driver name")
    if not _DRIVER.fullmatch(text):
        raise ValueError(f"not a driver name: {_short(text)}")
    return text


def _resource_name(v) -> str:
    text = _string(v, "a resource name")
    if not _NAME.fullmatch(text):
        raise ValueError(f"not a resource name: {_short(text)} (letters, digits, '_', '.', '-'; at most 64)")
    return text


def _id_pattern(v) -> IdPattern:
    return IdPattern.parse(_string(v, "a vendor:device id such as \"8086:10d3\""))


def _exact_id(v) -> tuple[int, int]:
    text = _string(v, "a vendor:device id such as \"8086:10d3\"")
    m = _EXACT_ID.fullmatch(text)
    if not m:
        raise ValueError(f"not a vendor:device id: {_short(text)} (4 hex digits each, no wildcards)")
    return int(m.group(1), 16), int(m.group(2), 16)


def _syntax_error(path: str, text: str, message: str) -> str:
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if m:
        return f"{path}:{m.group(1)}: TOML syntax error at column {m.group(2)}: {message[:m.start()]}"
    m = re.search(r"\s*\(at end of document\)$", message)
    if m:
        last = text.rstrip("\n").count("\n") + 1
        return f"{path}:{last}: TOML syntax error at the end of the file: {message[:m.start()]}"
    return f"{path}:1: TOML syntax error: {message}"


def _split_target(target: str) -> tuple[str, object]:
    """("group", N) | ("name", NAME) | ("address", PciAddress); InvalidArgument/InvalidAddress."""
    if not isinstance(target, str) or not target:
        raise InvalidArgument("empty target (expected 0000:04:00.0, 04:00.0, group:N or name:RESOURCE)")
    if len(target) > MAX_TARGET_LEN:
        raise InvalidArgument(f"the target is too long ({len(target)} characters)")
    if target.startswith("group:"):
        number = target[6:]
        if not re.fullmatch(r"\d{1,10}", number) or int(number) > MAX_GROUP:
            raise InvalidArgument(f"not an IOMMU group: {_short(target)} (expected group:N, e.g. group:8)")
        return "group", int(number)
    if target.startswith("name:"):
        name = target[5:]
        if not _NAME.fullmatch(name):
            raise InvalidArgument(f"not a resource name: {_short(target)} (expected name:RESOURCE)")
        return "name", name
    try:
        return "address", PciAddress.parse(target)
    except InvalidAddress:
        raise InvalidAddress(f"not a target: {_short(target)} (expected a PCI address such as "
                             "0000:04:00.0 or 04:00.0, group:N or name:RESOURCE)") from None


class _Loader:
    """Builds a policy from file texts; every problem is a located `PolicyError`."""

    def __init__(self, backends: Iterable[str], users: UserDb):
        self.backends = tuple(dict.fromkeys(backends))
        self.users = users
        self.rules: list[Rule] = []
        self.resources: dict[str, Resource] = {}
        self.claims: list[Claim] = []
        self.refs: list[tuple[_Table, str, int | None, str]] = []    # resource names, checked at the end

    # -- files

    def add(self, path: str, content: str | bytes) -> None:
        """Parse one file and add its tables."""
        if len(content) > MAX_FILE_SIZE:
            raise PolicyError(f"{path}:1: file too large (more than {MAX_FILE_SIZE} bytes)")
        if isinstance(content, bytes):
            try:
                content = content.decode("utf-8")
            except UnicodeDecodeError as e:
                line = content[:e.start].count(b"\n") + 1
                raise PolicyError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None
        content = content.removeprefix("\ufeff")
        try:
            data = tomllib.loads(content)
        except tomllib.TOMLDecodeError as e:
            raise PolicyError(_syntax_error(path, content, str(e))) from None
        except RecursionError:
            raise PolicyError(f"{path}:1: TOML syntax error: arrays or tables nested too deeply") from None
        except ValueError as e:          # tomllib wraps nearly everything; stay safe
            raise PolicyError(f"{path}:1: TOML syntax error: {e}") from None
        loc = _Locator(content)
        for key, value in data.items():
            line = loc.line("", 0, key)
            if key not in TABLES:
                close = difflib.get_close_matches(key, TABLES, n=1, cutoff=0.6)
                hint = f"did you mean [[{close[0]}]]?" if close else "expected [[rule]], [[resource]] or [[claim]]"
                raise PolicyError(f"{path}:{line}: key '{key}': unknown table ({hint})")
            odd = next((t for t in value if not isinstance(t, dict)), None) if isinstance(value, list) else value
            if odd is not None:
                got = f"an array holding {_describe(odd)}" if isinstance(value, list) else _describe(value)
                raise PolicyError(f"{path}:{line}: key '{key}': expected [[{key}]] tables "
                                  f"(an array of tables), got {got}")
        tables = sorted(((loc.header(kind, index), TABLES.index(kind), index), kind, table)
                        for kind in TABLES for index, table in enumerate(data.get(kind, ())))
        for (_, _, index), kind, table in tables:        # in file order: the first problem is reported
            t = _Table(path, loc, kind, index, table)
            if kind == "rule":
                self.rules.append(self._rule(t))
            elif kind == "resource":
                self._resource(t)
            else:
                self.claims.append(self._claim(t))

    def finish(self) -> None:
        """The checks that need every file: resource names may be defined in any of them."""
        for t, key, element, name in self.refs:
            if name not in self.resources:
                known = f"known: {', '.join(sorted(self.resources))}" if self.resources else "none is defined"
                raise t.error(key, f"no resource named '{name}' ({known})", element)

    # -- tables

    def _rule(self, t: _Table) -> Rule:
        t.check_keys(RULE_KEYS)
        d, kw = t.data, {"source": t.source}
        action = t.get("action", _text) if "action" in d else "allow"
        if action not in ("allow", "deny"):
            raise t.error("action", f"expected \"allow\" or \"deny\", got {_describe(action)}")
        kw["action"] = action
        if "comment" in d:
            kw["comment"] = t.get("comment", _text)
        # which devices
        if "address" in d:
            kw["addresses"] = frozenset(t.get("address", _one_or_many, _address, "address"))
        if "group" in d:
            kw["iommu_groups"] = frozenset(t.get("group", _one_or_many, _iommu_group, "group number"))
        if "ids" in d:
            kw["ids"] = tuple(dict.fromkeys(t.get("ids", _one_or_many, _id_pattern, "id")))
        if "class" in d:
            kw["classes"] = tuple(dict.fromkeys(t.get("class", _one_or_many, _class, "class")))
        if "driver" in d:
            kw["drivers"] = frozenset(t.get("driver", _one_or_many, _driver, "driver"))
        if "vf_of" in d:
            kw["vf_of"] = frozenset(t.get("vf_of", _one_or_many, _address, "address"))
        if "resource" in d:
            names = t.get("resource", _one_or_many, _resource_name, "resource name")
            many = isinstance(d["resource"], list)
            for j, name in enumerate(names):
                self.refs.append((t, "resource", j if many else None, name))
            kw["resources"] = tuple(dict.fromkeys(names))
        if not any(k in d for k in MATCH_KEYS):
            raise t.table_error("no device matcher: give at least one of " + ", ".join(MATCH_KEYS))
        # who
        uids: set[int] = set()
        if "users" in d:
            names = t.get("users", _one_or_many, lambda v: _string(v, "a user name"), "user name")
            user_uids = []
            for j, name in enumerate(names):
                uid = self.users.uid(name)
                if uid is None:
                    raise t.error("users", f"no user named {_short(name)} on this system",
                                  j if isinstance(d["users"], list) else None)
                user_uids.append(uid)
            kw["users"], kw["user_uids"] = tuple(dict.fromkeys(names)), tuple(user_uids)
            uids.update(user_uids)
        if "uids" in d:
            uids.update(t.get("uids", _one_or_many, _uid, "uid"))
        if "groups" in d:
            names = t.get("groups", _one_or_many, _unix_group_name, "group name")
            gids = set()
            for j, name in enumerate(names):
                gid = self.users.gid(name)
                if gid is None:
                    raise t.error("groups", f"no group named {_short(name)} on this system",
                                  j if isinstance(d["groups"], list) else None)
                gids.add(gid)
            kw["unix_groups"], kw["gids"] = tuple(dict.fromkeys(names)), frozenset(gids)
        if "everyone" in d:
            kw["everyone"] = t.get("everyone", _bool)
        kw["uids"] = frozenset(uids)
        if not (uids or kw.get("gids") or kw.get("everyone")):
            if "everyone" in d:
                raise t.error("everyone", "everyone = false names nobody: give users, uids or groups")
            raise t.table_error("names nobody: give at least one of " + ", ".join(WHO_KEYS))
        # what it grants
        if action == "deny":
            for key in GRANT_KEYS:
                if key in d:
                    raise t.error(key, "only allow rules grant anything; remove it from this deny rule")
            return Rule(**kw)
        backends = tuple(dict.fromkeys(t.get("backends", _one_or_many, self._backend, "backend"))) \
            if "backends" in d else ()
        if "default_backend" in d:
            default = t.get("default_backend", _bad, self._backend)
            if not backends:
                backends = (default,)
            elif default not in backends:
                raise t.error("default_backend", f"{default!r} is not among this rule's backends "
                                                 f"({', '.join(backends)})")
        else:
            backends = backends or ("vfio",)
            default = backends[0]
        kw["backends"], kw["default_backend"] = backends, default
        if "max_duration" in d:
            kw["max_duration"] = t.get("max_duration", _bad, parse_duration)
        if "persistent" in d:
            kw["persistent"] = t.get("persistent", _bool)
        if "memlock" in d:
            kw["memlock"] = t.get("memlock", _bad, parse_size)
        if "reset_on_release" in d:
            kw["reset_on_release"] = t.get("reset_on_release", _bool)
        if "allow_protected" in d:
            kw["allow_protected"] = t.get("allow_protected", _bool)
            if kw["allow_protected"] and "address" not in d and "resource" not in d:
                raise t.error("allow_protected", "a protected device must be named explicitly: "
                                                 "give the rule an 'address' or 'resource' key")
        return Rule(**kw)

    def _backend(self, v) -> str:
        text = _string(v, "a backend name")
        if text not in self.backends:
            raise ValueError(f"unknown backend {_short(text)} (known: {', '.join(sorted(self.backends))})")
        return text

    def _resource(self, t: _Table) -> None:
        t.check_keys(RESOURCE_KEYS)
        d = t.data
        for key in ("name", "devices"):
            if key not in d:
                raise t.table_error(f"missing key '{key}'")
        name = t.get("name", _bad, _resource_name)
        if name in self.resources:
            raise t.error("name", f"resource {name!r} is already defined at {self.resources[name].source}")
        comment = t.get("comment", _text) if "comment" in d else ""
        entries = d["devices"]
        if not isinstance(entries, list) or not entries:
            got = "an empty array" if entries == [] else _describe(entries)
            raise t.error("devices", "expected an array of { address = ..., ids = ..., subsystem = ... } "
                                     f"tables, got {got}")
        devices: list[ResourceDevice] = []
        for j, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise t.error("devices", f"device {j + 1}: expected a table {{ address = ..., ids = ... }}, "
                                         f"got {_describe(entry)}", j)
            for key in entry:
                if key not in RESOURCE_DEVICE_KEYS:
                    raise t.error("devices", f"device {j + 1}: unknown key '{key}'"
                                  + _did_you_mean(key, RESOURCE_DEVICE_KEYS), j)
            for key in ("address", "ids"):
                if key not in entry:
                    raise t.error("devices", f"device {j + 1}: missing key '{key}'", j)
            try:
                addr = _address(entry["address"])
                vendor, device = _exact_id(entry["ids"])
                subsystem = _exact_id(entry["subsystem"]) if "subsystem" in entry else None
            except ValueError as e:
                raise t.error("devices", f"device {j + 1}: {e}", j) from None
            if any(x.address == addr for x in devices):
                raise t.error("devices", f"device {j + 1}: {addr} is listed twice", j)
            devices.append(ResourceDevice(addr, vendor, device, subsystem))
        self.resources[name] = Resource(name=name, devices=tuple(devices), source=t.source, comment=comment)

    def _claim(self, t: _Table) -> Claim:
        t.check_keys(CLAIM_KEYS)
        d = t.data
        for key in ("target", "user"):
            if key not in d:
                raise t.table_error(f"missing key '{key}'")
        target = t.get("target", _text)
        try:
            kind, value = _split_target(target)
        except InvalidArgument as e:
            raise t.error("target", str(e)) from None
        if kind == "name":
            self.refs.append((t, "target", None, value))
        for c in self.claims:
            if c.target == target:
                raise t.error("target", f"{target} is already claimed at {c.source}")
        user = t.get("user", _text)
        uid = self.users.uid(user)
        if uid is None:
            raise t.error("user", f"no user named {_short(user)} on this system")
        backend = t.get("backend", _bad, self._backend) if "backend" in d else ""
        comment = t.get("comment", _text) if "comment" in d else ""
        return Claim(target=target, uid=uid, user=user, backend=backend, source=t.source, comment=comment)


# ---------------------------------------------------------------- the policy

@attrs.frozen(eq=False)
class Policy:
    """A loaded policy: rules in order, named resources, boot claims, and the files they came from."""

    rules: tuple[Rule, ...] = ()
    resources: Mapping[str, Resource] = attrs.field(factory=dict)
    claims: tuple[Claim, ...] = ()
    files: tuple[str, ...] = ()
    backends: tuple[str, ...] = KNOWN_BACKENDS
    directory: str | None = None

    # -- loading

    @classmethod
    def load(cls, directory: str = DEFAULT_DIR, backends: Iterable[str] = KNOWN_BACKENDS,
             users: UserDb | None = None) -> "Policy":
        """Every ``*.toml`` of `directory`, in name order; `PolicyError` if any is broken.

        `backends`: the backend names files may use (plugins add theirs);
        `users`: the user and group database (default: the system's)."""
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            raise PolicyError(f"{directory}: no such policy directory") from None
        except NotADirectoryError:
            raise PolicyError(f"{directory}: not a directory") from None
        except OSError as e:
            raise PolicyError(f"{directory}: cannot list the policy directory: {e.strerror}") from None
        _refuse_world_writable(directory)
        sources = []
        for name in names:
            path = os.path.join(directory, name)
            if not name.endswith(".toml") or name.startswith(".") or not os.path.isfile(path):
                continue
            _refuse_world_writable(path)
            try:
                with open(path, "rb") as f:
                    sources.append((path, f.read(MAX_FILE_SIZE + 1)))
            except OSError as e:
                raise PolicyError(f"{path}: cannot read: {e.strerror}") from None
        return attrs.evolve(cls.from_sources(sources, backends=backends, users=users), directory=directory)

    @classmethod
    def from_sources(cls, sources: Iterable[tuple[str, str | bytes]],
                     backends: Iterable[str] = KNOWN_BACKENDS, users: UserDb | None = None) -> "Policy":
        """A policy from ``(path, content)`` pairs, in the order given (`load` reads them from disk)."""
        loader = _Loader(backends, users if users is not None else system_users())
        paths = []
        for path, content in sources:
            loader.add(path, content)
            paths.append(path)
        loader.finish()
        return cls(rules=tuple(loader.rules), resources=dict(loader.resources), claims=tuple(loader.claims),
                   files=tuple(paths), backends=loader.backends)

    @classmethod
    def empty(cls) -> "Policy":
        """No rules: every request is denied."""
        return cls()

    # -- targets

    def resolve(self, host, target: str) -> Target:
        """The group and devices `target` names (``0000:04:00.0``, ``04:00.0``, ``group:8``, ``name:RES``).

        `InvalidArgument` (or `InvalidAddress`) for text that is none of
        these and for a resource spread over several groups; `NotFound` for
        what is not on this host or not in the policy, and for a resource
        whose hardware changed (saying what changed)."""
        kind, value = _split_target(target)
        if kind == "group":
            g = host.groups.get(value)
            if g is None:
                raise NotFound(f"no IOMMU group {value} on this host")
            return Target(group=g.number, addresses=tuple(g.members))
        if kind == "address":
            if value not in host.devices:
                raise NotFound(f"no PCI device {value} on this host")
            g = host.group_of(value)
            if g is None:
                raise NotFound(f"{value} is in no IOMMU group (is the IOMMU on?)")
            return Target(group=g.number, addresses=(value,))
        res = self.resources.get(value)
        if res is None:
            known = ", ".join(sorted(self.resources)) or "the policy names none"
            raise NotFound(f"no resource named {value!r} (known: {known})")
        problems = res.problems(host)
        if problems:
            raise NotFound("; ".join(problems))
        groups: dict[int, list[str]] = {}
        for d in res.devices:
            g = host.group_of(d.address)
            if g is None:
                raise NotFound(f"resource {res.name}: {d.address} is in no IOMMU group (is the IOMMU on?)")
            groups.setdefault(g.number, []).append(str(d.address))
        if len(groups) > 1:
            where = "; ".join(f"group {n}: {', '.join(a)}" for n, a in sorted(groups.items()))
            raise InvalidArgument(f"resource {res.name} spans several IOMMU groups ({where}); "
                                  "a lease takes one group: split the resource")
        return Target(group=next(iter(groups)), addresses=tuple(d.address for d in res.devices),
                      resource=res.name)

    # -- decisions

    def decide_device(self, dev, caller: Caller) -> tuple[DeviceDecision, Rule | None]:
        """The first rule naming both `dev` and `caller` decides; returns the verdict and that rule."""
        notes = []
        for rule in self.rules:
            if not rule.covers(caller):
                continue
            matched, note = rule.match(dev, self.resources)
            if note:
                notes.append(f"rule {rule.source} did not apply: {note}")
            if not matched:
                continue
            if not rule.allows:
                why = f" ({rule.comment})" if rule.comment else ""
                return DeviceDecision(dev.addr, False, rule.source, f"denied by rule {rule.source}{why}"), rule
            if dev.protected and not (rule.allow_protected and rule.names(dev.addr, self.resources)):
                return DeviceDecision(dev.addr, False, rule.source, (
                    f"protected ({dev.protected}): rule {rule.source} would have to name it by address "
                    "or resource and set allow_protected = true")), rule
            return DeviceDecision(dev.addr, True, rule.source, f"allowed by rule {rule.source}"), rule
        return DeviceDecision(dev.addr, False, "", "; ".join([DEFAULT_DENY, *notes])), None

    def decide(self, host, caller: Caller, group: int, backend: str = "",
               options: Mapping | None = None) -> Decision:
        """May `caller` lease IOMMU group `group` with `backend` ("" = the rules' default)?

        `options`: ``duration`` (seconds; 0 or absent: none asked for) and
        ``persistent`` (bool); other keys are not the policy's business.
        `InvalidArgument` for an unknown backend or malformed options,
        `NotFound` for a group that is not there; every other "no" is a
        `Decision` with a reason."""
        options = options or {}
        duration = options.get("duration") or 0
        if isinstance(duration, bool) or not isinstance(duration, int) or duration < 0:
            raise InvalidArgument(f"duration must be a number of seconds, got {_short(duration)}")
        persistent = options.get("persistent", False)
        if not isinstance(persistent, bool):
            raise InvalidArgument(f"persistent must be true or false, got {_short(persistent)}")
        if not isinstance(backend, str) or (backend and backend not in self.backends):
            raise InvalidArgument(f"unknown backend {_short(backend)} (known: {', '.join(sorted(self.backends))})")
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
                refusal = _refusal(rule, backend, duration, persistent)
                if refusal:
                    verdict = DeviceDecision(addr, False, rule.source, refusal)
                else:
                    deciding.append(rule)
            verdicts.append(verdict)
            endpoints.append(verdict)
        devices = tuple(verdicts)
        if not endpoints:
            return Decision(False, "", f"group {g.number} has no endpoint to lease (only bridges and ports)",
                            devices=devices)
        denied = [v for v in endpoints if not v.allowed]
        if denied:
            reason = f"group {g.number}: " + "; ".join(f"{v.address}: {v.reason}" for v in denied)
            if len(denied) < len(endpoints):
                reason += " (a lease takes the whole group, so every endpoint in it must be allowed)"
            return Decision(False, ", ".join(dict.fromkeys(v.rule for v in denied if v.rule)), reason,
                            devices=devices)

        rules = list(dict.fromkeys(deciding))
        sources = ", ".join(r.source for r in rules)
        chosen = backend or next((r.default_backend for r in rules
                                  if all(r.default_backend in other.backends for other in rules)), None)
        if chosen is None:
            what = "; ".join(f"rule {r.source} allows {', '.join(r.backends)} (default {r.default_backend})"
                             for r in rules)
            return Decision(False, sources, f"group {g.number}: its rules agree on no default backend "
                                            f"({what}); ask for a backend they all allow", devices=devices)
        caps = [r.max_duration for r in rules if r.max_duration]
        grants = [r.memlock for r in rules]
        return Decision(
            allowed=True, rule=sources, reason=f"group {g.number} allowed by rule {sources} (backend {chosen})",
            backend=chosen, max_duration=min(caps) if caps else None,
            persistent=all(r.persistent for r in rules),
            memlock=min(grants) if all(grants) else None,
            reset_on_release=any(r.reset_on_release for r in rules), devices=devices)

    def decide_target(self, host, caller: Caller, target: str, backend: str = "",
                      options: Mapping | None = None) -> tuple[Target, Decision]:
        """`resolve`, then `decide` on its group."""
        resolved = self.resolve(host, target)
        return resolved, self.decide(host, caller, resolved.group, backend, options)


def _refuse_world_writable(path: str) -> None:
    """Anyone who can write a policy file (or add one) could grant themselves devices."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise PolicyError(f"{path}: cannot read: {e.strerror}") from None
    if mode & 0o002:
        raise PolicyError(f"{path}: writable by anyone (mode {mode & 0o7777:04o}), so anyone could grant "
                          f"themselves devices; refusing the policy (chmod o-w {path})")


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

    def __init__(self, directory: str = DEFAULT_DIR, backends: Iterable[str] = KNOWN_BACKENDS,
                 users: UserDb | None = None):
        self.directory = directory
        self.backends = tuple(backends)
        self.users = users
        self.current: Policy = Policy.empty()
        self.error: str | None = None
        self._lock = threading.Lock()

    def reload(self) -> Policy:
        """Load the directory again; on `PolicyError` re-raise it and keep `current`."""
        with self._lock:
            try:
                policy = Policy.load(self.directory, backends=self.backends, users=self.users)
            except PolicyError as e:
                self.error = str(e)
                raise
            self.current, self.error = policy, None
            return policy
