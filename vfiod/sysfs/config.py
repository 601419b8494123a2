"""PCI configuration space: capabilities, PCIe port types and links, ACS and SR-IOV, parsed from bytes."""

from __future__ import annotations

import struct

import attrs




# PCIe port types (PCI Express Capabilities register, bits 7:4).
PCIE_ENDPOINT = 0x0
PCIE_LEGACY_ENDPOINT = 0x1
PCIE_ROOT_PORT = 0x4
PCIE_UPSTREAM = 0x5
PCIE_DOWNSTREAM = 0x6
PCIE_PCI_BRIDGE = 0x7      # PCIe-to-PCI/PCI-X bridge
PCIE_PCIE_BRIDGE = 0x8     # PCI/PCI-X-to-PCIe bridge
PCIE_RC_ENDPOINT = 0x9
PCIE_RC_EC = 0xA

PCIE_TYPE_NAMES = {
    PCIE_ENDPOINT: "endpoint", PCIE_LEGACY_ENDPOINT: "legacy endpoint",
    PCIE_ROOT_PORT: "root port", PCIE_UPSTREAM: "upstream switch port",
    PCIE_DOWNSTREAM: "downstream switch port", PCIE_PCI_BRIDGE: "PCIe-to-PCI bridge",
    PCIE_PCIE_BRIDGE: "PCI-to-PCIe bridge", PCIE_RC_ENDPOINT: "root complex integrated endpoint",
    PCIE_RC_EC: "root complex event collector",
}

# ACS capability/control bits (PCIe extended capability 0x000D).
ACS_SV, ACS_TB, ACS_RR, ACS_CR, ACS_UF, ACS_EC, ACS_DT = (1 << i for i in range(7))
ACS_EXT_CAP_ID = 0x000D
SRIOV_EXT_CAP_ID = 0x0010
DSN_EXT_CAP_ID = 0x0003    # Device Serial Number: a 64-bit serial, unique per device
SRIOV_VF_DID = 0x1A      # VF Device ID, in the SR-IOV capability
PCI_CAP_ID_EXP = 0x10
# In the PCI Express capability: Link Capabilities (max speed 3:0, max width 9:4), Link
# Status (current speed 3:0, negotiated width 9:4), Link Capabilities 2 (supported speeds 7:1).
EXP_LNKCAP, EXP_LNKSTA, EXP_LNKCAP2 = 0x0C, 0x12, 0x2C
#: A Link Speeds value (and a bit of the supported speeds vector) in GT/s, as the kernel's
#: ``current_link_speed`` and ``max_link_speed`` name them ("8.0 GT/s PCIe").
LINK_SPEEDS = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}
#: PCIe functions without a link of their own (the kernel's pcie_cap_has_lnkctl()).
NO_LINK_TYPES = frozenset({PCIE_RC_ENDPOINT, PCIE_RC_EC})


@attrs.frozen
class PcieLink:
    """A PCIe function's link: speed in GT/s and width in lanes, now and at most (None:
    unknown; a width of 0 is a link that is down)."""

    speed: float | None
    width: int | None
    max_speed: float | None
    max_width: int | None

    @classmethod
    def from_registers(cls, lnkcap: int, lnksta: int, lnkcap2: int = 0) -> "PcieLink":
        """From Link Capabilities, Link Status and (where nonzero) Link Capabilities 2, whose
        highest supported speed the kernel prefers for the maximum."""
        top = max((bit for bit in range(1, 8) if lnkcap2 >> bit & 1), default=0)
        return cls(speed=LINK_SPEEDS.get(lnksta & 0xF), width=(lnksta >> 4) & 0x3F,
                   max_speed=LINK_SPEEDS.get(top or lnkcap & 0xF), max_width=(lnkcap >> 4) & 0x3F)

    @classmethod
    def from_sysfs(cls, speed: bytes | None, width: bytes | None, max_speed: bytes | None,
                   max_width: bytes | None) -> "PcieLink | None":
        """From the kernel's ``current_link_speed``, ``current_link_width``, ``max_link_speed``
        and ``max_link_width`` ("8.0 GT/s PCIe", "4"); None where it shows none of them, or
        shows what a function without link registers reads (a root complex function:
        "Unknown" speeds, widths 0)."""
        link = cls(speed=_gts(speed), width=_lanes(width), max_speed=_gts(max_speed), max_width=_lanes(max_width))
        if link.speed is None and link.max_speed is None and not link.width and not link.max_width:
            return None
        return link

    @property
    def downgraded(self) -> bool:
        """Slower or narrower than both ends could run (lspci's "downgraded")."""
        return bool((self.speed and self.max_speed and self.speed < self.max_speed)
                    or (self.width and self.max_width and self.width < self.max_width))


def _gts(text: bytes | None) -> float | None:
    """``8.0 GT/s PCIe`` (older kernels: ``8 GT/s``) as 8.0; None for ``Unknown``."""
    try:
        value = float(text.split()[0]) if text else None
    except (ValueError, IndexError):
        return None
    return value if value and value > 0 else None


def _lanes(text: bytes | None) -> int | None:
    try:
        return int(text.strip().lstrip(b"x")) if text else None
    except ValueError:
        return None


@attrs.frozen
class ConfigInfo:
    """What vfiod needs from a device's configuration space; None where unreadable."""

    length: int = 0
    header_type: int | None = None
    multifunction: bool | None = None
    pcie_type: int | None = None     # None: not PCIe (or unknown, see `known`)
    is_pcie: bool | None = None
    acs_cap: int | None = None       # None: no ACS capability (or unknown, see `ext_known`)
    acs_ctrl: int | None = None
    sriov_vf_device: int | None = None   # device id of this PF's VFs
    serial: int | None = None        # the Device Serial Number (None: none, or see `ext_known`)
    link: PcieLink | None = None     # None: no link (not PCIe, a root complex function) or unread
    known: bool = False              # standard capability list was readable
    ext_known: bool = False          # extended space (>= 0x100) was readable

    @classmethod
    def parse(cls, data: bytes) -> "ConfigInfo":
        n = len(data)
        if n < 0x10:
            return cls(length=n)
        raw_hdr = data[0x0E]
        header_type = raw_hdr & 0x7F
        multifunction = bool(raw_hdr & 0x80)
        status = struct.unpack_from("<H", data, 0x06)[0]
        pcie_type: int | None = None
        link: PcieLink | None = None
        known = False
        if n >= 0x40:
            known = True
            if status & 0x10 and n > 0x34:
                ptr = data[0x34] & 0xFC
                seen = set()
                while ptr and ptr not in seen:
                    seen.add(ptr)
                    if ptr + 4 > n:
                        known = False     # the list runs past what we could read
                        break
                    cap_id, nxt = data[ptr], data[ptr + 1] & 0xFC
                    if cap_id == PCI_CAP_ID_EXP:
                        flags = struct.unpack_from("<H", data, ptr + 2)[0]
                        pcie_type = (flags >> 4) & 0xF
                        if pcie_type not in NO_LINK_TYPES and ptr + EXP_LNKSTA + 2 <= n:
                            v2 = flags & 0xF >= 2 and ptr + EXP_LNKCAP2 + 4 <= n
                            link = PcieLink.from_registers(
                                struct.unpack_from("<I", data, ptr + EXP_LNKCAP)[0],
                                struct.unpack_from("<H", data, ptr + EXP_LNKSTA)[0],
                                struct.unpack_from("<I", data, ptr + EXP_LNKCAP2)[0] if v2 else 0)
                        break
                    ptr = nxt
        acs_cap = acs_ctrl = vf_device = serial = None
        ext_known = False
        if pcie_type is not None and n >= 0x104:
            ext_known = True
            pos, seen = 0x100, set()
            while pos and pos not in seen and pos + 8 <= n:
                seen.add(pos)
                header = struct.unpack_from("<I", data, pos)[0]
                if header in (0, 0xFFFFFFFF):
                    break
                cap_id = header & 0xFFFF
                if cap_id == ACS_EXT_CAP_ID:
                    acs_cap, acs_ctrl = struct.unpack_from("<HH", data, pos + 4)
                elif cap_id == DSN_EXT_CAP_ID and pos + 12 <= n:
                    serial = struct.unpack_from("<Q", data, pos + 4)[0]
                elif cap_id == SRIOV_EXT_CAP_ID and pos + SRIOV_VF_DID + 2 <= n:
                    vf_device = struct.unpack_from("<H", data, pos + SRIOV_VF_DID)[0]
                pos = (header >> 20) & 0xFFC
        return cls(
            length=n, header_type=header_type, multifunction=multifunction,
            pcie_type=pcie_type, is_pcie=(pcie_type is not None) if known else None,
            acs_cap=acs_cap, acs_ctrl=acs_ctrl, sriov_vf_device=vf_device, serial=serial, link=link, known=known,
            ext_known=ext_known,
        )

