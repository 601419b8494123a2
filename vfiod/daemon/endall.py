"""`vfiod end-leases`: end every lease of a state directory, persistent ones too, with no
daemon running (the package's prerm runs it on removal, after the unit stopped).

It holds the state directory's lock (so it refuses while a vfiod serves it), judges
each lease against the devices there now as a starting daemon does (a device that is
not the one leased is left alone: `vfiod.leases.verify`), gives every other device back to
the driver it had, finishes what a stopped daemon left half-done (a grant is rolled
back, a release finished), and runs the revoke ladder for leases whose holders keep
their group, for up to `LIMIT` seconds."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from ..backends import load_backends
from ..errors import VfiodError
from ..leases import LeaseManager
from ..policy import Policy
from ..state import Journal
from ..statedir import MACHINE_ID, StateDirLock, machine_host, simulated_host
from ..leases.verify import check

log = logging.getLogger("vfiod")

#: The longest `end_all` turns the revoke ladder (systemd's stop timeout is 90 s).
LIMIT = 80.0


def end_all(args: argparse.Namespace, machine_id: str = MACHINE_ID) -> int:
    from . import make_kernel, resolve_dirs

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    resolve_dirs(args)
    if not os.path.exists(os.path.join(args.state_dir, "state.db")):
        log.info("no journal in %s: no lease to end", args.state_dir)
        return 0
    lock = StateDirLock.acquire(args.state_dir)
    try:
        host = simulated_host(args.simulate, args.sim_dir) if args.simulate else machine_host(machine_id)
        journal = Journal(os.path.join(args.state_dir, "state.db"), host=host)
        try:
            kernel, _ = make_kernel(args)
            manager = LeaseManager(kernel, journal, Policy.empty, load_backends())
            return _end(manager)
        finally:
            journal.close()
    finally:
        lock.release()


def _end(manager: LeaseManager) -> int:
    ended = 0
    for lease in manager.leases():
        try:
            if check(manager, lease.id, None, "end-leases") is not None:     # another device: left alone
                ended += 1
            elif lease.state == "granted" and manager.release(lease.id, None, "released") is not None:
                ended += 1
        except VfiodError as e:
            log.error("ending lease %s: %s", lease.id, e)
    ended += len(manager.reconcile())         # a grant or release a stopped daemon left half-done
    deadline = time.monotonic() + LIMIT
    while any(lease.state == "revoking" for lease in manager.leases()) and time.monotonic() < deadline:
        ended += len(manager.advance_all())
        time.sleep(0.5)
    left = manager.leases()
    for lease in left:
        log.error("lease %s of uid %s (group %s) could not be ended: it stays %s in the journal",
                  lease.id, lease.uid, lease.group, lease.state)
    log.info("%d lease(s) ended%s", ended, f", {len(left)} left (see above)" if left else "")
    return 1 if left else 0
