"""Leases on the real kernel: one boot of the ``bridge`` topology.

Inside the guest one python3 process (the project's venv; every python start
costs seconds under TCG) leases the two-e1000 bridge group to uid 1000 with
the vfio backend and then with pci-stub, recording what the kernel shows at
each point, and kills a LeaseManager process with SIGKILL half-way through a
grant, then reconciles in a new one.  The tests read those records.
"""

from __future__ import annotations

import json

import pytest

from tests.guest.harness import Guest, guest_available

_ok, _why = guest_available()
pytestmark = [pytest.mark.guest, pytest.mark.skipif(not _ok, reason=f"guest not available: {_why}")]

NICS = ["0000:02:01.0", "0000:02:02.0"]
BRIDGE = "0000:01:00.0"

GUEST_PY = r'''
import fcntl, json, os, signal, struct, subprocess, sys, time
sys.path.insert(0, os.environ["VFIOD_CHECKOUT"])
from tests.guest.instack import driver, group_of, node
from vfiod.backends import load_backends
from vfiod.leases import LeaseManager
from vfiod.policy import Caller, Policy
from vfiod.state import Journal
from vfiod.sysfs import Kernel, Roots, SysfsReader

OUT = os.environ["OUT"]
NICS = ["0000:02:01.0", "0000:02:02.0"]
BRIDGE = "0000:01:00.0"
os.makedirs("/run/vfiod/policy", exist_ok=True)
GROUP = group_of(NICS[0])
with open("/run/vfiod/policy/10-test.toml", "w") as f:
    f.write(f"[[rule]]\ngroup = [{GROUP}]\nuids = [1000]\nbackends = [\"vfio\", \"pci-stub\"]\n")

def snap():
    return {"drivers": {a: driver(a) for a in NICS + [BRIDGE]},
            "net": {a: sorted(os.listdir(f"/sys/bus/pci/devices/{a}/net")) if os.path.isdir(f"/sys/bus/pci/devices/{a}/net") else [] for a in NICS},
            "node": node(GROUP)}

def status_as(uid):
    """VFIO_GROUP_GET_STATUS flags, from a child that dropped to `uid` and opened the node."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgroups([]); os.setgid(uid); os.setuid(uid)
            fd = os.open(f"/dev/vfio/{GROUP}", os.O_RDWR)
            buf = bytearray(struct.pack("II", 8, 0))
            fcntl.ioctl(fd, 0x3B67, buf)
            os.write(w, str(struct.unpack("II", buf)[1]).encode())
        except OSError as e:
            os.write(w, f"error {e.errno}".encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    return os.read(r, 100).decode()

def manager(state):
    policy = Policy.load("/run/vfiod/policy")
    return LeaseManager(Kernel(Roots()), Journal(state), lambda: policy, load_backends())

res = {"group": GROUP, "before": snap()}
m = manager("/run/vfiod/a.db")
t = time.monotonic()
lease = m.request(Caller(1000), f"group:{GROUP}", "vfio", {})
res["vfio_grant_s"] = time.monotonic() - t
res["vfio_leased"] = snap()
res["vfio_status_uid1000"] = status_as(1000)
res["vfio_status_uid1001"] = status_as(1001)
t = time.monotonic()
m.release(lease.id, Caller(1000))
res["vfio_release_s"] = time.monotonic() - t
res["vfio_after"] = snap()

lease = m.request(Caller(1000), f"group:{GROUP}", "pci-stub", {})
res["stub_leased"] = snap()
m.release(lease.id, Caller(1000))
res["stub_after"] = snap()

# SIGKILL half-way through a grant: after the first NIC is bound, before the second.
child = subprocess.run([sys.executable, "-c", f"""
import os, signal, sys
sys.path.insert(0, os.environ["VFIOD_CHECKOUT"])
from vfiod.backends import load_backends
from vfiod.leases import LeaseManager
from vfiod.policy import Caller, Policy
from vfiod.state import Journal
from vfiod.sysfs import Kernel, Roots
policy = Policy.load("/run/vfiod/policy")
def step(name):
    if name == "bind-done:{NICS[0]}":
        os.kill(os.getpid(), signal.SIGKILL)
m = LeaseManager(Kernel(Roots()), Journal("/run/vfiod/b.db"), lambda: policy, load_backends(), on_step=step)
m.request(Caller(1000), "group:{GROUP}", "vfio", {{}})
"""])
res["crash_rc"] = child.returncode
res["crashed"] = snap()
m2 = manager("/run/vfiod/b.db")
res["crash_journal"] = [l.state for l in m2.leases()]
ended = m2.reconcile()
res["reconciled"] = snap()
res["reconcile_ended"] = [e.reason for e in ended]
res["journal_after"] = [l.id for l in m2.leases()]
json.dump(res, open(os.path.join(OUT, "leases.json"), "w"))
'''


@pytest.fixture(scope="module")
def guest_run():
    res = Guest(topology="bridge").run("python3 - <<'EOF'\n" + GUEST_PY + "\nEOF\n", timeout=900)
    assert res.returncode == 0 and "leases.json" in res.files, res.output[-4000:]
    return json.loads(res.files["leases.json"])


def test_vfio_lease_binds_the_group_and_hands_it_to_the_user(guest_run):
    r = guest_run
    assert r["before"]["drivers"] == {NICS[0]: "e1000", NICS[1]: "e1000", BRIDGE: "shpchp"}
    leased = r["vfio_leased"]
    assert leased["drivers"] == {NICS[0]: "vfio-pci", NICS[1]: "vfio-pci", BRIDGE: None}
    assert leased["node"] == [1000, "0o600"]
    assert r["vfio_status_uid1000"] == "1"            # VFIO_GROUP_FLAGS_VIABLE, opened as the lessee
    assert r["vfio_status_uid1001"] == "error 13"     # anyone else: EACCES


def test_vfio_release_returns_everything(guest_run):
    r = guest_run
    assert r["vfio_after"]["drivers"] == r["before"]["drivers"]
    assert r["vfio_after"]["node"] is None
    assert all(r["vfio_after"]["net"][a] for a in NICS)          # the interfaces are back
    assert r["vfio_after"]["net"] == r["before"]["net"]


def test_pci_stub_parks_and_returns(guest_run):
    r = guest_run
    assert r["stub_leased"]["drivers"] == {NICS[0]: "pci-stub", NICS[1]: "pci-stub", BRIDGE: None}
    assert r["stub_leased"]["node"] is None
    assert r["stub_after"]["drivers"] == r["before"]["drivers"]


def test_sigkill_mid_grant_then_reconcile_on_the_real_kernel(guest_run):
    r = guest_run
    assert r["crash_rc"] == -9
    assert r["crashed"]["drivers"][NICS[0]] == "vfio-pci"        # half-done when it died
    assert r["crashed"]["drivers"][NICS[1]] == "e1000"
    assert r["crash_journal"] == ["granting"]
    assert r["reconciled"]["drivers"] == r["before"]["drivers"]
    assert r["reconciled"]["net"] == r["before"]["net"]
    assert r["reconcile_ended"] == ["interrupted"] and r["journal_after"] == []
