"""Reading policy files: every problem is a `PolicyError` naming file, line and key."""

from __future__ import annotations

import difflib
import tomllib
from typing import Iterable, Mapping

import attrs

from ..address import PciAddress
from ..errors import InvalidArgument, PolicyError
from .locate import Locator
from .model import (EARLY_BACKENDS, AdminGroup, Claim, MAX_FILE_SIZE, Pool, PoolMember, Resource, ResourceDevice, Rule,
                    _NAME, parse_target)
from .units import _describe, _short, parse_duration, parse_size
from .users import UserDb
from .values import (CLAIM_KEYS, GRANT_KEYS, MATCH_KEYS, MDEV_BACKENDS, MDEV_KEYS, NOT_FOR_MDEV, POOL_KEYS,
                     RESOURCE_KEYS, RULE_KEYS, TABLES, TOP_KEYS, WHO_KEYS, _Table, _string, _text, _bool, _vf_count,
                     _on_revoke, _address, _iommu_group, _unix_group_name, _uid, _namespace_pattern, _class, _driver,
                     _resource_name, _mdev_type, _id_pattern, _ids_of, _device_entry, _line_of, _create_hint,
                     _syntax_error)

# ---------------------------------------------------------------- reading files


class Loader:
    """Builds a policy from file texts; every problem is a located `PolicyError`."""

    def __init__(self, backends: Iterable[str], users: UserDb):
        self.backends = tuple(dict.fromkeys(backends))
        self.users = users
        self.rules: list[Rule] = []
        self.resources: dict[str, Resource] = {}
        self.pools: dict[str, Pool] = {}
        self.admin_groups: dict[str, AdminGroup] = {}
        self.claims: list[Claim] = []
        # resource and pool names (kind "resource" or "pool"), checked at the end
        self.refs: list[tuple[_Table, str, int | None, str, str]] = []
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
        if "admin_groups" in data:
            self._admin_groups(_Table(path, loc, "", 0, {"admin_groups": data.pop("admin_groups")}))
        for key, value in data.items():
            line = loc.line("", 0, key)
            if key not in TABLES:
                close = difflib.get_close_matches(key, TABLES + TOP_KEYS, n=1, cutoff=0.6)
                hint = ((f"did you mean [[{close[0]}]]?" if close[0] in TABLES else f"did you mean {close[0]}?")
                        if close else "expected [[rule]], [[resource]], [[pool]], [[claim]] or admin_groups")
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
                elif t.kind == "pool":
                    self._pool(t)
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
        """The checks that need every file: resource and pool names may be defined in any of
        them.  A pool's members that name resources are resolved here, and the pools a rule
        names are given to it."""
        for t, key, element, name, kind in self.refs:
            defined: dict[str, Resource] | dict[str, Pool] = self.pools if kind == "pool" else self.resources
            if name not in defined:
                known = f"known: {', '.join(sorted(defined))}" if defined else "none is defined"
                self.errors.append(t.error(key, f"no {kind} named '{name}' ({known})", element))
        for name, pool in list(self.pools.items()):
            self.pools[name] = self._pool_members(pool)
        self.rules = [attrs.evolve(r, pool_defs=tuple(self.pools[n] for n in r.pools if n in self.pools))
                      if r.pools else r for r in self.rules]
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
        resources = self._named(t, "resource") if "resource" in d else None
        pools = self._named(t, "pool") if "pool" in d else None
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
                    drivers=drivers, vf_of=vf_of, resources=resources, pools=pools,
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
        if allow_protected and not t.gave(("address", "resource", "pool")):
            raise t.error("allow_protected", "a protected device must be named explicitly: "
                                             "give the rule an 'address', 'resource' or 'pool' key")
        return attrs.evolve(rule, backends=backends, default_backend=default, max_duration=max_duration,
                            persistent=persistent, memlock=memlock, reset_on_release=reset_on_release,
                            allow_protected=allow_protected, revoke_grace=revoke_grace, on_revoke=on_revoke,
                            revoke_others=revoke_others, max_vfs=max_vfs)

    def _named(self, t: _Table, key: str) -> tuple[str, ...]:
        """The resource or pool names of a rule's `key` (checked to exist at the end)."""
        names = t.many(key, _resource_name, f"{key} name")
        many = isinstance(t.data[key], list)
        for j, name in enumerate(names):
            self.refs.append((t, key, j if many else None, name, key))
        return tuple(dict.fromkeys(names))

    def _admin_groups(self, t: _Table) -> None:
        """``admin_groups``: the unix groups whose members are delegated admins."""
        try:
            names = t.many("admin_groups", _unix_group_name, "group name")
            gids = _ids_of(t, "admin_groups", names, self.users.gid, "group")
        except PolicyError as e:
            self.errors.append(e)
            return
        for name, gid in zip(names, gids):
            self.admin_groups.setdefault(name, AdminGroup(name, gid, t.source_of("admin_groups")))

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

    def _named_table(self, t: _Table, keys: tuple[str, ...], key: str, defined: Mapping[str, Resource | Pool],
                     expected: str, empty: str) -> tuple[str, str, list[object]]:
        """The name, comment and entries (the array `key`) of a [[resource]] or [[pool]]."""
        t.check_keys(keys, required=("name", key))
        name = t.checked("name", _resource_name)
        if name in defined:
            raise t.error("name", f"{t.kind} {name!r} is already defined at {defined[name].source}")
        comment = t.get("comment", _text) if "comment" in t.data else ""
        entries = t.data[key]
        if not isinstance(entries, list) or not entries:
            got = f"an empty array{empty}" if entries == [] else _describe(entries)
            raise t.error(key, f"expected an array of {expected}, got {got}")
        return name, comment, entries

    def _resource(self, t: _Table) -> None:
        name, comment, entries = self._named_table(
            t, RESOURCE_KEYS, "devices", self.resources, "{ address = ..., ids = ..., subsystem = ... } tables", "")
        devices: list[ResourceDevice] = []
        for j, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise t.error("devices", f"device {j + 1}: expected a table {{ address = ..., ids = ... }}, "
                                         f"got {_describe(entry)}", j)
            dev = _device_entry(t, "devices", f"device {j + 1}", j, entry)
            if any(x.address == dev.address for x in devices):
                raise t.error("devices", f"device {j + 1}: {dev.address} is listed twice", j)
            devices.append(dev)
        self.resources[name] = Resource(name=name, devices=tuple(devices), source=t.source, comment=comment)

    def _pool(self, t: _Table) -> None:
        name, comment, entries = self._named_table(
            t, POOL_KEYS, "members", self.pools, "resource names and { address = ..., ids = ... } tables",
            ": a pool needs at least one member")
        members: list[PoolMember] = []
        for j, entry in enumerate(entries):
            what = f"member {j + 1}"
            if isinstance(entry, str):
                if not _NAME.fullmatch(entry):
                    raise t.error("members", f"{what}: not a resource name: {_short(entry)}", j)
                target = f"name:{entry}"
                self.refs.append((t, "members", j, entry, "resource"))
                res = Resource(name=entry, devices=(), source=t.source)     # filled in by `finish`
            elif isinstance(entry, dict):
                dev = _device_entry(t, "members", what, j, entry)
                target = str(dev.address)
                res = Resource(name=target, devices=(dev,), source=t.source)
            else:
                raise t.error("members", f"{what}: expected a resource name or a table {{ address = ..., "
                                         f"ids = ... }}, got {_describe(entry)}", j)
            if any(m.target == target for m in members):
                raise t.error("members", f"{what}: {target} is listed twice", j)
            members.append(PoolMember(target, res))
        self.pools[name] = Pool(name=name, members=tuple(members), source=t.source, comment=comment)

    def _pool_members(self, pool: Pool) -> Pool:
        """`pool` with its resource members' devices; a device that two members share (or a
        member naming an unknown resource) is an error here, once every file is read."""
        members: list[PoolMember] = []
        seen: dict[PciAddress, str] = {}
        for m in pool.members:
            res = self.resources.get(m.resource.name) if m.target.startswith("name:") else m.resource
            if res is None:
                continue            # reported with the unknown names
            for dev in res.devices:
                if dev.address in seen:
                    self.errors.append(PolicyError(
                        f"{pool.source}: [[pool]] {pool.name}: {dev.address} is in two of its members "
                        f"({seen[dev.address]} and {m.target}); each member is one group's worth of devices"))
                seen.setdefault(dev.address, m.target)
            members.append(PoolMember(m.target, res))
        return attrs.evolve(pool, members=tuple(members))

    def _claim(self, t: _Table) -> Claim:
        t.check_keys(CLAIM_KEYS, required=("target", "user"))
        d = t.data
        target = t.get("target", _text)
        try:
            parsed = parse_target(target)
        except InvalidArgument as e:
            raise t.error("target", str(e)) from None
        if parsed[0] in ("name", "pool"):
            self.refs.append((t, "target", None, parsed[1], "resource" if parsed[0] == "name" else "pool"))
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
        early = t.get("early", _bool) if "early" in d else False
        if early and parsed[0] != "name":
            raise t.error("early", f"early binding happens before vfiod runs, on the ids the policy pins: "
                                   f"claim a [[resource]] (target = \"name:NAME\"), not {_short(target)}")
        if early and backend not in EARLY_BACKENDS:
            raise t.error("early", f"early binding binds vfio-pci or pci-stub, so it needs backend "
                                   f"{', '.join(repr(b) for b in EARLY_BACKENDS if b)} or none, not {backend!r}")
        return Claim(target=target, uid=uid, user=user, backend=backend, source=t.source, comment=comment,
                     early=early)
