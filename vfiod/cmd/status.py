"""`vfioctl status`: every PCI device of this host by class and driver, like
`dpdk-devbind.py --status` (offline: reads sysfs, never writes, needs no daemon)."""

from __future__ import annotations

import argparse
import sys

from .common import EXIT_OK, JSON_HELP, Formatter, add_root_options, print_json


STATUS_HELP = """\
List every PCI device of this host, by class (network, storage, display, ...)
and by what drives it (a VFIO driver, a kernel driver, none), with its network
interfaces, its IOMMU group and *Active* where the host uses it (an interface up
with routes, a mounted disk, ...), like `dpdk-devbind.py --status`.  Reads
sysfs only; needs no daemon, and works on a host without an IOMMU (it says so).

examples:
  vfioctl status
  vfioctl status --simulate sriov --json
"""


def show_status(args: argparse.Namespace) -> int:
    """Every PCI device by class and driver kind (offline: reads sysfs, never writes)."""
    from ..pciids import PciIds
    from ..report import render_status, status_json
    from ..sysfs import SysfsReader, device_usage
    from ..topology import Host
    from .common import host_roots

    with host_roots(args) as roots:
        host = Host.scan(SysfsReader(roots))
        status = status_json(host, PciIds(), lambda addr: device_usage(roots, addr))
    if args.json:
        print_json("status", **status)
    else:
        sys.stdout.write(render_status(status))
    return EXIT_OK


def add_status_command(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                       formatter: type[argparse.HelpFormatter] = Formatter) -> None:
    st = sub.add_parser("status", help="every PCI device by class and driver, like dpdk-devbind --status (offline)",
                        description=STATUS_HELP, formatter_class=formatter)
    add_root_options(st)
    st.add_argument("--json", action="store_true", help=JSON_HELP)
    st.set_defaults(func=show_status)
