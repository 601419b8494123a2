"""Network interfaces of PCI functions, where the kernel puts them: ``BDF/net/IF``, or
for a virtio NIC ``BDF/virtioN/net/IF`` (the interface belongs to the virtio device
below the PCI function), and from an interface name back to its PCI function."""

from __future__ import annotations

import os

from ..address import INTERFACE_NAME, PciAddress
from ..errors import InvalidAddress

_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW


def _names_at(dfd: int, name: str) -> list[str]:
    try:
        fd = os.open(name, _FLAGS, dir_fd=dfd)
    except OSError:
        return []
    try:
        return sorted(os.listdir(fd))
    except OSError:
        return []
    finally:
        os.close(fd)


def _virtio_children(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith("virtio") and n[6:].isdigit()]


def interfaces_at(dfd: int) -> tuple[str, ...]:
    """The interfaces of the PCI function whose sysfs directory is open at `dfd`."""
    names = _names_at(dfd, "net")
    for child in _virtio_children(_names_at(dfd, ".")):
        names.extend(_names_at(dfd, f"{child}/net"))
    return tuple(names)


def interface_dirs(base: str) -> list[tuple[str, str]]:
    """(name, sysfs directory) of each interface of the PCI function at `base`."""
    out: list[tuple[str, str]] = []
    try:
        children = sorted(os.listdir(base))
    except OSError:
        return out
    for sub in ["net"] + [c + "/net" for c in _virtio_children(children)]:
        try:
            names = sorted(os.listdir(os.path.join(base, sub)))
        except OSError:
            continue
        out.extend((name, os.path.join(base, sub, name)) for name in names)
    return out


def interface_address(sysfs: str, name: str) -> PciAddress | None:
    """The PCI function the interface `name` belongs to (None: no such interface, or not
    on a PCI device).  The name reaches a path only once checked as an interface name."""
    if not INTERFACE_NAME.fullmatch(name):
        return None
    link = os.path.join(sysfs, "class/net", name)
    if not os.path.islink(link):
        return None
    node = os.path.realpath(link)
    for piece in reversed(node.split("/")):
        try:
            return PciAddress.from_sysfs_name(piece)
        except InvalidAddress:
            continue
    return None
