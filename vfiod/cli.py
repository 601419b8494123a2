"""Command lines: `vfiod` (the daemon, and `vfiod inspect`, offline) and `vfioctl` (the client).

Exit codes (DESIGN §4): 0 success, 1 failure, 2 usage, 3 permission denied,
4 busy or not viable.  Every `VfiodError` maps to its own code; anything else
is a bug and is reported in one line, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from . import __version__
from .errors import VfiodError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


@contextlib.contextmanager
def host_roots(args):
    """The roots to read: a simulated host laid out in a temporary tree, or the given ones."""
    from .sysfs import Roots

    if getattr(args, "simulate", None):
        from . import hosts

        tmp, roots = hosts.build_temporary(args.simulate)
        with tmp:
            yield roots
    else:
        yield Roots(sysfs=args.sysfs_root, proc=args.proc_root, dev=getattr(args, "dev_root", "/dev"))


def add_root_options(p: argparse.ArgumentParser, dev: bool = False) -> None:
    from .hosts import DEFAULT, EXAMPLES

    p.add_argument("--sysfs-root", default="/sys", metavar="DIR",
                   help="where sysfs is mounted (default: /sys)")
    p.add_argument("--proc-root", default="/proc", metavar="DIR",
                   help="where procfs is mounted (default: /proc)")
    if dev:
        p.add_argument("--dev-root", default="/dev", metavar="DIR",
                       help="where devtmpfs is mounted (default: /dev)")
    p.add_argument("--simulate", nargs="?", const=DEFAULT, choices=sorted(EXAMPLES), metavar="TOPOLOGY",
                   help=f"read a built-in simulated host instead of this machine "
                        f"(default {DEFAULT}; one of: {', '.join(sorted(EXAMPLES))})")


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
  vfiod inspect --json | jq '.[] | select(.viable)'
"""


def cmd_inspect(args) -> int:
    from .pciids import PciIds
    from .report import host_json, render_groups
    from .sysfs import SysfsReader
    from .topology import Host

    with host_roots(args) as roots:
        host = Host.scan(SysfsReader(roots))
    groups = host_json(host, PciIds())
    if args.json:
        for f in host.findings:
            print(f"vfiod: {f.text}", file=sys.stderr)
        sys.stdout.write(json.dumps(groups, indent=1 if sys.stdout.isatty() else None) + "\n")
        return EXIT_OK
    if args.simulate:
        from .hosts import EXAMPLES
        print(f"Simulated host {args.simulate!r}: {EXAMPLES[args.simulate].description}\n")
    for f in host.findings:
        print(f"note: {f.text}\n")
    if not groups:
        print("No IOMMU groups on this host.")
        return EXIT_OK
    sys.stdout.write(render_groups(groups, explain=args.explain))
    viable = sum(1 for g in groups if g["viable"])
    print(f"{len(groups)} IOMMU groups, {viable} viable for VFIO now.")
    return EXIT_OK


def cmd_daemon(args) -> int:
    import asyncio

    from .daemon import serve

    return asyncio.run(serve(args))


def vfiod_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfiod", formatter_class=_Formatter,
        description="vfiod: PCI driver rebinding and VFIO IOMMU-group leasing under admin policy.\n\n"
                    "Without a command it runs the daemon (as root, on the system bus);\n"
                    "`vfiod inspect` shows the host offline.",
        epilog="examples:\n  vfiod --simulate --bus session      the daemon on a simulated ICH10 host\n"
               "  vfiod inspect --explain",
    )
    p.add_argument("--version", action="version", version=f"vfiod {__version__}")
    p.add_argument("--bus", default="system", metavar="system|session|ADDRESS",
                   help="the bus to serve on (default: system)")
    add_root_options(p, dev=True)
    p.add_argument("--policy-dir", default="/etc/vfiod/policy.d", metavar="DIR",
                   help="policy files, read in name order (default: /etc/vfiod/policy.d)")
    p.add_argument("--state-dir", default="/var/lib/vfiod", metavar="DIR",
                   help="where the journal (state.db) lives (default: /var/lib/vfiod)")
    p.add_argument("--sim-dir", metavar="DIR",
                   help="with --simulate: lay the simulated host out here (kept, reused on restart)")
    p.set_defaults(func=cmd_daemon)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    ins = sub.add_parser("inspect", help="show IOMMU groups, viability and isolation (offline)",
                         description=INSPECT_HELP, formatter_class=_Formatter)
    add_root_options(ins)
    ins.add_argument("--json", action="store_true", help="print a JSON list of groups for scripts")
    ins.add_argument("--explain", action="store_true", help="add why each group is what it is")
    ins.set_defaults(func=cmd_inspect)
    return p


def vfioctl_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfioctl", formatter_class=_Formatter,
        description="vfioctl: ask vfiod for IOMMU groups, explanations and leases; check policy files.",
    )
    p.add_argument("--version", action="version", version=f"vfioctl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    from .ctl import add_bus_commands

    from .policy_cli import add_policy_commands

    add_bus_commands(sub, _Formatter)
    add_policy_commands(sub, _Formatter)
    return p


def run(parser: argparse.ArgumentParser, argv, command=None) -> int:
    args = parser.parse_args(argv)
    if command:
        if not hasattr(args, "run_command"):
            parser.error("only `vfioctl lease` takes a command after --")
        args.run_command = command
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except VfiodError as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


def vfiod_main(argv=None) -> int:
    return run(vfiod_parser(), argv)


def vfioctl_main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:                      # vfioctl lease T [options] -- CMD ARGS...
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    return run(vfioctl_parser(), argv, command)


def main() -> None:  # python -m vfiod
    sys.exit(vfiod_main())
