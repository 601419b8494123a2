"""The policy for mediated devices: ``mdev:PARENT/TYPE`` targets and ``mdev_types`` rules.

A rule for PCI devices never allows an mdev, and a rule for mdev types never matches a
PCI device; the first mdev rule naming the type and the caller decides."""

import pytest

from vfiod.errors import InvalidArgument
from vfiod.policy import Policy, parse_target
from vfiod.sim import hosts
from vfiod.sysfs.mdev import MdevKind
from vfiod.sysfs import SysfsReader
from vfiod.topology import Host

from .policy_corpus.kit import USERS, caller

MTTY2 = MdevKind("mtty", "mtty-2")


def policy(text):
    return Policy.from_sources([("10-x.toml", text)], users=USERS)


@pytest.mark.parametrize("target", ["mdev:", "mdev:mtty", "mdev:../x/y", "mdev:../x", "mdev:mtty/..",
                                    "mdev:mtty/mtty-2/create", "mdev:mtty/mtty 2", "mdev:/mtty-2"])
def test_malformed_mdev_targets_are_named_errors(target):
    with pytest.raises(InvalidArgument, match="not an mdev target"):
        parse_target(target)


def test_an_mdev_target():
    assert parse_target("mdev:mtty/mtty-2") == ("mdev", MTTY2)


def test_a_pci_rule_never_allows_an_mdev():
    pol = policy('[[rule]]\nids = "*:*"\neveryone = true\n\n[[rule]]\ngroup = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]\n'
                 'everyone = true\n')
    d = pol.decide_mdev(caller("alice"), MTTY2)
    assert not d.allowed and "rules for PCI devices never allow mdevs" in d.reason


def test_an_mdev_rule_never_matches_a_pci_device(tmp_path):
    host = Host.scan(SysfsReader(hosts.build_spec(hosts.ICH10, str(tmp_path))))
    pol = policy('[[rule]]\nmdev_types = "*/*"\neveryone = true\n')
    d = pol.decide(host, caller("alice"), 8)
    assert not d.allowed and "no rule matched" in d.reason


def test_the_first_mdev_rule_naming_type_and_caller_decides():
    pol = policy('[[rule]]\naction = "deny"\nmdev_types = "mtty/mtty-1"\neveryone = true\ncomment = "one port"\n\n'
                 '[[rule]]\nmdev_types = ["mtty/mtty-*"]\nusers = ["alice"]\nmax_duration = "1h"\nmemlock = "64M"\n\n'
                 '[[rule]]\nmdev_types = "nvidia-*/*"\ngroups = ["kvm"]\n')
    d = pol.decide_mdev(caller("alice"), MTTY2)
    assert d.allowed and d.backend == "vfio" and d.max_duration == 3600 and d.memlock == 64 << 20
    assert d.rule == "10-x.toml:7"
    assert not pol.decide_mdev(caller("bob"), MTTY2).allowed
    one = pol.decide_mdev(caller("alice"), MdevKind("mtty", "mtty-1"))
    assert not one.allowed and "denied by rule 10-x.toml:1 (one port)" in one.reason
    assert pol.decide_mdev(caller("carol"), MdevKind("nvidia-0", "nvidia-63")).allowed     # kvm member
    terms = pol.decide_mdev(caller("alice"), MTTY2, options={"duration": 7200})
    assert not terms.allowed and "at most 1h" in terms.reason
    assert not pol.decide_mdev(caller("alice"), MTTY2, options={"persistent": True}).allowed
    assert not pol.decide_mdev(caller("alice"), MTTY2, "pci-stub").allowed
    with pytest.raises(InvalidArgument, match="unknown backend"):
        pol.decide_mdev(caller("alice"), MTTY2, "nope")


def test_resolve_says_an_mdev_target_names_no_group(tmp_path):
    host = Host.scan(SysfsReader(hosts.build_spec(hosts.ICH10, str(tmp_path))))
    with pytest.raises(InvalidArgument, match="names a type of mediated device, not an IOMMU group"):
        policy('[[rule]]\nmdev_types = "*/*"\neveryone = true\n').resolve(host, "mdev:mtty/mtty-2")
