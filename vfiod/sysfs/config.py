"""PCI configuration space: capabilities, PCIe port types, ACS and SR-IOV, parsed from bytes."""

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
        pcie_type = None
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
                        pcie_type = (struct.unpack_from("<H", data, ptr + 2)[0] >> 4) & 0xF
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
            acs_cap=acs_cap, acs_ctrl=acs_ctrl, sriov_vf_device=vf_device, serial=serial, known=known,
            ext_known=ext_known,
        )

