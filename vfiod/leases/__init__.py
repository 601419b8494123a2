"""Leases: take a whole IOMMU group from the host, hand it over, give it back exactly.

Pure domain code (no bus, no udev).  The names used throughout: ``addr`` is a
`PciAddress` (a key), ``device`` a `topology.Device` (a snapshot), ``held``
a `state.HeldDevice` (the journal's record of a device before the lease), ``holder``
a `sysfs.Holder` (a process that has the group or a device open).

The rooms, one job each:

``core``       what the parts share: the kernel, the journal, group locks, the journaled step
``manager``    `LeaseManager`: the lifecycle's entry points (request, release, renew, expiry)
``moves``      the devices' walk: bind and hand over; take back, reset and restore
``ladder``     the revoke ladder: tell, ask, end the holders, give back
``reconcile``  on start: roll back, finish, keep or end each journaled lease
``memlock``    the RLIMIT_MEMLOCK grant and its return
``sriov``      an admin's change of a PF's VF count
``audit``      the audit record (journal table, log line, journald fields)
"""

from .core import END_REASONS, KILL_AFTER, Ended, LeaseCore, Revoking
from .manager import LeaseManager

__all__ = ["END_REASONS", "KILL_AFTER", "Ended", "LeaseCore", "LeaseManager", "Revoking"]
