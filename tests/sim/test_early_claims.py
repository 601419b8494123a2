"""An early claim at start: udev's helper bound the NIC to vfio-pci before e1000e could
probe it; vfiod takes the claim's lease over, and giving it back means the kernel's
choice (the device never had a host driver in this boot), not vfio-pci again."""

import asyncio
import os

from vfiod import early
from vfiod.address import PciAddress
from vfiod.daemon.claims import apply_claims, publish_early
from vfiod.daemon.snapshot import Snapshot
from vfiod.policy import PolicyStore
from vfiod.sysfs import KERNELS_CHOICE

from ..source import early_bind_helper
from .leasekit import Kit

NIC, TG3 = PciAddress.parse("0000:04:00.0"), PciAddress.parse("0000:05:00.0")

POLICY = """
[[resource]]
name = "fast-nic"
devices = [{ address = "0000:04:00.0", ids = "8086:10d3", subsystem = "8086:a01f" }]

[[rule]]
address = ["0000:04:00.0", "0000:05:00.0"]
users = ["root"]
backends = ["vfio"]
persistent = true

[[claim]]
target = "name:fast-nic"
user = "root"
backend = "vfio"
early = true
"""


def boot(tmp_path, override_by_someone_else=False):
    """A boot of the ICH10 host with the policy above: vfiod wrote the early claims at its
    last run; the kernel adds 04:00.0, udev's helper runs before e1000e loads, then the
    kernel probes it.  Returns the kit and the policy store, as vfiod starts."""
    kit = Kit(tmp_path)
    policy_dir = tmp_path / "policy.d"
    policy_dir.mkdir()
    (policy_dir / "40-nic.toml").write_text(POLICY)
    store = PolicyStore(str(policy_dir))
    store.reload()
    kit.policy = store.current
    claims = str(tmp_path / "state" / "early.d")
    publish_early(store, claims)
    kit.kernel.unbind(NIC)                       # added, not probed yet
    if override_by_someone_else:                 # driverctl's own rule, say: no helper mark
        kit.kernel.set_override(NIC, "vfio-pci")
    else:
        assert early_bind_helper().main(["0000:04:00.0", "--sysfs-root", kit.roots.sysfs, "--proc-root", kit.roots.proc,
                            "--claims-dir", claims, "--run-dir", kit.roots.run]) == 0
    kit.kernel.probe(NIC)
    assert kit.kernel.driver_of(NIC) == "vfio-pci"   # never on e1000e in this boot
    return kit, store


def start(kit, store):
    asyncio.run(apply_claims(kit.manager, store, Snapshot(kit.manager)))
    (lease,) = kit.manager.leases()
    return lease


def test_vfiod_takes_the_early_claim_over_and_gives_it_to_the_kernels_choice(tmp_path):
    kit, store = boot(tmp_path)
    lease = start(kit, store)
    assert lease.persistent and lease.target == "name:fast-nic"
    held = {h.addr: (h.driver, h.override) for h in kit.journal.held(lease.id)}
    assert held == {"0000:04:00.0": (KERNELS_CHOICE, None), "0000:05:00.0": ("tg3", None)}
    assert kit.kernel.driver_of(NIC) == kit.kernel.driver_of(TG3) == "vfio-pci"
    kit.manager.release(lease.id)
    # the kernel's probe chose: e1000e, the driver it would have had; no override left behind
    assert kit.kernel.state()["0000:04:00.0"] == ("e1000e", None)
    assert kit.kernel.state()["0000:05:00.0"] == ("tg3", None)


def test_someone_elses_override_is_given_back_as_it_was(tmp_path):
    kit, store = boot(tmp_path, override_by_someone_else=True)
    lease = start(kit, store)
    held = {h.addr: (h.driver, h.override) for h in kit.journal.held(lease.id)}
    assert held["0000:04:00.0"] == ("vfio-pci", "vfio-pci")
    kit.manager.release(lease.id)
    assert kit.kernel.state()["0000:04:00.0"] == ("vfio-pci", "vfio-pci")


def test_the_claims_for_udev_follow_the_policy_and_survive_a_broken_one(tmp_path):
    kit, store = boot(tmp_path)
    claims = str(tmp_path / "state" / "early.d")
    assert os.listdir(claims) == ["pci-0000:04:00.0"]
    (tmp_path / "policy.d" / "50-broken.toml").write_text("[[claim]]\ntarget = 7\n")
    try:
        store.reload()
    except Exception:
        pass
    publish_early(store, claims)
    assert os.listdir(claims) == ["pci-0000:04:00.0"]           # the last good claims stay
    (tmp_path / "policy.d" / "50-broken.toml").unlink()
    (tmp_path / "policy.d" / "40-nic.toml").write_text(POLICY.replace("early = true", ""))
    store.reload()
    publish_early(store, claims)
    assert os.listdir(claims) == [] and early.early_claims(store.current) == []
