"""Mediated devices (mdev): parents, their types, their instances, as sysfs shows them.

A parent driver (a vGPU's, s390's AP/CCW, the kernel's ``mtty``/``mdpy`` samples)
registers with the mdev core; each of its types can be instantiated by writing a UUID
to ``create``, and an instance is removed by writing 1 to its ``remove``::

    SYSFS/class/mdev_bus/PARENT -> ../../devices/.../PARENT
    .../PARENT/mdev_supported_types/TYPE/{name,description,device_api,available_instances,create}
    .../PARENT/mdev_supported_types/TYPE/devices/UUID -> ../../../UUID
    SYSFS/bus/mdev/devices/UUID -> ../../../devices/.../PARENT/UUID
    .../PARENT/UUID/{mdev_type,iommu_group,remove}

An instance is a VFIO device of an emulated IOMMU group (``/dev/vfio/N``), used through
the legacy group interface.  ``mdevctl`` keeps persistent definitions in
``/etc/mdevctl.d/PARENT/UUID`` (JSON): those instances are the admin's.
"""

from __future__ import annotations

import os
import re

import attrs

from .read import Roots, _text

#: An mdev's name: a UUID in the kernel's spelling (lower-case, dashed).
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: A parent's or a type's sysfs name (what `mdev:PARENT/TYPE` names).
NAME = re.compile(r"[A-Za-z0-9_.:+-]{1,64}")
MDEVCTL_DIR = "/etc/mdevctl.d"


@attrs.frozen
class MdevInstance:
    uuid: str
    group: int | None          # its (emulated) IOMMU group, None while it has none
    mdevctl: bool              # defined persistently by mdevctl (the admin's, never vfiod's to remove)


@attrs.frozen
class MdevType:
    parent: str
    type: str                  # the sysfs name, e.g. mtty-2
    name: str | None           # its own words (the type's ``name``), e.g. "Dual port serial"
    device_api: str | None     # vfio-pci, vfio-ccw, ...
    available: int | None      # how many more instances the parent can make now
    instances: tuple[MdevInstance, ...] = ()

    @property
    def target(self) -> str:
        return f"mdev:{self.parent}/{self.type}"


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def mdevctl_defined(etc: str = MDEVCTL_DIR) -> frozenset[str]:
    """The UUIDs mdevctl defines persistently (``/etc/mdevctl.d/PARENT/UUID``)."""
    found: set[str] = set()
    try:
        parents = os.listdir(etc)
    except OSError:
        return frozenset()
    for p in parents:
        try:
            found.update(n for n in os.listdir(os.path.join(etc, p)) if UUID.fullmatch(n))
        except OSError:
            continue
    return frozenset(found)


def instance_group(roots: Roots, uuid: str) -> int | None:
    link = os.path.join(roots.sysfs, "bus/mdev/devices", uuid, "iommu_group")
    try:
        return int(os.path.basename(os.readlink(link)))
    except (OSError, ValueError):
        return None


def read_types(roots: Roots, etc: str = MDEVCTL_DIR) -> list[MdevType]:
    """Every type of every mdev parent, with its instances; [] where there are none."""
    base = os.path.join(roots.sysfs, "class/mdev_bus")
    try:
        parents = sorted(p for p in os.listdir(base) if NAME.fullmatch(p))
    except OSError:
        return []
    defined = mdevctl_defined(etc)
    out = []
    for parent in parents:
        tdir = os.path.join(base, parent, "mdev_supported_types")
        try:
            types = sorted(t for t in os.listdir(tdir) if NAME.fullmatch(t))
        except OSError:
            continue
        for t in types:
            d = os.path.join(tdir, t)
            try:
                uuids = sorted(u for u in os.listdir(os.path.join(d, "devices")) if UUID.fullmatch(u))
            except OSError:
                uuids = []
            out.append(MdevType(
                parent=parent, type=t, name=_text(os.path.join(d, "name")),
                device_api=_text(os.path.join(d, "device_api")),
                available=_int(_text(os.path.join(d, "available_instances"))),
                instances=tuple(MdevInstance(u, instance_group(roots, u), u in defined) for u in uuids)))
    return out

