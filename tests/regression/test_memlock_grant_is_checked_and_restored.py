"""The memlock grant goes only to a process of the lessee's uid, found through a
pidfd, and is restored when the lease ends.

Before, vfiod raised RLIMIT_MEMLOCK of whatever process had the pid captured
when the caller connected (a reused pid, a connection handed to another
user's process) and never lowered it again."""

import os
import resource
import subprocess
import sys

import attrs
import pytest

from vfiod.errors import PermissionDenied

from tests.sim.leasekit import Caller, Kit

# This machine may not give vfiod CAP_SYS_RESOURCE: grant within the hard limit.
HARD = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
SMALL = (1 << 20, HARD)
GIB = 4 << 20 if HARD == resource.RLIM_INFINITY else min(HARD, 4 << 20)
GOT = (GIB, HARD)


def limits(pid):
    return resource.prlimit(pid, resource.RLIMIT_MEMLOCK)


@pytest.fixture
def child():
    """A process of this test's uid with a small locked-memory limit."""
    p = subprocess.Popen([sys.executable, "-c", "import resource, time;"
                          f"resource.setrlimit(resource.RLIMIT_MEMLOCK, {SMALL}); time.sleep(60)"])
    try:
        deadline = 50
        while limits(p.pid) != SMALL and deadline:
            import time
            time.sleep(0.05)
            deadline -= 1
        yield p
    finally:
        p.kill()
        p.wait()


def grant_lease(kit, uid, group="group:8"):
    lease = kit.manager.request(Caller(uid), group, "vfio", {})
    return attrs.evolve(lease, memlock=GIB)


def test_the_grant_is_restored_when_the_lease_ends(tmp_path, child):
    kit = Kit(tmp_path, "ich10")
    lease = grant_lease(kit, os.getuid())
    assert kit.manager.grant_memlock(lease, child.pid) == GOT
    assert limits(child.pid) == GOT
    kit.manager.release(lease.id, Caller(os.getuid()))
    assert limits(child.pid) == SMALL


def test_two_leases_of_one_process_restore_once_the_last_ends(tmp_path, child):
    kit = Kit(tmp_path, "ich10")
    a = grant_lease(kit, os.getuid())
    b = grant_lease(kit, os.getuid(), "group:4")
    kit.manager.grant_memlock(a, child.pid)
    kit.manager.grant_memlock(b, child.pid)
    kit.manager.release(a.id, Caller(os.getuid()))
    assert limits(child.pid) == GOT
    kit.manager.release(b.id, Caller(os.getuid()))
    assert limits(child.pid) == SMALL


def test_a_process_of_another_uid_gets_nothing(tmp_path, child):
    kit = Kit(tmp_path, "ich10")
    lease = grant_lease(kit, 4242)                      # the child runs as this test's uid, not 4242
    with pytest.raises(PermissionDenied, match="runs as uid"):
        kit.manager.grant_memlock(lease, child.pid)
    assert limits(child.pid) == SMALL
    kit.manager.release(lease.id, Caller(4242))


def test_a_process_that_is_gone_gets_nothing(tmp_path):
    kit = Kit(tmp_path, "ich10")
    p = subprocess.Popen(["true"])
    p.wait()
    lease = grant_lease(kit, os.getuid())
    assert kit.manager.grant_memlock(lease, p.pid) is None
    kit.manager.release(lease.id, Caller(os.getuid()))
