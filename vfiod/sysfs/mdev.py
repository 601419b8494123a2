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

Names reach paths only through `MdevKind.parse` (``PARENT/TYPE``, each a sysfs name,
never ``.`` or ``..``) and `check_uuid`; what an instance is now (its type and group)
is read from the kernel by `instance_now`.
"""

from __future__ import annotations

import os
import re

import attrs

from ..errors import InvalidArgument
from .read import Roots, _readlink, _text

#: An mdev's name: a UUID in the kernel's spelling (lower-case, dashed).
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: A parent's or a type's sysfs name (what `mdev:PARENT/TYPE` names).
NAME = re.compile(r"[A-Za-z0-9_.:+-]{1,64}")
MDEVCTL_DIR = "/etc/mdevctl.d"


def _name(text: str, what: str) -> str:
    if not NAME.fullmatch(text) or text in (".", ".."):
        raise InvalidArgument(f"not an mdev {what} name: {text[:80]!r} (a sysfs name: letters, digits, "
                              "'_', '.', ':', '+', '-'; at most 64)")
    return text


def check_uuid(text: str) -> str:
    """`text` if it is an mdev's name as the kernel spells it (a lower-case UUID)."""
    if not isinstance(text, str) or not UUID.fullmatch(text):
        raise InvalidArgument(f"not an mdev UUID: {str(text)[:80]!r}")
    return text


@attrs.frozen
class MdevKind:
    """A type of a parent: what ``mdev:PARENT/TYPE`` names."""

    parent: str
    type: str

    @classmethod
    def parse(cls, text: str) -> "MdevKind":
        """``PARENT/TYPE`` (`InvalidArgument` for anything else, ``../x/y`` included)."""
        parts = text.split("/") if isinstance(text, str) else []
        if len(parts) != 2:
            raise InvalidArgument(f"not an mdev type: {str(text)[:80]!r} (expected PARENT/TYPE, e.g. mtty/mtty-2)")
        return cls(_name(parts[0], "parent"), _name(parts[1], "type"))

    def __str__(self) -> str:
        return f"{self.parent}/{self.type}"

    @property
    def create_rel(self) -> str:
        """The attribute a UUID is written to, relative to the sysfs root."""
        return f"class/mdev_bus/{self.parent}/mdev_supported_types/{self.type}/create"

    def type_dir(self, roots: Roots) -> str:
        return os.path.join(roots.sysfs, "class/mdev_bus", self.parent, "mdev_supported_types", self.type)


@attrs.frozen
class InstanceNow:
    """An instance as the kernel shows it now."""

    uuid: str
    kind: MdevKind | None       # None where its mdev_type link does not say
    group: int | None


def instance_now(roots: Roots, uuid: str) -> InstanceNow | None:
    """The instance named `uuid` as sysfs shows it now (None: there is none)."""
    node = os.path.join(roots.sysfs, "bus/mdev/devices", check_uuid(uuid))
    if not os.path.isdir(node):
        return None
    kind = None
    real = os.path.realpath(os.path.join(node, "mdev_type"))
    if _readlink(os.path.join(node, "mdev_type")) is not None and os.path.isdir(real):
        try:
            # .../PARENT/mdev_supported_types/TYPE: the parent device's name is its mdev_bus name
            kind = MdevKind(_name(os.path.basename(os.path.dirname(os.path.dirname(real))), "parent"),
                            _name(os.path.basename(real), "type"))
        except InvalidArgument:
            kind = None
    return InstanceNow(uuid, kind, instance_group(roots, uuid))


def read_type(roots: Roots, kind: MdevKind, etc: str | None = None) -> "MdevType | None":
    """One type of one parent as sysfs shows it now (None: the parent has no such type)."""
    return next((t for t in read_types(roots, etc, only=kind)), None)


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


def mdevctl_dir(roots: Roots) -> str:
    return os.path.join(roots.etc, "mdevctl.d")


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


def read_types(roots: Roots, etc: str | None = None, only: MdevKind | None = None) -> list[MdevType]:
    """Every type of every mdev parent (or `only` that one), with its instances; [] where
    there are none.  `etc`: mdevctl's directory (default: the roots' ``etc/mdevctl.d``)."""
    base = os.path.join(roots.sysfs, "class/mdev_bus")
    try:
        parents = sorted(p for p in os.listdir(base) if NAME.fullmatch(p) and p not in (".", "..")
                         and (only is None or p == only.parent))
    except OSError:
        return []
    defined = mdevctl_defined(etc if etc is not None else mdevctl_dir(roots))
    out = []
    for parent in parents:
        tdir = os.path.join(base, parent, "mdev_supported_types")
        try:
            types = sorted(t for t in os.listdir(tdir) if NAME.fullmatch(t) and t not in (".", "..")
                           and (only is None or t == only.type))
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

