"""The ``pci-stub`` backend: park a group so no host driver takes it; nothing is handed over."""

from vfiod.backends import BackendBase
from vfiod.hookspecs import Register, hookimpl


class PciStubBackend(BackendBase):
    name = "pci-stub"
    driver = "pci-stub"


@hookimpl
def vfiod_register_backends(register: Register) -> None:
    register(PciStubBackend())
