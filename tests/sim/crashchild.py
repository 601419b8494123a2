"""A process that holds a LeaseManager and dies (SIGKILL) at a named point.

    python -m tests.sim.crashchild HOSTROOT STATEFILE CRASH_AT [mdev]

CRASH_AT is a step name (as LeaseManager.on_step reports it) or ``write:N``
(right after the N-th sysfs write took effect), or ``none`` to run through
and print every point it passed, one per line.  It grants group 2 of the
three-NIC bridge host to uid 1000 with the vfio backend, then releases it; with
``mdev``, it leases a new instance of mtty/mtty-2 on `leasekit.MDEV_HOST` instead.
"""

import os
import signal
import sys

from vfiod.backends import load_backends
from vfiod.leases import LeaseManager
from vfiod.sim.kernel import SimKernel
from vfiod.state import Journal
from vfiod.sysfs import Roots

from .leasekit import MDEV_HOST, Caller, open_policy
from .test_leases import BRIDGE3


def main(root, state, crash_at, what="group"):
    spec, target = (MDEV_HOST, "mdev:mtty/mtty-2") if what == "mdev" else (BRIDGE3, "group:2")
    roots = Roots(root + "/sys", root + "/proc", root + "/dev", etc=root + "/etc")
    kernel = SimKernel.for_spec(spec, roots)
    writes = [0]

    def point(name):
        if crash_at == "none":
            print(name, flush=True)
        elif name == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def after_write(rel, data):
        writes[0] += 1
        point(f"write:{writes[0]}")

    kernel.after_write = after_write
    policy = open_policy(spec)
    manager = LeaseManager(kernel, Journal(state), lambda: policy, load_backends(), on_step=point)
    lease = manager.request(Caller(1000), target, "vfio", {}, owner=":1.9")
    manager.release(lease.id, Caller(1000))


if __name__ == "__main__":
    main(*sys.argv[1:5])
