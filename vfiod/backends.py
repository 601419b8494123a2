"""Finding backends: built-ins from ``plugins/``, then entry points, through pluggy."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Iterable

import pluggy

from . import hookspecs
from .errors import BackendFailed, InvalidArgument
from .hookspecs import Backend

if TYPE_CHECKING:
    from .address import PciAddress
    from .hookspecs import LeaseContext
    from .state import HeldDevice, Record

BUILTIN = ("vfiod_plugins.vfio", "vfiod_plugins.pci_stub", "vfiod_plugins.libvirt")
ENTRY_POINT_GROUP = "vfiod.backends"


class BackendBase:
    """Defaults for the `vfiod.hookspecs.Backend` methods that most backends share:
    bind to `driver` and restore, hand nothing over, open nothing."""

    name = ""
    driver = ""
    uses_vfio = False

    def check(self, ctx: LeaseContext) -> None:
        pass

    def bind(self, ctx: LeaseContext, addr: PciAddress) -> None:
        ctx.kernel.load_driver(self.driver)
        ctx.kernel.bind(addr, self.driver)

    def unbind(self, ctx: LeaseContext, addr: PciAddress, held: HeldDevice) -> None:
        ctx.kernel.restore(addr, held.driver, held.override)

    def plan_hand_over(self, ctx: LeaseContext) -> Record:
        return {}

    def hand_over(self, ctx: LeaseContext) -> Record:
        return {}

    def take_back(self, ctx: LeaseContext, record: Record) -> None:
        pass

    def open_group(self, ctx: LeaseContext) -> int:
        raise InvalidArgument(f"the {self.name} backend hands over no group fd")

    def open_container(self, ctx: LeaseContext) -> int:
        raise InvalidArgument(f"the {self.name} backend hands over no container fd")

    def open_device(self, ctx: LeaseContext, addr: PciAddress) -> int:
        raise InvalidArgument(f"the {self.name} backend hands over no device cdev")

    def open_iommu(self, ctx: LeaseContext) -> int:
        raise InvalidArgument(f"the {self.name} backend hands over no iommufd")

    def hostdev_xml(self, ctx: LeaseContext) -> str:
        raise InvalidArgument(f"the {self.name} backend has no hostdev XML (use the libvirt backend)")


def plugin_manager(extra: Iterable[object] = (), entry_points: bool = True) -> pluggy.PluginManager:
    """Backends come through the entry-point group `vfiod.backends`, the built-in ones
    (``plugins/``, imported as `vfiod_plugins`) as well as third parties'.  Where vfiod
    runs from a source tree without installed metadata, the built-ins are imported
    directly; `extra` plugins (tests) come last."""
    pm = pluggy.PluginManager("vfiod")
    pm.add_hookspecs(hookspecs.BackendSpec)
    if entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for name in BUILTIN:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:      # the plugin is there but broken: say so
                raise
            continue
        if not pm.is_registered(module):
            pm.register(module, name=name)
    for plugin in extra:
        pm.register(plugin)
    pm.check_pending()
    return pm


def load_backends(pm: pluggy.PluginManager | None = None) -> dict[str, Backend]:
    pm = pm or plugin_manager()
    found: dict[str, Backend] = {}

    def register(backend: object) -> None:
        # Third-party plugins are not type-checked with vfiod: check the protocol here.
        if not isinstance(backend, Backend):
            raise BackendFailed(f"a plugin registered {backend!r}, which is not a backend (it lacks a member of "
                                "vfiod.hookspecs.Backend; vfiod.backends.BackendBase gives the defaults)")
        name = backend.name
        if not name or not backend.driver:
            raise BackendFailed(f"a plugin registered a backend without a name or driver: {backend!r}")
        if name in found:
            raise BackendFailed(f"two plugins register a backend named {name!r}")
        found[name] = backend

    pm.hook.vfiod_register_backends(register=register)
    return found
