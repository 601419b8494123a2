"""GroupsJson of ``group:N`` scanned the group's sysfs only to learn its number, then
printed the snapshot's group all the same: a call of vfiod-dra's spec writer at every
prepare, tens of milliseconds on a slow machine.  A number the snapshot has is taken as
it is; any other target (an address, a name, a group the snapshot lacks) is resolved on
a fresh scan as before."""

import asyncio

import pytest

from vfiod.errors import NotFound
from tests.sim.test_prepared_objects import service_on


def test_a_group_number_is_answered_from_the_snapshot_without_a_scan(tmp_path):
    service = service_on(tmp_path, "ich10")
    queries = service.queries
    scans = []
    real = queries.manager.host_for
    queries.manager.host_for = lambda *a: scans.append(a) or real(*a)
    caller = None
    (g,) = asyncio.run(queries.groups_json(caller, ["group:8"]))
    assert g["group"] == 8 and len(g["devices"]) == 4
    assert scans == []
    (by_address,) = asyncio.run(queries.groups_json(caller, ["0000:04:00.0"]))
    assert by_address == g and len(scans) == 1               # an address still resolves on a scan
    with pytest.raises(NotFound):
        asyncio.run(queries.groups_json(caller, ["group:999"]))     # not in the snapshot: scanned, refused
