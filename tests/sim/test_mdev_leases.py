"""Leases of mediated devices on the simulated kernel: an instance of mtty/mtty-2 is made
for the lease, its emulated group handed over as any group, and removed at the end;
refusals change nothing; a crash at any point leaves no orphan instance; instances that
are not vfiod's (mdevctl's, an admin's, another boot's) are never removed.

The simulated kernel's mdev semantics (create, remove waiting for the group's holders)
are described in `vfiod.sim.kernel`; the real kernel's are the guest tier's
(tests/guest/test_mdev_guest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from vfiod.errors import Busy, InvalidArgument, NotFound, PermissionDenied
from vfiod.leases import Ended, Revoking
from vfiod.leases.verify import reconcile_at_start
from vfiod.sim import hosts
from vfiod.sim.kernel import Fault
from vfiod.state import HeldMdev

from .leasekit import MDEV_HOST, Caller, Kit
from .test_revoke import hold, turn

LESSEE, OTHER = Caller(1000), Caller(1001)
TARGET = "mdev:mtty/mtty-2"
ADMINS = "0b1e6d38-8a8b-4c57-9d52-9a2f3e1c0001"      # an instance mdevctl defines
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def kit(tmp_path):
    k = Kit(tmp_path, spec=MDEV_HOST)
    k.manager.kill_after = 0.5
    k.procs = []
    yield k
    for p in k.procs:
        try:
            os.killpg(p.pid, 9)
        except ProcessLookupError:
            pass
        p.wait()


def mdevctl_instance(kit):
    """An admin's instance of mtty-2, defined persistently by mdevctl and started."""
    d = os.path.join(kit.root, "etc/mdevctl.d/mtty")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, ADMINS), "w") as f:
        f.write('{"mdev_type": "mtty-2", "start": "auto"}\n')
    kit.kernel.create_mdev_behind_vfiods_back("mtty/mtty-2", ADMINS)


def unchanged(kit, before):
    assert kit.snapshot() == before
    assert kit.journal.leases() == [] and kit.journal.mdev.all() == []


def test_a_lease_makes_an_instance_hands_over_its_group_and_removes_it(kit):
    mdevctl_instance(kit)
    before = kit.snapshot()
    lease = kit.manager.request(LESSEE, TARGET, "", {}, owner=":1.5")
    held = kit.journal.mdev.of(lease.id)
    assert lease.state == "granted" and lease.backend == "vfio" and lease.target == TARGET
    assert kit.journal.held(lease.id) == []                      # no PCI device moves
    instances = kit.kernel.mdev_instances()
    assert instances[held.uuid] == lease.group and instances[ADMINS] != lease.group
    node = kit.kernel.vfio_group_path(lease.group)
    assert kit.kernel.node_owner(node) == (1000, 0, 0o600)
    assert kit.kernel.state() == before[0]                       # every PCI device where it was
    avail = os.path.join(kit.root, "sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2/available_instances")
    assert open(avail).read().strip() == "10"
    ended = kit.manager.release(lease.id, LESSEE)
    assert isinstance(ended, Ended) and ended.reason == "released"
    unchanged(kit, before)                                       # mdevctl's instance is still there
    assert [a for a in kit.journal.audit_rows() if a[5] == "granted"][0][2] == TARGET


def test_two_leases_two_instances_two_groups(kit):
    a = kit.manager.request(LESSEE, TARGET, "", {})
    b = kit.manager.request(LESSEE, "mdev:mtty/mtty-1", "", {})
    assert a.group != b.group and kit.journal.mdev.of(a.id).uuid != kit.journal.mdev.of(b.id).uuid
    for lease in (a, b):
        kit.manager.release(lease.id, LESSEE)
    assert kit.kernel.mdev_instances() == {}


@pytest.mark.parametrize("who,target,error,words", [
    (OTHER, TARGET, PermissionDenied, "no rule with mdev_types matched"),
    (LESSEE, "mdev:mtty/mtty-9", NotFound, "no mdev type mtty/mtty-9 on this host"),
    (LESSEE, "mdev:mdpy/mdpy", NotFound, "no mdev type mdpy/mdpy"),
    (LESSEE, "mdev:../x/y", InvalidArgument, "not an mdev target"),
    (LESSEE, "mdev:mtty/../../../kernel", InvalidArgument, "not an mdev target"),
    (LESSEE, "mdev:mtty", InvalidArgument, "not an mdev target"),
])
def test_refusals_are_named_and_change_nothing(kit, who, target, error, words):
    before = kit.snapshot()
    writes = len(kit.kernel.writes)
    with pytest.raises(error, match=words):
        kit.manager.request(who, target, "", {})
    unchanged(kit, before)
    assert len(kit.kernel.writes) == writes


def test_a_pci_rule_never_lets_an_mdev_in(kit):
    kit.policy = type(kit.policy).from_sources([("t.toml", '[[rule]]\nids = "*:*"\neveryone = true\n')])
    with pytest.raises(PermissionDenied, match="rules for PCI devices never allow mdevs"):
        kit.manager.request(LESSEE, TARGET, "", {})


def test_no_instance_left_is_busy(kit):
    path = os.path.join(kit.root, "sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2/available_instances")
    with open(path, "w") as f:
        f.write("0\n")
    before = kit.snapshot()
    with pytest.raises(Busy, match="no more instances"):
        kit.manager.request(LESSEE, TARGET, "", {})
    unchanged(kit, before)


def test_a_failed_create_leaves_nothing(kit):
    before = kit.snapshot()
    kit.kernel.inject("mdev-create", "mtty/mtty-2", Fault("error"))
    with pytest.raises(Exception, match="the kernel refused"):
        kit.manager.request(LESSEE, TARGET, "", {})
    unchanged(kit, before)


def test_a_failed_hand_over_removes_the_instance(kit, monkeypatch):
    before = kit.snapshot()

    real = kit.kernel.set_node_owner

    def refuse(path, uid, gid, mode):          # the hand-over's chown fails; taking back works
        if uid == 1000:
            from vfiod.errors import KernelError
            raise KernelError("chown refused (injected)")
        real(path, uid, gid, mode)
    monkeypatch.setattr(kit.kernel, "set_node_owner", refuse)
    with pytest.raises(Exception, match="chown refused"):
        kit.manager.request(LESSEE, TARGET, "", {})
    unchanged(kit, before)


def test_a_held_group_is_revoked_then_removed(kit):
    """The remove waits while the lessee holds the group open, as an unbind does: the
    release goes through the revoke ladder, which ends the holder."""
    lease = kit.manager.request(LESSEE, TARGET, "", {})
    uuid = kit.journal.mdev.of(lease.id).uuid
    p, _ = hold(kit, lease, uid=1000, mode="stubborn")
    assert kit.manager.release(lease.id, LESSEE) is None
    assert kit.journal.lease(lease.id).state == "revoking"
    assert uuid in kit.kernel.mdev_instances()                    # the remove waits for the holder
    kit.manager.revoke(lease.id, "maintenance", Caller(0))
    got = kit.manager.advance(lease.id)
    assert isinstance(got, Revoking) and [h.pid for h in got.holders] == [p.pid]
    kit.journal.start_revoke(lease.id, "released", 0.0)         # the grace is over
    ended = turn(kit, lease.id)
    assert ended is not None and p.wait(5) == -9
    assert kit.kernel.mdev_instances() == {} and kit.journal.mdev.all() == []


def test_an_instance_gone_behind_vfiods_back_ends_the_lease_and_its_number_is_left_alone(kit):
    lease = kit.manager.request(LESSEE, TARGET, "", {"persistent": True})
    uuid = kit.journal.mdev.of(lease.id).uuid
    kit.kernel._mdev_remove(uuid)                                 # an admin's echo 1 > remove
    kit.kernel.create_mdev_behind_vfiods_back("mtty/mtty-1", ADMINS)   # gets the same group number
    node = kit.kernel.vfio_group_path(lease.group)
    assert kit.kernel.mdev_instances()[ADMINS] == lease.group
    os.chown(node, 4242, 4242)                                    # the admin gave it to someone
    ended = kit.manager.reconcile()
    assert [e.reason for e in ended] == ["removed"]
    assert kit.kernel.node_owner(node)[:2] == (4242, 4242)        # not vfiod's to take back
    assert ADMINS in kit.kernel.mdev_instances() and kit.journal.leases() == []


def test_an_instance_removed_at_run_time_ends_its_lease(kit):
    lease = kit.manager.request(LESSEE, TARGET, "", {})
    kit.kernel._mdev_remove(kit.journal.mdev.of(lease.id).uuid)
    assert [(e.lease.id, e.reason) for e in kit.manager.expire_due()] == [(lease.id, "removed")]
    assert kit.journal.leases() == [] and kit.journal.mdev.all() == []


def test_a_journaled_uuid_that_is_not_vfiods_instance_is_never_removed(kit):
    """Rows of grants cut short whose UUID the kernel shows as mdevctl's, or of another type,
    or made in another boot: the rows go, the instances stay."""
    mdevctl_instance(kit)
    other = "0b1e6d38-8a8b-4c57-9d52-9a2f3e1c0002"
    later = "0b1e6d38-8a8b-4c57-9d52-9a2f3e1c0003"
    kit.kernel.create_mdev_behind_vfiods_back("mtty/mtty-1", other)
    kit.kernel.create_mdev_behind_vfiods_back("mtty/mtty-2", later)
    boot = kit.manager.reader.boot_id()
    kit.journal.mdev.intent(HeldMdev("a" * 16, ADMINS, "mtty", "mtty-2", boot))
    kit.journal.mdev.intent(HeldMdev("b" * 16, other, "mtty", "mtty-2", boot))
    kit.journal.mdev.intent(HeldMdev("c" * 16, later, "mtty", "mtty-2", "an-earlier-boot"))
    before = kit.kernel.mdev_instances()
    kit.manager.reconcile()
    assert kit.kernel.mdev_instances() == before and kit.journal.mdev.all() == []


def test_a_persistent_lease_is_kept_across_a_restart_and_ends_at_a_reboot(kit, tmp_path):
    lease = kit.manager.request(LESSEE, TARGET, "", {"persistent": True})
    uuid = kit.journal.mdev.of(lease.id).uuid
    kit.journal.set_meta("boot_id", kit.manager.reader.boot_id())
    again = Kit(tmp_path, spec=MDEV_HOST)
    assert reconcile_at_start(again.manager) == []
    assert again.journal.lease(lease.id).state == "granted"
    assert again.kernel.node_owner(again.kernel.vfio_group_path(lease.group))[0] == 1000
    # A reboot: the instance went with the old kernel; an instance of that UUID now is not vfiod's.
    again.kernel._mdev_remove(uuid)
    with open(os.path.join(again.root, "proc/sys/kernel/random/boot_id"), "w") as f:
        f.write("a-new-boot\n")
    again.kernel.create_mdev_behind_vfiods_back("mtty/mtty-2", uuid)
    third = Kit(tmp_path, spec=MDEV_HOST)
    ended = reconcile_at_start(third.manager)
    assert [e.reason for e in ended] == ["removed"]
    assert uuid in third.kernel.mdev_instances() and third.journal.leases() == []


def child(host_root, state, crash_at):
    return subprocess.run([sys.executable, "-m", "tests.sim.crashchild", host_root, state, crash_at, "mdev"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_a_crash_at_every_step_leaves_no_orphan_instance(tmp_path):
    """SIGKILL at every step of the grant and the release (each journal step and each
    sysfs write), restart, reconcile: either the lease is whole (its instance there, its
    node the lessee's) or nothing of it is left, and mdevctl's instance is untouched."""
    pristine = tmp_path / "pristine"
    kit = Kit(pristine, spec=MDEV_HOST)
    mdevctl_instance(kit)
    dry = tmp_path / "dry"
    shutil.copytree(pristine / "host", dry / "host", symlinks=True)
    run = child(str(dry / "host"), str(dry / "state.db"), "none")
    assert run.returncode == 0, run.stderr
    points = run.stdout.split()
    assert {"mdev-create-intent", "mdev-created", "granted", "remove-mdev-intent", "released"} <= set(points)
    before = kit.snapshot()
    kept = gone = 0
    for i, point in enumerate(points):
        case = tmp_path / f"case{i}"
        shutil.copytree(pristine / "host", case / "host", symlinks=True)
        os.makedirs(case / "state")
        run = child(str(case / "host"), str(case / "state/state.db"), point)
        assert run.returncode == -9, (point, run.stderr[-2000:])
        k = Kit(case, spec=MDEV_HOST, owner_alive=lambda lease: True)
        k.manager.reconcile()
        leases = k.journal.leases()
        if leases:
            (lease,) = leases
            held = k.journal.mdev.of(lease.id)
            assert lease.state == "granted", (point, lease)
            assert k.kernel.mdev_instances()[held.uuid] == lease.group, point
            assert k.kernel.node_owner(k.kernel.vfio_group_path(lease.group))[0] == 1000, point
            k.manager.release(lease.id, LESSEE)
            kept += 1
        else:
            gone += 1
        assert k.snapshot() == before, point
        assert k.journal.leases() == [] and k.journal.mdev.all() == [], point
    print(f"\nmdev crash points covered: {len(points)} ({kept} kept the lease, {gone} left nothing)")
    assert kept and gone


def test_the_host_spec_lays_out_mtty(tmp_path):
    roots = hosts.build_spec(MDEV_HOST, str(tmp_path))
    assert os.path.isdir(os.path.join(roots.sysfs, "class/mdev_bus/mtty/mdev_supported_types/mtty-2"))
