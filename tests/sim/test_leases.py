"""Leases on the simulated kernel: grant, release, rollback at every step, refusals, concurrency."""

import os
import threading

import pytest

from vfiod.sysfs import acl
from vfiod.sim import hosts
from vfiod.address import PciAddress
from vfiod.errors import Busy, KernelError, PermissionDenied, InvalidArgument, NotFound, StateError
from vfiod.sim.kernel import Fault
from vfiod.state import Journal

from .leasekit import Caller, Kit

A = PciAddress.parse
USER = Caller(1000)
ADMIN = Caller(0)


def multi_endpoint_groups(spec):
    """Every group with at least one endpoint, as (group, endpoints)."""
    by = {}
    for fn in spec.functions:
        if fn.group is not None:
            by.setdefault(fn.group, []).append(fn)
    return sorted((g, [f for f in fns if f.kind not in ("rootport", "upstream", "downstream", "pcie-pci", "pci-bridge")])
                  for g, fns in by.items())


@pytest.mark.parametrize("name", sorted(hosts.EXAMPLES))
@pytest.mark.parametrize("backend,driver", [("vfio", "vfio-pci"), ("pci-stub", "pci-stub")])
def test_grant_and_release_every_group_of_every_example(name, backend, driver, tmp_path):
    kit = Kit(tmp_path, name)
    before = kit.snapshot()
    for group, endpoints in multi_endpoint_groups(kit.spec):
        if not endpoints:
            continue
        who = USER
        try:
            lease = kit.manager.request(USER, f"group:{group}", backend, {}, owner=":1.5")
        except Busy:        # the host uses it (root disk, default route): only an admin may force
            who = ADMIN
            lease = kit.manager.request(ADMIN, f"group:{group}", backend, {"force": True}, owner=":1.5")
        assert lease.state == "granted" and lease.group == group
        for fn in endpoints:
            assert kit.kernel.driver_of(fn.addr) == driver
        nodes = kit.kernel.vfio_nodes()
        if backend == "vfio":
            assert nodes[str(group)] == (who.uid, 0, 0o600)
        else:
            assert str(group) not in nodes
        kit.manager.release(lease.id, who)
        assert kit.snapshot() == before, f"group {group} not restored"
    assert kit.journal.leases() == []


def test_a_lease_records_what_it_changed_and_release_restores_overrides(tmp_path):
    kit = Kit(tmp_path, "ich10")
    lease = kit.manager.request(USER, "0000:04:00.0", "vfio", {})
    held = {h.addr: (h.driver, h.override) for h in kit.journal.held(lease.id)}
    assert held == {"0000:04:00.0": ("e1000e", None), "0000:05:00.0": ("tg3", None)}
    assert kit.kernel.state()["0000:05:00.0"] == ("vfio-pci", "vfio-pci")
    kit.manager.release(lease.id, USER)
    assert kit.kernel.state()["0000:05:00.0"] == ("tg3", None)


def test_devices_an_admin_parked_on_vfio_are_left_so(tmp_path):
    import attrs
    fns = tuple(attrs.evolve(f, driver="vfio-pci", override="vfio-pci") if str(f.addr) == "0000:04:00.0" else f
                for f in hosts.ICH10.functions)
    kit = Kit(tmp_path, spec=attrs.evolve(hosts.ICH10, functions=fns))
    before = kit.snapshot()
    lease = kit.manager.request(USER, "group:8", "vfio", {})
    kit.manager.release(lease.id, USER)
    assert kit.snapshot() == before
    assert kit.kernel.state()["0000:04:00.0"] == ("vfio-pci", "vfio-pci")


# ---------------------------------------------------------------- rollback at every step

BRIDGE3 = hosts.HostSpec.from_table("bridge3", "three conventional NICs behind one bridge", """
00:1c.0  -        8086:2940  060400  rootport   pcieport   1      acs
01:00.0  00:1c.0  12d8:e111  060400  pcie-pci   -          2
02:01.0  01:00.0  8086:100e  020000  pci        e1000      2      net=ens1
02:02.0  01:00.0  8086:100e  020000  pci        e1000      2      net=ens2
02:03.0  01:00.0  14e4:1677  020000  pci        tg3        2      net=ens3 override=tg3
""")
NICS = [A("02:01.0"), A("02:02.0"), A("02:03.0")]
FAULT_POINTS = [(op, addr, kind) for addr in NICS for op, kind in
                (("override", "error"), ("unbind", "error"), ("unbind", "block"), ("probe", "nobind"),
                 ("probe", "error"), ("override", "vanish"))]


@pytest.mark.parametrize("op,addr,kind", FAULT_POINTS, ids=[f"{o}-{a}-{k}" for o, a, k in FAULT_POINTS])
def test_a_fault_at_any_step_rolls_back_to_the_exact_prior_state(op, addr, kind, tmp_path):
    kit = Kit(tmp_path, spec=BRIDGE3, write_timeout=1.0)
    before = kit.snapshot()
    kit.kernel.inject(op, addr, Fault(kind, delay=1.5))
    with pytest.raises((KernelError, Busy)) as exc:
        kit.manager.request(USER, "group:2", "vfio", {})
    msg = str(exc.value)
    assert str(addr) in msg and "step" in msg
    if kind == "vanish":
        state, nodes = kit.snapshot()
        expected = {k: v for k, v in before[0].items() if k != str(addr)}
        assert state == expected and nodes == before[1]
    else:
        import time
        time.sleep(1.6 if kind == "block" else 0)      # a blocked write that completes late
        assert kit.snapshot() == before
    assert kit.journal.leases() == []
    assert [r[5] for r in kit.journal.audit_rows()][-1] == "rolled-back"


def test_a_failing_hand_over_rolls_back(tmp_path, monkeypatch):
    kit = Kit(tmp_path, spec=BRIDGE3)
    before = kit.snapshot()

    real = kit.kernel.set_node_owner

    def refuse(path, uid, gid, mode):
        if uid != 0:
            raise KernelError("cannot hand over /dev/vfio/2: Operation not permitted")
        real(path, uid, gid, mode)
    monkeypatch.setattr(kit.kernel, "set_node_owner", refuse)
    with pytest.raises(KernelError, match="hand over group 2"):
        kit.manager.request(USER, "group:2", "vfio", {})
    assert kit.snapshot() == before and kit.journal.leases() == []


# ---------------------------------------------------------------- refusals change nothing

def refused(kit, caller, target, backend="vfio", options=None, exc=Exception):
    before = kit.snapshot(), kit.journal.leases()
    with pytest.raises(exc) as e:
        kit.manager.request(caller, target, backend, options or {})
    assert (kit.snapshot(), kit.journal.leases()) == before
    assert not kit.kernel.writes
    return str(e.value)


def test_refusals_leave_host_and_journal_unchanged(tmp_path):
    kit = Kit(tmp_path, "ich10")
    assert "no IOMMU group 99" in refused(kit, USER, "group:99", exc=NotFound)
    assert "PCI address" in refused(kit, USER, "../../etc/passwd", exc=InvalidArgument)
    assert "unknown backend" in refused(kit, USER, "group:8", backend="nope", exc=InvalidArgument)
    assert "unknown option" in refused(kit, USER, "group:8", options={"uid": 0}, exc=InvalidArgument)
    kit.deny(1000)
    assert "denied by rule test.toml:1" in refused(kit, USER, "group:8", exc=PermissionDenied)


def test_second_request_for_a_leased_group_is_busy(tmp_path):
    kit = Kit(tmp_path, "ich10")
    lease = kit.manager.request(USER, "group:8", "vfio", {})
    kit.kernel.writes.clear()
    snap = kit.snapshot()
    with pytest.raises(Busy, match="leased by another user") as refused:
        kit.manager.request(Caller(1001), "0000:05:00.0", "vfio", {})
    assert lease.id not in str(refused.value)          # another user's lease id is not theirs to know
    with pytest.raises(Busy, match=lease.id):
        kit.manager.request(USER, "0000:05:00.0", "vfio", {})
    assert kit.snapshot() == snap and not kit.kernel.writes


def test_a_bridge_on_shpchp_is_held_unbound_for_the_lease(tmp_path):
    # Checked on kernel 6.1: a group whose PCIe-to-PCI bridge is on shpchp reads not
    # viable (VFIO_GROUP_GET_STATUS flags 0) until the bridge is unbound.
    import attrs
    fns = tuple(attrs.evolve(f, driver="shpchp") if str(f.addr) == "0000:01:00.0" else f
                for f in hosts.BRIDGE.functions)
    kit = Kit(tmp_path, spec=attrs.evolve(hosts.BRIDGE, functions=fns))
    before = kit.snapshot()
    lease = kit.manager.request(USER, "group:2", "vfio", {})
    assert kit.kernel.state()["0000:01:00.0"] == (None, "none")
    assert kit.manager.scan().groups[2].viable
    assert [h.role for h in kit.journal.held(lease.id)] == ["endpoint", "endpoint", "bridge"]
    kit.manager.release(lease.id, USER)
    assert kit.snapshot() == before


def test_in_use_devices_are_busy_unless_admin_forces(tmp_path):
    kit = Kit(tmp_path, "ich10")
    with open(os.path.join(kit.roots.proc, "net/route"), "a") as f:
        f.write("enp4s0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")
    msg = refused(kit, USER, "group:8", exc=Busy)
    assert "0000:04:00.0: network interface enp4s0 is up with routes" in msg
    refused(kit, ADMIN, "group:8", exc=Busy)
    lease = kit.manager.request(ADMIN, "group:8", "vfio", {"force": True})
    assert lease.state == "granted"


def test_only_the_owner_or_admin_releases(tmp_path):
    kit = Kit(tmp_path, "ich10")
    lease = kit.manager.request(USER, "group:8", "vfio", {})
    with pytest.raises(PermissionDenied):
        kit.manager.release(lease.id, Caller(1001))
    assert kit.journal.lease(lease.id) is not None
    kit.manager.release(lease.id, ADMIN)
    assert kit.journal.lease(lease.id) is None


def test_expiry_and_disconnect_end_leases(tmp_path):
    kit = Kit(tmp_path, "sriov")
    now = [1000.0]
    kit.manager.clock = lambda: now[0]
    a = kit.manager.request(USER, "group:5", "vfio", {"duration": 60}, owner=":1.7")
    b = kit.manager.request(USER, "group:4", "vfio", {}, owner=":1.7")
    c = kit.manager.request(USER, "group:3", "pci-stub", {"persistent": True}, owner=":1.7")
    now[0] += 61
    assert [(e.lease.id, e.reason) for e in kit.manager.expire_due()] == [(a.id, "expired")]
    assert [(e.lease.id, e.reason) for e in kit.manager.end_owned_by(":1.7")] == [(b.id, "disconnected")]
    assert [l.id for l in kit.journal.leases()] == [c.id]


def test_container_acl_when_the_host_made_it_root_only(tmp_path):
    kit = Kit(tmp_path, "bridge")
    os.chmod(kit.kernel.vfio_container_path(), 0o600)
    lease = kit.manager.request(USER, "group:2", "vfio", {})
    assert acl.user_perm(kit.kernel.vfio_container_path(), 1000) == 6
    kit.manager.release(lease.id, USER)
    assert acl.user_perm(kit.kernel.vfio_container_path(), 1000) is None
    assert os.stat(kit.kernel.vfio_container_path()).st_mode & 0o777 == 0o600


def test_open_group_gives_the_leased_node(tmp_path):
    kit = Kit(tmp_path, "bridge")
    lease = kit.manager.request(USER, "group:2", "vfio", {})
    ctx = kit.manager.context(lease)
    fd = kit.manager.backends["vfio"].open_group(ctx)
    try:
        assert os.fstat(fd).st_ino == os.stat(os.path.join(kit.roots.dev, "vfio/2")).st_ino
    finally:
        os.close(fd)
    with pytest.raises(InvalidArgument):
        kit.manager.backends["pci-stub"].open_group(ctx)


# ---------------------------------------------------------------- concurrency

def test_200_concurrent_requests_for_one_group_grant_exactly_one(tmp_path):
    kit = Kit(tmp_path, "ich10")
    results = []
    barrier = threading.Barrier(200)

    def go(uid):
        barrier.wait()
        try:
            results.append(("ok", kit.manager.request(Caller(uid), "group:8", "vfio", {}).id))
        except Busy:
            results.append(("busy", None))
    threads = [threading.Thread(target=go, args=(1000 + i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r[0] for r in results).count("ok") == 1
    assert [r[0] for r in results].count("busy") == 199
    assert len(kit.journal.leases()) == 1


def test_distinct_groups_all_succeed_in_parallel(tmp_path):
    kit = Kit(tmp_path, "sriov")
    groups = [3, 4, 5, 6]
    out = []
    threads = [threading.Thread(target=lambda g=g: out.append(kit.manager.request(USER, f"group:{g}", "vfio", {})))
               for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(l.group for l in out) == groups


# ---------------------------------------------------------------- the state file

def test_corrupt_or_newer_state_file_is_refused_untouched(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite at all" * 10)
    with pytest.raises(StateError, match="corrupt"):
        Journal(str(bad))
    assert bad.read_bytes() == b"this is not sqlite at all" * 10
    newer = tmp_path / "newer.db"
    j = Journal(str(newer))
    j.db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    j.close()
    data = newer.read_bytes()
    with pytest.raises(StateError, match="newer vfiod"):
        Journal(str(newer))
    assert newer.read_bytes() == data


def test_the_rules_duration_cap_applies_when_the_request_names_none(tmp_path):
    from vfiod.policy import Policy
    pdir = tmp_path / "policy"
    pdir.mkdir()
    (pdir / "10.toml").write_text('[[rule]]\ngroup = [8]\nuids = [1000]\nbackends = ["vfio"]\nmax_duration = "2h"\n')
    kit = Kit(tmp_path, "ich10")
    policy = Policy.load(str(pdir))
    kit.manager.policy_source = lambda: policy
    kit.manager.clock = lambda: 1000.0
    lease = kit.manager.request(USER, "group:8", "", {})
    assert lease.backend == "vfio" and lease.expires == 1000.0 + 7200
    kit.manager.release(lease.id, USER)
    with pytest.raises(PermissionDenied, match="allows at most 2h"):
        kit.manager.request(USER, "group:8", "", {"duration": 3 * 3600})


def test_a_protected_device_is_refused_as_protected_and_nothing_changes(tmp_path):
    from vfiod.errors import Protected
    from vfiod.policy import Policy
    pdir = tmp_path / "policy"
    pdir.mkdir()
    (pdir / "10.toml").write_text('[[rule]]\ngroup = [2]\nuids = [0]\nbackends = ["vfio"]\n')
    kit = Kit(tmp_path, "ich10")
    policy = Policy.load(str(pdir))
    kit.manager.policy_source = lambda: policy
    msg = refused(kit, ADMIN, "group:2", exc=Protected)
    assert "default route NIC" in msg and "allow_protected" in msg


def test_vfs_lease_one_by_one_and_their_pf_is_busy_while_they_are_leased(tmp_path):
    kit = Kit(tmp_path, "sriov")
    vf1 = kit.manager.request(USER, "0000:01:10.0", "vfio", {})
    vf2 = kit.manager.request(Caller(1001), "0000:01:10.4", "vfio", {})
    assert (vf1.group, vf2.group) == (3, 4)
    kit.kernel.writes.clear()
    snap = kit.snapshot()
    with pytest.raises(Busy, match="SR-IOV PF whose VFs are leased"):
        kit.manager.request(USER, "0000:01:00.0", "vfio", {})
    assert kit.snapshot() == snap and not kit.kernel.writes
    kit.manager.release(vf1.id, USER)
    kit.manager.release(vf2.id, Caller(1001))
    pf = kit.manager.request(USER, "0000:01:00.0", "vfio", {})
    assert kit.kernel.driver_of(A("0000:01:00.0")) == "vfio-pci"
    kit.manager.release(pf.id, USER)
