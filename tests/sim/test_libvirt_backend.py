"""The libvirt backend's logic on the simulated kernel, with a stand-in for
libvirt's binding that moves devices the way libvirtd does (driver_override,
unbind, probe).  The real thing is proven in tests/guest/test_libvirt_guest.py;
this tier injects what is hard to make happen there."""

import logging

import pytest

from vfiod.address import PciAddress
from vfiod.errors import BackendFailed, Busy
from vfiod_plugins.libvirt import LibvirtBackend, hostdev_elements

from .leasekit import Caller, Kit

A = PciAddress.parse
USER = Caller(1000)
NICS = [A("0000:04:00.0"), A("0000:05:00.0")]          # ICH10 group 8


class FakeLibvirt:
    """What the backend uses of the `libvirt` module, over a SimKernel."""

    VIR_CONNECT_LIST_DOMAINS_ACTIVE = 1

    class libvirtError(Exception):
        def get_error_message(self):
            return str(self)

    def __init__(self, kernel, reachable=True):
        self.kernel = kernel
        self.reachable = reachable
        self.calls = []
        self.domains = []                 # (name, xml) of running domains
        self.reattach_to = None           # where a buggy reattach leaves the device
        self.unknown = set()              # node devices libvirt does not know

    def open(self, uri):
        if not self.reachable:
            raise self.libvirtError("Failed to connect socket to '/run/libvirt/libvirt-sock': No such file")
        return _Conn(self)


class _Conn:
    def __init__(self, lv):
        self.lv = lv

    def isAlive(self):
        return True

    def listAllDomains(self, flags):
        return [_Dom(n, x) for n, x in self.lv.domains]

    def nodeDeviceLookupByName(self, name):
        _, dom, bus, slot, fn = name.split("_")
        addr = PciAddress(int(dom, 16), int(bus, 16), int(slot, 16), int(fn, 16))
        if name in self.lv.unknown or not self.lv.kernel.exists(addr):
            raise self.lv.libvirtError(f"Node device not found: no node device with matching name '{name}'")
        return _Dev(self.lv, addr)


class _Dom:
    def __init__(self, name, xml):
        self._name, self._xml = name, xml

    def name(self):
        return self._name

    def XMLDesc(self, flags):
        return self._xml


class _Dev:
    def __init__(self, lv, addr):
        self.lv, self.addr = lv, addr

    def detachFlags(self, driver, flags):
        self.lv.calls.append(("detach", str(self.addr), driver))
        self.lv.kernel.bind(self.addr, "vfio-pci")

    def reAttach(self):
        self.lv.calls.append(("reattach", str(self.addr)))
        k = self.lv.kernel
        k.set_override(self.addr, self.lv.reattach_to)
        k.unbind(self.addr)
        k.probe(self.addr)


def kit_with_libvirt(tmp_path, **kw):
    kit = Kit(tmp_path, "ich10")
    lv = FakeLibvirt(kit.kernel, **kw)
    kit.manager.backends["libvirt"] = LibvirtBackend(uri="qemu:///system", module=lv)
    return kit, lv


def test_grant_detaches_through_libvirt_and_release_reattaches(tmp_path):
    kit, lv = kit_with_libvirt(tmp_path)
    before = kit.snapshot()
    lease = kit.manager.request(USER, "group:8", "libvirt", {})
    assert [c for c in lv.calls if c[0] == "detach"] == [("detach", str(a), "vfio") for a in NICS]
    assert [kit.kernel.driver_of(a) for a in NICS] == ["vfio-pci", "vfio-pci"]
    assert kit.kernel.vfio_nodes()["8"] == (USER.uid, 0, 0o600)          # QEMU opens it by path
    ctx = kit.manager.context(kit.journal.lease(lease.id))
    assert kit.manager.backends["libvirt"].hostdev_xml(ctx) == hostdev_elements(NICS)
    kit.manager.release(lease.id, USER)
    assert [c for c in lv.calls if c[0] == "reattach"] == [("reattach", str(a)) for a in NICS]
    assert kit.snapshot() == before


def test_where_libvirt_reattaches_elsewhere_vfiods_journal_wins(tmp_path, caplog):
    kit, lv = kit_with_libvirt(tmp_path)
    before = kit.snapshot()
    lease = kit.manager.request(USER, "group:8", "libvirt", {})
    lv.reattach_to = "pci-stub"          # libvirt puts them somewhere the journal does not say
    with caplog.at_level(logging.WARNING):
        kit.manager.release(lease.id, USER)
    assert kit.snapshot() == before
    assert "libvirt left 0000:04:00.0 on pci-stub" in caplog.text and "restoring that" in caplog.text


def test_a_device_a_running_domain_uses_is_refused(tmp_path):
    kit, lv = kit_with_libvirt(tmp_path)
    lv.domains = [("web", "<domain><devices>" + hostdev_elements([NICS[1]]) + "</devices></domain>"),
                  ("other", "<domain><devices>" + hostdev_elements([A("0000:00:19.0")]) + "</devices></domain>")]
    before = kit.snapshot()
    with pytest.raises(Busy, match="0000:05:00.0 is assigned to the running libvirt domain 'web'"):
        kit.manager.request(USER, "group:8", "libvirt", {})
    assert kit.snapshot() == before and kit.journal.leases() == [] and lv.calls == []


@pytest.mark.parametrize("setup, message", [
    (lambda lv: setattr(lv, "reachable", False), "cannot reach libvirt at qemu:///system: .*is libvirtd"),
    (lambda lv: lv.unknown.add("pci_0000_05_00_0"), "libvirt does not know 0000:05:00.0 .*systemd-udevd"),
])
def test_libvirt_unreachable_or_ignorant_is_named_and_changes_nothing(tmp_path, setup, message):
    kit, lv = kit_with_libvirt(tmp_path)
    setup(lv)
    before = kit.snapshot()
    with pytest.raises(BackendFailed, match=message):
        kit.manager.request(USER, "group:8", "libvirt", {})
    assert kit.snapshot() == before and kit.journal.leases() == []
    # the other backends keep working
    lease = kit.manager.request(USER, "group:8", "vfio", {})
    kit.manager.release(lease.id, USER)
    assert kit.snapshot() == before


def test_without_the_binding_the_backend_says_how_to_get_it(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_libvirt(name, *a, **kw):
        if name == "libvirt":
            raise ImportError("No module named 'libvirt'")
        return real_import(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_libvirt)
    kit = Kit(tmp_path, "ich10")
    kit.manager.backends["libvirt"] = LibvirtBackend()
    before = kit.snapshot()
    with pytest.raises(BackendFailed, match=r"pip install 'vfiod\[libvirt\]'"):
        kit.manager.request(USER, "group:8", "libvirt", {})
    assert kit.snapshot() == before


def test_a_failed_detach_rolls_back_what_libvirt_already_moved(tmp_path):
    from vfiod.sim.kernel import Fault
    kit, lv = kit_with_libvirt(tmp_path)
    before = kit.snapshot()
    kit.kernel.inject("probe", NICS[1], Fault("nobind"))     # the second detach binds nothing
    with pytest.raises(BackendFailed):
        kit.manager.request(USER, "group:8", "libvirt", {})
    assert kit.snapshot() == before and kit.journal.leases() == []
