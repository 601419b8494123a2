#!/usr/bin/env python3
"""A release while another user's process holds many files.

The release of a lease nobody holds any more looks for holders before it gives the
devices back.  That search reads the lease's candidate processes only (the
lessee's and its scope's; everyone's only under ``revoke_others``), so another
user's 100,000 open files must not slow it down.  Printed: the median grant +
release of the ICH10 host's group 8 on the simulated kernel by uid 1000, with
nobody else holding files and with uid 65534 holding N (real processes, the
real /proc; as many processes as this process's RLIMIT_NOFILE hard limit needs).

    .venv/bin/python bench/holders.py [--rounds 15] [--files 100000]      (as root)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LESSEE, OTHER = 1000, 65534
HOLDER = r"""
import os, resource, sys, time
n = int(sys.argv[1])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
os.setgroups([]); os.setgid(%(uid)d); os.setuid(%(uid)d)
fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(n)]
print("holding", len(fds), flush=True)
time.sleep(3600)
""" % {"uid": OTHER}


def timed_rounds(manager, rounds: int) -> tuple[list[float], list[float], int]:
    """Per round: the grant + release, and vfiod's own holder search of the granted
    lease (what a release runs); and the fd links the last search read."""
    from vfiod.policy import Caller
    caller, whole, search, fds = Caller(LESSEE), [], [], 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        lease = manager.request(caller, "group:8", "vfio", {})
        t1 = time.perf_counter()
        found = manager.ladder.search(manager.journal.lease(lease.id), fresh=True)
        t2 = time.perf_counter()
        manager.release(lease.id, caller)
        whole.append(time.perf_counter() - t2 + t1 - t0)
        search.append(t2 - t1)
        fds = found.fds
    return whole, search, fds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--files", type=int, default=100_000)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/holders.py: run as root (the other user's process is started as uid 65534)", file=sys.stderr)
        return 2
    from vfiod.backends import load_backends
    from vfiod.leases import LeaseManager
    from vfiod.policy import Policy
    from vfiod.sim import hosts
    from vfiod.sim.kernel import SimKernel
    from vfiod.state import Journal

    with tempfile.TemporaryDirectory(prefix="vfiod-bench-holders-") as tmp:
        kernel = SimKernel.for_spec(hosts.ICH10, hosts.build("ich10", os.path.join(tmp, "host")))
        policy = Policy.from_sources([("bench.toml", f'[[rule]]\ngroup = [8]\nuids = [{LESSEE}]\n')])
        manager = LeaseManager(kernel, Journal(os.path.join(tmp, "state.db")), lambda: policy, load_backends())
        timed_rounds(manager, 2)                                   # warm up
        quiet = timed_rounds(manager, args.rounds)
        import resource
        per = resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 64
        counts = [min(per, args.files - i) for i in range(0, args.files, per)]
        holders = [subprocess.Popen([sys.executable, "-c", HOLDER, str(n)], stdout=subprocess.PIPE, text=True,
                                    start_new_session=True) for n in counts]
        try:
            for h in holders:
                line = h.stdout.readline() if h.stdout else ""
                if not line.startswith("holding"):
                    print(f"bench/holders.py: a holder did not start: {line!r}", file=sys.stderr)
                    return 1
            busy = timed_rounds(manager, args.rounds)
        finally:
            for h in holders:
                h.kill()
                h.wait()
    print(f"ICH10 group 8 leased by uid {LESSEE} on the simulated kernel, medians of {args.rounds}:")
    print(f"{'':44} {'holder search':>14} {'fds read':>9} {'grant + release':>16}")
    for name, (whole, search, fds) in ((f"nobody else holding files", quiet),
                                       (f"uid {OTHER}: {args.files:,} files, {len(counts)} processes", busy)):
        print(f"  {name:42} {statistics.median(search) * 1000:11.2f} ms {fds:9d} "
              f"{statistics.median(whole) * 1000:13.1f} ms")
    print("(grant + release includes the simulated kernel's stand-in for the exclusive open and the\n"
          " unbind's wait, which scan every process's fds as the real kernel never needs to: vfiod's\n"
          " own share is the holder search)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
