"""Man pages from the sources of ``--help`` and of ``pydoc vfiod.policy``.

``python -m vfiod.cmd.manpage OUTDIR`` writes ``vfiod.8``, ``vfioctl.1`` and
``vfiod.policy.5`` (roff, the man macros).  The two program pages walk the
argparse parsers the programs use, so every command, option and help text is
the one ``--help`` prints; the policy page is the module docstring of
`vfiod.policy`, the one description of the policy format.  Nothing here is
written by hand twice: change the parser or the docstring, and the pages follow.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from typing import Iterator

from .. import __version__
from .common import DOCS, EXIT_CODES

SOURCE = f"vfiod {__version__}"

# What --help does not say, and a man page must.
FILES = [("/etc/vfiod/policy.d/*.toml", "the policy files, read in name order; see vfiod.policy(5)"),
         ("/var/lib/vfiod/state.db", "vfiod's journal of leases and its audit table (SQLite)"),
         ("/lib/systemd/system/vfiod.service", "the unit; `systemctl reload vfiod` runs `vfiod reload`"),
         ("/usr/share/dbus-1/system.d/org.vfiod1.conf", "who may own and call org.vfiod1 on the system bus"),
         ("/usr/share/doc/vfiod/examples/", "example policy files, vfiod-dra's units and manifests"),
         ("/usr/share/doc/vfiod/README.md", "the admin's guide: install, first policy, troubleshooting, upgrade"),
         (f"{DOCS}/json.md", "every field and code of every command's --json output"),
         (f"{DOCS}/dbus.md", "the D-Bus API of org.vfiod1: methods, properties, signals, errors"),
         (f"{DOCS}/internals.md", "what a lease does to the host, restarts, the revoke ladder"),
         (f"{DOCS}/kubernetes.md", "vfiod-dra: the DRA flow, the CDI spec writer, the policy")]
PAGES = {"vfiod": "8", "vfioctl": "1", "vfiod.policy": "5", "vfiod-dra": "8"}


def esc(text: str) -> str:
    """Text safe in roff: backslashes, and lines that would start a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = re.sub(r"[^\x00-\x7f]", lambda m: f"\\[u{ord(m.group()):04X}]", text)   # groff's Unicode escapes
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.M)


def _inline(text: str) -> str:
    """``code`` in bold, `names` in italics (the docstring's reST), escaped."""
    out = []
    for part in re.split(r"(``[^`]+``|`[^`]+`)", text):
        if part.startswith("``"):
            out.append(f"\\fB{esc(part[2:-2])}\\fR")
        elif part.startswith("`") and len(part) > 1:
            out.append(f"\\fI{esc(part[1:-1])}\\fR")
        else:
            out.append(esc(part))
    return "".join(out)


def header(name: str, section: str, summary: str) -> list[str]:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")      # reproducible builds (dpkg sets it)
    date = (datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc).date() if epoch
            else datetime.date.today())
    return [f'.TH "{name.upper()}" "{section}" "{date.isoformat()}" "{SOURCE}" "vfiod"',
            ".SH NAME", f"{esc(name)} \\- {esc(summary)}"]


def text_blocks(text: str) -> list[str]:
    """A help text (RawDescriptionHelpFormatter: its line breaks matter) as roff: plain
    paragraphs are filled, indented lines (tables, examples) kept as they are, and a
    line ending in a colon before indented lines becomes a bold heading."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text.strip("\n")):
        lines = block.rstrip().splitlines()
        if not lines:
            continue
        head = None
        if len(lines) > 1 and lines[0].rstrip().endswith(":") and not lines[0][:1].isspace() \
                and all(line[:1].isspace() for line in lines[1:]):
            head, lines = lines[0].rstrip(), lines[1:]
        if head:
            out += [".PP", f"\\fB{esc(head)}\\fR"]
        if any(line[:1].isspace() for line in lines) or lines[0].startswith("usage:"):
            indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
            out += [".RS 4" if head else ".PP", ".nf"] + [esc(line[indent:]) for line in lines] + \
                   [".fi"] + ([".RE"] if head else [])
        else:
            out += [] if head else [".PP"]
            out += [esc(" ".join(line.strip() for line in lines))]
    return out


def _visible(action: argparse.Action) -> bool:
    return action.help is not argparse.SUPPRESS and not isinstance(action, argparse._SubParsersAction)


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each sub-command, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name) or "", sub


def _option_items(parser: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    for action in parser._actions:
        if not _visible(action):
            continue
        if action.option_strings:
            metavar = ""
            if action.nargs != 0:
                named = action.metavar or action.dest.upper()
                text = " ".join(named) if isinstance(named, tuple) else named
                metavar = f" \\fI{esc(text)}\\fR"
                if action.nargs == "?":
                    metavar = f" [{metavar.strip()}]"
            label = ", ".join(f"\\fB{esc(o)}\\fR" for o in action.option_strings) + metavar
        else:
            label = f"\\fI{esc(str(action.metavar or action.dest))}\\fR"
        out += [".TP", label, esc(_help_text(action, parser)) if action.help else ""]
    return out


def _help_text(action: argparse.Action, parser: argparse.ArgumentParser) -> str:
    text = action.help or ""
    if "%" in text:
        params = dict(vars(action), prog=parser.prog)
        if isinstance(params.get("choices"), dict):
            params["choices"] = ", ".join(params["choices"])
        text = text % params
    return text


def _usage(parser: argparse.ArgumentParser) -> list[str]:
    usage = parser.format_usage().strip()
    usage = re.sub(r"^usage:\s*", "", usage)
    return [".PP", ".nf", esc(re.sub(r"\s+", " ", usage)), ".fi"]


def commands(parser: argparse.ArgumentParser, prefix: str) -> list[str]:
    """Every sub-command, depth first: usage, description and options."""
    out: list[str] = []
    for name, summary, sub in _subparsers(parser):
        full = f"{prefix} {name}"
        out += [f'.SS "{esc(full)}"', esc(summary)]
        out += _usage(sub)
        if sub.description:
            out += text_blocks(sub.description)
        options = _option_items(sub)
        if options:
            out += [".PP", "\\fIOptions:\\fR", ".RS 4"] + options + [".RE"]
        out += commands(sub, full)
    return out


def program_page(parser: argparse.ArgumentParser, section: str, summary: str, see_also: list[str]) -> str:
    name = parser.prog
    out = header(name, section, summary)
    out += [".SH SYNOPSIS"] + _usage(parser)
    for sub_name, _, sub in _subparsers(parser):
        out += _usage(sub)
    out += [".SH DESCRIPTION"] + text_blocks(parser.description or "")
    out += [".SH OPTIONS"] + _option_items(parser)
    out += [".SH COMMANDS"] + commands(parser, name)
    if parser.epilog:
        out += [".SH EXAMPLES"] + text_blocks(re.sub(r"^examples:\s*\n", "", parser.epilog))
    out += [".SH EXIT STATUS", ".TP"]
    for i, (code, meaning) in enumerate(EXIT_CODES):        # the README's table, the same rows
        out += ([".TP"] if i else []) + [f"\\fB{code}\\fR", esc(meaning.replace("`", ""))]
    out += [".SH FILES"]
    for path, what in FILES:
        out += [".TP", f"\\fI{esc(path)}\\fR", esc(what)]
    out += [".SH SEE ALSO", ", ".join(f"\\fB{esc(p)}\\fR({s})" for p, s in
                                       ((x.rsplit("(", 1)[0], x.rsplit("(", 1)[1].rstrip(")")) for x in see_also))]
    return "\n".join(out) + "\n"


def rest_to_roff(text: str) -> list[str]:
    """The docstring's small reST: ``Heading`` over ``=====``, paragraphs, ``* `` items,
    and literal blocks after a paragraph that ends in ``::``."""
    out: list[str] = []
    lines = text.strip("\n").splitlines()
    i = 0
    literal_next = False
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        if i + 1 < len(lines) and re.fullmatch(r"=+", lines[i + 1].strip()):
            out.append(f".SH {esc(line.strip().upper())}")
            i += 2
            continue
        if literal_next and line[:1].isspace():
            block = []
            while i < len(lines) and (not lines[i].strip() or lines[i][:1].isspace()):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            indent = min(len(b) - len(b.lstrip()) for b in block if b.strip())
            out += [".PP", ".RS 4", ".nf"] + [esc(b[indent:]) for b in block] + [".fi", ".RE"]
            literal_next = False
            continue
        para = []
        while i < len(lines) and lines[i].strip() and not (i + 1 < len(lines)
                                                          and re.fullmatch(r"=+", lines[i + 1].strip())):
            para.append(lines[i].strip())
            i += 1
            if para[0].startswith("* ") and i < len(lines) and lines[i].startswith("* "):
                break
        joined = " ".join(para)
        literal_next = joined.endswith("::")
        if literal_next:
            joined = joined[:-1]
        if joined.startswith("* "):
            out += [".IP \\(bu 2", _inline(joined[2:])]
        else:
            out += [".PP", _inline(joined)]
    return out


def policy_page() -> str:
    from .. import policy

    doc = policy.__doc__ or ""
    first, _, rest = doc.partition("\n\n")
    out = header("vfiod.policy", "5", first.rstrip(".").replace("Admin policy: ", "vfiod's policy files: "))
    out += [".SH SYNOPSIS", ".PP", "\\fI/etc/vfiod/policy.d/*.toml\\fR"]
    out += [".SH DESCRIPTION", ".PP", _inline(
        "vfiod(8) leases a device's IOMMU group only when its policy allows it: deny by default. "
        "Check files with ``vfioctl policy check DIR`` and try them with ``vfioctl policy test --user USER "
        "TARGET``; reload the daemon with ``systemctl reload vfiod``, which fails if the policy is refused.")]
    # the body: from the first section on (the paragraph before it is about the code)
    start = re.search(r"^\S.*\n=+\n", rest, flags=re.M)
    out += rest_to_roff(rest[start.start():] if start else rest)
    out += [".SH EXAMPLES", ".PP", "The files in \\fI/usr/share/doc/vfiod/examples/\\fR cover the common cases."]
    out += [".SH SEE ALSO", "\\fBvfiod\\fR(8), \\fBvfioctl\\fR(1)"]
    return "\n".join(out) + "\n"


def pages() -> dict[str, str]:
    from ..dra.main import parser as dra_parser
    from .ctl import vfioctl_parser
    from .server import vfiod_parser

    return {
        "vfiod.8": program_page(vfiod_parser(), "8", "VFIO IOMMU-group leasing daemon",
                                ["vfioctl(1)", "vfiod.policy(5)", "systemctl(1)"]),
        "vfioctl.1": program_page(vfioctl_parser(), "1", "ask vfiod for IOMMU groups and leases; check policy",
                                  ["vfiod(8)", "vfiod.policy(5)"]),
        "vfiod.policy.5": policy_page(),
        "vfiod-dra.8": program_page(dra_parser(), "8", "Kubernetes DRA node driver for vfiod (vfiod.io)",
                                    ["vfiod(8)", "vfioctl(1)", "vfiod.policy(5)"]),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m vfiod.cmd.manpage OUTDIR", file=sys.stderr)
        return 2
    os.makedirs(argv[0], exist_ok=True)
    for name, text in pages().items():
        with open(os.path.join(argv[0], name), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
