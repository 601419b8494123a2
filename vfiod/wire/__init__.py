"""What the daemon and its clients share on the bus: names and paths (`names`), and
dbus-next's connection with its fixes (`transport`).

`transport` (and with it dbus-next and asyncio) is imported on first use, so a
command that never touches the bus (`vfiod inspect`, `vfioctl --simulate`) does
not pay for it at start."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .names import BUS_NAME, ROOT, BusArgs, bus_args, device_path, group_path, group_number, lease_id_of, lease_path

if TYPE_CHECKING:
    from .transport import MAX_BODY_BYTES, PatientBus

__all__ = ["BUS_NAME", "MAX_BODY_BYTES", "ROOT", "BusArgs", "PatientBus", "bus_args", "device_path", "group_path",
           "group_number", "lease_id_of", "lease_path"]


def __getattr__(name: str) -> Any:
    if name in ("MAX_BODY_BYTES", "PatientBus"):
        from . import transport
        return getattr(transport, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
