"""The names every side of org.vfiod1 shares: the bus name, object paths, bus addresses.

Used by the daemon, `vfioctl`, `vfioctl monitor` and vfiod-dra alike; it imports
nothing of the daemon."""

from __future__ import annotations

import argparse
import difflib
import re
from typing import TYPE_CHECKING, TypedDict

from ..address import PciAddress
from ..errors import NotFound

if TYPE_CHECKING:
    from dbus_next import BusType

BUS_NAME = "org.vfiod1"
ROOT = "/org/vfiod1"


class BusArgs(TypedDict, total=False):
    """Where a MessageBus connects: a well-known bus or an address."""

    bus_type: BusType
    bus_address: str


def bus_args(spec: str) -> BusArgs:
    """MessageBus arguments for ``system``, ``session`` or a bus address."""
    from dbus_next import BusType  # here, not at the top: names are read by commands that never connect
    if spec == "system":
        return {"bus_type": BusType.SYSTEM}
    if spec == "session":
        return {"bus_type": BusType.SESSION}
    return {"bus_address": spec}


_ADDRESS = re.compile(r"[a-z][a-z0-9-]*:[^;]*(;[a-z][a-z0-9-]*:[^;]*)*")


def bus_arg(text: str) -> str:
    """An argparse type for --bus: ``system``, ``session`` or a D-Bus address
    (``unix:path=/run/dbus/system_bus_socket``); anything else is a usage error."""
    if text in ("system", "session") or _ADDRESS.fullmatch(text):
        return text
    close = difflib.get_close_matches(text, ("system", "session"), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise argparse.ArgumentTypeError(f"not a bus: {text!r} (system, session, or a D-Bus address such as "
                                     f"unix:path=/run/dbus/system_bus_socket{hint})")


def group_path(n: int) -> str:
    return f"{ROOT}/group/{int(n)}"


def device_path(addr: PciAddress) -> str:
    return f"{ROOT}/device/{addr.object_name}"


def lease_id_of(path: str) -> str:
    """The lease id of a lease object path (`NotFound` for any other path)."""
    prefix = lease_path("")
    if not isinstance(path, str) or not path.startswith(prefix) or not path[len(prefix):]:
        raise NotFound(f"not a lease: {path!r}")
    return path[len(prefix):]


def lease_path(lease_id: str) -> str:
    return f"{ROOT}/lease/{lease_id}"



def group_number(path: str) -> int:
    """The IOMMU group number of a group object path (``/org/vfiod1/group/N``);
    `NotFound` for any other path."""
    prefix = group_path(0)[:-1]
    tail = path[len(prefix):] if isinstance(path, str) and path.startswith(prefix) else ""
    if not (tail.isascii() and tail.isdigit() and len(tail) <= 9):
        raise NotFound(f"not an IOMMU group: {path!r}")
    return int(tail)
