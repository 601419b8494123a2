"""What the simulated-kernel lease tests share: a host, a kernel, a journal, a manager."""

from __future__ import annotations

import os

import attrs

from vfiod import hosts
from vfiod.address import PciAddress
from vfiod.backends import load_backends
from vfiod.errors import InvalidArgument, NotFound
from vfiod.leases import LeaseManager
from vfiod.simkernel import SimKernel
from vfiod.state import Journal


@attrs.frozen
class Caller:
    uid: int
    gids: frozenset = frozenset()
    pid: int | None = None

    @property
    def is_admin(self):
        return self.uid == 0


@attrs.frozen
class Target:
    group: int
    addresses: tuple
    resource: str | None = None


@attrs.frozen
class Decision:
    allowed: bool
    rule: str
    reason: str
    backend: str | None
    max_duration: int | None = None
    persistent: bool = True
    memlock: int | None = None
    devices: tuple = ()


class OpenPolicy:
    """A policy double that allows every group to everyone (the lease mechanics under test
    do not depend on policy; the policy engine has its own tests)."""

    def __init__(self, deny_uids=()):
        self.deny_uids = set(deny_uids)

    def resolve(self, host, target):
        if target.startswith("group:"):
            n = int(target[6:])
            if n not in host.groups:
                raise NotFound(f"no IOMMU group {n}")
            return Target(n, host.groups[n].members)
        addr = PciAddress.parse(target)
        g = host.group_of(addr)
        if g is None:
            raise NotFound(f"no device {addr}")
        return Target(g.number, g.members)

    def decide(self, host, caller, group, backend="", options=None):
        if caller.uid in self.deny_uids:
            return Decision(False, "", "no rule matched (deny by default)", None)
        if backend not in ("", "vfio", "pci-stub", "libvirt"):
            raise InvalidArgument(f"unknown backend {backend!r}")
        return Decision(True, "test.toml:1", "allowed", backend or "vfio")


class Kit:
    def __init__(self, tmp_path, name="ich10", spec=None, on_step=None, owner_alive=None, **kw):
        self.spec = spec or hosts.EXAMPLES[name]
        self.root = str(tmp_path / "host")
        if not os.path.exists(self.root):
            self.roots = hosts.build_spec(self.spec, self.root)
        else:
            from vfiod.sysfs import Roots
            self.roots = Roots(self.root + "/sys", self.root + "/proc", self.root + "/dev")
        self.kernel = SimKernel.for_spec(self.spec, self.roots, **kw)
        self.state_path = str(tmp_path / "state" / "state.db")
        self.journal = Journal(self.state_path)
        self.policy = OpenPolicy()
        self.manager = LeaseManager(self.kernel, self.journal, lambda: self.policy, load_backends(),
                                    on_step=on_step, owner_alive=owner_alive)

    def snapshot(self):
        return self.kernel.state(), self.kernel.vfio_nodes()
