"""Finding backends: built-ins from ``plugins/``, then entry points, through pluggy."""

from __future__ import annotations

import importlib

import pluggy

from . import hookspecs
from .errors import BackendFailed, InvalidArgument

BUILTIN = ("vfiod_plugins.vfio", "vfiod_plugins.pci_stub", "vfiod_plugins.libvirt")
ENTRY_POINT_GROUP = "vfiod.backends"


class BackendBase:
    """Defaults for the hooks of `vfiod.hookspecs` that most backends share."""

    name = ""
    driver = ""

    def check(self, ctx) -> None:
        pass

    def bind(self, ctx, addr) -> None:
        ctx.kernel.load_driver(self.driver)
        ctx.kernel.bind(addr, self.driver)

    def unbind(self, ctx, addr, held) -> None:
        ctx.kernel.restore(addr, held.driver, held.override)

    def plan_hand_over(self, ctx) -> dict:
        return {}

    def hand_over(self, ctx) -> dict:
        return {}

    def take_back(self, ctx, record: dict) -> None:
        pass

    def open_group(self, ctx) -> int:
        raise InvalidArgument(f"the {self.name} backend hands over no group fd")

    def open_container(self, ctx) -> int:
        raise InvalidArgument(f"the {self.name} backend hands over no container fd")

    def hostdev_xml(self, ctx) -> str:
        raise InvalidArgument(f"the {self.name} backend has no hostdev XML (use the libvirt backend)")


def plugin_manager(extra=(), entry_points: bool = True) -> pluggy.PluginManager:
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


def load_backends(pm: pluggy.PluginManager | None = None) -> dict[str, object]:
    pm = pm or plugin_manager()
    found: dict[str, object] = {}

    def register(backend):
        name = getattr(backend, "name", None)
        if not name or not getattr(backend, "driver", None):
            raise BackendFailed(f"a plugin registered a backend without a name or driver: {backend!r}")
        if name in found:
            raise BackendFailed(f"two plugins register a backend named {name!r}")
        found[name] = backend

    pm.hook.vfiod_register_backends(register=register)
    return found
