"""The revoke ladder on the simulated kernel, with real holder processes.

The simulated kernel makes an unbind from vfio-pci wait while any process holds
the group's node open (as the real one waits for device fds); the holders are
real processes of the lessee's uid (or of others), found by vfiod in /proc and
ended for real.  The real kernel's request eventfd, QEMU and DPDK are the guest
tier's (tests/guest/test_revoke_guest.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vfiod.address import PciAddress
from vfiod.errors import PermissionDenied
from vfiod.leases import Ended, Revoking
from vfiod.policy import Caller, Policy
from vfiod.sim import hosts

from .leasekit import Kit

A = PciAddress.parse
LESSEE = 1000
OTHER = 1001
SPEC = hosts.HostSpec.from_table("revoke", "a NIC alone, and one vfio-pci holds from boot", """
00:1c.0  -        8086:2940  060400  rootport   pcieport   1      acs
01:00.0  00:1c.0  8086:10d3  020000  endpoint   e1000e     5      net=ens1
00:1d.0  -        8086:2940  060400  rootport   pcieport   3      acs
02:00.0  00:1d.0  8086:10d3  020000  endpoint   vfio-pci   6
""")
NIC, BOOT_VFIO = A("01:00.0"), A("02:00.0")

HOLDER = r"""
import os, signal, sys, time
fd = int(sys.argv[1])
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if sys.argv[2] == "pass":
    # hand the fd to a child over SCM_RIGHTS, as a VFIO user hands a device fd on, and close ours
    import socket
    a, b = socket.socketpair()
    if os.fork() == 0:
        a.close()
        _, fds, _, _ = socket.recv_fds(b, 1, 1)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("child", os.getpid(), flush=True)
        b.send(b"k")                    # the parent speaks after: the two lines never mix
        while True:
            time.sleep(1)
    socket.send_fds(a, [b"x"], [fd])
    os.close(fd)
    a.recv(1)
print("holding", flush=True)
while True:
    time.sleep(1)
"""


def policy(grace="1s", on_revoke=None, others=False, max_duration=None, uids=(LESSEE,)):
    extra = f'on_revoke = "{on_revoke}"\n' if on_revoke else ""
    extra += "revoke_others = true\n" if others else ""
    extra += f'max_duration = "{max_duration}"\n' if max_duration else ""
    return Policy.from_sources([("10-test.toml", (
        f'[[rule]]\naddress = ["{NIC}", "{BOOT_VFIO}"]\nuids = {json.dumps(list(uids))}\n'
        f'backends = ["vfio", "pci-stub"]\npersistent = true\nrevoke_grace = "{grace}"\n' + extra))])


@pytest.fixture
def kit(tmp_path):
    k = Kit(tmp_path, spec=SPEC)
    k.policy = policy()
    k.manager.kill_after = 0.5
    procs: list[subprocess.Popen[str]] = []
    k.procs = procs
    yield k
    for p in procs:                     # each holder leads its own session: its children go too
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def hold(kit, lease, uid=LESSEE, mode="plain"):
    """A real process of `uid` holding the lease's /dev/vfio/N open (waits until it does).
    The node is opened here and the fd handed down: the test's tree is root's alone."""
    fd = os.open(kit.kernel.vfio_group_path(lease.group), os.O_RDWR)
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(fd), mode], user=uid, group=uid, extra_groups=[],
                         stdout=subprocess.PIPE, text=True, pass_fds=(fd,), cwd="/", start_new_session=True)
    os.close(fd)
    kit.procs.append(p)
    lines = [p.stdout.readline().strip()]
    if mode == "pass":
        lines.append(p.stdout.readline().strip())
    assert "holding" in lines, lines
    return p, [int(line.split()[1]) for line in lines if line.startswith("child")]


def turn(kit, lease_id, until_s=15.0):
    """Turn the ladder as the daemon does (every 0.1 s here) until the lease ended."""
    deadline = time.monotonic() + until_s
    while time.monotonic() < deadline:
        got = kit.manager.advance(lease_id)
        if isinstance(got, Ended):
            return got
        if got is None:
            return None
        time.sleep(0.1)
    raise AssertionError(f"lease {lease_id} still {kit.manager.get(lease_id).state} after {until_s} s")


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_holder_that_will_not_let_go_is_ended_after_the_grace_and_the_device_goes_home(kit):
    lease = kit.manager.request(Caller(LESSEE), str(NIC), "vfio", {})
    p, _ = hold(kit, lease, mode="stubborn")               # ignores SIGTERM: needs the SIGKILL
    t0 = time.monotonic()
    got = kit.manager.revoke(lease.id, "maintenance", Caller(0))
    assert isinstance(got, Revoking) and [h.pid for h in got.holders] == [p.pid]
    assert kit.journal.lease(lease.id).state == "revoking"
    assert kit.kernel.node_owner(kit.kernel.vfio_group_path(lease.group))[0] == 0   # taken back at once
    ended = turn(kit, lease.id)
    took = time.monotonic() - t0
    assert ended.reason == "revoked"
    assert p.wait(5) == -signal.SIGKILL
    assert kit.kernel.driver_of(NIC) == "e1000e"
    assert kit.journal.leases() == []
    assert 1.0 <= took < 1.0 + 0.5 + 5, took               # grace, then TERM, KILL 0.5 s later
    steps = [r for r in kit.journal.audit_rows() if r[0] == "revoke"]
    assert [r[5] for r in steps] == ["revoking", "ended", "ended"]
    assert "SIGTERM" in steps[1][6] and "SIGKILL" in steps[2][6] and f"pid {p.pid}" in steps[2][6]


def test_a_holder_that_goes_within_the_grace_is_not_signalled(kit):
    kit.policy = policy(grace="30s")
    lease = kit.manager.request(Caller(LESSEE), str(NIC), "vfio", {})
    p, _ = hold(kit, lease)
    got = kit.manager.revoke(lease.id, "maintenance", Caller(0))
    assert isinstance(got, Revoking)
    p.terminate()                       # the holder lets go on its own (here: it ends)
    p.wait(5)
    ended = turn(kit, lease.id, until_s=10)
    assert ended.reason == "revoked"
    assert kit.kernel.driver_of(NIC) == "e1000e"
    assert not [r for r in kit.journal.audit_rows() if r[5] == "ended"]


def test_a_fd_passed_to_a_child_over_scm_rights_is_found(kit):
    lease = kit.manager.request(Caller(LESSEE), str(NIC), "vfio", {})
    p, (child,) = hold(kit, lease, mode="pass")
    holders = kit.manager.holders(kit.journal.lease(lease.id))
    assert [h.pid for h in holders] == [child]          # the sender closed its own copy
    kit.manager.revoke(lease.id, "maintenance", Caller(0))
    turn(kit, lease.id)
    assert not alive(child)
    assert kit.kernel.driver_of(NIC) == "e1000e"


def test_another_uids_holder_is_never_ended_unless_the_policy_says_so(kit):
    lease = kit.manager.request(Caller(LESSEE), str(NIC), "vfio", {})
    p, _ = hold(kit, lease, uid=OTHER)
    root, _ = hold(kit, lease, uid=0)
    kit.manager.revoke(lease.id, "maintenance", Caller(0))
    time.sleep(1.5)                               # the grace (1 s) is over
    for _ in range(10):
        assert isinstance(kit.manager.advance(lease.id), Revoking)
        time.sleep(0.1)
    assert p.poll() is None and root.poll() is None          # neither was touched
    assert kit.kernel.driver_of(NIC) is None or kit.kernel.driver_of(NIC) == "vfio-pci"
    assert kit.journal.lease(lease.id).state == "revoking"
    # An admin who allows it: the policy's revoke_others, recorded with the next lease.
    root.kill()
    p.kill()
    p.wait()
    root.wait()
    turn(kit, lease.id)
    kit.policy = policy(others=True)
    lease = kit.manager.request(Caller(LESSEE), str(NIC), "vfio", {})
    p, _ = hold(kit, lease, uid=OTHER)
    kit.manager.revoke(lease.id, "maintenance", Caller(0))
    turn(kit, lease.id)
    assert p.wait(5) == -signal.SIGTERM
    assert kit.kernel.driver_of(NIC) == "e1000e"


def test_on_revoke_wait_waits_for_the_holder(kit):
    kit.policy = policy(on_revoke="wait")
    lease = kit.manager.request(Caller(LESSEE), str(NIC), "vfio", {})
    p, _ = hold(kit, lease)
    kit.manager.revoke(lease.id, "maintenance", Caller(0))
    time.sleep(1.5)
    assert isinstance(kit.manager.advance(lease.id), Revoking)
    assert p.poll() is None
    p.terminate()
    p.wait()
    assert turn(kit, lease.id).reason == "revoked"
    assert kit.kernel.driver_of(NIC) == "e1000e"


def test_only_root_revokes(kit):
    lease = kit.manager.request(Caller(LESSEE), str(NIC), "vfio", {})
    with pytest.raises(PermissionDenied):
        kit.manager.revoke(lease.id, "mine now", Caller(LESSEE))
    assert kit.journal.lease(lease.id).state == "granted"


def test_expiry_of_a_held_lease_goes_through_the_ladder(kit):
    kit.policy = policy(max_duration="1s")
    lease = kit.manager.request(Caller(LESSEE), str(NIC), "vfio", {})
    p, _ = hold(kit, lease, mode="stubborn")
    time.sleep(1.1)
    assert kit.manager.expire_due() == []               # not ended yet: on the ladder
    assert kit.journal.lease(lease.id).revoke_reason == "expired"
    assert turn(kit, lease.id).reason == "expired"
    assert p.wait(5) == -signal.SIGKILL
    assert kit.kernel.driver_of(NIC) == "e1000e"


def test_max_duration_caps_the_whole_lease_not_each_renewal(kit):
    kit.policy = policy(max_duration="60s")
    lease = kit.manager.request(Caller(LESSEE), str(NIC), "vfio", {})
    kit.manager.clock = lambda: time.time() + 30            # half-way through
    with pytest.raises(PermissionDenied, match="caps lease"):
        kit.manager.renew(lease.id, Caller(LESSEE), 60)     # allowed on its own, not past the cap
    assert kit.journal.lease(lease.id).expires == lease.expires
    kit.manager.renew(lease.id, Caller(LESSEE), 20)
    assert kit.journal.lease(lease.id).expires <= lease.created + 60.5


def test_a_release_while_the_group_is_held_is_revoked_not_left_half_done(kit):
    lease = kit.manager.request(Caller(LESSEE), str(NIC), "vfio", {})
    p, _ = hold(kit, lease, mode="stubborn")
    t0 = time.monotonic()
    assert kit.manager.release(lease.id, Caller(LESSEE)) is None
    assert time.monotonic() - t0 < 1.0                  # no unbind waited on in the kernel
    row = kit.journal.lease(lease.id)
    assert (row.state, row.revoke_reason) == ("revoking", "released")
    assert turn(kit, lease.id).reason == "released"
    assert kit.kernel.driver_of(NIC) == "e1000e"


def test_a_group_on_vfio_pci_from_boot_is_never_granted_while_the_last_holder_has_it(kit):
    lease = kit.manager.request(Caller(LESSEE), str(BOOT_VFIO), "vfio", {})
    p, _ = hold(kit, lease, mode="stubborn")
    assert kit.manager.release(lease.id, Caller(LESSEE)) is None
    with pytest.raises(Exception, match="already leased"):
        kit.manager.request(Caller(OTHER), str(BOOT_VFIO), "vfio", {})
    turn(kit, lease.id)
    assert p.wait(5) == -signal.SIGKILL                 # the old holder is gone ...
    assert kit.kernel.driver_of(BOOT_VFIO) == "vfio-pci"   # ... and the host driver is back
    kit.policy = policy(uids=(LESSEE, OTHER))
    again = kit.manager.request(Caller(OTHER), str(BOOT_VFIO), "vfio", {})
    assert kit.manager.holders(kit.journal.lease(again.id)) == []


def test_a_policy_reload_that_no_longer_allows_a_lease_revokes_it(kit):
    lease = kit.manager.request(Caller(LESSEE), str(NIC), "vfio", {})
    kept = kit.manager.request(Caller(LESSEE), str(BOOT_VFIO), "vfio", {})
    kit.policy = Policy.from_sources([("10-test.toml", f'[[rule]]\naddress = ["{BOOT_VFIO}"]\nuids = [{LESSEE}]\n')])
    got = kit.manager.revoke_disallowed(kit.policy)
    assert [g.lease.id for g in got] == [lease.id]
    assert isinstance(got[0], Ended) and got[0].reason == "revoked"      # nobody held it: at once
    assert [r[5] for r in kit.journal.audit_rows() if r[0] == "revoke"] == ["revoking"]
    assert [row.id for row in kit.journal.leases()] == [kept.id]
    assert kit.kernel.driver_of(NIC) == "e1000e"


def test_a_lease_stuck_releasing_is_finished_by_the_ladder(kit):
    lease = kit.manager.request(Caller(LESSEE), str(NIC), "vfio", {})
    from vfiod.sim.kernel import Fault
    kit.kernel.inject("probe", NIC, Fault("error"))
    with pytest.raises(Exception, match="will be retried"):
        kit.manager.release(lease.id, Caller(LESSEE))
    assert kit.journal.lease(lease.id).state == "revoking"        # never left "releasing"
    assert turn(kit, lease.id).reason == "released"
    assert kit.kernel.driver_of(NIC) == "e1000e"


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ladder_child(kit, lease_id, crash_at):
    return subprocess.run([sys.executable, "-m", "tests.sim.revokechild", kit.root, kit.state_path, lease_id,
                           crash_at], cwd=ROOT, capture_output=True, text=True, timeout=120)


def _granted_and_held(tmp_path, name):
    k = Kit(tmp_path / name, spec=SPEC)
    k.policy = policy()
    k.manager.kill_after = 0.5
    k.procs = []
    lease = k.manager.request(Caller(LESSEE), str(NIC), "vfio", {"persistent": True})
    p, _ = hold(k, lease, mode="stubborn")
    return k, lease, p


def test_sigkill_of_vfiod_at_each_step_of_the_ladder_then_a_restart_finishes_the_revoke(tmp_path):
    k, lease, p = _granted_and_held(tmp_path, "dry")
    try:
        run = _ladder_child(k, lease.id, "none")
        assert run.returncode == 0, run.stderr[-2000:]
    finally:
        p.kill()
    points = list(dict.fromkeys(run.stdout.split()))
    for want in ("revoke", "ask-intent", "ask-done", "end-holder-intent:TERM", "end-holder-done:TERM",
                 "end-holder-intent:KILL", "end-holder-done:KILL", "releasing", "released"):
        assert want in points, (want, points)
    for i, point in enumerate(points):
        k, lease, p = _granted_and_held(tmp_path, f"case{i}")
        try:
            run = _ladder_child(k, lease.id, point)
            assert run.returncode == -9, (point, run.returncode, run.stderr[-2000:])
            # The restart: a new manager on the same journal and tree.
            again = Kit(tmp_path / f"case{i}", spec=SPEC)
            again.manager.kill_after = 0.5
            ended = again.manager.reconcile()      # a release cut short is finished here
            assert [e.reason for e in ended] in ([], ["revoked"]), (point, ended)
            row = again.journal.lease(lease.id)
            if row is not None:
                assert row.state == "revoking", (point, row)
                assert turn(again, lease.id).reason == "revoked", point
            assert again.journal.leases() == [], point
            assert again.kernel.driver_of(NIC) == "e1000e", point
            assert p.wait(10) in (-signal.SIGKILL, -signal.SIGTERM), point
        finally:
            if p.poll() is None:
                p.kill()


def test_a_revoke_whose_lease_another_turn_of_the_ladder_ended_says_it_ended(kit):
    # The unbind's uevent turns the ladder at once, in another thread: the lease this
    # revoke started may be over before the revoke looks again.  That is its end, not
    # "no lease".
    lease = kit.manager.request(Caller(LESSEE), str(NIC), "vfio", {})
    ladder = kit.manager.ladder
    real = ladder.advance
    turned = []

    def another_thread_turned_it(lease_id):
        turned.append(real(lease_id))
        return None                     # as the revoke's own turn finds a lease already over

    ladder.advance = another_thread_turned_it
    got = kit.manager.revoke(lease.id, "maintenance", Caller(0))
    assert isinstance(turned[0], Ended) and kit.journal.lease(lease.id) is None
    assert isinstance(got, Ended) and got.lease.id == lease.id and got.reason == "revoked"
    assert kit.kernel.driver_of(NIC) == "e1000e"
