"""What vfiod's dependencies need from newer Pythons, installed when vfiod is imported.

dbus-next 0.2.3 (PyPI's last release, and what Debian 12 and 13 ship) does
``from typing import no_type_check_decorator`` and calls it each time a class
declares a D-Bus method, property or signal.  Python 3.13 deprecates that
function (each call warns) and Python 3.15 removes it (the import fails, and
with it every part of vfiod that speaks D-Bus).  Where it is deprecated or
gone, ``typing`` gets an equivalent of its own that does not warn: what the
function did, applied by hand (``typing.no_type_check`` on the result of the
decorator).  Older Pythons are left alone.  Importing ``vfiod`` installs it,
before anything of vfiod imports dbus-next.
"""

from __future__ import annotations

import functools
import sys
import typing
from typing import Any, Callable

#: The first Python whose typing.no_type_check_decorator warns.
DEPRECATED_FROM = (3, 13)


def no_type_check_decorator(decorator: Callable[..., Any]) -> Callable[..., Any]:
    """Give a decorator the effect of typing.no_type_check (as typing's own did)."""

    @functools.wraps(decorator)
    def wrapped_decorator(*args: Any, **kwargs: Any) -> Any:
        return typing.no_type_check(decorator(*args, **kwargs))

    return wrapped_decorator


def install(version: tuple[int, ...] = tuple(sys.version_info[:2])) -> bool:
    """Put the shim into typing where its own warns or is missing; True if it did."""
    current = getattr(typing, "no_type_check_decorator", None)
    if current is no_type_check_decorator:
        return False
    if current is not None and version < DEPRECATED_FROM:
        return False
    setattr(typing, "no_type_check_decorator", no_type_check_decorator)
    return True
