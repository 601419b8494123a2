"""A process that runs the revoke ladder of a lease and dies (SIGKILL) at a named point.

    python -m tests.sim.revokechild HOSTROOT STATEFILE LEASE_ID CRASH_AT

CRASH_AT is a step name (as LeaseManager.on_step reports it), or ``none`` to
run through and print every point it passed, one per line.  The host is
`tests.sim.test_revoke.SPEC`; the lease was granted, and its holder started,
by the test.
"""

import os
import signal
import sys
import time

from vfiod.backends import load_backends
from vfiod.leases import Ended, LeaseManager
from vfiod.sim.kernel import SimKernel
from vfiod.state import Journal
from vfiod.sysfs import Roots

from .leasekit import Caller
from .test_revoke import SPEC, policy


def main(root: str, state: str, lease_id: str, crash_at: str) -> None:
    roots = Roots(root + "/sys", root + "/proc", root + "/dev")
    kernel = SimKernel.for_spec(SPEC, roots)

    def point(name: str) -> None:
        if crash_at == "none":
            print(name, flush=True)
        elif name == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)

    the_policy = policy()
    manager = LeaseManager(kernel, Journal(state), lambda: the_policy, load_backends(), on_step=point)
    manager.kill_after = 0.5
    manager.revoke(lease_id, "maintenance", Caller(0))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if isinstance(manager.advance(lease_id), Ended):
            return
        time.sleep(0.1)
    sys.exit("the ladder did not finish")


if __name__ == "__main__":
    main(*sys.argv[1:5])
