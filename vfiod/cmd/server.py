"""`vfiod`: the daemon, and `vfiod inspect` (offline, read-only)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .. import __version__
from ..wire.names import bus_arg
from .common import EXIT_OK, JSON_HELP, Formatter, add_root_options, host_roots, print_json, run


INSPECT_HELP = """\
Show this host as VFIO sees it: every IOMMU group, its devices and their drivers,
whether the group is viable for VFIO (every endpoint on vfio-pci, pci-stub or no
driver; bridges and ports on pcieport are exempt), what blocks it and how to fix
that, and why its devices share a group.  Reads only; needs no daemon.  Run as
root to read full configuration space (isolation needs the ACS capability).

isolation codes (--json "isolation"):
  isolated       the device is alone in its group
  alias          conventional PCI behind a PCIe-to-PCI/PCI bridge: one requester ID
  no-acs-port    below a root or downstream port without ACS
  multifunction  functions of one device without ACS
  unknown        the kernel's grouping is not explained by topology and config
                 space (a device quirk or pcie_acs_override, most likely)

examples:
  vfiod inspect                     this machine
  vfiod inspect --simulate --explain   the built-in ICH10 host, with reasons
  vfiod inspect --tree              the PCI tree: groups, drivers, PCIe links, NUMA nodes
  vfiod inspect --json | jq '.groups[] | select(.viable)'   (/usr/share/doc/vfiod/docs/json.md: every field)
"""


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.all:
        from .status import show_status
        return show_status(args)
    import gc

    from ..pciids import PciIds
    from ..report import findings_json, host_json, render_groups
    from ..report import mdev_json, render_mdev
    from ..sysfs import SysfsReader
    from ..sysfs.mdev import read_types
    from ..topology import Host

    # A short process that makes a few objects per PCI function and no reference cycles:
    # the cycle collector would only walk them again and again (a tenth of a big host's scan).
    gc.disable()
    with host_roots(args) as roots:
        host = Host.scan(SysfsReader(roots))
        mdev = mdev_json(read_types(roots))
    if args.tree:
        from ..report import render_tree, tree_json

        buses = tree_json(host, PciIds())
        if args.json:
            print_json("tree", buses=buses)
        else:
            sys.stdout.write(render_tree(buses) or "No PCI devices.\n")
        return EXIT_OK
    groups = host_json(host, PciIds())
    if args.json:
        for f in host.findings:
            print(f"vfiod: {f.text}", file=sys.stderr)
        print_json("groups", groups=groups, findings=findings_json(host), mdev=mdev)
        return EXIT_OK
    if args.simulate:
        from ..sim.hosts import spec
        print(f"Simulated host {args.simulate!r}: {spec(args.simulate).description}\n")
    for f in host.findings:
        print(f"note: {f.text}\n")
    if not groups:
        print("No IOMMU groups on this host.")
        return EXIT_OK
    sys.stdout.write(render_groups(groups, explain=args.explain))
    viable = sum(1 for g in groups if g["viable"])
    print(f"{len(groups)} IOMMU groups, {viable} viable for VFIO now.")
    if mdev:
        sys.stdout.write("\n" + render_mdev(mdev))
    return EXIT_OK


def cmd_daemon(args: argparse.Namespace) -> int:
    import asyncio

    from ..daemon import serve

    return asyncio.run(serve(args))


RELOAD_HELP = """\
Ask the running daemon to load its policy directory again (the bus call
ReloadPolicy; root or the policy's admin_groups), and wait for the answer.  A broken policy is refused:
this command prints every error (file:line: key) and exits non-zero, and the
daemon goes on deciding by the last good policy.  vfiod.service runs it as
ExecReload=, so `systemctl reload vfiod` fails visibly when the policy is refused.

exit status: 0 reloaded; 2 the policy was refused; 3 not an admin; 1 vfiod not running
or not answering.

examples:
  vfiod reload
  systemctl reload vfiod        the same, through systemd
"""


def cmd_reload(args: argparse.Namespace) -> int:
    """`vfioctl reload`'s work, for ExecReload: the same answer, errors and exit codes."""
    from .reload import cmd_reload as reload_over_the_bus

    return reload_over_the_bus(args)


END_HELP = """\
End every lease recorded in the state directory, persistent ones and boot claims
too, and give every device back to the driver it had (a device that is no longer
the one leased is left alone).  Runs without a daemon and refuses while a vfiod
serves the directory: stop vfiod.service first.  The package runs it when vfiod is
removed, so that no device is left on vfio-pci.  A lease whose holders keep its
group goes through the revoke ladder (its grace, then SIGTERM and SIGKILL).

exit status: 0 every lease ended (or there was none); 1 some lease is left, or
a vfiod runs on the directory.

examples:
  systemctl stop vfiod && vfiod end-leases
"""


def cmd_end_leases(args: argparse.Namespace) -> int:
    from ..daemon.endall import end_all

    return end_all(args)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return value


def vfiod_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfiod", formatter_class=Formatter,
        description="vfiod: PCI driver rebinding and VFIO IOMMU-group leasing under admin policy.\n\n"
                    "Without a command it runs the daemon (as root, on the system bus);\n"
                    "`vfiod inspect` shows the host offline; `vfiod reload` reloads the\n"
                    "running daemon's policy.",
        epilog="examples:\n"
               "  vfiod --simulate --bus session --sim-dir /tmp/sim\n"
               "        the daemon on a simulated ICH10 host; its journal in /tmp/sim/state, its policy\n"
               "        files in /tmp/sim/policy.d (nothing of this machine's vfiod is read or written)\n"
               "  vfiod inspect --explain",
    )
    p.add_argument("--version", action="version", version=f"vfiod {__version__}")
    p.add_argument("--bus", default="system", type=bus_arg, metavar="system|session|ADDRESS",
                   help="the bus to serve on (default: system)")
    add_root_options(p, dev=True)
    p.add_argument("--policy-dir", default=None, metavar="DIR",
                   help="policy files, read in name order (default: /etc/vfiod/policy.d; "
                        "with --simulate: SIM_DIR/policy.d)")
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="where the journal (state.db) lives, locked by one daemon at a time "
                        "(default: /var/lib/vfiod; with --simulate: SIM_DIR/state)")
    p.add_argument("--sim-dir", metavar="DIR",
                   help="with --simulate: lay the simulated host out here (kept, reused on restart with "
                        "the same topology only; default: a new temporary directory)")
    p.set_defaults(func=cmd_daemon, run_command=None)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    ins = sub.add_parser("inspect", help="show IOMMU groups, viability and isolation (offline)",
                         description=INSPECT_HELP, formatter_class=Formatter)
    add_root_options(ins, inherit=True)
    ins.add_argument("--json", action="store_true", help=JSON_HELP)
    ins.add_argument("--explain", action="store_true", help="add why each group is what it is")
    ins.add_argument("--tree", action="store_true",
                     help="the PCI tree with each function's IOMMU group, driver, PCIe link and NUMA node "
                          "(as vfioctl show --tree)")
    ins.add_argument("--all", action="store_true",
                     help="every PCI device by class and driver (as vfioctl status), IOMMU or not")
    ins.set_defaults(func=cmd_inspect)
    end = sub.add_parser("end-leases", help="end every lease, persistent ones too, with vfiod stopped",
                         description=END_HELP, formatter_class=Formatter)
    add_root_options(end, inherit=True)
    end.set_defaults(func=cmd_end_leases)
    rel = sub.add_parser("reload", help="reload the running daemon's policy; fails if it is refused",
                         description=RELOAD_HELP, formatter_class=Formatter)
    rel.add_argument("--bus", default=argparse.SUPPRESS, type=bus_arg, metavar="system|session|ADDRESS",
                     help="the bus the daemon serves on (default: system)")
    rel.add_argument("--timeout", type=_seconds, default=60.0, metavar="SECONDS",
                     help="how long to wait for the daemon's answer (default: 60)")
    rel.add_argument("--json", action="store_true", help=JSON_HELP)
    rel.set_defaults(func=cmd_reload)
    return p



def main(argv: Sequence[str] | None = None) -> int:
    return run(vfiod_parser(), argv)
