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

With --class (dpdk-devbind's --status-dev), only the devices of those classes;
--class help lists the names and the PCI classes each takes.

examples:
  vfioctl status
  vfioctl status --class net,crypto
  vfioctl status --simulate sriov --json
"""


def class_names(text: str) -> list[str]:
    """--class: one or more `DEVICE_CLASSES` names, comma-separated; ``help`` lists them."""
    from ..report import DEVICE_CLASSES

    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names == ["help"]:
        return names
    unknown = [n for n in names if n not in DEVICE_CLASSES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown device class {', '.join(map(repr, unknown)) or repr(text)} "
            f"(known: {', '.join(DEVICE_CLASSES)}; --class help says what each takes)")
    return names


def class_table() -> str:
    """The names --class takes, the PCI classes of each, and what they hold."""
    from ..report import DEVICE_CLASSES

    return "".join(f"{name:<11} {', '.join(f'{c:02x}' if c <= 0xFF else f'{c:04x}' for c in codes):<9} {what}\n"
                   for name, (codes, what) in DEVICE_CLASSES.items())


def show_status(args: argparse.Namespace) -> int:
    """Every PCI device by class and driver kind (offline: reads sysfs, never writes)."""
    from ..pciids import PciIds
    from ..report import render_status, status_json
    from ..sysfs import SysfsReader, device_usage
    from ..topology import Host
    from .common import host_roots

    classes = [c for group in getattr(args, "classes", None) or () for c in group]
    if "help" in classes:
        sys.stdout.write(class_table())
        return EXIT_OK
    with host_roots(args) as roots:
        host = Host.scan(SysfsReader(roots))
        status = status_json(host, PciIds(), lambda addr: device_usage(roots, addr), classes)
    if args.json:
        print_json("status", **status)
    elif classes and not status["devices"]:
        print(f"No PCI devices of class {', '.join(classes)} on this host.")
    else:
        sys.stdout.write(render_status(status))
    return EXIT_OK


def add_status_command(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                       formatter: type[argparse.HelpFormatter] = Formatter) -> None:
    st = sub.add_parser("status", help="every PCI device by class and driver, like dpdk-devbind --status (offline)",
                        description=STATUS_HELP, formatter_class=formatter)
    add_root_options(st)
    st.add_argument("--json", action="store_true", help=JSON_HELP)
    st.add_argument("--class", dest="classes", type=class_names, action="append", metavar="NAME[,NAME...]",
                    help="only devices of these classes: net, storage, display, crypto, dma, ... "
                         "(--class help lists them all with their PCI class codes)")
    st.set_defaults(func=show_status)
