"""A device read while it was being removed comes back half-read, in no IOMMU group.

Before, the partial refresh kept such a device (it was "in the scan"), and since it
was no longer a member of its group, no later refresh of that group dropped it:
the removed device stayed on the bus for good (seen as a flaky hotplug test)."""

import attrs

from vfiod.daemon.snapshot import Snapshot
from vfiod.sim import hosts
from vfiod.sysfs import SysfsReader
from vfiod.topology import Host


def test_a_half_read_device_in_no_group_is_dropped_with_its_group_rescanned(tmp_path):
    reader = SysfsReader(hosts.build("ich10", str(tmp_path / "host")))
    old = Host.scan(reader)
    group = old.groups[8]
    keep, gone = group.members[0], group.members[-1]
    assert keep != gone
    # The rescan of group 8 as it reads mid-removal: `gone` is there, but in no group.
    raws = [old.devices[keep].raw, attrs.evolve(old.devices[gone].raw, iommu_group=None)]
    part = Host.from_raw(raws, reader.facts())
    assert part.groups[8].members == (keep,) and gone in part.devices
    merged = Snapshot._merge(old, part, [8])
    assert gone not in merged.devices
    assert keep in merged.devices and merged.groups[8].members == (keep,)
    # A device that moved to another rescanned group stays.
    assert set(Snapshot._merge(old, Host.scan_groups(reader, [8]), [8]).devices) == set(old.devices)
