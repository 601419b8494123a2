"""What both command lines share: exit codes, root options, simulated hosts, durations, and `run`.

Exit codes (DESIGN §4): 0 success, 1 failure, 2 usage, 3 permission denied,
4 busy or not viable.  Every `VfiodError` maps to its own code; anything else
is a bug and is reported in one line, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import TYPE_CHECKING, Iterator, Sequence

from ..errors import VfiodError

if TYPE_CHECKING:
    from ..sysfs import Roots

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Help texts keep their line breaks (examples, tables)."""


def duration_arg(text: str) -> int:
    """An argparse type: seconds from "90s", "30m", "2h", "1d", "1w", "1h30m" or seconds,
    by the policy's one duration grammar."""
    from ..policy import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@contextlib.contextmanager
def host_roots(args: argparse.Namespace) -> Iterator[Roots]:
    """The roots to read: a simulated host laid out in a temporary tree, or the given ones
    (`args` from a parser given `add_root_options`)."""
    from ..sysfs import Roots

    if args.simulate:
        from ..sim import hosts

        tmp, roots = hosts.build_temporary(args.simulate)
        with tmp:
            yield roots
    else:
        from ..sysfs import SysfsReader

        roots = Roots(sysfs=args.sysfs_root, proc=args.proc_root, dev=args.dev_root)
        SysfsReader(roots).require_pci()
        yield roots


def add_root_options(p: argparse.ArgumentParser, dev: bool = False, inherit: bool = False) -> None:
    """--sysfs-root, --proc-root (--dev-root) and --simulate.  With `inherit` (a sub-command
    whose parent has them too) an option not given keeps the parent's value, so
    `vfiod --simulate gpu inspect` and `vfiod inspect --simulate gpu` read the same host."""
    from ..sim.hosts import DEFAULT, EXAMPLES, topology_arg

    def default(value: str | None) -> str | None:
        return argparse.SUPPRESS if inherit else value

    p.add_argument("--sysfs-root", default=default("/sys"), metavar="DIR",
                   help="where sysfs is mounted (default: /sys)")
    p.add_argument("--proc-root", default=default("/proc"), metavar="DIR",
                   help="where procfs is mounted (default: /proc)")
    if dev:
        p.add_argument("--dev-root", default=default("/dev"), metavar="DIR",
                       help="where devtmpfs is mounted (default: /dev)")
    elif not inherit:
        p.set_defaults(dev_root="/dev")
    p.add_argument("--simulate", nargs="?", const=DEFAULT, default=default(None), type=topology_arg,
                   metavar="TOPOLOGY",
                   help=f"read a built-in simulated host instead of this machine "
                        f"(default {DEFAULT}; one of: {', '.join(sorted(EXAMPLES))}, or server[:N], "
                        f"a two-socket server of N PCI functions)")


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None, command: list[str] | None = None) -> int:
    """Parse `argv` and run the chosen command's ``func(args)``.  `parser` defaults ``func`` and
    ``run_command`` to None; a command that takes ``-- CMD ARGS`` sets ``run_command`` to a list."""
    args = parser.parse_args(argv)
    if command:
        if args.run_command is None:
            parser.error("only `vfioctl lease` takes a command after --")
        args.run_command = command
    if not args.func:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        rc: int = args.func(args)
        return rc
    except VfiodError as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:       # a bug: one line for the person, not a traceback
        print(f"{parser.prog}: internal error: {type(e).__name__}: {e} (a bug in vfiod: please report it)",
              file=sys.stderr)
        return EXIT_FAIL
    except BrokenPipeError:
        return EXIT_OK


