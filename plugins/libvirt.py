"""The ``libvirt`` backend: a leased group for a user's libvirt VM, without root.

libvirt's managed hostdevs need a root-run domain; a user running VMs under
``qemu:///session`` has none.  This backend does the privileged half for them:

* grant: every endpoint is detached through libvirt's node-device API on
  ``qemu:///system`` (``virNodeDeviceDetachFlags(..., "vfio")``), so libvirt's
  own bookkeeping knows the device is off the host; vfiod then checks the
  device really is on vfio-pci and makes ``/dev/vfio/N`` the lessee's, as the
  ``vfio`` backend does (QEMU opens it by path).  The policy's memlock grant
  goes to the calling process, which is what lets session libvirt raise its
  QEMU's limit to RAM + 1 GiB.
* ``hostdev_xml``: ``<hostdev mode='subsystem' type='pci' managed='no'>`` for
  every endpoint, to paste into (or generate) the domain.
* release: reattach through libvirt, then restore each device to what vfiod's
  journal recorded; where libvirt put it elsewhere, that is logged and fixed.
* refused: a device that a running libvirt domain uses, and any request when
  the binding is missing or libvirt cannot be reached (the other backends go
  on working).

The URI is ``qemu:///system``; ``VFIOD_LIBVIRT_URI`` in vfiod's environment
changes it.
"""

from __future__ import annotations

import logging
import os
import threading
import xml.etree.ElementTree as ET
from types import ModuleType
from typing import TYPE_CHECKING, Iterable

from vfiod.address import PciAddress
from vfiod.errors import BackendFailed, Busy
from vfiod.hookspecs import Register, hookimpl
from vfiod.sysfs import KERNELS_CHOICE

from .vfio import VfioBackend

if TYPE_CHECKING:
    import libvirt                      # the binding ships no types: its classes name what is meant

    from vfiod.hookspecs import LeaseContext
    from vfiod.state import HeldDevice

log = logging.getLogger("vfiod.libvirt")

DEFAULT_URI = "qemu:///system"


def nodedev_name(addr: PciAddress) -> str:
    """libvirt's node-device name of a PCI function: pci_DDDD_BB_SS_F."""
    return addr.libvirt_name


def hostdev_elements(addresses: Iterable[PciAddress]) -> str:
    """The ``<hostdev>`` elements of a group's endpoints, in address order."""
    out = []
    for a in sorted(addresses):
        out.append(
            "<hostdev mode='subsystem' type='pci' managed='no'>\n"
            "  <driver name='vfio'/>\n"
            "  <source>\n"
            f"    <address domain='0x{a.domain:04x}' bus='0x{a.bus:02x}' slot='0x{a.slot:02x}' "
            f"function='0x{a.function:x}'/>\n"
            "  </source>\n"
            "</hostdev>")
    return "\n".join(out) + "\n"


def domain_hostdevs(domain_xml: str) -> set[tuple[int, int, int, int]]:
    """(domain, bus, slot, function) of every PCI hostdev in a domain's XML."""
    found: set[tuple[int, int, int, int]] = set()
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError:
        return found
    for hd in root.iter("hostdev"):
        if hd.get("type") != "pci":
            continue
        a = hd.find("source/address")
        if a is None:
            continue
        try:
            domain, bus, slot, function = (int(a.get(k, "0"), 16) for k in ("domain", "bus", "slot", "function"))
        except ValueError:
            continue
        found.add((domain, bus, slot, function))
    return found


class LibvirtBackend(VfioBackend):
    name = "libvirt"
    driver = "vfio-pci"

    def __init__(self, uri: str | None = None, module: ModuleType | None = None):
        self.uri = uri or os.environ.get("VFIOD_LIBVIRT_URI") or DEFAULT_URI
        self._module = module              # the libvirt binding (tests pass a double)
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.Lock()

    # ---- the connection

    def _libvirt(self) -> ModuleType:
        if self._module is None:
            try:
                import libvirt
            except ImportError:
                raise BackendFailed(
                    "the libvirt backend needs libvirt's Python binding, which is not installed: "
                    "pip install 'vfiod[libvirt]' (libvirt-python, built against Debian's libvirt-dev)") from None
            self._module = libvirt
        return self._module

    def connection(self) -> libvirt.virConnect:
        libvirt = self._libvirt()
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                self._conn = None
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as e:
                raise BackendFailed(
                    f"cannot reach libvirt at {self.uri}: {e.get_error_message()}; is libvirtd (or "
                    "virtqemud) running? (systemctl start libvirtd)") from None
            return self._conn

    def _nodedev(self, conn: libvirt.virConnect, addr: PciAddress) -> libvirt.virNodeDevice:
        libvirt = self._libvirt()
        try:
            return conn.nodeDeviceLookupByName(nodedev_name(addr))
        except libvirt.libvirtError as e:
            raise BackendFailed(
                f"libvirt does not know {addr} ({nodedev_name(addr)}: {e.get_error_message()}); its "
                "node-device driver learns PCI devices from udev: is systemd-udevd running?") from None

    # ---- the hooks

    def check(self, ctx: LeaseContext) -> None:
        super().check(ctx)
        libvirt = self._libvirt()
        conn = self.connection()
        wanted = {(a.domain, a.bus, a.slot, a.function): a for a in ctx.endpoints}
        try:
            domains = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            for dom in domains:
                for key in domain_hostdevs(dom.XMLDesc(0)) & wanted.keys():
                    raise Busy(f"{wanted[key]} is assigned to the running libvirt domain {dom.name()!r} "
                               f"on {self.uri}")
        except libvirt.libvirtError as e:
            raise BackendFailed(f"cannot list libvirt's domains: {e.get_error_message()}") from None
        for a in ctx.endpoints:
            self._nodedev(conn, a)

    def bind(self, ctx: LeaseContext, addr: PciAddress) -> None:
        libvirt = self._libvirt()
        if ctx.kernel.driver_of(addr) == self.driver:
            return
        conn = self.connection()
        dev = self._nodedev(conn, addr)
        try:
            dev.detachFlags("vfio", 0)
        except libvirt.libvirtError as e:
            raise BackendFailed(f"libvirt could not detach {addr}: {e.get_error_message()}") from None
        have = ctx.kernel.wait_driver(addr, self.driver)
        if have != self.driver:
            raise BackendFailed(f"libvirt detached {addr}, but it is on {have or 'no driver'}, not {self.driver}")

    def unbind(self, ctx: LeaseContext, addr: PciAddress, held: HeldDevice) -> None:
        libvirt = self._libvirt()
        if ctx.kernel.driver_of(addr) == self.driver:
            try:
                dev = self._nodedev(self.connection(), addr)
                dev.reAttach()
            except (BackendFailed, libvirt.libvirtError) as e:
                msg = e.get_error_message() if isinstance(e, libvirt.libvirtError) else str(e)
                log.warning("libvirt could not reattach %s (%s); vfiod restores it itself", addr, msg)
        if held.driver == KERNELS_CHOICE:     # bound early: the kernel's probe chooses (vfiod.sysfs.early)
            ctx.kernel.restore(addr, held.driver, held.override)
            return
        have = ctx.kernel.wait_driver(addr, held.driver)
        if have != held.driver or ctx.kernel.override_of(addr) != held.override:
            if have != self.driver:
                log.warning("libvirt left %s on %s (override %s); vfiod's journal says %s (override %s): "
                            "restoring that", addr, have or "no driver", ctx.kernel.override_of(addr),
                            held.driver or "no driver", held.override)
            ctx.kernel.restore(addr, held.driver, held.override)

    def hostdev_xml(self, ctx: LeaseContext) -> str:
        return hostdev_elements(ctx.endpoints)


@hookimpl
def vfiod_register_backends(register: Register) -> None:
    register(LibvirtBackend())
