"""What both command lines share: exit codes, root options, simulated hosts, durations, and `run`.

`EXIT_CODES` is the one exit-code table of `vfiod` and `vfioctl` (README,
"Exit codes", shows it and a test keeps the two equal).  Every `VfiodError`
carries one of these codes; anything else is a bug and is reported in one
line, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from ..errors import VfiodError

if TYPE_CHECKING:
    from ..sysfs import Roots

EXIT_OK = 0            # success (check, policy test: allowed)
EXIT_FAIL = 1          # failure: not found, no daemon or bus, a backend or the kernel failed
EXIT_USAGE = 2         # usage: bad arguments or target, a broken policy
EXIT_DENIED = 3        # permission denied: policy, root only, protected, unsafe
EXIT_BUSY = 4          # busy or not viable: leased, in use, a group VFIO cannot take now
EXIT_INTERRUPTED = 130  # Ctrl-C before the command finished (128 + SIGINT)

#: (code, meaning): the README's table, in this order.
#: Where the package puts the reference (docs/ of the source, next to README.md).
DOCS = "/usr/share/doc/vfiod/docs"
#: The help of every --json option.
JSON_HELP = f"print JSON for scripts ({DOCS}/json.md)"

EXIT_CODES = (
    (EXIT_OK, "success; `check` and `policy test`: allowed"),
    (EXIT_FAIL, "failure: not found, vfiod or the bus unreachable or gone, a backend or the kernel failed"),
    (EXIT_USAGE, "usage: bad arguments, a malformed target, a broken policy"),
    (EXIT_DENIED, "permission denied: by policy, root only, protected or unsafe device"),
    (EXIT_BUSY, "busy or not viable: leased or in use, or a group VFIO cannot take now"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C) before the command finished"),
)


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
    from ..sim import BUILT_IN, DEFAULT, topology_arg

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
                        f"(default {DEFAULT}; one of: {', '.join(BUILT_IN)}, or server[:N], "
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
        return EXIT_INTERRUPTED
    except BrokenPipeError:      # the reader went away (`vfioctl monitor | head`): nothing more to say
        _quiet_stdout()
        return EXIT_OK
    except Exception as e:       # a bug: one line for the person, not a traceback
        print(f"{parser.prog}: internal error: {type(e).__name__}: {e} (a bug in vfiod: please report it)",
              file=sys.stderr)
        return EXIT_FAIL


def print_json(kind: str, one_line: bool = False, **fields: Any) -> None:
    """One versioned JSON document (docs/json.md): ``{"version": 1, "kind": KIND, ...}``,
    indented for a terminal unless `one_line` (a stream of documents, one a line)."""
    import json

    from ..report import envelope
    indent = None if one_line or not sys.stdout.isatty() else 1
    print(json.dumps(envelope(kind, **fields), indent=indent), flush=True)


def _quiet_stdout() -> None:
    """Point stdout at a pipe of our own (held open until exit), so the interpreter's last
    flush of what is still buffered (less than a pipe holds) meets no closed reader."""
    import os
    try:
        _read_end, write_end = os.pipe()
        os.dup2(write_end, sys.stdout.fileno())
        os.close(write_end)
    except (OSError, ValueError):
        pass


