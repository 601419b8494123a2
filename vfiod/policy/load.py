"""Reading policy files: every problem is a `PolicyError` naming file, line and key."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from typing import Callable, Iterable, TypeVar

import attrs


from ..address import PciAddress
from ..errors import InvalidAddress, InvalidArgument, PolicyError
from .locate import Locator
from .model import K8S_NAMESPACE_PATTERN, ON_REVOKE, Claim, IdPattern, MAX_FILE_SIZE, MAX_GROUP, MAX_UID, Resource, ResourceDevice, Rule, _CLASS, _DRIVER, _EXACT_ID, _NAME, parse_target
from .units import _describe, _short, parse_duration, parse_size
from .users import UserDb


MATCH_KEYS = ("address", "group", "ids", "class", "driver", "vf_of", "resource")
#: A rule names PCI devices (MATCH_KEYS) or types of mediated devices, never both.
MDEV_KEYS = ("mdev_types",)
#: What an mdev rule may not say: it grants new instances through VFIO, nothing a PCI device needs.
NOT_FOR_MDEV = ("allow_protected", "reset_on_release", "max_vfs")
#: The backends an mdev lease can use: its instance is used through VFIO's legacy group.
MDEV_BACKENDS = ("vfio",)
WHO_KEYS = ("users", "uids", "groups", "everyone")
K8S_KEYS = ("k8s_namespaces", "k8s_delegates")
GRANT_KEYS = ("backends", "default_backend", "max_duration", "persistent", "memlock", "allow_protected",
              "reset_on_release", "revoke_grace", "on_revoke", "revoke_others", "max_vfs")
RULE_KEYS = ("action", "comment") + MATCH_KEYS + MDEV_KEYS + WHO_KEYS + K8S_KEYS + GRANT_KEYS
RESOURCE_KEYS = ("name", "comment", "devices")
RESOURCE_DEVICE_KEYS = ("address", "ids", "subsystem")
CLAIM_KEYS = ("target", "user", "backend", "comment")
TABLES = ("rule", "resource", "claim")

# ---------------------------------------------------------------- reading files

_T = TypeVar("_T")


class _Bad(Exception):
    """A problem with one value; `_Table` adds file, line and key."""

    def __init__(self, message: str, element: int | None = None):
        super().__init__(message)
        self.message = message
        self.element = element


class _Table:
    """One ``[[kind]]`` table of one file, for error messages with its file and lines."""

    #: keys a table cannot be read on without (set aside, the table's other problems are not looked for)
    REQUIRED = {"resource": ("name", "devices"), "claim": ("target", "user")}

    def __init__(self, path: str, loc: Locator, kind: str, index: int, data: dict[str, object],
                 aside: frozenset[str] = frozenset()):
        self.path, self.loc, self.kind, self.index, self.data = path, loc, kind, index, data
        self.aside = aside          # keys set aside after a problem was found with them

    @property
    def source(self) -> str:
        return f"{self.path}:{self.loc.header(self.kind, self.index)}"

    def error(self, key: str, message: str, element: int | None = None) -> PolicyError:
        line = self.loc.line(self.kind, self.index, key, element)
        e = PolicyError(f"{self.path}:{line}: key '{key}': {message}")
        e.policy_key = key          # the key to set aside to look for the table's next problem
        return e

    def without(self, key: str) -> "_Table":
        """This table with `key` set aside (its lines stay where they are)."""
        return _Table(self.path, self.loc, self.kind, self.index, {k: v for k, v in self.data.items() if k != key},
                      self.aside | {key})

    def gave(self, keys: Iterable[str]) -> bool:
        """Whether the table gave any of `keys` (one set aside counts: it was given, wrongly)."""
        return any(k in self.data or k in self.aside for k in keys)

    def table_error(self, message: str) -> PolicyError:
        return PolicyError(f"{self.source}: [[{self.kind}]]: {message}")

    def check_keys(self, known: tuple[str, ...], required: tuple[str, ...] = ()) -> None:
        for key in self.data:
            if key not in known:
                raise self.error(key, "unknown key" + _did_you_mean(key, known))
        for key in required:
            if key not in self.data:
                raise self.table_error(f"missing key '{key}'")

    def get(self, key: str, parse: Callable[[object], _T]) -> _T:
        """`parse(value)` of the key's value; `_Bad` becomes a located PolicyError."""
        try:
            return parse(self.data[key])
        except _Bad as e:
            raise self.error(key, e.message, e.element) from None

    def many(self, key: str, item: Callable[[object], _T], what: str) -> tuple[_T, ...]:
        """The key's value or array of values, each through `item` (see `_one_or_many`)."""
        return self.get(key, lambda v: _one_or_many(v, item, what))

    def checked(self, key: str, fn: Callable[[object], _T]) -> _T:
        """`fn(value)` of the key's value, its ValueError a located PolicyError."""
        return self.get(key, lambda v: _bad(v, fn))


def _did_you_mean(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.7)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"


def _one_or_many(value: object, item: Callable[[object], _T], what: str) -> tuple[_T, ...]:
    """A value or an array of values, each through `item` (whose ValueError becomes `_Bad`)."""
    if isinstance(value, list):
        if not value:
            raise _Bad(f"an empty array names nothing: give at least one {what} or remove the key")
        items = value
    else:
        items = [value]
    out: list[_T] = []
    for j, v in enumerate(items):
        try:
            out.append(item(v))
        except ValueError as e:
            raise _Bad(str(e), j if isinstance(value, list) else None) from None
    return tuple(out)


def _bad(v: object, fn: Callable[[object], _T]) -> _T:
    """`fn(v)` with its ValueError as `_Bad` (for `_Table.get`)."""
    try:
        return fn(v)
    except ValueError as e:
        raise _Bad(str(e)) from None


def _string(v: object, what: str) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected {what}, got {_describe(v)}")
    return v


def _text(v: object) -> str:
    if not isinstance(v, str):
        raise _Bad(f"expected a string, got {_describe(v)}")
    return v


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise _Bad(f"expected true or false, got {_describe(v)}")
    return v


def _vf_count(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0xFFFF:
        raise _Bad(f"expected a number of VFs from 0 to 65535, got {_describe(v)}")
    return v


def _on_revoke(v: object) -> str:
    if v not in ON_REVOKE:
        raise ValueError(f"expected one of {', '.join(map(repr, ON_REVOKE))}, got {_describe(v)}")
    assert isinstance(v, str)
    return v


def _address(v: object) -> PciAddress:
    text = _string(v, "a PCI address such as \"0000:04:00.0\"")
    try:
        return PciAddress.parse(text)
    except InvalidAddress as e:
        raise ValueError(str(e)) from None


def _iommu_group(v: object) -> int:
    if isinstance(v, str):
        raise ValueError(f"expected an IOMMU group number, got {_describe(v)} (unix groups go in 'groups')")
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_GROUP:
        raise ValueError(f"expected an IOMMU group number (0 or more), got {_describe(v)}")
    return v


def _unix_group_name(v: object) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        raise ValueError(f"expected a unix group name, got {_describe(v)} (IOMMU groups go in 'group')")
    return _string(v, "a unix group name")


def _uid(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_UID:
        raise ValueError(f"expected a uid (0 or more), got {_describe(v)}")
    return v


def _namespace_pattern(v: object) -> str:
    text = _string(v, "a Kubernetes namespace or a pattern such as \"ml-*\"")
    if not K8S_NAMESPACE_PATTERN.fullmatch(text):
        raise ValueError(f"not a Kubernetes namespace pattern: {_short(text)} "
                   "(lower-case letters, digits, '-', and the globs '*' and '?')")
    return text


def _class(v: object) -> str:
    text = _string(v, "a class code prefix such as \"02\" or \"0300\"")
    if not _CLASS.fullmatch(text):
        raise ValueError(f"not a class code prefix: {_short(text)} (2, 4 or 6 hex digits: "
                         "\"02\" network, \"0300\" VGA, \"0c0330\" xHCI)")
    return text.lower()


def _driver(v: object) -> str:
    text = _string(v, "a driver name")
    if not _DRIVER.fullmatch(text):
        raise ValueError(f"not a driver name: {_short(text)}")
    return text


_MDEV_GLOB = re.compile(r"[A-Za-z0-9_.:+*?\[\]!-]{1,64}")


def _mdev_type(v: object) -> str:
    text = _string(v, "an mdev type such as \"mtty/mtty-2\"")
    parts = text.split("/")
    if len(parts) != 2 or not all(_MDEV_GLOB.fullmatch(p) and p not in (".", "..") for p in parts):
        raise ValueError(f"not an mdev type: {_short(text)} (PARENT/TYPE as sysfs names them, e.g. "
                         "\"mtty/mtty-2\"; each side may hold the globs '*', '?' and [...])")
    return text


def _resource_name(v: object) -> str:
    text = _string(v, "a resource name")
    if not _NAME.fullmatch(text):
        raise ValueError(f"not a resource name: {_short(text)} (letters, digits, '_', '.', '-'; at most 64)")
    return text


def _id_pattern(v: object) -> IdPattern:
    return IdPattern.parse(_string(v, "a vendor:device id such as \"8086:10d3\""))


def _exact_id(v: object) -> tuple[int, int]:
    text = _string(v, "a vendor:device id such as \"8086:10d3\"")
    m = _EXACT_ID.fullmatch(text)
    if not m:
        raise ValueError(f"not a vendor:device id: {_short(text)} (4 hex digits each, no wildcards)")
    return int(m.group(1), 16), int(m.group(2), 16)


def _ids_of(t: _Table, key: str, names: Iterable[str], lookup: Callable[[str], int | None],
           what: str) -> list[int]:
    """The uid or gid `lookup` gives each of `names` (the value of `key`); a located
    error for a name the system does not know."""
    ids = []
    for j, name in enumerate(names):
        found = lookup(name)
        if found is None:
            raise t.error(key, f"no {what} named {_short(name)} on this system{_create_hint(what, name)}",
                          j if isinstance(t.data[key], list) else None)
        ids.append(found)
    return ids


def _line_of(e: PolicyError) -> int:
    """The line a located error names (0 if none)."""
    m = re.match(r"[^\n]*?:(\d+): ", e.message)
    return int(m.group(1)) if m else 0


def _create_hint(what: str, name: object) -> str:
    """How an admin makes the user or group a policy names (a typo is fixed in the file)."""
    if not isinstance(name, str) or not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", name):
        return ""
    return f" (a typo? or create it: {'groupadd --system' if what == 'group' else 'adduser'} {name})"


def _syntax_error(path: str, text: str, message: str) -> str:
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if m:
        return f"{path}:{m.group(1)}: TOML syntax error at column {m.group(2)}: {message[:m.start()]}"
    m = re.search(r"\s*\(at end of document\)$", message)
    if m:
        last = text.rstrip("\n").count("\n") + 1
        return f"{path}:{last}: TOML syntax error at the end of the file: {message[:m.start()]}"
    return f"{path}:1: TOML syntax error: {message}"



class Loader:
    """Builds a policy from file texts; every problem is a located `PolicyError`."""

    def __init__(self, backends: Iterable[str], users: UserDb):
        self.backends = tuple(dict.fromkeys(backends))
        self.users = users
        self.rules: list[Rule] = []
        self.resources: dict[str, Resource] = {}
        self.claims: list[Claim] = []
        self.refs: list[tuple[_Table, str, int | None, str]] = []    # resource names, checked at the end
        self.errors: list[PolicyError] = []                           # every problem, in file order

    # -- files

    def add(self, path: str, content: str | bytes) -> None:
        """Parse one file and add its tables; each problem is kept in `errors` (a file
        that does not parse gives one), and the tables without problems are added."""
        try:
            self._add(path, content)
        except PolicyError as e:
            self.errors.append(e)

    def _add(self, path: str, content: str | bytes) -> None:
        if len(content) > MAX_FILE_SIZE:
            raise PolicyError(f"{path}:1: file too large (more than {MAX_FILE_SIZE} bytes)")
        if isinstance(content, bytes):
            raw = content
            try:
                content = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line = raw[:e.start].count(b"\n") + 1
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
        loc = Locator(content)
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
        for (_, _, index), kind, table in tables:        # in file order: problems are reported in order
            self._table(_Table(path, loc, kind, index, table))

    def _table(self, t: _Table) -> None:
        """Add one table.  A problem with a key is recorded, the key set aside and the table
        read again, so one check reports every key's problem; a problem of the whole table
        that shows only once a key is set aside follows from that key and is not reported."""
        found: list[PolicyError] = []
        while True:
            try:
                # What is left of a broken table is added too (the policy is refused all the
                # same), so names it defines do not show up as further errors.
                if t.kind == "rule":
                    self.rules.append(self._rule(t))
                elif t.kind == "resource":
                    self._resource(t)
                else:
                    self.claims.append(self._claim(t))
                break
            except PolicyError as e:
                key = getattr(e, "policy_key", None)
                if found and key is None:
                    break
                found.append(e)
                if key is None or key not in t.data or key in t.REQUIRED.get(t.kind, ()):
                    break
                t = t.without(key)
        self.errors.extend(sorted(found, key=_line_of))

    def finish(self) -> None:
        """The checks that need every file: resource names may be defined in any of them."""
        for t, key, element, name in self.refs:
            if name not in self.resources:
                known = f"known: {', '.join(sorted(self.resources))}" if self.resources else "none is defined"
                self.errors.append(t.error(key, f"no resource named '{name}' ({known})", element))
        if self.errors:
            raise PolicyError("\n".join(dict.fromkeys(e.message for e in self.errors)))

    # -- tables

    def _rule(self, t: _Table) -> Rule:
        # Keys are read in this order, so a table with several problems reports the same first one.
        t.check_keys(RULE_KEYS)
        d = t.data
        action = t.get("action", _text) if "action" in d else "allow"
        if action not in ("allow", "deny"):
            raise t.error("action", f"expected \"allow\" or \"deny\", got {_describe(action)}")
        comment = t.get("comment", _text) if "comment" in d else ""
        # which devices
        addresses = frozenset(t.many("address", _address, "address")) if "address" in d else None
        iommu_groups = frozenset(t.many("group", _iommu_group, "group number")) if "group" in d else None
        ids = tuple(dict.fromkeys(t.many("ids", _id_pattern, "id"))) if "ids" in d else None
        classes = tuple(dict.fromkeys(t.many("class", _class, "class"))) if "class" in d else None
        drivers = frozenset(t.many("driver", _driver, "driver")) if "driver" in d else None
        vf_of = frozenset(t.many("vf_of", _address, "address")) if "vf_of" in d else None
        resources: tuple[str, ...] | None = None
        if "resource" in d:
            names = t.many("resource", _resource_name, "resource name")
            many = isinstance(d["resource"], list)
            for j, name in enumerate(names):
                self.refs.append((t, "resource", j if many else None, name))
            resources = tuple(dict.fromkeys(names))
        mdev_types = tuple(dict.fromkeys(t.many("mdev_types", _mdev_type, "mdev type"))) \
            if "mdev_types" in d else None
        if t.gave(MDEV_KEYS):
            pci = next((k for k in MATCH_KEYS if k in d), None)
            if pci is not None:
                raise t.error(pci, "a rule names PCI devices or mdev types, not both: put them in rules of their own")
        elif not any(k in d for k in MATCH_KEYS):
            if not t.gave(MATCH_KEYS):
                raise t.table_error("no device matcher: give at least one of "
                                    + ", ".join(MATCH_KEYS + MDEV_KEYS))
        # who
        uids: set[int] = set()
        users: tuple[str, ...] = ()
        user_uids: list[int] = []
        if "users" in d:
            names = t.many("users", lambda v: _string(v, "a user name"), "user name")
            user_uids = _ids_of(t, "users", names, self.users.uid, "user")
            users = tuple(dict.fromkeys(names))
            uids.update(user_uids)
        if "uids" in d:
            uids.update(t.many("uids", _uid, "uid"))
        unix_groups: tuple[str, ...] = ()
        gids: set[int] = set()
        if "groups" in d:
            names = t.many("groups", _unix_group_name, "group name")
            gids.update(_ids_of(t, "groups", names, self.users.gid, "group"))
            unix_groups = tuple(dict.fromkeys(names))
        everyone = t.get("everyone", _bool) if "everyone" in d else False
        k8s = self._k8s_who(t)
        if k8s is not None:
            if uids or gids or "everyone" in d:
                key = next(k for k in WHO_KEYS if k in d)
                raise t.error(key, "a Kubernetes rule names namespaces and delegates, not users: "
                                   "put the users in a rule of their own")
        elif not (uids or gids or everyone):
            if "everyone" in d:
                raise t.error("everyone", "everyone = false names nobody: give users, uids or groups")
            if not t.gave(WHO_KEYS):
                raise t.table_error("names nobody: give at least one of " + ", ".join(WHO_KEYS))
        rule = Rule(source=t.source, action=action, comment=comment,
                    addresses=addresses, iommu_groups=iommu_groups, ids=ids, classes=classes,
                    drivers=drivers, vf_of=vf_of, resources=resources,
                    users=users, user_uids=tuple(user_uids), unix_groups=unix_groups,
                    uids=frozenset(uids), gids=frozenset(gids), everyone=everyone, mdev_types=mdev_types)
        if k8s is not None:
            rule = attrs.evolve(rule, k8s_namespaces=k8s[0], k8s_delegates=k8s[1], delegate_uids=k8s[2])
        # what it grants
        if action == "deny":
            for key in GRANT_KEYS:
                if key in d:
                    raise t.error(key, "only allow rules grant anything; remove it from this deny rule")
            return rule
        backends = tuple(dict.fromkeys(t.many("backends", self._backend, "backend"))) \
            if "backends" in d else ()
        if "default_backend" in d:
            default = t.checked("default_backend", self._backend)
            if not backends:
                backends = (default,)
            elif default not in backends:
                raise t.error("default_backend", f"{default!r} is not among this rule's backends "
                                                 f"({', '.join(backends)})")
        else:
            backends = backends or ("vfio",)
            default = backends[0]
        max_duration = t.checked("max_duration", parse_duration) if "max_duration" in d else None
        persistent = t.get("persistent", _bool) if "persistent" in d else False
        memlock = t.checked("memlock", parse_size) if "memlock" in d else None
        reset_on_release = t.get("reset_on_release", _bool) if "reset_on_release" in d else False
        allow_protected = t.get("allow_protected", _bool) if "allow_protected" in d else False
        revoke_grace = t.checked("revoke_grace", parse_duration) if "revoke_grace" in d else None
        on_revoke = t.checked("on_revoke", _on_revoke) if "on_revoke" in d else None
        revoke_others = t.get("revoke_others", _bool) if "revoke_others" in d else False
        max_vfs = t.get("max_vfs", _vf_count) if "max_vfs" in d else None
        if t.gave(MDEV_KEYS):
            for key in NOT_FOR_MDEV:
                if key in d:
                    raise t.error(key, "does not apply to mdev types (vfiod creates a new instance for each "
                                       "lease and removes it at the end): remove it from this rule")
            other = [b for b in backends if b not in MDEV_BACKENDS]
            if other:
                raise t.error("default_backend" if "backends" not in d else "backends",
                              f"an mdev lease uses the {', '.join(MDEV_BACKENDS)} backend (its instance is used "
                              f"through VFIO's group interface), not {', '.join(other)}")
        if max_vfs is not None:
            for key in GRANT_KEYS:
                if key in d and key not in ("max_vfs", "allow_protected"):
                    raise t.error(key, "a rule with max_vfs grants a number of VFs, not leases: "
                                       "put the lease terms in a rule of their own")
        if allow_protected and not t.gave(("address", "resource")):
            raise t.error("allow_protected", "a protected device must be named explicitly: "
                                             "give the rule an 'address' or 'resource' key")
        return attrs.evolve(rule, backends=backends, default_backend=default, max_duration=max_duration,
                            persistent=persistent, memlock=memlock, reset_on_release=reset_on_release,
                            allow_protected=allow_protected, revoke_grace=revoke_grace, on_revoke=on_revoke,
                            revoke_others=revoke_others, max_vfs=max_vfs)

    def _k8s_who(self, t: _Table) -> tuple[tuple[str, ...], tuple[str, ...], frozenset[int]] | None:
        """(namespace patterns, delegate names, delegate uids) of a Kubernetes rule; None for others."""
        d = t.data
        if "k8s_namespaces" not in d:
            if "k8s_delegates" in d and not t.gave(("k8s_namespaces",)):
                raise t.error("k8s_delegates", "delegates speak for namespaces: give k8s_namespaces too")
            return None
        patterns = tuple(dict.fromkeys(t.many("k8s_namespaces", _namespace_pattern, "namespace pattern")))
        if "k8s_delegates" not in d:
            raise t.table_error("k8s_namespaces needs k8s_delegates: the users (such as the one vfiod-dra runs as) "
                                "that may speak for those namespaces")
        names = t.many("k8s_delegates", lambda v: _string(v, "a user name"), "user name")
        delegate_uids = _ids_of(t, "k8s_delegates", names, self.users.uid, "user")
        return patterns, tuple(dict.fromkeys(names)), frozenset(delegate_uids)

    def _backend(self, v: object) -> str:
        text = _string(v, "a backend name")
        if text not in self.backends:
            raise ValueError(f"unknown backend {_short(text)} (known: {', '.join(sorted(self.backends))})")
        return text

    def _resource(self, t: _Table) -> None:
        t.check_keys(RESOURCE_KEYS, required=("name", "devices"))
        d = t.data
        name = t.checked("name", _resource_name)
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
        t.check_keys(CLAIM_KEYS, required=("target", "user"))
        d = t.data
        target = t.get("target", _text)
        try:
            parsed = parse_target(target)
        except InvalidArgument as e:
            raise t.error("target", str(e)) from None
        if parsed[0] == "name":
            self.refs.append((t, "target", None, parsed[1]))
        if parsed[0] == "mdev":
            raise t.error("target", "a claim takes a PCI target (an address, group:N or name:RESOURCE): an mdev "
                                    "instance vfiod creates lives only as long as its lease (define a lasting "
                                    "one with mdevctl)")
        for c in self.claims:
            if c.target == target:
                raise t.error("target", f"{target} is already claimed at {c.source}")
        user = t.get("user", _text)
        uid = self.users.uid(user)
        if uid is None:
            raise t.error("user", f"no user named {_short(user)} on this system{_create_hint('user', user)}")
        backend = t.checked("backend", self._backend) if "backend" in d else ""
        comment = t.get("comment", _text) if "comment" in d else ""
        return Claim(target=target, uid=uid, user=user, backend=backend, source=t.source, comment=comment)
