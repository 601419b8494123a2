#!/usr/bin/env python3
"""The revoke ladder on the real kernel: ``Revoke`` to the device back on its driver.

Boots the QEMU guest of tests/guest/test_revoke_guest.py once (every scenario of that
test, about 3–5 minutes under TCG) and prints the seconds ``vfioctl revoke --json``
reports for each holder: the cooperative one, which lets go when the kernel's request
fires (target <= 0.3 s), and the uncooperative ones, which the ladder ends after the
grace (the grace, then SIGTERM, then the driver's return).

    .venv/bin/python bench/revoke.py
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TARGET = 0.3


def main() -> int:
    from tests.guest import test_revoke_guest as t
    from tests.guest.harness import guest_available

    ok, why = guest_available()
    if not ok:
        print(f"bench/revoke.py: the guest is not available: {why}", file=sys.stderr)
        return 1
    r = t.run_guest()
    if r["errors"] or not r.get("complete"):
        print("\n".join(r["errors"]) or "the guest's script did not finish", file=sys.stderr)
        return 1
    print(f"guest wall time {r['_wall_seconds']:.0f} s; grace {t.GRACE} s; seconds from Revoke to the driver back:")
    coop = r["coop"]["revoke"]["doc"]["seconds"]
    print(f"  cooperative holder:   {coop:.2f} s{'' if coop <= TARGET else '  OVER TARGET'} (target <= {TARGET} s)")
    print(f"  uncooperative holder: {r['stubborn']['revoke']['doc']['seconds']:.2f} s (the grace, then SIGTERM)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
