"""Revocation on the kernel's word, on the simulated kernel with real holder processes.

A file of the group no process has (in flight over SCM_RIGHTS, queued in another
daemon's message) is modelled by `SimKernel.in_flight` (the real kernel's answer is
tests/guest/test_kernels_word_guest.py); everything else is real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from vfiod.errors import Busy
from vfiod.leases import Ended, Revoking
from vfiod.policy import Caller

from .test_revoke import BOOT_VFIO, LESSEE, NIC, OTHER, hold, kit, policy, turn  # noqa: F401  (kit: a fixture)


def test_a_file_in_flight_keeps_a_release_revoking_the_group_from_others_and_the_admin_told(kit):
    lease = kit.manager.request(Caller(LESSEE), str(NIC), "vfio", {})
    kit.kernel.in_flight[lease.group] += 1          # sent over SCM_RIGHTS, not received: in no /proc/PID/fd
    assert kit.manager.release(lease.id, Caller(LESSEE)) is None
    for _ in range(15):                             # the grace (1 s) and more
        got = kit.manager.advance(lease.id)
        assert isinstance(got, Revoking) and got.holders == (), got
        time.sleep(0.1)
    assert kit.journal.lease(lease.id).state == "revoking"
    assert kit.kernel.driver_of(NIC) != "e1000e"     # unbound (a group file does not hold the unbind), not given back
    waits = kit.manager.revoke_waiting(lease.id)
    assert "EBUSY" in waits and "held by a process vfiod cannot find" in waits, waits
    assert [r[6] for r in kit.journal.audit_rows() if r[5] == "waiting"] == [waits]
    kit.policy = policy(uids=(LESSEE, OTHER))
    with pytest.raises(Busy, match="already leased"):
        kit.manager.request(Caller(OTHER), str(NIC), "vfio", {})
    kit.kernel.in_flight[lease.group] -= 1          # received and closed
    assert turn(kit, lease.id).reason == "released"
    assert kit.kernel.driver_of(NIC) == "e1000e"
    again = kit.manager.request(Caller(OTHER), str(NIC), "vfio", {})
    assert kit.journal.lease(again.id).state == "granted"


def test_a_group_held_by_a_file_vfiod_cannot_see_is_given_to_nobody(kit):
    group = kit.manager.group_of(BOOT_VFIO)
    before = kit.snapshot()
    kit.kernel.in_flight[group] += 1                # a holder from before vfiod, its fd in flight
    with pytest.raises(Busy, match="still held.*EBUSY"):
        kit.manager.request(Caller(LESSEE), str(BOOT_VFIO), "vfio", {})
    assert kit.journal.leases() == [] and kit.snapshot() == before
    assert [r[5] for r in kit.journal.audit_rows() if r[0] == "grant"] == ["held", "rolled-back"]
    kit.kernel.in_flight[group] -= 1
    lease = kit.manager.request(Caller(LESSEE), str(BOOT_VFIO), "vfio", {})
    assert kit.journal.lease(lease.id).state == "granted"


def test_no_other_process_opens_the_group_between_the_bind_and_the_hand_over(kit):
    seen = []

    def at(name):
        if name == "hand-over-intent":
            try:
                os.close(kit.kernel.open_vfio_group(kit.manager.group_of(NIC)))
                seen.append("opened")
            except OSError as e:
                seen.append(e.errno)
    kit.manager.on_step = at
    kit.manager.request(Caller(LESSEE), str(NIC), "vfio", {})
    import errno
    assert seen == [errno.EBUSY]                    # vfiod holds it until the lessee may have it
    assert kit.kernel.claimed[kit.manager.group_of(NIC)] == 0


def test_root_and_a_system_daemon_holding_the_group_are_never_signalled_even_with_revoke_others(kit):
    kit.policy = policy(others=True)
    lease = kit.manager.request(Caller(LESSEE), str(NIC), "vfio", {})
    root, _ = hold(kit, lease, uid=0)
    daemon, _ = hold(kit, lease, uid=OTHER)
    kit.manager.protected_pids.add(daemon.pid)      # as the bus daemon is
    other, _ = hold(kit, lease, uid=OTHER)
    kit.manager.revoke(lease.id, "maintenance", Caller(0))
    time.sleep(1.2)
    for _ in range(12):
        assert isinstance(kit.manager.advance(lease.id), Revoking)
        time.sleep(0.1)
    assert other.wait(5) == -signal.SIGTERM         # another user's, and the policy allows it
    assert root.poll() is None and daemon.poll() is None
    waits = kit.manager.revoke_waiting(lease.id)
    assert f"pid {root.pid}" in waits and "system user (uid 0)" in waits, waits
    assert f"pid {daemon.pid}" in waits and "the bus daemon, which vfiod never ends" in waits, waits
    ended = [r[6] for r in kit.journal.audit_rows() if r[5] == "ended"]
    assert ended and all(f"pid {other.pid}" in e for e in ended), ended
    root.kill()
    daemon.kill()
    root.wait()
    daemon.wait()
    assert turn(kit, lease.id).reason == "revoked"


def test_a_scope_member_of_another_uid_is_spared_and_the_lessees_are_ended(kit):
    lease = kit.manager.request(Caller(LESSEE), str(NIC), "vfio", {})
    mine = subprocess.Popen(["sleep", "600"], user=LESSEE, group=LESSEE, extra_groups=[], start_new_session=True)
    roots = subprocess.Popen(["sleep", "600"], start_new_session=True)     # e.g. a set-uid program's
    kit.procs.extend([mine, roots])
    kit.journal.set_scope(lease.id, f"vfiod-lease-{lease.id}.scope")
    from vfiod.sysfs.procs import describe_process
    kit.manager.scope_members = lambda scope: [describe_process(pid, f"a member of {scope}")
                                               for pid in (mine.pid, roots.pid)]
    p, _ = hold(kit, lease)
    kit.manager.revoke(lease.id, "maintenance", Caller(0))
    ended = turn(kit, lease.id)
    assert ended.reason == "revoked"
    assert mine.wait(5) == -signal.SIGTERM and p.wait(5) == -signal.SIGTERM
    assert roots.poll() is None                      # root's: never the lease's to end
    assert any("every process of vfiod-lease-" in r[6] and f"pid {mine.pid}" in r[6] and str(roots.pid) not in r[6]
               for r in kit.journal.audit_rows() if r[5] == "ended")


MANY = r"""
import os, resource, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20000), hard))
fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(int(sys.argv[1]))]
print("holding", len(fds), flush=True)
time.sleep(600)
"""


def test_a_release_reads_only_the_lessees_processes_not_another_users_thousands_of_fds(kit):
    many = subprocess.Popen([sys.executable, "-c", MANY, "5000"], user=OTHER, group=OTHER, extra_groups=[],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    kit.procs.append(many)
    assert many.stdout.readline().startswith("holding")
    lease = kit.manager.request(Caller(LESSEE), str(NIC), "vfio", {})
    p, _ = hold(kit, lease)
    search = kit.manager.ladder.search(kit.journal.lease(lease.id), fresh=True)
    assert [h.pid for h in search.holders] == [p.pid]
    assert many.pid not in search.seen and p.pid in search.seen
    assert search.fds < 500, search                 # not the other user's 5,000
    assert search.examined < search.listed
    p.kill()
    p.wait()
    assert isinstance(kit.manager.release(lease.id, Caller(LESSEE)), Ended)
    assert kit.kernel.driver_of(NIC) == "e1000e"


def test_the_holder_search_is_rate_limited(kit):
    lease = kit.manager.request(Caller(LESSEE), str(NIC), "vfio", {})
    p, _ = hold(kit, lease, mode="stubborn")
    kit.manager.revoke(lease.id, "maintenance", Caller(0))
    first = kit.manager.ladder.search(kit.journal.lease(lease.id))
    for _ in range(5):
        kit.manager.advance(lease.id)
    assert kit.manager.ladder.search(kit.journal.lease(lease.id)) is first      # within a second: reused
    time.sleep(1.1)
    assert kit.manager.ladder.search(kit.journal.lease(lease.id)) is not first
    assert turn(kit, lease.id).reason == "revoked"


@pytest.mark.parametrize("cdevs", [None, "dev", "sysfs"])
def test_a_release_looks_for_processes_only_where_the_claim_cannot_answer_for_the_devices(kit, cdevs):
    """Without VFIO device cdevs, vfiod's own open of the group's node is the kernel's word
    that no file of the group or of its devices exists: a release then reads no process.
    With them (``/dev/vfio/devices``, or sysfs giving the device's cdev a device number), a
    cdev opened and not bound holds its device without the group, so the processes are
    searched as before.  A holder of the group's node is
    found either way (the claim fails, then the search names it)."""
    if cdevs == "dev":
        os.makedirs(os.path.join(kit.kernel.roots.dev, "vfio", "devices"), exist_ok=True)
    elif cdevs == "sysfs":          # the kernel gave the NIC a cdev (its device number in sysfs)
        cdev = os.path.join(kit.kernel.roots.sysfs, "bus/pci/devices", NIC.sysfs_name, "vfio-dev", "vfio0")
        os.makedirs(cdev, exist_ok=True)
        with open(os.path.join(cdev, "dev"), "w") as f:
            f.write("511:0\n")
    searched = []
    real = kit.kernel.holders

    def counted(*args, **kwargs):
        searched.append(args[0])
        return real(*args, **kwargs)
    kit.kernel.holders = counted
    lease = kit.manager.request(Caller(LESSEE), str(NIC), "vfio", {})
    assert isinstance(kit.manager.release(lease.id, Caller(LESSEE)), Ended)
    assert kit.kernel.driver_of(NIC) == "e1000e"
    assert len(searched) == (1 if cdevs else 0), searched

    lease = kit.manager.request(Caller(LESSEE), str(NIC), "vfio", {})
    p, _ = hold(kit, lease)
    searched.clear()
    assert kit.manager.release(lease.id, Caller(LESSEE)) is None        # the ladder has it
    assert searched and [h.pid for h in kit.manager.ladder.holders(kit.journal.lease(lease.id))] == [p.pid]
    p.kill()
    p.wait()
    assert turn(kit, lease.id).reason == "released"
    assert kit.kernel.driver_of(NIC) == "e1000e"
