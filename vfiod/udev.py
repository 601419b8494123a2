"""Hotplug: PCI add/remove/bind/unbind events, from udev or straight from the kernel.

With udevd running, events come from udev's monitor; without it (containers,
minimal guests) from the kernel's own uevents (pyudev's ``source='kernel'``),
which carry the same actions.  Each event reaches the daemon as
``handler(action, addr, driver)``; everything else (what a removal or a driver
change means for a lease) is decided there.  The simulated kernel calls the
same handler directly, so startup, hotplug and tests share one path.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Callable

from .address import PciAddress
from .errors import InvalidAddress

if TYPE_CHECKING:
    import pyudev

log = logging.getLogger("vfiod.udev")

ACTIONS = ("add", "remove", "bind", "unbind", "change", "move")

# Who gets each event, as (action, addr, driver); what it returns is ignored.
EventHandler = Callable[[str, PciAddress, "str | None"], object]


def parse_event(action: str | None, sys_name: str | None,
                driver: str | None) -> tuple[str, PciAddress, str | None] | None:
    """(action, PciAddress, driver) for a PCI event vfiod cares about, else None."""
    if action is None or action not in ACTIONS or not sys_name:
        return None
    try:
        addr = PciAddress.from_sysfs_name(sys_name)
    except InvalidAddress:
        return None
    return action, addr, driver or None


def watch(loop: asyncio.AbstractEventLoop, handler: EventHandler,
          udev_running: bool | None = None) -> pyudev.Monitor:
    """Feed PCI events to `handler` on `loop`; returns the monitor (keep a reference)."""
    import pyudev

    if udev_running is None:
        udev_running = os.path.exists("/run/udev/control")
    context = pyudev.Context()
    monitor = pyudev.Monitor.from_netlink(context, source="udev" if udev_running else "kernel")
    # libudev drops every other subsystem's event before Python sees it, for the kernel's
    # own uevents too (a NIC's rebind brings dozens: its net device, queues, vfio nodes).
    monitor.filter_by(subsystem="pci")
    monitor.start()

    def readable() -> None:
        while True:
            device = monitor.poll(timeout=0)
            if device is None:
                return
            if device.subsystem != "pci":
                continue
            event = parse_event(device.action, device.sys_name, device.driver)
            if event:
                try:
                    handler(*event)
                except Exception:
                    log.exception("handling %s of %s", event[0], event[1])

    loop.add_reader(monitor.fileno(), readable)
    log.info("following PCI events from %s", "udev" if udev_running else "the kernel")
    return monitor
