"""Safe at start: a journaled lease is judged against the device there now (vfiod.leases.identity).

Each case leases on a simulated host, "stops" vfiod (the journal is closed), changes
the host as a reboot, a card swap or an admin would, "starts" it again (a new kernel
and manager on the same journal, `reconcile_at_start`) and checks the simulated
kernel's record of writes: a device that is not the one leased is never written to."""

import asyncio
import shutil
import sqlite3

import attrs

from vfiod.address import PciAddress
from vfiod.leases.verify import reconcile_at_start
from vfiod.policy import Policy
from vfiod.sim import hosts

from .leasekit import Caller, Kit

A = PciAddress.parse
USER = Caller(1000)


def fn_evolve(spec, addr, **changes):
    """`spec` with the function at `addr` changed (None: without that function)."""
    fns = []
    for fn in spec.functions:
        if fn.addr == A(addr):
            if changes.get("remove"):
                continue
            fn = attrs.evolve(fn, **changes)
        fns.append(fn)
    return attrs.evolve(spec, functions=tuple(fns))


def stop(kit):
    kit.journal.close()


def start(tmp_path, spec, policy=None, reboot=True, owner_alive=None):
    """vfiod starts again on the same journal; with `reboot`, on a host laid out afresh from
    `spec` (every device on its boot driver, a new boot id); without, on the same tree."""
    if reboot:
        shutil.rmtree(tmp_path / "host")
    kit = Kit(tmp_path, spec=spec, owner_alive=owner_alive)
    if policy is not None:
        kit.policy = policy
    ended = []
    kit.manager.on_ended = ended.append
    got = reconcile_at_start(kit.manager)
    assert [(e.lease.id, e.reason) for e in got] == [(e.lease.id, e.reason) for e in ended]
    return kit, got


def ends(got):
    return [e.reason for e in got]


def audit_outcomes(kit, lease_id):
    return [(r[0], r[5]) for r in kit.journal.audit_rows() if r[3] == lease_id]


def writes_to(kit, addr):
    return [w for w in kit.kernel.writes if addr in w[0] or w[1].strip() == addr]


def persistent_lease(tmp_path, spec, target):
    kit = Kit(tmp_path, spec=spec)
    lease = kit.manager.request(USER, target, "vfio", {"persistent": True})
    # vfiod records the boot it last reconciled in (the daemon does it at every start).
    reconcile_at_start(kit.manager)
    stop(kit)
    return lease


def test_a_reboot_on_the_same_hardware_binds_the_persistent_lease_again(tmp_path):
    lease = persistent_lease(tmp_path, hosts.ICH10, "group:8")
    kit, got = start(tmp_path, hosts.ICH10)
    assert got == []
    assert [x.id for x in kit.journal.leases()] == [lease.id]
    for addr in ("0000:04:00.0", "0000:05:00.0"):
        assert kit.kernel.driver_of(A(addr)) == "vfio-pci"
        assert ("bus/pci/drivers/e1000e/unbind" if addr.endswith("04:00.0") else "bus/pci/drivers/tg3/unbind",
                addr) in [(w[0], w[1].strip()) for w in kit.kernel.writes]


def test_a_different_card_at_the_address_ends_the_lease_as_replaced_and_is_not_touched(tmp_path):
    # The case: a persistent lease of the I350 at 01:00.0, and at the next start the
    # boot VGA's GPU sits there (and its audio function beside it, in the same group 2).
    lease = persistent_lease(tmp_path, hosts.SRIOV, "0000:01:00.0")
    gpu = attrs.evolve(hosts.GPU, route_iface=None)
    kit, got = start(tmp_path, gpu)
    assert ends(got) == ["replaced"]
    assert kit.kernel.writes == []                    # no unbind, no override write: nothing
    assert kit.kernel.driver_of(A("0000:01:00.0")) == "nouveau"
    assert kit.kernel.driver_of(A("0000:01:00.1")) == "snd_hda_intel"
    assert kit.journal.leases() == []
    assert ("reconcile", "replaced") in audit_outcomes(kit, lease.id)


def test_a_card_with_the_same_ids_and_another_serial_is_replaced(tmp_path):
    spec = fn_evolve(hosts.ICH10, "0000:04:00.0", serial=0x0011223344556677)
    lease = persistent_lease(tmp_path, spec, "group:8")
    kit, got = start(tmp_path, fn_evolve(hosts.ICH10, "0000:04:00.0", serial=0x0011223344556678))
    assert ends(got) == ["replaced"]
    assert kit.kernel.writes == []
    assert kit.kernel.driver_of(A("0000:04:00.0")) == "e1000e" and kit.kernel.driver_of(A("0000:05:00.0")) == "tg3"
    detail = [r[6] for r in kit.journal.audit_rows() if r[3] == lease.id and r[5] == "replaced"][0]
    assert "serial 00-11-22-33-44-55-66-77 -> 00-11-22-33-44-55-66-78" in detail


def test_the_same_serial_after_a_reboot_is_the_same_card(tmp_path):
    spec = fn_evolve(hosts.ICH10, "0000:04:00.0", serial=0x0011223344556677)
    lease = persistent_lease(tmp_path, spec, "group:8")
    kit, got = start(tmp_path, spec)
    assert got == [] and [x.id for x in kit.journal.leases()] == [lease.id]
    assert kit.kernel.driver_of(A("0000:04:00.0")) == "vfio-pci"


def test_a_device_gone_after_a_reboot_ends_the_lease_as_removed(tmp_path):
    persistent_lease(tmp_path, hosts.ICH10, "group:8")
    kit, got = start(tmp_path, fn_evolve(hosts.ICH10, "0000:05:00.0", remove=True))
    assert ends(got) == ["removed"]
    assert kit.kernel.writes == []                    # 04:00.0 stays on the e1000e it booted on
    assert kit.kernel.driver_of(A("0000:04:00.0")) == "e1000e"


def test_a_device_removed_while_vfiod_was_down_ends_the_lease_and_the_rest_goes_home(tmp_path):
    persistent_lease(tmp_path, hosts.ICH10, "group:8")
    kit = Kit(tmp_path, spec=hosts.ICH10)
    kit.kernel.remove_device(A("0000:05:00.0"))
    stop(kit)
    kit, got = start(tmp_path, hosts.ICH10, reboot=False)
    assert ends(got) == ["removed"]
    assert writes_to(kit, "0000:05:00.0") == []
    assert writes_to(kit, "0000:04:00.0")             # verified and on vfio-pci: given back
    assert kit.kernel.state()["0000:04:00.0"] == ("e1000e", None)


def test_a_group_whose_members_changed_ends_the_lease_untouched(tmp_path):
    persistent_lease(tmp_path, hosts.ICH10, "group:8")
    # After the reboot 05:00.0 sits in a group of its own (say, an ACS quirk was added).
    kit, got = start(tmp_path, fn_evolve(hosts.ICH10, "0000:05:00.0", group=9))
    assert ends(got) == ["group-changed"]
    assert kit.kernel.writes == []
    assert kit.kernel.driver_of(A("0000:04:00.0")) == "e1000e"


NO_PROTECTED = Policy.from_sources([("t.toml", '[[rule]]\ngroup = [8]\neveryone = true\nbackends = ["vfio"]\n'
                                               'persistent = true\n')])


def test_a_device_the_host_now_needs_is_not_bound_again(tmp_path):
    persistent_lease(tmp_path, hosts.ICH10, "group:8")
    # After the reboot the default route runs over 04:00.0: it is protected now.
    kit, got = start(tmp_path, attrs.evolve(hosts.ICH10, route_iface="enp4s0"), policy=NO_PROTECTED)
    assert ends(got) == ["protected"]
    assert kit.kernel.writes == []
    assert kit.kernel.driver_of(A("0000:04:00.0")) == "e1000e"


def test_a_policy_that_no_longer_allows_it_is_asked_before_the_rebind(tmp_path):
    lease = persistent_lease(tmp_path, hosts.ICH10, "group:8")
    deny = Policy.from_sources([("t.toml", '[[rule]]\ngroup = [8]\nuids = [0]\nbackends = ["vfio"]\n')])
    kit, got = start(tmp_path, hosts.ICH10, policy=deny)
    assert ends(got) == ["denied"]
    assert kit.kernel.writes == []
    assert ("reconcile", "denied") in audit_outcomes(kit, lease.id)


def test_a_device_in_use_after_the_reboot_is_left_to_the_host(tmp_path):
    persistent_lease(tmp_path, hosts.ICH10, "group:8")
    # The open test policy allows protected devices: the in-use check still refuses.
    kit, got = start(tmp_path, attrs.evolve(hosts.ICH10, route_iface="enp4s0"))
    assert ends(got) == ["in-use"]
    assert kit.kernel.writes == []


def test_a_driver_changed_while_vfiod_was_down_ends_the_lease_as_at_run_time(tmp_path):
    kit = Kit(tmp_path, spec=hosts.ICH10)
    before = kit.snapshot()
    kit.manager.request(USER, "group:8", "vfio", {"persistent": True})
    reconcile_at_start(kit.manager)
    stop(kit)
    kit = Kit(tmp_path, spec=hosts.ICH10)
    kit.kernel.bind_behind_vfiods_back(A("0000:04:00.0"), "e1000e")      # an admin, same boot
    stop(kit)
    kit, got = start(tmp_path, hosts.ICH10, reboot=False)
    assert ends(got) == ["tampered"]
    # The group went back whole, as a tampered lease does at run time: 05:00.0 left vfio-pci.
    assert ("bus/pci/drivers/vfio-pci/unbind", "0000:05:00.0") in [(w[0], w[1].strip()) for w in kit.kernel.writes]
    assert kit.snapshot() == before


def test_a_restart_without_a_reboot_keeps_the_lease_without_a_write(tmp_path):
    lease = persistent_lease(tmp_path, hosts.ICH10, "group:8")
    kit, got = start(tmp_path, hosts.ICH10, reboot=False)
    assert got == [] and [x.id for x in kit.journal.leases()] == [lease.id]
    assert [w for w in kit.kernel.writes if not w[0].endswith("driver_override")] == []


def forget_identities(tmp_path):
    db = sqlite3.connect(str(tmp_path / "state" / "state.db"))
    db.execute("DELETE FROM identity")
    db.execute("DELETE FROM membership")
    db.commit()
    db.close()


def test_a_lease_journaled_without_identities_is_adopted_while_its_devices_stay_on_vfio(tmp_path):
    lease = persistent_lease(tmp_path, hosts.ICH10, "group:8")
    forget_identities(tmp_path)
    kit, got = start(tmp_path, hosts.ICH10, reboot=False)
    assert got == [] and [x.id for x in kit.journal.leases()] == [lease.id]
    members, identities = kit.journal.identity_of(lease.id)
    assert members == ["0000:00:1c.0", "0000:00:1c.4", "0000:04:00.0", "0000:05:00.0"]
    assert set(identities) == {"0000:04:00.0", "0000:05:00.0"}


def test_a_lease_journaled_without_identities_is_not_bound_again_after_a_reboot(tmp_path):
    lease = persistent_lease(tmp_path, hosts.ICH10, "group:8")
    forget_identities(tmp_path)
    kit, got = start(tmp_path, hosts.ICH10)
    assert ends(got) == ["unverified"]
    assert kit.kernel.writes == []
    assert ("reconcile", "unverified") in audit_outcomes(kit, lease.id)


def test_a_plain_lease_of_a_replaced_card_ends_without_touching_it(tmp_path):
    # Not only persistent leases: a plain one whose owner is gone is given back at start,
    # and giving back must not write to a card that is not the one leased.
    kit = Kit(tmp_path, spec=hosts.ICH10)
    kit.manager.request(USER, "group:8", "vfio", {}, owner=":1.9")
    stop(kit)
    kit, got = start(tmp_path, fn_evolve(hosts.ICH10, "0000:05:00.0", vendor=0x8086, device=0x10d3, driver="e1000e"))
    assert ends(got) == ["replaced"]
    assert kit.kernel.writes == []


def test_a_replaced_device_added_at_run_time_ends_the_lease_and_is_not_touched(tmp_path):
    from .test_hotplug import until
    from vfiod.backends import load_backends
    from vfiod.daemon import Service
    from vfiod.policy import PolicyStore

    kit = Kit(tmp_path, spec=hosts.ICH10)
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "10.toml").write_text('[[rule]]\ngroup = [8]\nuids = [1000]\nbackends = ["vfio"]\n')
    store = PolicyStore(str(tmp_path / "policy"))
    store.reload()

    async def main():
        service = Service(kit.kernel, kit.journal, store, load_backends())
        loop = asyncio.get_running_loop()
        service.loop = loop
        ended = []
        service.manager.on_ended = lambda e: ended.append(e.reason)
        kit.kernel.event_sink = lambda *e: loop.call_soon_threadsafe(service.on_pci_event, *e)
        await service.request(USER, "group:8", "vfio", {})
        # Another card shows up at 05:00.0 (its removal was never seen): new ids in its config space.
        node = kit.kernel._dev(A("0000:05:00.0"))
        with open(node + "/config", "r+b") as f:
            f.write(bytes([0xE4, 0x14, 0x99, 0x16]))
        kit.kernel.writes.clear()
        service.on_pci_event("add", A("0000:05:00.0"), None)
        await until(lambda: ended)
        assert ended == ["replaced"]
        assert writes_to(kit, "0000:05:00.0") == []
        assert kit.kernel.driver_of(A("0000:05:00.0")) == "vfio-pci"       # left as it is
        assert kit.kernel.state()["0000:04:00.0"] == ("e1000e", None)      # the verified one went home
    asyncio.run(main())
