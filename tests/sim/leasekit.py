"""What the simulated-kernel lease tests share: a host, a kernel, a journal, a manager."""

from __future__ import annotations

import json
import os

import attrs

from vfiod.sim import hosts
from vfiod.sim.hosts.builder import MTTY
from vfiod.address import PciAddress
from vfiod.backends import load_backends
from vfiod.leases import LeaseManager
from vfiod.policy import Caller, Policy  # noqa: F401  (Caller: for the tests)
from vfiod.sim.kernel import SimKernel
from vfiod.state import Journal


#: The bridge host with the kernel's mtty sample as a parent of mediated devices.
MDEV_HOST = attrs.evolve(hosts.EXAMPLES["bridge"], name="mdev", mdev_parents=(MTTY,))


def open_policy(spec, deny_uids=()) -> Policy:
    """A real policy that gives every device of `spec` to everyone, on every backend,
    persistent, protected devices included; `deny_uids` are refused by a deny rule first.
    The lease mechanics under test do not depend on policy (the engine has its own tests),
    but they run against the real policy objects, never a stand-in."""
    text = ""
    if deny_uids:
        text += f'[[rule]]\naction = "deny"\nids = "*:*"\nuids = {sorted(deny_uids)}\n\n'
    addresses = json.dumps([str(fn.addr) for fn in spec.functions])
    text += (f'[[rule]]\naddress = {addresses}\neveryone = true\nbackends = ["vfio", "pci-stub", "libvirt"]\n'
             'persistent = true\nallow_protected = true\n')
    if spec.mdev_parents:           # instances of every type, for uid 1000 alone
        text += '\n[[rule]]\nmdev_types = "*/*"\nuids = [1000]\npersistent = true\n'

    return Policy.from_sources([("test.toml", text)])


class Kit:
    def __init__(self, tmp_path, name="ich10", spec=None, on_step=None, owner_alive=None, **kw):
        self.spec = spec or hosts.EXAMPLES[name]
        self.root = str(tmp_path / "host")
        if not os.path.exists(self.root):
            self.roots = hosts.build_spec(self.spec, self.root)
        else:
            from vfiod.sysfs import Roots
            self.roots = Roots(self.root + "/sys", self.root + "/proc", self.root + "/dev", etc=self.root + "/etc")
        self.kernel = SimKernel.for_spec(self.spec, self.roots, **kw)
        self.state_path = str(tmp_path / "state" / "state.db")
        self.journal = Journal(self.state_path)
        self.policy = open_policy(self.spec)
        self.manager = LeaseManager(self.kernel, self.journal, lambda: self.policy, load_backends(),
                                    on_step=on_step, owner_alive=owner_alive)

    def deny(self, *uids) -> None:
        """From now on the policy refuses `uids` (a deny rule before the open one)."""
        self.policy = open_policy(self.spec, deny_uids=uids)

    def snapshot(self):
        if self.spec.mdev_parents:
            return self.kernel.state(), self.kernel.vfio_nodes(), self.kernel.mdev_instances()
        return self.kernel.state(), self.kernel.vfio_nodes()
