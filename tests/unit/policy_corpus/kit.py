"""What the policy tests share: a user database, example hosts, policies from text."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import attrs

from vfiod.sim import hosts
from vfiod.address import PciAddress
from vfiod.policy import KNOWN_BACKENDS, Caller, Policy, StaticUserDb
from vfiod.sysfs import SysfsReader
from vfiod.topology import Host

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
GOOD = os.path.join(HERE, "good")
BAD = os.path.join(HERE, "bad")
EXAMPLES = os.path.join(ROOT, "policy")

#: Every user and group the corpus and the example policies name.
USERS = StaticUserDb(
    users={"root": 0, "alice": 1000, "bob": 1001, "carol": (1002, 36), "dpdk-svc": 990},
    groups={"root": (0, ()), "wheel": (10, ("root",)), "kvm": (36, ("alice",)),
            "dpdk": (2000, ("bob", "dpdk-svc")), "empty": (3000, ())},
)


def caller(name: str) -> Caller:
    """The caller `name` with the groups `USERS` gives it."""
    return Caller.from_uid(USERS.uid(name), USERS)


def A(text: str) -> PciAddress:
    return PciAddress.parse(text)


def policy(*texts: str, backends=KNOWN_BACKENDS) -> Policy:
    """A policy of one file per text, named p/10-t.toml, p/20-t.toml, … (in that order)."""
    return Policy.from_sources([(f"p/{10 * (i + 1)}-t.toml", t) for i, t in enumerate(texts)],
                               backends=backends, users=USERS)


_tmp = tempfile.mkdtemp(prefix="vfiod-policy-tests-")
atexit.register(shutil.rmtree, _tmp, True)
_raws: dict[str, tuple] = {}


def raws(name: str):
    """(raw devices, host facts) of an example host, scanned once per test run."""
    if name not in _raws:
        roots = hosts.build(name, os.path.join(_tmp, name))
        reader = SysfsReader(roots)
        _raws[name] = (tuple(reader.scan()), reader.facts())
    return _raws[name]


def host(name: str = "ich10", changes: dict[str, dict] | None = None, without=()) -> Host:
    """An example host; `changes` maps an address to RawDevice fields to change (a swapped card…),
    `without` lists addresses to leave out (a removed card)."""
    devices, facts = raws(name)
    norm = {A(a): c for a, c in (changes or {}).items()}
    gone = {A(a) for a in without}
    devices = [attrs.evolve(r, **norm[r.addr]) if r.addr in norm else r for r in devices if r.addr not in gone]
    return Host.from_raw(devices, facts)
