"""What the daemon and its clients share on the bus: names and paths (`names`), and
dbus-next's connection with its fixes (`transport`)."""

from .names import BUS_NAME, ROOT, BusArgs, bus_args, device_path, group_path, group_number, lease_id_of, lease_path
from .transport import MAX_BODY_BYTES, PatientBus

__all__ = ["BUS_NAME", "MAX_BODY_BYTES", "ROOT", "BusArgs", "PatientBus", "bus_args", "device_path", "group_path",
           "group_number", "lease_id_of", "lease_path"]
