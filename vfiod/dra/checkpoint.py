"""What vfiod-dra did, for whom: ``STATE_DIR/checkpoint.json``, rewritten whole and atomically.

One record per claim the kubelet asked to prepare, by claim uid:

``namespace``, ``name``  the claim, as the kubelet named it
``state``                ``preparing`` from before the first lease is asked for until the
                         CDI spec is written; then ``prepared``
``leases``               IOMMU group number (as text) → the vfiod lease object path, added as
                         each lease is granted
``devices``              the kubelet's answer (``prepared`` only): request names, pool,
                         device and CDI device ids of each device

A restart (`driver.Driver.reconcile`) unprepares every ``preparing`` record, keeps
``prepared`` ones, and releases any lease the driver's user holds that no record
names: a crash between a grant and this file's write leaves nothing held."""

from __future__ import annotations

import json
import os
from typing import Any

import attrs

FILE = "checkpoint.json"
VERSION = 1


@attrs.frozen
class ClaimRecord:
    namespace: str
    name: str
    state: str                                          # "preparing" or "prepared"
    leases: dict[str, str] = attrs.field(factory=dict)  # group number → lease object path
    devices: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "name": self.name, "state": self.state,
                "leases": dict(self.leases), "devices": list(self.devices)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ClaimRecord":
        state = d.get("state")
        if state not in ("preparing", "prepared"):
            raise ValueError(f"unknown state {state!r}")
        leases = d.get("leases") or {}
        if not isinstance(leases, dict) or not all(isinstance(v, str) for v in leases.values()):
            raise ValueError("leases must map group numbers to lease paths")
        return cls(namespace=str(d.get("namespace", "")), name=str(d.get("name", "")), state=state,
                   leases={str(k): v for k, v in leases.items()},
                   devices=tuple(d.get("devices") or ()))


class Checkpoint:
    """The records, loaded once and saved after every change."""

    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, FILE)
        self.state_dir = state_dir
        self.claims: dict[str, ClaimRecord] = {}
        self.damaged: str | None = None          # why the file on disk could not be read

    def load(self) -> "Checkpoint":
        try:
            with open(self.path) as f:
                doc = json.load(f)
            if doc.get("version") != VERSION:
                raise ValueError(f"version {doc.get('version')!r}, expected {VERSION}")
            self.claims = {str(uid): ClaimRecord.from_json(rec) for uid, rec in doc["claims"].items()}
        except FileNotFoundError:
            self.claims = {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            # Kept aside for people; reconciling with vfiod's leases still ends what is stranded.
            self.damaged = f"{self.path}: {e}"
            os.replace(self.path, self.path + ".damaged")
            self.claims = {}
        return self

    def put(self, uid: str, record: ClaimRecord) -> None:
        self.claims[uid] = record
        self.save()

    def drop(self, uid: str) -> None:
        if self.claims.pop(uid, None) is not None:
            self.save()

    def save(self) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": VERSION, "claims": {u: r.to_json() for u, r in sorted(self.claims.items())}},
                      f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
