"""Durations and sizes: the one grammar for both, used by policy files and the command line."""

from __future__ import annotations

import re
from datetime import date, datetime, time




_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_DURATION = 100 * 366 * 86400
#: The longest a lease may be asked for or renewed by, whatever the rules say (one year):
#: longer is refused, so every expiry stays a number clients can read.
MAX_LEASE_SECONDS = 365 * 86400
MAX_MEMLOCK = (1 << 63) - 1

_SIZE = re.compile(r"(\d{1,20})\s*([kKmMgGtT]?)(?:i?B)?")
_DURATION_PART = re.compile(r"(\d{1,9})([smhdw])")

# ---------------------------------------------------------------- values

def parse_duration(value: object) -> int:
    """Seconds from an integer or "90s", "30m", "8h", "2d", "1w", "1h30m" ("90": seconds).

    Raises `ValueError` with a message for people."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a duration (\"8h\", \"30m\" or seconds), got {_describe(value)}")
    if isinstance(value, int):
        seconds = value
    elif re.fullmatch(r"\d{1,12}", value):
        seconds = int(value)
    else:
        parts = _DURATION_PART.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise ValueError(f"not a duration: {_short(value)} (try \"90s\", \"30m\", \"8h\", \"2d\", \"1h30m\")")
        seconds = sum(int(n) * _SECONDS[u] for n, u in parts)
    if not 0 < seconds <= MAX_DURATION:
        raise ValueError(f"a duration must be between 1 second and 100 years, got {seconds} s")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from an integer or "512K", "256M", "1G", "1T" (powers of 1024; "MiB"/"MB" too)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a size (\"256M\", \"1G\" or bytes), got {_describe(value)}")
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE.fullmatch(value.strip())
        if not m:
            raise ValueError(f"not a size: {_short(value)} (try \"256M\", \"1G\" or a number of bytes)")
        size = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if not 0 < size <= MAX_MEMLOCK:
        raise ValueError(f"a size must be positive and below 8 EiB, got {size}")
    return size


def format_size(size: int) -> str:
    """"1G", "256M", … (the largest unit that divides `size`), or "N bytes"."""
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size} bytes"


def format_duration(seconds: int) -> str:
    """"8h", "1h30m", "90s" → "1m30s", …"""
    out = []
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= factor:
            out.append(f"{seconds // factor}{unit}")
            seconds %= factor
    return "".join(out) or "0s"


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 4] + "...'"


def _describe(value: object) -> str:
    """`value` in the words of TOML: "the string 'x'", "an array", …"""
    if isinstance(value, bool):
        return f"the boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"the integer {value}" if abs(value) < 10 ** 20 else "a huge integer"
    if isinstance(value, float):
        return f"the float {value!r}"
    if isinstance(value, str):
        return f"the string {_short(value)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime):
        return "a date-time"
    if isinstance(value, date):
        return "a date"
    if isinstance(value, time):
        return "a time"
    return f"a {type(value).__name__}"


def _hex4(v: int | None) -> str:
    return "????" if v is None else f"{v:04x}"


