"""Properties of the policy engine over random hosts and random rule sets (hypothesis).

Hosts are the example tables of `vfiod.sim.hosts` with random drivers, ids,
classes, IOMMU groups and boot-VGA flags; rule sets are random TOML files,
loaded by the real loader.  An oracle written independently of the engine
says which allow rules cover a device for a caller.
"""

from __future__ import annotations

import fnmatch
import json

import attrs
from hypothesis import HealthCheck, given, settings, target
from hypothesis import strategies as st

from vfiod.sim import hosts
from vfiod.address import PciAddress
from vfiod.policy import KNOWN_BACKENDS, Caller, Policy
from vfiod.topology import Host

from .policy_corpus.kit import USERS, raws

EXAMPLE_NAMES = sorted(hosts.EXAMPLES)
ALL_FNS = [f for spec in hosts.EXAMPLES.values() for f in spec.functions]
ADDRESSES = sorted({str(f.addr) for f in ALL_FNS})
IDS = sorted({(f.vendor, f.device) for f in ALL_FNS})
CLASSES = sorted({f.class_code for f in ALL_FNS})
DRIVERS = sorted({f.driver for f in ALL_FNS if f.driver} | {"vfio-pci", "pci-stub"})
ID_PATTERNS = sorted({f"{v:04x}:{d:04x}" for v, d in IDS} | {"8086:*", "10de:*", "*:167b", "*:1520", "*:*"})
CLASS_PREFIXES = ["01", "0106", "02", "0200", "020000", "03", "0300", "030000", "04", "0403", "06", "0604",
                  "060400", "0c", "0c03", "0c0320"]
USER_NAMES = ["alice", "bob", "carol", "root", "dpdk-svc"]
GROUP_NAMES = ["dpdk", "kvm", "wheel", "empty"]
UIDS = [0, 990, 1000, 1001, 1002, 4242]
CALLERS = [Caller.from_uid(uid, USERS) for uid in UIDS] + [Caller(uid=4242, gids=frozenset({2000, 36}))]
RESOURCE_NAMES = ["r0", "r1"]
SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------- random hosts

@st.composite
def random_hosts(draw) -> Host:
    name = draw(st.sampled_from(EXAMPLE_NAMES))
    devices, facts = raws(name)
    out = []
    for r in devices:
        changes = {}
        if draw(st.booleans()):
            changes["driver"] = draw(st.sampled_from([None, *DRIVERS]))
        if draw(st.booleans()):
            changes["vendor"], changes["device"] = draw(st.sampled_from([*IDS, (None, None)]))
        if draw(st.integers(0, 4)) == 0:
            changes["class_code"] = draw(st.sampled_from([*CLASSES, None]))
        if draw(st.integers(0, 3)) == 0:
            changes["iommu_group"] = draw(st.integers(0, 9))
        if draw(st.integers(0, 6)) == 0:
            changes["boot_vga"] = True
        out.append(attrs.evolve(r, **changes) if changes else r)
    return Host.from_raw(out, facts)


# ---------------------------------------------------------------- random policies

def _one_or_list(draw, values, most=3):
    picked = draw(st.lists(st.sampled_from(values), min_size=1, max_size=most))
    return picked[0] if len(picked) == 1 and draw(st.booleans()) else picked


@st.composite
def random_resources(draw) -> list[dict]:
    out = []
    for name in RESOURCE_NAMES[:draw(st.integers(0, len(RESOURCE_NAMES)))]:
        devices = []
        for addr in draw(st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=2, unique=True)):
            v, d = draw(st.sampled_from(IDS))
            devices.append({"address": addr, "ids": f"{v:04x}:{d:04x}"})
        out.append({"name": name, "devices": devices})
    return out


@st.composite
def random_rules(draw, resources: list[dict], action=None) -> dict:
    rule: dict = {}
    action = action or draw(st.sampled_from(["allow", "allow", "allow", "deny"]))
    if action == "deny" or draw(st.booleans()):
        rule["action"] = action
    matchers = {
        "address": lambda: _one_or_list(draw, ADDRESSES),
        "group": lambda: _one_or_list(draw, list(range(10)), 5),
        "ids": lambda: _one_or_list(draw, ID_PATTERNS),
        "class": lambda: _one_or_list(draw, CLASS_PREFIXES),
        "driver": lambda: _one_or_list(draw, DRIVERS),
        "vf_of": lambda: _one_or_list(draw, ["0000:01:00.0", "0000:02:00.0"], 2),
    }
    if resources:
        matchers["resource"] = lambda: _one_or_list(draw, [r["name"] for r in resources], 2)
    for key in draw(st.lists(st.sampled_from(sorted(matchers)), min_size=1, max_size=2, unique=True)):
        rule[key] = matchers[key]()
    who = {
        "users": lambda: _one_or_list(draw, USER_NAMES),
        "uids": lambda: _one_or_list(draw, UIDS),
        "groups": lambda: _one_or_list(draw, GROUP_NAMES),
        "everyone": lambda: True,
    }
    keys = ["everyone"] if draw(st.integers(0, 3)) == 0 else \
        draw(st.lists(st.sampled_from(sorted(who)), min_size=1, max_size=2, unique=True))
    for key in keys:
        rule[key] = who[key]()
    if action == "allow":
        if draw(st.booleans()):
            rule["backends"] = draw(st.lists(st.sampled_from(KNOWN_BACKENDS), min_size=1, max_size=3, unique=True))
            if draw(st.booleans()):
                rule["default_backend"] = draw(st.sampled_from(rule["backends"]))
        if draw(st.booleans()):
            rule["max_duration"] = draw(st.sampled_from([60, "1h", "8h", "2d"]))
        if draw(st.booleans()):
            rule["persistent"] = draw(st.booleans())
        if draw(st.booleans()):
            rule["memlock"] = draw(st.sampled_from(["256M", "1G", 4096]))
        if ("address" in rule or "resource" in rule) and draw(st.booleans()):
            rule["allow_protected"] = True
    return rule


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, str)):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def to_toml(rules: list[dict], resources: list[dict] = ()) -> str:
    out = []
    for r in resources:
        out.append("[[resource]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in r.items()))
    for r in rules:
        out.append("[[rule]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in r.items()))
    return "\n".join(out)


def load(files: list[str]) -> Policy:
    return Policy.from_sources([(f"p/{10 * (i + 1)}.toml", t) for i, t in enumerate(files)], users=USERS)


# ---------------------------------------------------------------- the oracle

def _as_list(v):
    return v if isinstance(v, list) else [v]


def _covers_caller(rule: dict, caller: Caller) -> bool:
    if rule.get("everyone"):
        return True
    if caller.uid in {USERS.uid(u) for u in _as_list(rule.get("users", []))}:
        return True
    if caller.uid in set(_as_list(rule.get("uids", []))):
        return True
    return any(USERS.gid(g) in caller.gids for g in _as_list(rule.get("groups", [])))


def _in_resource(res: dict, dev) -> bool:
    for d in res["devices"]:
        if PciAddress.parse(d["address"]) == dev.addr:
            raw = dev.raw
            return raw.vendor is not None and raw.device is not None and \
                d["ids"] == f"{raw.vendor:04x}:{raw.device:04x}"
    return False


def _matches_device(rule: dict, dev, resources: dict) -> bool:
    raw = dev.raw
    checks = {
        "address": lambda v: PciAddress.parse(v) == dev.addr,
        "group": lambda v: raw.iommu_group == v,
        "ids": lambda v: raw.vendor is not None and raw.device is not None and all(
            fnmatch.fnmatchcase(have, want) for have, want in
            zip((f"{raw.vendor:04x}", f"{raw.device:04x}"), v.split(":"))),
        "class": lambda v: raw.class_code is not None and f"{raw.class_code:06x}".startswith(v),
        "driver": lambda v: raw.driver == v,
        "vf_of": lambda v: raw.physfn == PciAddress.parse(v),
        "resource": lambda v: _in_resource(resources[v], dev),
    }
    return all(any(checks[key](v) for v in _as_list(rule[key])) for key in checks if key in rule)


def _names(rule: dict, dev, resources: dict) -> bool:
    return any(PciAddress.parse(a) == dev.addr for a in _as_list(rule.get("address", []))) or any(
        _in_resource(resources[n], dev) for n in _as_list(rule.get("resource", [])))


def _backends(rule: dict) -> list[str]:
    if "backends" in rule:
        return rule["backends"]
    return [rule["default_backend"]] if "default_backend" in rule else ["vfio"]


def covering_allow_rules(rules: list[dict], resources: dict, dev, caller: Caller) -> list[dict]:
    """Allow rules that name this caller and this device (and may unprotect it)."""
    return [r for r in rules
            if r.get("action", "allow") == "allow" and _covers_caller(r, caller)
            and _matches_device(r, dev, resources)
            and (not dev.protected or (r.get("allow_protected") and _names(r, dev, resources)))]


# ---------------------------------------------------------------- properties

@SETTINGS
@given(host=random_hosts(), data=st.data())
def test_nothing_is_allowed_that_no_allow_rule_covers(host, data):
    resources = data.draw(random_resources())
    rules = data.draw(st.lists(random_rules(resources), max_size=8))
    pol = load([to_toml(rules, resources)])
    by_name = {r["name"]: r for r in resources}
    allowed = 0
    for n, g in host.groups.items():
        for caller in CALLERS:
            for backend in ("", *KNOWN_BACKENDS):
                d = pol.decide(host, caller, n, backend)
                if not d.allowed:
                    continue
                allowed += 1
                assert d.backend in KNOWN_BACKENDS and (not backend or d.backend == backend)
                endpoints = host.endpoints(g)
                assert endpoints
                for dev in endpoints:
                    covering = covering_allow_rules(rules, by_name, dev, caller)
                    assert any(d.backend in _backends(r) for r in covering), (n, caller, str(dev.addr))
    target(allowed, label="allowed decisions")          # steer towards policies that allow things


@SETTINGS
@given(host=random_hosts(), data=st.data())
def test_adding_a_deny_rule_never_widens_access(host, data):
    resources = data.draw(random_resources())
    rules = data.draw(st.lists(random_rules(resources), max_size=8))
    deny = data.draw(random_rules(resources, action="deny"))
    at = data.draw(st.integers(0, len(rules)))
    cut = data.draw(st.integers(0, len(rules)))         # two files: rules[:cut], rules[cut:]
    before = load([to_toml(rules[:cut], resources), to_toml(rules[cut:])])
    with_deny = rules[:at] + [deny] + rules[at:]
    cut2 = cut + (at <= cut)
    after = load([to_toml(with_deny[:cut2], resources), to_toml(with_deny[cut2:])])
    assert len(after.rules) == len(before.rules) + 1
    options = data.draw(st.sampled_from([{}, {"persistent": True}, {"duration": 7200}]))
    allowed = 0
    for n in host.groups:
        for caller in CALLERS:
            for backend in ("", *KNOWN_BACKENDS):
                was = before.decide(host, caller, n, backend, options).allowed
                allowed += was
                if after.decide(host, caller, n, backend, options).allowed:
                    assert was, (n, caller, backend)
    target(allowed, label="allowed before the deny rule")


@SETTINGS
@given(host=random_hosts(), data=st.data())
def test_a_deny_rule_first_for_everyone_denies_what_it_matches(host, data):
    resources = data.draw(random_resources())
    rules = data.draw(st.lists(random_rules(resources), max_size=5))
    deny = data.draw(random_rules(resources, action="deny"))
    for key in ("users", "uids", "groups"):
        deny.pop(key, None)
    deny["everyone"] = True
    pol = load([to_toml([deny], resources), to_toml(rules)])
    by_name = {r["name"]: r for r in resources}
    for n, g in host.groups.items():
        hit = [dev for dev in host.endpoints(g) if _matches_device(deny, dev, by_name)]
        if hit:
            for caller in CALLERS:
                d = pol.decide(host, caller, n)
                assert not d.allowed and "denied by rule p/10.toml:" in d.reason
