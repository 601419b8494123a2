"""SR-IOV: an admin changes a PF's number of VFs, never from under a lease."""

from __future__ import annotations

from ..address import PciAddress
from ..errors import Busy, InvalidArgument, NotFound, PermissionDenied
from ..policy import Caller
from .core import LeaseCore


def set_vf_count(core: LeaseCore, caller: Caller, pf: PciAddress, count: int) -> int:
    """Set an SR-IOV PF's number of VFs (``sriov_numvfs``): root, or a user a
    policy rule with ``max_vfs`` allows (up to that many; a protected PF only where
    the rule names it and sets allow_protected).  Refused (`Busy`) while the PF or
    any of its VFs is leased: changing the count removes every VF, and would pull
    them from under their lessees.  Returns the count before the change."""
    reader = core.reader
    if not core.kernel.exists(pf):
        raise NotFound(f"no device {pf}")
    raw = reader.read_device(pf)
    if raw.sriov_totalvfs is None:
        raise InvalidArgument(f"{pf} is not an SR-IOV physical function")
    if not isinstance(count, int) or not 0 <= count <= raw.sriov_totalvfs:
        raise InvalidArgument(f"{pf} supports 0 to {raw.sriov_totalvfs} VFs, not {count!r}")
    group = reader.group_of(pf)
    with core.group_lock(group if group is not None else -1):
        why = ""
        if not caller.is_root:
            host = core.scan_groups([group] if group is not None else [])
            dev = host.devices.get(pf)
            allowed, why = core.policy_source().decide_vf_count(dev, caller, count) if dev else (False, "")
            if not allowed:
                raise PermissionDenied(f"may not set {pf} to {count} VFs: {why or 'not in an IOMMU group'}")
        raw = reader.read_device(pf)
        holdings = core.journal.holdings()
        busy = sorted({holdings[str(a)][0].id for a in (pf, *raw.virtfns) if str(a) in holdings})
        if busy:
            raise Busy(f"{pf} or its VFs are leased ({', '.join(busy)}); release them first")
        before = raw.sriov_numvfs or 0
        core.kernel.set_numvfs(pf, count)
        detail = f"{before} -> {count} VFs" + (f"; {why}" if why else "")
        core.audit("sriov", caller.uid, str(pf), None, None, "changed", detail, group=group)
        return before
