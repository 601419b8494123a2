"""The values of policy files, each checked as it is read: a wrong one is a `_Bad`,
which `_Table` turns into a `PolicyError` naming file, line and key."""

from __future__ import annotations

import difflib
import re
from typing import Callable, Iterable, TypeVar

from ..address import PciAddress
from ..errors import InvalidAddress, PolicyError
from .model import (K8S_NAMESPACE_PATTERN, ON_REVOKE, IdPattern, MAX_GROUP, MAX_UID, ResourceDevice, _CLASS, _DRIVER,
                    _EXACT_ID, _NAME)
from .locate import Locator
from .units import _describe, _short

MATCH_KEYS = ("address", "group", "ids", "class", "driver", "vf_of", "resource", "pool")
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
POOL_KEYS = ("name", "comment", "members")
CLAIM_KEYS = ("target", "user", "backend", "comment", "early")
TABLES = ("rule", "resource", "pool", "claim")
#: keys of a file's top level, above its first table
TOP_KEYS = ("admin_groups",)


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
    REQUIRED = {"resource": ("name", "devices"), "pool": ("name", "members"), "claim": ("target", "user")}

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

    def source_of(self, key: str) -> str:
        """file:line of `key`."""
        return f"{self.path}:{self.loc.line(self.kind, self.index, key)}"

    def table_error(self, message: str) -> PolicyError:
        return PolicyError(f"{self.source}: [[{self.kind}]]: {message}")

    def check_keys(self, known: tuple[str, ...], required: tuple[str, ...] = ()) -> None:
        for key in self.data:
            if key in TOP_KEYS and key not in known:
                raise self.error(key, f"a key of the file's top level, not of [[{self.kind}]]: "
                                      "move it above the file's first table")
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


def _matching(v: object, wanted: str, pattern: re.Pattern[str], refusal: str, hint: str = "") -> str:
    """`v` as text that `pattern` matches whole; else a ValueError saying what it is not
    (``not REFUSAL: TEXT (HINT)``)."""
    text = _string(v, wanted)
    if not pattern.fullmatch(text):
        raise ValueError(f"not {refusal}: {_short(text)}" + (f" ({hint})" if hint else ""))
    return text


def _namespace_pattern(v: object) -> str:
    return _matching(v, "a Kubernetes namespace or a pattern such as \"ml-*\"", K8S_NAMESPACE_PATTERN,
                     "a Kubernetes namespace pattern", "lower-case letters, digits, '-', and the globs '*' and '?'")


def _class(v: object) -> str:
    return _matching(v, "a class code prefix such as \"02\" or \"0300\"", _CLASS, "a class code prefix",
                     "2, 4 or 6 hex digits: \"02\" network, \"0300\" VGA, \"0c0330\" xHCI").lower()


def _driver(v: object) -> str:
    return _matching(v, "a driver name", _DRIVER, "a driver name")


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


def _device_entry(t: _Table, key: str, what: str, j: int, entry: dict[str, object]) -> ResourceDevice:
    """One ``{ address = ..., ids = ..., subsystem = ... }`` table, the `j`-th of `key`."""
    for k in entry:
        if k not in RESOURCE_DEVICE_KEYS:
            raise t.error(key, f"{what}: unknown key '{k}'" + _did_you_mean(k, RESOURCE_DEVICE_KEYS), j)
    for k in ("address", "ids"):
        if k not in entry:
            raise t.error(key, f"{what}: missing key '{k}'", j)
    try:
        addr = _address(entry["address"])
        vendor, device = _exact_id(entry["ids"])
        subsystem = _exact_id(entry["subsystem"]) if "subsystem" in entry else None
    except ValueError as e:
        raise t.error(key, f"{what}: {e}", j) from None
    return ResourceDevice(addr, vendor, device, subsystem)


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
