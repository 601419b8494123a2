"""mountinfo: which filesystem is mounted where, from what (parsed text; reads nothing)."""

from __future__ import annotations

import re

import attrs


@attrs.frozen
class Mount:
    """One line of /proc/PID/mountinfo: the device number, where it is mounted, the
    filesystem type, its source and its super options."""

    majmin: str
    point: str
    fstype: str
    source: str
    options: dict[str, str]


def parse_mountinfo(text: str) -> list[Mount]:
    """Every mount of a mountinfo text, in order (a line that does not parse is skipped)."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-", 6)
            fstype, source, opts = fields[sep + 1], fields[sep + 2], fields[sep + 3] if len(fields) > sep + 3 else ""
        except (ValueError, IndexError):
            continue
        options = dict((o.split("=", 1) + [""])[:2] for o in opts.split(",") if o)
        out.append(Mount(majmin=fields[2], point=_unescape(fields[4]), fstype=fstype, source=_unescape(source),
                         options={k: _unescape(v) for k, v in options.items()}))
    return out


def _unescape(text: str) -> str:
    """mountinfo's octal escapes (``\\040`` for a space)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text) if "\\" in text else text


def _mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount that holds `path` (the last one on the longest matching mount point)."""
    best: Mount | None = None
    for m in mounts:
        point = m.point.rstrip("/") or "/"
        if path == point or path.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) >= len(best.point.rstrip("/") or "/"):
                best = m
    return best
