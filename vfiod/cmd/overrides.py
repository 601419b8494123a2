"""`vfioctl overrides`: every PCI device with a driver_override set now, and whose it is
(like `driverctl list-overrides`; reads sysfs, asks vfiod for its leases if it runs)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from .common import EXIT_OK, Formatter, add_root_options, print_json

OVERRIDES_HELP = """\
List every PCI device whose driver_override is set now (read from sysfs), with
its ids, its driver, and whose the override is:

  vfiod lease      a vfiod lease holds the device's group (vfiod is asked over
                   the bus; without it running, leases are not known)
  vfiod early claim  udev bound it at boot for an early [[claim]] (the policy
                   file:line is named), and the kernel still shows what udev did
  driverctl        /etc/driverctl.d/pci-ADDRESS names that driver
  other            set by hand or by another tool

Any user may run it: it only reads.

examples:
  vfioctl overrides
  vfioctl overrides --json
"""


def cmd_overrides(args: argparse.Namespace) -> int:
    from ..sysfs import Roots
    from ..sysfs.early import device_ids, early_bound
    from ..sysfs.hostconfig import driverctl_overrides, overrides_now
    from .common import host_roots

    with host_roots(args) as roots:
        roots = Roots(roots.sysfs, roots.proc, roots.dev, run=args.run_dir, etc=roots.etc) if not args.simulate else roots
        found = overrides_now(roots)
        leased = _leased_devices(args) if found else set()
        driverctl = driverctl_overrides(args.etc_root)
        rows = []
        for addr, override, driver in found:
            ids = device_ids(roots, addr)
            mark = early_bound(roots, addr)
            if leased is not None and str(addr) in leased:
                whose, text = "lease", "vfiod lease" + (f" (early claim {mark.source})" if mark else "")
            elif mark is not None:
                whose, text = "early-claim", f"vfiod early claim ({mark.source})"
            elif driverctl.get(addr) == override:
                whose, text = "driverctl", f"driverctl (/etc/driverctl.d/pci-{addr})"
            elif leased is None:
                whose, text = "unknown", "not known: vfiod is not reachable to say whether a lease holds it"
            else:
                whose, text = "other", "other (not vfiod's, not driverctl's)"
            rows.append({"address": str(addr), "ids": ids[0] if ids else None, "override": override,
                         "driver": driver, "whose": whose, "text": text})
    if args.json:
        print_json("overrides", overrides=rows, leases_known=leased is not None)
        return EXIT_OK
    if not rows:
        print("No PCI device has a driver_override set.")
        return EXIT_OK
    out = sys.stdout
    for r in rows:
        print(f"{r['address']}  {r['ids'] or '????:????'}  override {r['override']:<10} "
              f"on {r['driver'] or '(no driver)':<12} {r['text']}", file=out)
    return EXIT_OK


def _leased_devices(args: argparse.Namespace) -> set[str] | None:
    """The addresses of devices in leased groups, as vfiod says (None: vfiod did not answer)."""
    from ..client import Client

    async def ask() -> list[Any]:

        client = await Client(args.bus, timeout=args.timeout).connect()
        try:
            return await client.groups_json()
        finally:
            client.close()
    try:
        groups = asyncio.run(ask())
    except Exception:          # no bus, no vfiod, refused: say so in the listing
        return None
    return {d["address"] for g in groups if g.get("state") == "leased" for d in g.get("devices", ())}


def add_overrides_command(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                          formatter: type[argparse.HelpFormatter] = Formatter) -> None:
    import os

    from ..wire.names import bus_arg

    p = sub.add_parser("overrides", help="every device with a driver_override now, and whose it is",
                       description=OVERRIDES_HELP, formatter_class=formatter)
    add_root_options(p)
    p.add_argument("--etc-root", default="/etc", metavar="DIR", help="where driverctl.d is looked for (default: /etc)")
    p.add_argument("--run-dir", default="/run/vfiod", metavar="DIR",
                   help="where udev's early binding leaves its marks (default: /run/vfiod)")
    p.add_argument("--bus", default=os.environ.get("VFIOD_BUS") or "system", type=bus_arg,
                   metavar="system|session|ADDRESS", help="the bus vfiod is on, to ask for its leases")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="how long to wait for vfiod's answer (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts (/usr/share/doc/vfiod/json.md)")
    p.set_defaults(func=cmd_overrides)
