"""Vendor, device and class names from the system's pci.ids, looked up lazily.

The file (about 1.3 MB) is read on the first lookup only and searched in
place, per vendor block, so a scan that prints no names never pays for it.
Names fall back to the numbers when the file or the entry is missing.
"""

from __future__ import annotations

import re
from functools import lru_cache

from . import sysfs

_UNSET = object()
_TOP_LEVEL = re.compile(rb"\n[^\t#\n]")

# Base classes, so a host without pci.ids still reads sensibly.
FALLBACK_CLASSES = {
    0x00: "Unclassified device", 0x01: "Mass storage controller", 0x02: "Network controller",
    0x03: "Display controller", 0x04: "Multimedia controller", 0x05: "Memory controller",
    0x06: "Bridge", 0x07: "Communication controller", 0x08: "Generic system peripheral",
    0x09: "Input device controller", 0x0C: "Serial bus controller", 0x0D: "Wireless controller",
    0x12: "Processing accelerators",
}


class PciIds:
    def __init__(self, data: bytes | None | object = _UNSET):
        # _UNSET: read the system's file on first use; None: there is none.
        self._data = data

    @property
    def data(self) -> bytes:
        if self._data is _UNSET:
            self._data = sysfs.read_pci_ids_file()
        return self._data if isinstance(self._data, bytes) else b""

    def _block(self, start_marker: bytes) -> tuple[int, int] | None:
        """(start, end) of the block that follows a top-level line beginning with the marker."""
        data = self.data
        if data.startswith(start_marker):
            pos = 0
        else:
            pos = data.find(b"\n" + start_marker)
            if pos < 0:
                return None
            pos += 1
        m = _TOP_LEVEL.search(data, pos + 1)
        return pos, (m.start() if m else len(data))

    @staticmethod
    def _line_name(data: bytes, pos: int, skip: int) -> str:
        eol = data.find(b"\n", pos)
        return data[pos + skip:eol if eol >= 0 else len(data)].decode("utf-8", "replace").strip()

    @lru_cache(maxsize=4096)
    def vendor(self, vendor: int) -> str | None:
        block = self._block(b"%04x  " % vendor)
        return self._line_name(self.data, block[0], 6) if block else None

    @lru_cache(maxsize=8192)
    def device(self, vendor: int, device: int) -> str | None:
        block = self._block(b"%04x  " % vendor)
        if not block:
            return None
        data = self.data
        pos = data.find(b"\n\t%04x  " % device, block[0], block[1])
        return self._line_name(data, pos + 1, 7) if pos >= 0 else None

    @lru_cache(maxsize=512)
    @lru_cache(maxsize=1024)
    def class_name(self, class_code: int) -> str:
        base, sub = (class_code >> 16) & 0xFF, (class_code >> 8) & 0xFF
        block = self._block(b"C %02x  " % base)
        if block:
            data = self.data
            pos = data.find(b"\n\t%02x  " % sub, block[0], block[1])
            if pos >= 0:
                return self._line_name(data, pos + 1, 5)
            return self._line_name(data, block[0], 6)
        return FALLBACK_CLASSES.get(base, f"Class {class_code >> 8:04x}")

    @lru_cache(maxsize=8192)
    def describe(self, vendor: int | None, device: int | None) -> str:
        """'Vendor Device' in words, or the numbers where the names are unknown."""
        if vendor is None or device is None:
            return "unknown device"
        v = self.vendor(vendor)
        d = self.device(vendor, device)
        if v and d:
            return f"{v} {d}"
        if v:
            return f"{v} device {device:04x}"
        return f"{vendor:04x}:{device:04x}"
