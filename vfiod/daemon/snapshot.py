"""The daemon's picture of the host: one `Host` snapshot, refreshed whole or by group.

A partial refresh rescans only the given groups and merges them into the last
snapshot, keeping each group's isolation from the last whole scan (explaining
a group needs the bridges above it, which may sit in other groups).  Every
refresh hands (old, new, groups) to `on_change`, which publishes what changed
(in `groups` only, after a partial refresh).

Refreshes run in worker threads and one at a time: a scan that started before a
change and ended after a later one must not put the older picture back (the
VF objects of a PF whose count went 2 → 0 → 1 came back that way)."""

from __future__ import annotations

import threading
from typing import Callable, Iterable

import attrs

from ..leases import LeaseManager
from ..topology import Host


class Snapshot:
    def __init__(self, manager: LeaseManager) -> None:
        self.manager = manager
        self.host: Host = manager.scan()
        self.scans = {"full": 0, "partial": 0, "events": 0}
        self.on_change: Callable[[Host, Host, list[int] | None], None] = lambda old, new, groups: None
        self._lock = threading.Lock()

    def refresh(self, groups: Iterable[int] | None = None) -> None:
        """Rescan (only `groups`, if given) and report what changed (in a worker thread)."""
        with self._lock:
            self._refresh(groups)

    def _refresh(self, groups: Iterable[int] | None) -> None:
        old = self.host
        touched = None if groups is None else list(groups)
        if touched is None:
            self.scans["full"] += 1
            new = self.manager.scan()
        else:
            self.scans["partial"] += 1
            new = self._merge(old, self.manager.scan_groups(touched), touched)
        self.host = new
        self.on_change(old, new, touched)

    @staticmethod
    def _merge(old: Host, part: Host, groups: list[int]) -> Host:
        devices, group_map = dict(old.devices), dict(old.groups)
        devices.update(part.devices)
        for n, g in part.groups.items():
            prev = old.groups.get(n)
            group_map[n] = g if prev is None else attrs.evolve(
                g, isolation=prev.isolation, isolation_text=prev.isolation_text, links=prev.links)
        # Devices that left these groups (removed, say).  One read while it was being removed
        # may come back half-read, in no group at all: it goes too (a full scan finds it again
        # if it is still there), or no later partial refresh of its group would drop it.
        rescanned = {a for g in part.groups.values() for a in g.members}
        for n in groups:
            for a in old.groups[n].members if n in old.groups else ():
                if a not in rescanned:
                    devices.pop(a, None)
            if n not in part.groups:
                group_map.pop(n, None)
        return attrs.evolve(old, devices=devices, groups=group_map)
