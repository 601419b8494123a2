"""The daemon's picture of the host: one `Host` snapshot, refreshed whole or by group.

A partial refresh rescans only the given groups and merges them into the last
snapshot, keeping each group's isolation from the last whole scan (explaining
a group needs the bridges above it, which may sit in other groups).  Every
refresh hands (old, new) to `on_change`, which publishes what changed.

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
        self.on_change: Callable[[Host, Host], None] = lambda old, new: None
        self._lock = threading.Lock()

    def refresh(self, groups: Iterable[int] | None = None) -> None:
        """Rescan (only `groups`, if given) and report what changed (in a worker thread)."""
        with self._lock:
            self._refresh(groups)

    def _refresh(self, groups: Iterable[int] | None) -> None:
        old = self.host
        if groups is None:
            self.scans["full"] += 1
            new = self.manager.scan()
        else:
            groups = list(groups)
            self.scans["partial"] += 1
            new = self._merge(old, self.manager.scan_groups(groups), groups)
        self.host = new
        self.on_change(old, new)

    @staticmethod
    def _merge(old: Host, part: Host, groups: list[int]) -> Host:
        devices, group_map = dict(old.devices), dict(old.groups)
        devices.update(part.devices)
        for n, g in part.groups.items():
            prev = old.groups.get(n)
            group_map[n] = g if prev is None else attrs.evolve(
                g, isolation=prev.isolation, isolation_text=prev.isolation_text, links=prev.links)
        for n in groups:               # devices that left these groups (removed, say)
            members = set(part.groups[n].members) if n in part.groups else set()
            for a, d in old.devices.items():
                if d.group == n and a not in members:
                    devices.pop(a, None)
            if n not in part.groups:
                group_map.pop(n, None)
        return attrs.evolve(old, devices=devices, groups=group_map)
