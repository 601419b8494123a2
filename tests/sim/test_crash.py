"""Crash at every step: SIGKILL the process holding the LeaseManager, restart, reconcile.

After each crash point of a grant and a release of a three-device group, a new
manager on the same state file and tree must leave every device either fully
leased (with the lease still recorded) or exactly as before: no lease lost,
none leaked, no device without the driver it had.
"""

import os
import shutil
import subprocess
import sys

from vfiod.sim import hosts

from .leasekit import Caller, Kit
from .test_leases import BRIDGE3

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child(host_root, state, crash_at):
    return subprocess.run([sys.executable, "-m", "tests.sim.crashchild", host_root, state, crash_at],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_crash_at_every_step_of_grant_and_release(tmp_path):
    pristine = str(tmp_path / "pristine")
    hosts.build_spec(BRIDGE3, pristine)
    dry_root = str(tmp_path / "dry")
    shutil.copytree(pristine, dry_root, symlinks=True)
    run = child(dry_root, str(tmp_path / "dry.db"), "none")
    assert run.returncode == 0, run.stderr
    points = run.stdout.split()
    assert "granted" in points and "released" in points
    assert sum(p.startswith("write:") for p in points) >= 18     # 3 devices x 3 writes, both ways

    before = _pristine_snapshot(pristine)
    covered = {"leased": 0, "restored": 0}
    for i, point in enumerate(points):
        case = tmp_path / f"case{i}"
        shutil.copytree(pristine, str(case / "host"), symlinks=True)
        state = str(case / "state" / "state.db")
        os.makedirs(os.path.dirname(state))
        run = child(str(case / "host"), state, point)
        assert run.returncode == -9, (point, run.returncode, run.stderr[-2000:])

        kit = Kit(case, spec=BRIDGE3, owner_alive=lambda lease: True)
        kit.manager.reconcile()
        leases = kit.journal.leases()
        state_now = kit.snapshot()
        if leases:
            (lease,) = leases
            assert lease.state == "granted", (point, lease)
            for addr in ("0000:02:01.0", "0000:02:02.0", "0000:02:03.0"):
                assert kit.kernel.driver_of(hosts.PciAddress.parse(addr)) == "vfio-pci", (point, addr)
            assert state_now[1]["2"] == (1000, 0, 0o600), point
            covered["leased"] += 1
            kit.manager.release(lease.id, Caller(1000))     # and it still gives everything back
            assert kit.snapshot() == before, point
        else:
            assert state_now == before, (point, state_now)
            covered["restored"] += 1
        assert kit.journal.leases() == []
    print(f"\ncrash points covered: {len(points)} ({covered['leased']} kept the lease, "
          f"{covered['restored']} restored the host)")
    assert covered["leased"] and covered["restored"]


def _pristine_snapshot(path):
    import tempfile
    with tempfile.TemporaryDirectory() as t:
        from pathlib import Path
        shutil.copytree(path, os.path.join(t, "host"), symlinks=True)
        kit = Kit(Path(t), spec=BRIDGE3)
        return kit.snapshot()
