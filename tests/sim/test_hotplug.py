"""Hotplug on the simulated kernel: removed and tampered leased devices, and event bursts."""

import asyncio
import faulthandler
import sys
import time

import pytest

from vfiod.sim import hosts
from vfiod.address import PciAddress
from vfiod.backends import load_backends
from vfiod.daemon import Service
from vfiod.policy import Caller, PolicyStore
from vfiod.sim.kernel import SimKernel
from vfiod.state import Journal

A = PciAddress.parse
USER = Caller(1000)
POLICY = '[[rule]]\ngroup = [8]\nuids = [1000]\nbackends = ["vfio"]\n'


def make_service(tmp_path):
    roots = hosts.build("ich10", str(tmp_path / "host"))
    kernel = SimKernel.for_spec(hosts.ICH10, roots)
    pdir = tmp_path / "policy"
    pdir.mkdir()
    (pdir / "10.toml").write_text(POLICY)
    store = PolicyStore(str(pdir))
    store.reload()
    service = Service(kernel, Journal(str(tmp_path / "state.db")), store, load_backends())
    ended = []
    service.manager.on_ended = lambda e: ended.append((e.lease.id, e.reason))
    return service, kernel, ended


async def until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            faulthandler.dump_traceback(sys.stderr, all_threads=True)     # what each thread was doing
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


def run(tmp_path, scenario):
    async def main():
        service, kernel, ended = make_service(tmp_path)
        loop = asyncio.get_running_loop()
        service.loop = loop
        kernel.event_sink = lambda *e: loop.call_soon_threadsafe(service.on_pci_event, *e)
        return await scenario(service, kernel, ended, loop)
    return asyncio.run(main())


def test_a_leased_device_that_is_removed_ends_its_lease(tmp_path):
    async def scenario(service, kernel, ended, loop):
        lease = await service.request(USER, "group:8", "vfio", {})
        await loop.run_in_executor(None, kernel.remove_device, A("0000:05:00.0"))
        await until(lambda: ended)
        assert ended == [(lease.id, "removed")]
        assert kernel.driver_of(A("0000:04:00.0")) == "e1000e"          # the rest went back
        assert service.manager.leases() == []
        await until(lambda: A("0000:05:00.0") not in service.host.devices)
    run(tmp_path, scenario)


def test_a_driver_change_behind_vfiods_back_ends_the_lease_as_tampered(tmp_path):
    async def scenario(service, kernel, ended, loop):
        lease = await service.request(USER, "group:8", "vfio", {})
        await asyncio.sleep(0.1)          # vfiod's own binds are not tampering
        assert ended == []
        await loop.run_in_executor(None, kernel.bind_behind_vfiods_back, A("0000:04:00.0"), "e1000e")
        await until(lambda: ended)
        assert ended == [(lease.id, "tampered")]
        state = kernel.state()
        assert state["0000:04:00.0"][0] == "e1000e" and state["0000:05:00.0"] == ("tg3", None)
    run(tmp_path, scenario)


def test_a_burst_of_1000_events_is_handled_without_a_rescan_per_event(tmp_path):
    async def scenario(service, kernel, ended, loop):
        before = dict(service.scans)
        addrs = sorted(service.host.devices)
        t0 = time.perf_counter()
        for i in range(1000):
            service.on_pci_event("change", addrs[i % len(addrs)], None)
            if i % 100 == 99:
                await asyncio.sleep(0)     # let the loop breathe, as a socket read would
        await asyncio.sleep(0.2)
        took = time.perf_counter() - t0
        full = service.scans["full"] - before["full"]
        partial = service.scans["partial"] - before["partial"]
        print(f"\nevent burst: 1000 events in {took * 1000:.0f} ms -> {full} full scans, "
              f"{partial} partial refreshes")
        assert service.scans["events"] - before["events"] == 1000
        assert full == 0 and partial <= 20
    run(tmp_path, scenario)


def test_events_after_the_daemon_stopped_touch_neither_the_journal_nor_the_log(tmp_path, caplog):
    """A uevent (or a tamper check it scheduled) that arrives while vfiod stops, after
    its journal closed, is dropped: before, the handler read the closed journal and
    logged sqlite3's "Cannot operate on a closed database" with a traceback."""
    async def scenario(service, kernel, ended, loop):
        lease = await service.request(USER, "group:8", "vfio", {})
        addr = A("0000:05:00.0")
        service.on_pci_event("unbind", addr, None)          # a tamper check is scheduled ...
        service.stop()
        service.manager.journal.close()                     # ... and the journal closes first
        service.on_pci_event("bind", addr, "e1000e")
        service.on_pci_event("remove", addr, None)
        await asyncio.sleep(service.hotplug.TAMPER_GRACE + 0.2)
        return lease
    lease = run(tmp_path, scenario)
    assert lease.id
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= 40], caplog.text


def test_a_lease_rescans_its_group_once_not_for_each_of_its_own_driver_changes(tmp_path):
    """The binds and unbinds of a grant are vfiod's own: the group is rescanned when the
    grant ends, not once per burst of its events (each rescan competed with the reply)."""
    async def scenario(service, kernel, ended, loop):
        before = service.scans["partial"]
        await service.request(USER, "group:8", "vfio", {})
        await until(lambda: service.scans["partial"] > before)
        await asyncio.sleep(0.5)
        assert service.scans["partial"] - before == 1
        assert service.host.devices[A("0000:04:00.0")].driver == "vfio-pci"
    run(tmp_path, scenario)


def test_a_device_removed_while_vfiod_moves_its_group_is_still_rescanned(tmp_path):
    async def scenario(service, kernel, ended, loop):
        with service.manager.group_lock(8):          # as during a grant or a release
            assert service.manager.is_busy(8)
            await loop.run_in_executor(None, kernel.remove_device, A("0000:05:00.0"))
            await until(lambda: A("0000:05:00.0") not in service.host.devices)
    run(tmp_path, scenario)


def test_a_driver_change_in_a_group_vfiod_moves_asks_the_journal_nothing_and_a_revokes_still_turns(tmp_path):
    """While a grant or release holds a group's lock, its devices' bind and unbind events are
    vfiod's own: they are dropped before any journal query (each cost a query on the loop,
    beside the move).  The unbind of a device the revoke ladder is unbinding is not dropped:
    is asked about as always (it turns the ladder)."""
    async def scenario(service, kernel, ended, loop):
        asked = []
        real = service.manager.journal.holdings

        def counted(addr):
            asked.append(addr)
            return real(addr)
        service.manager.journal.holdings = counted
        with service.manager.group_lock(8):
            service.on_pci_event("bind", A("0000:04:00.0"), "vfio-pci")
            service.on_pci_event("unbind", A("0000:05:00.0"), None)
        assert asked == []
        service.on_pci_event("bind", A("0000:04:00.0"), "e1000e")      # not moving: judged as always
        assert asked == ["0000:04:00.0"]
        service.manager.reader.locked = frozenset({A("0000:04:00.0")})   # as a revoke's ladder leaves it
        with service.manager.group_lock(8):
            service.on_pci_event("unbind", A("0000:04:00.0"), None)
        assert asked[-1] == "0000:04:00.0"
    run(tmp_path, scenario)
