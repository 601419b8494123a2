"""The people of the simulated hosts: the users and groups the example policies name.

`vfioctl policy check|test|generate --simulate` look users and groups up here where
this system has no such name, so the examples (alice, bob, dpdk-svc, the dpdk and
kvm groups) check and test as written on any machine.  The daemon never uses them:
a real policy names real people."""

from __future__ import annotations

from .. import policy
from ..policy.users import LayeredUserDb, StaticUserDb, UserDb

#: Simulated uids sit above any a Debian system hands out by default, so none is mistaken
#: for a real user's.
PEOPLE = StaticUserDb(
    users={"alice": 61001, "bob": 61002, "dpdk-svc": 61003, "vfiod-dra": 61004},
    groups={"dpdk": (61100, ("alice", "dpdk-svc")), "kvm": (61101, ("alice", "bob")),
            "vfiod-admin": (61102, ("bob",))},
)


def users_for(simulate: str | None) -> UserDb:
    """This system's users; with a simulated host, its people too (this system's first)."""
    system = policy.system_users()
    return LayeredUserDb((system, PEOPLE)) if simulate else system
