"""SR-IOV on a real kernel: one boot of the ``sriov`` topology, an emulated Intel 82576
(QEMU's ``igb``, QEMU >= 8: on Debian 12 bookworm-backports' QEMU 10, fetched into the
guest cache by the harness) behind a root port, with Linux's igb and igbvf drivers.
vfiod runs on a private bus (tests/guest/instack.py) with a ``vf_of`` rule:

* root creates VFs through vfiod (``vfioctl vfs PF 3``); each VF is in an IOMMU group
  of its own, and vfiod lists each under its PF;
* a VF is leased by an unprivileged user, who does the whole VFIO handshake on it;
* while it is leased, the PF refuses a VF-count change (``Busy``, naming the lease)
  and the count stays;
* VFs removed behind vfiod's back (root writes 0 to ``sriov_numvfs``) end their
  leases as ``removed``.
"""

from __future__ import annotations

import json

import pytest

from tests.guest.harness import DEFAULT_MODULES, Guest, guest_available

QEMU_WITH_IGB = (8, 0)
_ok, _why = guest_available(qemu=QEMU_WITH_IGB)
pytestmark = [pytest.mark.guest, pytest.mark.skipif(not _ok, reason=f"guest not available: {_why}")]

PF = "0000:01:00.0"

GUEST_PY = r'''
import json, os, sys, time
sys.path.insert(0, os.environ["VFIOD_CHECKOUT"])
from tests.guest.instack import Stack, driver, ensure_user, group_of
from tests.guest.vfioholder import hold
OUT = os.environ["OUT"]
PF = %(pf)r
SYS = f"/sys/bus/pci/devices/{PF}"
res = {"errors": [], "complete": False, "uname": os.uname().release}
def save():
    with open(os.path.join(OUT, "sriov.json"), "w") as f:
        json.dump(res, f)
def until(pred, timeout=60):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.1)
    return pred()
def vfs():
    return sorted(os.path.basename(os.readlink(f"{SYS}/{n}")) for n in os.listdir(SYS) if n.startswith("virtfn"))
def numvfs():
    return int(open(f"{SYS}/sriov_numvfs").read())
def members(group):
    return sorted(os.listdir(f"/sys/kernel/iommu_groups/{group}/devices"))
ensure_user(1000, "lessee")
res["pf"] = {"id": open(f"{SYS}/vendor").read().strip() + ":" + open(f"{SYS}/device").read().strip(),
             "driver": driver(PF), "totalvfs": int(open(f"{SYS}/sriov_totalvfs").read()),
             "group_members": members(group_of(PF))}
rules = f'[[rule]]\nvf_of = ["{PF}"]\nuids = [1000]\nbackends = ["vfio"]\npersistent = true\nmemlock = "512M"\n'
stack = Stack("/run/vfiod-sriov", {"50-vfs.toml": rules})
try:
    stack.start()
    p = stack.vfioctl(0, "vfs", PF, "3", timeout=120)
    res["create"] = {"rc": p.returncode, "out": p.stdout + p.stderr, "present": until(lambda: len(vfs()) == 3, 60)}
    V = vfs()
    res["vfs"] = {a: {"group": group_of(a), "members": members(group_of(a)), "driver": driver(a),
                      "id": open(f"/sys/bus/pci/devices/{a}/device").read().strip()} for a in V}
    # vfiod's own view: the VFs under their PF
    until(lambda: all(a in stack.vfioctl(0, "show", a, "--json", timeout=60).stdout for a in V), 30)
    res["show"] = {a: json.loads(stack.vfioctl(0, "show", a, "--json", timeout=60).stdout or "null") for a in V}
    save()

    # A VF leased by the user, who does the whole handshake on it.
    p = stack.vfioctl(1000, "lease", V[0], "--persistent", timeout=120)
    res["lease"] = {"rc": p.returncode, "err": p.stderr}
    lid = p.stdout.split()[-1]
    g = group_of(V[0])
    res["lease"].update({"driver": driver(V[0]), "node_owner": os.stat(f"/dev/vfio/{g}").st_uid})
    h = hold(g, V[0], "stubborn")
    res["handshake"] = h.expect("ready")

    # The PF refuses a VF-count change meanwhile.
    p = stack.vfioctl(0, "vfs", PF, "0", timeout=120)
    res["refused"] = {"rc": p.returncode, "err": p.stderr, "lease": lid, "numvfs": numvfs(), "vfs": vfs()}
    h.kill()
    h.wait(10)
    save()

    # A second VF leased too; then root removes every VF behind vfiod's back.
    p = stack.vfioctl(1000, "lease", V[1], "--persistent", timeout=120)
    res["second"] = {"rc": p.returncode, "err": p.stderr, "driver": driver(V[1])}
    with open(f"{SYS}/sriov_numvfs", "w") as f:
        f.write("0")
    res["removed_logged"] = until(lambda: stack.read_log().count("outcome=removed") >= 2, 60)
    res["leases_after"] = json.loads(stack.vfioctl(0, "leases", "--json", timeout=60).stdout)["leases"]
    res["vfs_after"] = vfs()
    res["pf_driver_after"] = driver(PF)
    res["complete"] = True
except Exception:
    import traceback
    res["errors"].append(traceback.format_exc())
finally:
    stack.close()
    res["vfiod_log"] = stack.read_log()
    save()
'''


@pytest.fixture(scope="module")
def run():
    script = GUEST_PY % {"pf": PF}
    g = Guest(topology="sriov", qemu=QEMU_WITH_IGB, modules=DEFAULT_MODULES + ("igb", "igbvf"))
    res = g.run("python3 - <<'EOF'\n" + script + "\nEOF\n", timeout=1200)
    assert "sriov.json" in res.files, res.output[-4000:] + res.console[-3000:]
    r = json.loads(res.files["sriov.json"])
    print(f"\nSR-IOV guest (QEMU {res.command[0]}): boot to script {res.boot_seconds}s, "
          f"script {res.script_seconds}s, wall {res.wall_seconds:.0f}s")
    seen = json.dumps({k: v for k, v in r.items() if k != "vfiod_log"}, indent=1)[-6000:]
    assert not r["errors"] and r["complete"], "\n".join(r["errors"]) + seen + r.get("vfiod_log", "")[-4000:]
    return r


def test_the_guest_has_an_82576_pf_on_igb_alone_in_its_group(run):
    pf = run["pf"]
    assert pf["id"] == "0x8086:0x10c9" and pf["driver"] == "igb" and pf["totalvfs"] == 7, pf
    assert pf["group_members"] == [PF]


def test_root_creates_vfs_through_vfiod_each_in_a_group_of_its_own(run):
    assert run["create"]["rc"] == 0 and run["create"]["present"], run["create"]
    vfs = run["vfs"]
    assert len(vfs) == 3 and all(v["id"] == "0x10ca" for v in vfs.values()), vfs
    assert all(v["members"] == [a] for a, v in vfs.items()), vfs
    assert len({v["group"] for v in vfs.values()}) == 3


def test_vfiod_lists_each_vf_under_its_pf(run):
    for addr, doc in run["show"].items():
        text = json.dumps(doc)
        assert addr in text and PF in text, (addr, doc)


def test_an_unprivileged_user_leases_a_vf_and_does_the_whole_vfio_handshake(run):
    lease = run["lease"]
    assert lease["rc"] == 0 and lease["driver"] == "vfio-pci" and lease["node_owner"] == 1000, lease
    assert run["handshake"] == "ready"


def test_the_pf_refuses_a_vf_count_change_while_a_vf_is_leased(run):
    r = run["refused"]
    assert r["rc"] != 0 and r["lease"] in r["err"], r
    assert "Traceback" not in r["err"]
    assert r["numvfs"] == 3 and len(r["vfs"]) == 3, r


def test_vfs_removed_behind_vfiods_back_end_their_leases_as_removed(run):
    assert run["second"]["rc"] == 0 and run["second"]["driver"] == "vfio-pci", run["second"]
    assert run["removed_logged"] is True, run["vfiod_log"][-3000:]
    assert run["leases_after"] == [] and run["vfs_after"] == []
    assert run["pf_driver_after"] == "igb"


def test_no_traceback_in_the_daemon_log(run):
    assert "Traceback" not in run["vfiod_log"]
