"""The policy engine: matching, order, whole groups, protected devices, resources, claims, terms.

Hosts are the example tables of `vfiod.sim.hosts` (ICH10 unless said otherwise):
group 8 holds the root ports 00:1c.0/00:1c.4 and the NICs 04:00.0 (8086:10d3,
e1000e) and 05:00.0 (14e4:167b, tg3); 00:19.0 carries the default route,
01:00.0 is the boot VGA and 00:1f.2 the root disk's controller.
"""

import os

import attrs
import pytest

from vfiod.sim import hosts
from vfiod.errors import InvalidAddress, InvalidArgument, NotFound, PolicyError
from vfiod.policy import (Caller, Policy, PolicyStore, StaticUserDb, Target, UserDb, Locator,
                          format_duration, format_size, parse_duration, parse_size)

from .policy_corpus.kit import EXAMPLES, USERS, A, caller, host, policy

ICH10 = host("ich10")


def verdict(text: str, addr: str, user: str = "alice", on=None) -> bool:
    """Is `addr` allowed to `user` by a policy of one file?"""
    h = on or ICH10
    return policy(text).decide_device(h.devices[A(addr)], caller(user))[0].allowed


def rule(matcher: str, who: str = 'users = ["alice"]', extra: str = "") -> str:
    return f"[[rule]]\n{matcher}\n{who}\n{extra}\n"


# ---------------------------------------------------------------- matchers

@pytest.mark.parametrize("matcher, addr, expected", [
    ('address = "0000:04:00.0"', "04:00.0", True),
    ('address = "04:00.0"', "04:00.0", True),                    # lspci spelling
    ('address = "pci_0000_04_00_0"', "04:00.0", True),           # libvirt spelling
    ('address = ["0000:04:00.0"]', "05:00.0", False),
    ('address = ["0000:04:00.0", "0000:05:00.0"]', "05:00.0", True),
    ("group = 8", "05:00.0", True),
    ("group = [4, 8]", "00:1b.0", True),
    ("group = 8", "00:1b.0", False),
    ('ids = "8086:10d3"', "04:00.0", True),
    ('ids = "8086:10D3"', "04:00.0", True),
    ('ids = "8086:*"', "04:00.0", True),
    ('ids = "*:167b"', "05:00.0", True),
    ('ids = "8086:*"', "05:00.0", False),
    ('ids = ["8086:1000", "14e4:*"]', "05:00.0", True),
    ('ids = "*:*"', "05:00.0", True),
    ('class = "02"', "05:00.0", True),                           # every network controller
    ('class = "0200"', "04:00.0", True),
    ('class = "020000"', "04:00.0", True),
    ('class = "03"', "04:00.0", False),
    ('class = "0c03"', "00:1a.7", True),                         # USB: 0c0320
    ('class = "0c0320"', "00:1a.0", False),                      # 0c0300
    ('class = ["03", "0403"]', "01:00.1", True),
    ('driver = "e1000e"', "04:00.0", True),
    ('driver = "tg3"', "04:00.0", False),
    ('driver = ["tg3", "e1000e"]', "05:00.0", True),
    ('driver = "pcieport"', "00:00.0", False),                   # unbound: no driver matches
    ('ids = "8086:*"\nclass = "02"', "04:00.0", True),           # every key must match
    ('ids = "8086:*"\nclass = "02"', "05:00.0", False),
    ('group = 8\ndriver = "tg3"', "04:00.0", False),
    ('group = 8\ndriver = "tg3"', "05:00.0", True),
])
def test_each_matcher(matcher, addr, expected):
    assert verdict(rule(matcher), addr) is expected


@pytest.mark.parametrize("matcher, addr, expected", [
    ('vf_of = "0000:01:00.0"', "01:10.0", True),
    ('vf_of = "01:00.0"', "01:11.4", True),
    ('vf_of = "0000:01:00.0"', "01:00.0", False),                 # the PF is not its own VF
    ('vf_of = "0000:02:00.0"', "01:10.0", False),
    ('vf_of = ["0000:02:00.0", "0000:01:00.0"]', "01:10.4", True),
    ('ids = "8086:1520"', "01:11.0", True),                       # a VF's ids are the VF device id
])
def test_vf_of_matches_the_virtual_functions_of_a_pf(matcher, addr, expected):
    assert verdict(rule(matcher), addr, on=host("sriov")) is expected


def test_unreadable_ids_and_class_match_no_pattern():
    h = host(changes={"04:00.0": {"vendor": None, "device": None, "class_code": None}})
    for matcher in ('ids = "*:*"', 'ids = "8086:*"', 'class = "02"'):
        assert not verdict(rule(matcher), "04:00.0", on=h), matcher
    assert verdict(rule('address = "04:00.0"'), "04:00.0", on=h)


@pytest.mark.parametrize("who, user, expected", [
    ('users = ["alice"]', "alice", True),
    ('users = ["alice"]', "bob", False),
    ('users = "alice"', "alice", True),
    ('users = ["alice"]', "root", False),          # uid 0 gets nothing implicitly
    ("uids = [1001]", "bob", True),
    ("uids = 1001", "alice", False),
    ('groups = ["dpdk"]', "bob", True),            # supplementary group
    ('groups = ["dpdk"]', "dpdk-svc", True),
    ('groups = ["dpdk"]', "alice", False),
    ('groups = ["kvm"]', "carol", True),           # primary group
    ('groups = ["empty"]', "alice", False),
    ('users = ["bob"]\ngroups = ["kvm"]', "alice", True),   # any of the who keys
    ('users = ["bob"]\ngroups = ["kvm"]', "bob", True),
    ("everyone = true", "root", True),
    ("everyone = true", "carol", True),
    ('everyone = false\nusers = ["bob"]', "alice", False),
])
def test_who(who, user, expected):
    assert verdict(rule('address = "04:00.0"', who), "04:00.0", user) is expected


def test_callers_groups_come_from_the_caller_not_the_database():
    pol = policy(rule('address = "04:00.0"', 'groups = ["dpdk"]'))
    dev = ICH10.devices[A("04:00.0")]
    assert pol.decide_device(dev, Caller(uid=4242, gids=frozenset({2000})))[0].allowed
    assert not pol.decide_device(dev, Caller(uid=1001))[0].allowed      # bob, but without his groups


# ---------------------------------------------------------------- order

DENY = '[[rule]]\naction = "deny"\naddress = "04:00.0"\nusers = ["alice"]\n'
ALLOW = '[[rule]]\naddress = "04:00.0"\nusers = ["alice"]\n'


@pytest.mark.parametrize("files, allowed, deciding", [
    ([DENY + ALLOW], False, "p/10-t.toml:1"),
    ([ALLOW + DENY], True, "p/10-t.toml:1"),
    ([DENY, ALLOW], False, "p/10-t.toml:1"),
    ([ALLOW, DENY], True, "p/10-t.toml:1"),
    (["", ALLOW + "\n" + DENY], True, "p/20-t.toml:1"),
    (["", "# x\n\n" + DENY + "\n" + ALLOW], False, "p/20-t.toml:3"),
])
def test_the_first_matching_rule_decides(files, allowed, deciding):
    d, _ = policy(*files).decide_device(ICH10.devices[A("04:00.0")], caller("alice"))
    assert (d.allowed, d.rule) == (allowed, deciding)


def test_files_are_read_in_name_order(tmp_path):
    (tmp_path / "20-allow.toml").write_text(ALLOW)
    (tmp_path / "10-deny.toml").write_text(DENY)
    pol = Policy.load(str(tmp_path), users=USERS)
    assert [os.path.basename(f) for f in pol.files] == ["10-deny.toml", "20-allow.toml"]
    assert [r.source for r in pol.rules] == [f"{tmp_path}/10-deny.toml:1", f"{tmp_path}/20-allow.toml:1"]
    assert not pol.decide(ICH10, caller("alice"), 8).allowed
    # byte order, not numeric: "10-…" sorts before "9-…"
    (tmp_path / "9-allow.toml").write_text(ALLOW)
    assert os.path.basename(Policy.load(str(tmp_path), users=USERS).files[0]) == "10-deny.toml"


def test_a_rule_that_does_not_name_the_caller_is_skipped():
    pol = policy('[[rule]]\naction = "deny"\naddress = "04:00.0"\nusers = ["bob"]\n'
                 '[[rule]]\naddress = "04:00.0"\nusers = ["alice", "bob"]\n')
    dev = ICH10.devices[A("04:00.0")]
    assert pol.decide_device(dev, caller("alice"))[0].allowed
    assert not pol.decide_device(dev, caller("bob"))[0].allowed


def test_the_first_match_decides_even_when_its_terms_refuse():
    """A later rule with other terms is not consulted: first match, then its terms."""
    pol = policy('[[rule]]\naddress = ["04:00.0", "05:00.0"]\nusers = ["alice"]\nbackends = ["vfio"]\n'
                 '[[rule]]\ngroup = 8\nusers = ["alice"]\nbackends = ["libvirt"]\n')
    d = pol.decide(ICH10, caller("alice"), 8, "libvirt")
    assert not d.allowed
    assert "rule p/10-t.toml:1 does not allow the libvirt backend (it allows vfio)" in d.reason


def test_other_files_and_non_toml_names_are_skipped(tmp_path):
    (tmp_path / "10-a.toml").write_text(ALLOW)
    (tmp_path / ".20-hidden.toml").write_text("broken [")
    (tmp_path / "30-b.toml~").write_text("broken [")
    (tmp_path / "README").write_text("broken [")
    (tmp_path / "40-dir.toml").mkdir()
    pol = Policy.load(str(tmp_path), users=USERS)
    assert [os.path.basename(f) for f in pol.files] == ["10-a.toml"]
    assert pol.directory == str(tmp_path)


# ---------------------------------------------------------------- whole groups

def test_a_group_is_allowed_only_if_every_endpoint_is():
    pol = policy(rule('address = "0000:04:00.0"'))
    d = pol.decide(ICH10, caller("alice"), 8)
    assert not d.allowed
    assert d.reason.startswith("group 8: 0000:05:00.0: no rule matched (deny by default)")
    assert "0000:04:00.0" not in d.reason
    assert "whole group" in d.reason
    by = {str(x.address): x for x in d.devices}
    assert list(by) == ["0000:00:1c.0", "0000:00:1c.4", "0000:04:00.0", "0000:05:00.0"]
    assert by["0000:04:00.0"].allowed and by["0000:04:00.0"].rule == "p/10-t.toml:1"
    assert not by["0000:05:00.0"].allowed and by["0000:05:00.0"].rule == ""
    assert by["0000:00:1c.0"].allowed and "exempt" in by["0000:00:1c.0"].reason
    assert d.backend is None and d.memlock is None and not d.persistent


def test_bridges_and_ports_are_exempt_even_from_deny_rules():
    pol = policy(rule('address = ["04:00.0", "05:00.0"]'),
                 '[[rule]]\naction = "deny"\naddress = ["00:1c.0", "00:1c.4"]\neveryone = true\n')
    d = pol.decide(ICH10, caller("alice"), 8)
    assert d.allowed and d.rule == "p/10-t.toml:1" and d.backend == "vfio"


def test_a_group_of_bridges_only_has_nothing_to_lease():
    d = policy(rule("group = 6", "everyone = true")).decide(ICH10, caller("alice"), 6)
    assert not d.allowed and "no endpoint" in d.reason


def test_every_deciding_rule_is_named():
    pol = policy(rule('address = "04:00.0"'), rule('ids = "14e4:*"'))
    d = pol.decide(ICH10, caller("alice"), 8)
    assert d.allowed and d.rule == "p/10-t.toml:1, p/20-t.toml:1"


def test_several_denials_are_all_named():
    d = policy().decide(ICH10, caller("alice"), 8)
    assert d.reason == ("group 8: 0000:04:00.0: no rule matched (deny by default); "
                        "0000:05:00.0: no rule matched (deny by default)")
    assert d.rule == ""


def test_a_deny_rule_names_itself():
    pol = policy('[[rule]]\naction = "deny"\ncomment = "storage network"\naddress = "05:00.0"\n'
                 'everyone = true\n', rule("group = 8"))
    d = pol.decide(ICH10, caller("alice"), 8)
    assert not d.allowed and d.rule == "p/10-t.toml:1"
    assert "0000:05:00.0: denied by rule p/10-t.toml:1 (storage network)" in d.reason


def test_an_unknown_group_is_not_found():
    with pytest.raises(NotFound, match="no IOMMU group 99"):
        policy().decide(ICH10, caller("alice"), 99)


def test_the_empty_policy_denies_everything():
    pol = Policy.empty()
    assert pol.rules == () and pol.claims == () and not pol.resources
    for n in ICH10.groups:
        assert not pol.decide(ICH10, Caller(0), n).allowed


# ---------------------------------------------------------------- protected devices

@pytest.mark.parametrize("group, addr, why", [
    (2, "00:19.0", "default route NIC: carries the host's default route (eno1)"),
    (7, "00:1f.2", "root disk: storage controller of the root filesystem (sda1)"),
    (1, "01:00.0", "boot VGA: the host's console display"),
])
def test_protected_devices_need_an_explicit_rule_with_allow_protected(group, addr, why):
    assert ICH10.devices[A(addr)].protected == why
    members = [str(a) for a in ICH10.groups[group].members if not ICH10.devices[a].is_bridge]
    listed = "address = [" + ", ".join(f'"{a}"' for a in members) + "]"
    # a broad rule: denied, quoting why
    d = policy(rule(f"group = {group}")).decide(ICH10, caller("alice"), group)
    assert not d.allowed
    assert f"{A(addr)}: protected ({why}): rule p/10-t.toml:1 would have to name it" in d.reason
    # named by address, but no allow_protected: denied
    assert not policy(rule(listed)).decide(ICH10, caller("alice"), group).allowed
    # allow_protected but not named: a load error (a rule must name what it unprotects)
    with pytest.raises(PolicyError, match="allow_protected"):
        policy(rule(f"group = {group}", extra="allow_protected = true"))
    # named and allow_protected: allowed
    assert policy(rule(listed, extra="allow_protected = true")).decide(ICH10, caller("alice"), group).allowed


def test_allow_protected_covers_only_the_devices_the_rule_names():
    """A rule naming one address and matching others by group: only the named one is unprotected."""
    h = host(changes={"05:00.0": {"boot_vga": True, "class_code": 0x030000}})
    assert h.devices[A("05:00.0")].protected
    pol = policy(rule('address = "04:00.0"', extra="allow_protected = true"), rule("group = 8"))
    d = pol.decide(h, caller("alice"), 8)
    assert not d.allowed and "0000:05:00.0: protected (boot VGA" in d.reason


def test_a_resource_names_protected_devices_explicitly():
    res = ('[[resource]]\nname = "console"\ndevices = [{ address = "01:00.0", ids = "10de:1b80" }, '
           '{ address = "01:00.1", ids = "10de:10f0" }]\n')
    assert policy(res + rule('resource = "console"', extra="allow_protected = true")).decide(
        ICH10, caller("alice"), 1).allowed
    assert not policy(res + rule('resource = "console"')).decide(ICH10, caller("alice"), 1).allowed


# ---------------------------------------------------------------- named resources

FAST_NIC = ('[[resource]]\nname = "fast-nic"\n'
            'devices = [{ address = "0000:04:00.0", ids = "8086:10d3", subsystem = "8086:a01f" }]\n')
BOTH_NICS = ('[[resource]]\nname = "nics"\ndevices = [\n'
             '  { address = "0000:04:00.0", ids = "8086:10d3" },\n'
             '  { address = "0000:05:00.0", ids = "14e4:167b", subsystem = "14e4:167b" },\n]\n')


def test_a_resource_resolves_to_its_group():
    pol = policy(FAST_NIC, BOTH_NICS)
    assert pol.resolve(ICH10, "name:fast-nic") == Target(8, (A("04:00.0"),), "fast-nic")
    assert pol.resolve(ICH10, "name:nics") == Target(8, (A("04:00.0"), A("05:00.0")), "nics")
    d = policy(BOTH_NICS + rule('resource = "nics"')).decide(ICH10, caller("alice"), 8)
    assert d.allowed


@pytest.mark.parametrize("changes, message", [
    ({"04:00.0": {"vendor": 0x14E4, "device": 0x167B}},
     "resource fast-nic: 0000:04:00.0 is now 14e4:167b, the policy names 8086:10d3 (card swapped?)"),
    ({"04:00.0": {"subsystem_device": 0x0001}},
     "resource fast-nic: 0000:04:00.0 is now 8086:10d3 subsystem 8086:0001, "
     "the policy names subsystem 8086:a01f (card swapped?)"),
    ({"04:00.0": {"vendor": None}},
     "resource fast-nic: the ids of 0000:04:00.0 cannot be read, the policy names 8086:10d3"),
])
def test_a_resource_refuses_changed_hardware_saying_what_changed(changes, message):
    h = host(changes=changes)
    pol = policy(FAST_NIC + rule('resource = "fast-nic"'), rule('address = "05:00.0"'))
    with pytest.raises(NotFound) as e:
        pol.resolve(h, "name:fast-nic")
    assert str(e.value) == message
    # and the rules naming the resource no longer match the slot, whatever the target says
    d = pol.decide(h, caller("alice"), 8)
    assert not d.allowed
    assert ("0000:04:00.0: no rule matched (deny by default); rule p/10-t.toml:4 did not apply: "
            + message) in d.reason


def test_a_removed_card():
    with pytest.raises(NotFound, match=r"^resource fast-nic: 0000:04:00.0 is not on this host \(card removed\?\)$"):
        policy(FAST_NIC).resolve(host(without=["04:00.0"]), "name:fast-nic")


def test_a_swapped_card_on_a_scanned_host(build_host, scan):
    """The same, on a host laid out in sysfs with a different card in slot 4."""
    spec = attrs.evolve(hosts.ICH10, functions=tuple(
        attrs.evolve(f, vendor=0x14E4, device=0x167B, subsys=(0x14E4, 0x167B)) if str(f.addr) == "0000:04:00.0"
        else f for f in hosts.ICH10.functions))
    h = scan(build_host(spec))
    with pytest.raises(NotFound, match=r"0000:04:00.0 is now 14e4:167b, the policy names 8086:10d3 \(card swapped\?\)"):
        policy(FAST_NIC).resolve(h, "name:fast-nic")
    assert policy(FAST_NIC).resolve(scan(build_host("ich10")), "name:fast-nic").group == 8


def test_a_resource_over_two_groups_cannot_be_leased():
    pol = policy('[[resource]]\nname = "two"\ndevices = [{ address = "04:00.0", ids = "8086:10d3" }, '
                 '{ address = "00:1b.0", ids = "8086:3a3e" }]\n')
    with pytest.raises(InvalidArgument, match="spans several IOMMU groups"):
        pol.resolve(ICH10, "name:two")


def test_resources_may_be_defined_in_any_file_and_in_table_syntax():
    pol = policy(rule('resource = "later"'),
                 '[[resource]]\nname = "later"\n[[resource.devices]]\naddress = "04:00.0"\nids = "8086:10d3"\n'
                 '[[resource.devices]]\naddress = "05:00.0"\nids = "14e4:167b"\n')
    assert pol.decide(ICH10, caller("alice"), 8).allowed
    assert pol.resources["later"].source == "p/20-t.toml:1"


# ---------------------------------------------------------------- targets

@pytest.mark.parametrize("target, group, addresses", [
    ("0000:04:00.0", 8, ("0000:04:00.0",)),
    ("04:00.0", 8, ("0000:04:00.0",)),
    ("pci_0000_04_00_0", 8, ("0000:04:00.0",)),
    ("group:8", 8, ("0000:00:1c.0", "0000:00:1c.4", "0000:04:00.0", "0000:05:00.0")),
    ("group:4", 4, ("0000:00:1b.0",)),
])
def test_targets(target, group, addresses):
    t = Policy.empty().resolve(ICH10, target)
    assert (t.group, tuple(map(str, t.addresses)), t.resource) == (group, addresses, None)


@pytest.mark.parametrize("target, error, message", [
    ("group:99", NotFound, "no IOMMU group 99 on this host"),
    ("group:x", InvalidArgument, "not an IOMMU group: 'group:x'"),
    ("group:", InvalidArgument, "not an IOMMU group"),
    ("0000:0a:00.0", NotFound, "no PCI device 0000:0a:00.0 on this host"),
    ("../../etc/passwd", InvalidAddress, "not a target"),
    ("0000:04:00.0/../x", InvalidAddress, "not a target"),
    ("", InvalidArgument, "empty target"),
    ("x" * 300, InvalidArgument, "too long"),
    ("name:nope", NotFound, "no resource named 'nope' (known: the policy names none)"),
    ("name:../x", InvalidArgument, "not a resource name"),
])
def test_bad_targets(target, error, message):
    with pytest.raises(error) as e:
        Policy.empty().resolve(ICH10, target)
    assert message in str(e.value)


# ---------------------------------------------------------------- terms: backends, duration, persistent, memlock

NICS = 'address = ["04:00.0", "05:00.0"]'


@pytest.mark.parametrize("extra, asked, allowed, backend", [
    ("", "", True, "vfio"),                                              # default backends: vfio
    ("", "vfio", True, "vfio"),
    ("", "libvirt", False, None),
    ('backends = ["vfio", "libvirt"]', "", True, "vfio"),                 # default: the first
    ('backends = ["libvirt", "vfio"]', "", True, "libvirt"),
    ('backends = ["vfio", "libvirt"]\ndefault_backend = "libvirt"', "", True, "libvirt"),
    ('backends = ["vfio", "libvirt"]\ndefault_backend = "libvirt"', "vfio", True, "vfio"),
    ('default_backend = "pci-stub"', "", True, "pci-stub"),               # backends = [default]
    ('default_backend = "pci-stub"', "vfio", False, None),
])
def test_backends(extra, asked, allowed, backend):
    d = policy(rule(NICS, extra=extra)).decide(ICH10, caller("alice"), 8, asked)
    assert (d.allowed, d.backend) == (allowed, backend)
    if not allowed:
        assert f"does not allow the {asked} backend" in d.reason


@pytest.mark.parametrize("first, second, asked, expected", [
    ('backends = ["libvirt", "vfio"]', 'backends = ["vfio"]', "", "vfio"),           # a default both allow
    ('backends = ["vfio", "libvirt"]', 'backends = ["libvirt", "vfio"]', "", "vfio"),  # the first rule's
    ('backends = ["libvirt"]', 'backends = ["vfio"]', "", None),                     # none in common
    ('backends = ["libvirt", "vfio"]', 'backends = ["vfio", "libvirt"]', "libvirt", "libvirt"),
    ('backends = ["libvirt", "vfio"]', 'backends = ["vfio"]', "libvirt", None),
])
def test_the_deciding_rules_must_agree_on_a_backend(first, second, asked, expected):
    pol = policy(rule('address = "04:00.0"', extra=first), rule('address = "05:00.0"', extra=second))
    d = pol.decide(ICH10, caller("alice"), 8, asked)
    assert d.backend == expected and d.allowed is (expected is not None)
    if expected is None and not asked:
        assert "agree on no default backend" in d.reason and "ask for a backend" in d.reason


def test_an_unknown_backend_is_an_invalid_argument():
    with pytest.raises(InvalidArgument, match="unknown backend 'vfoi'"):
        policy(rule(NICS)).decide(ICH10, caller("alice"), 8, "vfoi")
    # a plugin's backend is known when the loader is told about it
    pol = policy(rule(NICS, extra='backends = ["mdev"]'), backends=("vfio", "mdev"))
    assert pol.decide(ICH10, caller("alice"), 8).backend == "mdev"
    with pytest.raises(PolicyError, match="unknown backend 'mdev'"):
        policy(rule(NICS, extra='backends = ["mdev"]'))


@pytest.mark.parametrize("cap, duration, allowed, reason", [
    ('"8h"', 8 * 3600, True, ""),
    ('"8h"', 8 * 3600 + 1, False, "asked for 8h1s, rule p/10-t.toml:1 allows at most 8h"),
    ("3600", 3601, False, "allows at most 1h"),
    ('"1h30m"', 5400, True, ""),
    ('"1h30m"', 0, True, ""),                       # no duration asked: the cap is in the decision
    (None, 365 * 86400, True, ""),                  # no cap in the rule: vfiod's own ceiling
])
def test_max_duration(cap, duration, allowed, reason):
    extra = f"max_duration = {cap}" if cap else ""
    d = policy(rule(NICS, extra=extra)).decide(ICH10, caller("alice"), 8, "", {"duration": duration})
    assert d.allowed is allowed
    assert reason in d.reason
    if allowed:
        assert d.max_duration == (parse_duration(eval(cap)) if cap else None)


def test_the_smallest_cap_of_the_deciding_rules_applies():
    pol = policy(rule('address = "04:00.0"', extra='max_duration = "8h"'),
                 rule('address = "05:00.0"', extra='max_duration = "2h"'))
    assert pol.decide(ICH10, caller("alice"), 8).max_duration == 7200
    d = pol.decide(ICH10, caller("alice"), 8, "", {"duration": 3 * 3600})
    assert not d.allowed and "0000:05:00.0: asked for 3h, rule p/20-t.toml:1 allows at most 2h" in d.reason


@pytest.mark.parametrize("first, second, asked, allowed, granted", [
    ("persistent = true", "persistent = true", True, True, True),
    ("persistent = true", "persistent = true", False, True, True),
    ("persistent = true", "", True, False, None),
    ("persistent = true", "", False, True, False),
    ("", "", True, False, None),
])
def test_persistent(first, second, asked, allowed, granted):
    pol = policy(rule('address = "04:00.0"', extra=first), rule('address = "05:00.0"', extra=second))
    d = pol.decide(ICH10, caller("alice"), 8, "", {"persistent": asked})
    assert d.allowed is allowed
    if allowed:
        assert d.persistent is granted
    else:
        assert "does not allow persistent leases" in d.reason


@pytest.mark.parametrize("options", [{"duration": "1h"}, {"duration": -1}, {"duration": True},
                                     {"persistent": "yes"}, {"persistent": 1}])
def test_malformed_options_are_invalid_arguments(options):
    with pytest.raises(InvalidArgument):
        policy(rule(NICS)).decide(ICH10, caller("alice"), 8, "", options)


def test_options_the_policy_does_not_judge_are_ignored():
    assert policy(rule(NICS)).decide(ICH10, caller("alice"), 8, "", {"force": True}).allowed


@pytest.mark.parametrize("first, second, expected", [
    ('memlock = "1G"', 'memlock = "1G"', 1 << 30),
    ('memlock = "1G"', 'memlock = "256M"', 256 << 20),           # the smallest grant
    ('memlock = 4096', 'memlock = "1G"', 4096),
    ('memlock = "1G"', "", None),                                # a rule that grants none: none
    ("", "", None),
])
def test_memlock(first, second, expected):
    pol = policy(rule('address = "04:00.0"', extra=first), rule('address = "05:00.0"', extra=second))
    assert pol.decide(ICH10, caller("alice"), 8).memlock == expected


@pytest.mark.parametrize("text, size", [
    ("256M", 256 << 20), ("1G", 1 << 30), ("512K", 512 << 10), ("1T", 1 << 40), ("1GiB", 1 << 30),
    ("64MB", 64 << 20), ("2 G", 2 << 30), ("1g", 1 << 30), ("4096", 4096), (4096, 4096),
])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1Q", "1.5G", "", "G", "-1", 0, -1, True, 1.5, "1 GB extra"])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("text, seconds", [
    (90, 90), ("90", 90), ("90s", 90), ("30m", 1800), ("8h", 28800), ("2d", 172800), ("1w", 604800),
    ("1h30m", 5400), ("1d12h", 129600),
])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["8 hours", "h", "", "1h 30m", "30x", 0, -5, True, 1.5, "0s", "999999w"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_formatting_for_people():
    assert [format_duration(s) for s in (90, 28800, 5400, 86401)] == ["1m30s", "8h", "1h30m", "1d1s"]
    assert [format_size(s) for s in (1 << 30, 256 << 20, 4096, 1000)] == ["1G", "256M", "4K", "1000 bytes"]


# ---------------------------------------------------------------- claims

def test_claims_are_parsed_and_listed():
    pol = policy(FAST_NIC + '\n[[claim]]\ntarget = "name:fast-nic"\nuser = "dpdk-svc"\nbackend = "vfio"\n'
                 '\n[[claim]]\ncomment = "the audio"\ntarget = "00:1b.0"\nuser = "root"\n',
                 '[[claim]]\ntarget = "group:8"\nuser = "bob"\nbackend = "pci-stub"\n')
    got = [(c.target, c.uid, c.user, c.backend, c.source, c.comment) for c in pol.claims]
    assert got == [
        ("name:fast-nic", 990, "dpdk-svc", "vfio", "p/10-t.toml:5", ""),
        ("00:1b.0", 0, "root", "", "p/10-t.toml:10", "the audio"),
        ("group:8", 1001, "bob", "pci-stub", "p/20-t.toml:1", ""),
    ]


# ---------------------------------------------------------------- callers and the user database

def test_caller():
    alice = caller("alice")
    assert alice == Caller(uid=1000, gids=frozenset({1000, 36}))
    assert not alice.is_admin and Caller(0).is_admin
    assert Caller.from_uid(4242, USERS).gids == frozenset()


def test_the_system_database():
    db = UserDb()
    assert db.uid("root") == 0 and db.user_name(0) == "root" and db.gid("root") == 0
    assert 0 in Caller.from_uid(0).gids
    for odd in ("no-such-user-xyz", "a\0b", "", "x" * 5000):
        assert db.uid(odd) is None and db.gid(odd) is None
    assert db.groups_of(2 ** 31 - 7) == frozenset()
    assert db.user_name(-1) is None


def test_static_database():
    db = StaticUserDb(users={"a": 5, "b": (6, 7)}, groups={"g": (7, ["a"])})
    assert (db.uid("a"), db.uid("b"), db.uid("c")) == (5, 6, None)
    assert db.groups_of(5) == {5, 7} and db.groups_of(6) == {7} and db.groups_of(99) == frozenset()
    assert db.group_name(7) == "g" and db.user_name(6) == "b"


# ---------------------------------------------------------------- the store

def test_the_store_keeps_the_last_good_policy(tmp_path):
    store = PolicyStore(str(tmp_path), users=USERS)
    assert not store.current.rules and store.error is None
    (tmp_path / "10-a.toml").write_text(rule(NICS))
    good = store.reload()
    assert store.current is good and good.decide(ICH10, caller("alice"), 8).allowed
    (tmp_path / "20-b.toml").write_text('[[rule]]\nusres = ["alice"]\n')
    with pytest.raises(PolicyError, match=r"20-b.toml:2: key 'usres': unknown key \(did you mean 'users'\?\)"):
        store.reload()
    assert store.current is good and "usres" in store.error
    os.remove(tmp_path / "20-b.toml")
    assert store.reload() is store.current is not good and store.error is None


def test_a_missing_directory_is_a_policy_error(tmp_path):
    with pytest.raises(PolicyError, match="no such policy directory"):
        Policy.load(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("")
    with pytest.raises(PolicyError, match="not a directory"):
        Policy.load(str(tmp_path / "file"))


def test_file_level_checks():
    with pytest.raises(PolicyError, match=r"^p/10-t.toml:1: file too large"):
        policy("#" * (1 << 20) + "\n")
    with pytest.raises(PolicyError, match=r"^x.toml:3: not UTF-8 text"):
        Policy.from_sources([("x.toml", b"\n\n\xff\n")], users=USERS)
    assert policy("\ufeff" + rule(NICS)).rules[0].source == "p/10-t.toml:1"   # a BOM is fine


# ---------------------------------------------------------------- where keys are

def test_the_locator_follows_strings_comments_and_arrays():
    text = '''# [[rule]] in a comment
[[rule]]
comment = """
[[rule]]
users = "in a string"
"""
'key with spaces' = 1
"users" = [   # a comment [with brackets]
  "alice",
  'bob', "carol" ,
  # "dave",
  "eve",
]

[[rule]]
address = "a\\"b" # users = 1
[rule.sub]
x = 1
[[resource]]
[[resource.devices]]
address = 1
[[resource.devices]]
address = 2
'''
    loc = Locator(text)
    assert loc.header("rule", 0) == 2 and loc.header("rule", 1) == 15 and loc.header("rule", 2) == 2
    assert loc.line("rule", 0, "comment") == 3
    assert loc.line("rule", 0, "key with spaces") == 7
    assert [loc.line("rule", 0, "users", j) for j in range(4)] == [9, 10, 10, 12]
    assert loc.line("rule", 0, "users", 9) == 8
    assert loc.line("rule", 0, "nope") == 2
    assert loc.line("rule", 1, "address") == 16 and loc.line("rule", 1, "users") == 15
    assert loc.line("rule", 1, "sub") == 17
    assert loc.line("resource", 0, "devices") == 20
    assert [loc.line("resource", 0, "devices", j) for j in range(2)] == [20, 22]
    assert loc.line("", 0, "rule") == 2 and loc.line("", 0, "resource") == 19


def test_inline_arrays_of_tables_are_located_by_element():
    with pytest.raises(PolicyError) as e:
        policy('rule = [\n  { users = "alice", address = "04:00.0" },\n  { users = "alice" },\n]\n')
    assert str(e.value).startswith("p/10-t.toml:3: [[rule]]: no device matcher")


# ---------------------------------------------------------------- the examples in policy/

@pytest.fixture(scope="module")
def examples():
    return Policy.load(EXAMPLES, users=USERS)


def test_every_example_loads_alone_and_together(examples):
    names = sorted(n for n in os.listdir(EXAMPLES) if n.endswith(".toml"))
    assert len(names) >= 4
    for name in names:
        with open(os.path.join(EXAMPLES, name), "rb") as f:
            Policy.from_sources([(name, f.read())], users=USERS)
    assert [os.path.basename(f) for f in examples.files] == names
    assert sorted(examples.resources) == ["fast-nic", "gpu"]


def test_example_nics_for_the_dpdk_group(examples):
    d = examples.decide(ICH10, caller("bob"), 8, "", {"persistent": True})
    assert d.allowed and (d.backend, d.persistent, d.memlock) == ("vfio", True, 1 << 30)
    assert not examples.decide(ICH10, caller("alice"), 8).allowed
    assert not examples.decide(ICH10, caller("bob"), 8, "libvirt").allowed
    # the onboard NIC carries the default route: protected
    d = examples.decide(ICH10, caller("bob"), 2)
    assert not d.allowed and "protected (default route NIC" in d.reason


def test_example_vfs_for_vms(examples):
    """The same VF is decided by different rules for different callers."""
    sriov = host("sriov")
    vf_group = examples.resolve(sriov, "01:10.4").group
    d = examples.decide(sriov, caller("alice"), vf_group)
    assert d.allowed and d.rule.endswith("15-vm-vfs.toml:10") and d.backend == "libvirt"
    assert (d.max_duration, d.memlock) == (7 * 86400, 8 << 30)
    d = examples.decide(sriov, caller("dpdk-svc"), vf_group)
    assert d.allowed and d.rule.endswith("10-dpdk-nics.toml:11") and d.backend == "vfio"
    assert examples.decide(sriov, caller("carol"), vf_group).allowed         # kvm is carol's primary group
    assert not examples.decide(sriov, Caller.from_uid(0, USERS), vf_group).allowed


def test_example_gpu_for_alice_through_libvirt(examples):
    gpu = host("gpu")
    t = examples.resolve(gpu, "name:gpu")
    assert (t.group, t.resource) == (2, "gpu")
    d = examples.decide(gpu, caller("alice"), t.group)
    assert d.allowed and (d.backend, d.max_duration, d.persistent, d.memlock) == ("libvirt", 12 * 3600, False, 16 << 30)
    assert not examples.decide(gpu, caller("alice"), t.group, "", {"duration": 13 * 3600}).allowed
    assert not examples.decide(gpu, caller("alice"), t.group, "", {"persistent": True}).allowed
    assert not examples.decide(gpu, caller("bob"), t.group).allowed
    with pytest.raises(NotFound, match="subsystem 10de:119e, the policy names subsystem 1458:3702 \\(card swapped"):
        examples.resolve(ICH10, "name:gpu")           # ICH10 has another GTX 1080 board


def test_example_pci_stub_for_root_only(examples):
    group = examples.resolve(ICH10, "0000:00:1b.0").group
    d = examples.decide(ICH10, Caller.from_uid(0, USERS), group, "", {"persistent": True})
    assert d.allowed and d.backend == "pci-stub"
    assert not examples.decide(ICH10, Caller.from_uid(0, USERS), group, "vfio").allowed
    assert not examples.decide(ICH10, caller("bob"), group).allowed


def test_example_boot_claim(examples):
    (claim,) = examples.claims
    assert (claim.target, claim.user, claim.uid, claim.backend) == ("name:fast-nic", "dpdk-svc", 990, "vfio")
    assert claim.source == os.path.join(EXAMPLES, "40-dpdk-claim.toml") + ":15"
    # what the daemon will do with it at start
    target = examples.resolve(ICH10, claim.target)
    d = examples.decide(ICH10, Caller.from_uid(claim.uid, USERS), target.group, claim.backend, {"persistent": True})
    assert d.allowed and target.group == 8


def test_the_first_problem_in_a_file_is_reported():
    with pytest.raises(PolicyError, match=r"^p/10-t.toml:2: key 'usres'"):
        policy('[[rule]]\nusres = 1\n[[resource]]\nname = 5\n')
    with pytest.raises(PolicyError, match=r"^p/10-t.toml:2: key 'name'"):
        policy('[[resource]]\nname = 5\ndevices = []\n[[rule]]\nusres = 1\n')


def test_a_policy_anyone_may_write_is_refused(tmp_path):
    d = tmp_path / "policy.d"
    d.mkdir()
    (d / "10-a.toml").write_text(ALLOW)
    assert Policy.load(str(d), users=USERS).rules
    os.chmod(d / "10-a.toml", 0o666)
    with pytest.raises(PolicyError, match=r"10-a.toml: writable by anyone \(mode 0666\)"):
        Policy.load(str(d), users=USERS)
    os.chmod(d / "10-a.toml", 0o664)
    with pytest.raises(PolicyError, match=r"10-a.toml: writable by its group \(mode 0664\)"):
        Policy.load(str(d), users=USERS)
    os.chmod(d / "10-a.toml", 0o644)
    os.chmod(d, 0o777)
    with pytest.raises(PolicyError, match=r"policy.d: writable by anyone \(mode 0777\)"):
        Policy.load(str(d), users=USERS)


@pytest.mark.parametrize("first, second, expected", [
    ("reset_on_release = true", "", True),           # one rule asking is enough: it protects the host
    ("reset_on_release = false", "reset_on_release = true", True),
    ("reset_on_release = false", "", False),
    ("", "", False),
])
def test_reset_on_release(first, second, expected):
    pol = policy(rule('address = "04:00.0"', extra=first), rule('address = "05:00.0"', extra=second))
    d = pol.decide(ICH10, caller("alice"), 8)
    assert d.allowed and d.reset_on_release is expected


def test_reset_on_release_takes_a_boolean_and_no_deny_rule():
    with pytest.raises(PolicyError, match=r"10-t\.toml:4: key 'reset_on_release': expected true or false, got the string 'yes'"):
        policy(rule(NICS, extra='reset_on_release = "yes"'))
    with pytest.raises(PolicyError, match="reset_on_release"):
        policy(rule(NICS, extra='action = "deny"\nreset_on_release = true'))
