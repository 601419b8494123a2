#!/usr/bin/env python3
"""vfiod-dra's prepare/unprepare latency against a bare vfiod lease/release, on the real kernel.

Boots the QEMU guest of tests/guest/test_dra_guest.py once (the rootport topology's
e1000e, alone in its group) and prints, per round and as medians:

* bare: ``RequestLease(group:N)`` + ``Release`` by an unprivileged user over the bus
  (vfiod binds vfio-pci, then returns e1000e);
* DRA: ``NodePrepareResources`` + ``NodeUnprepareResources`` of one claim from a fake
  kubelet (vfiod-dra reads the claim from a stub API server, leases the group for the
  claim's namespace, writes and removes the CDI spec, keeps its checkpoint).

    .venv/bin/python bench/dra.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from tests.guest import test_dra_guest as t
    from tests.guest.harness import guest_available

    ok, why = guest_available()
    if not ok:
        print(f"bench/dra.py: the guest is not available: {why}", file=sys.stderr)
        return 1
    r = t.run_guest(args.rounds)
    if r["errors"] or not isinstance(r.get("bare"), list):
        print("\n".join(r["errors"]) or r.get("bare"), file=sys.stderr)
        return 1
    print(f"guest wall time {r['_wall_seconds']:.0f} s; {len(r['bare'])} rounds each (ms)")
    print(f"{'round':>5} {'lease':>8} {'release':>8} {'prepare':>8} {'unprep.':>8}")
    for i, (b, d) in enumerate(zip(r["bare"], r["dra"]), 1):
        print(f"{i:>5} {b[0] * 1000:8.0f} {b[1] * 1000:8.0f} {d[0] * 1000:8.0f} {d[1] * 1000:8.0f}")
    med = [statistics.median(x[i] for x in rows) * 1000 for rows in (r["bare"], r["dra"]) for i in (0, 1)]
    print(f"{'med.':>5} {med[0]:8.0f} {med[1]:8.0f} {med[2]:8.0f} {med[3]:8.0f}")
    ratio = med[2] / med[0]
    print(f"prepare / bare lease {ratio:.2f}x{'' if ratio <= 1.2 else '  OVER TARGET'} (target <= 1.2x); "
          f"unprepare / bare release {med[3] / med[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
