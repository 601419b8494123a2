"""SR-IOV on a real kernel: one boot of the ``sriov`` topology, an emulated Intel 82576
(QEMU's ``igb``, QEMU >= 8: on Debian 12 bookworm-backports' QEMU 10, fetched into the
guest cache by the harness) behind a root port, with Linux's igb and igbvf drivers.
vfiod runs on a private bus (tests/guest/instack.py) with a ``vf_of`` rule:

* root creates VFs through vfiod (``vfioctl vfs PF 3``); each VF is in an IOMMU group
  of its own, and vfiod lists each under its PF;
* a VF is leased by an unprivileged user, who does the whole VFIO handshake on it;
* while it is leased, the PF refuses a VF-count change (``Busy``, naming the lease)
  and the count stays;
* a user a ``max_vfs`` rule names sets the PF's VF count within it, and is
  refused above it; the PF carries the default route (protected: nobody leases it)
  while its VFs are leasable;
* vfiod-dra's slice, built as its delegate user, lists the VFs and not the PF;
* a persistent VF lease survives a daemon restart, the VF still on vfio-pci;
* ``dpdk-testpmd`` runs on a VF as the lessee (``vfioctl lease VF -- dpdk-testpmd``)
  and the VF goes back to igbvf;
* VFs removed behind vfiod's back (root writes 0 to ``sriov_numvfs``) end their
  leases as ``removed``.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.guest.harness import DEFAULT_MODULES, Guest, guest_available

QEMU_WITH_IGB = (8, 0)
_ok, _why = guest_available(qemu=QEMU_WITH_IGB)
pytestmark = [pytest.mark.guest, pytest.mark.skipif(not _ok, reason=f"guest not available: {_why}")]

PF = "0000:01:00.0"

GUEST_PY = r'''
import json, os, subprocess, sys, time
sys.path.insert(0, os.environ["VFIOD_CHECKOUT"])
from tests.guest.instack import Stack, as_user, converse, driver, ensure_user, group_of, until, user_env
from tests.guest.vfioholder import hold
OUT = os.environ["OUT"]
PF = %(pf)r
SYS = f"/sys/bus/pci/devices/{PF}"
res = {"errors": [], "complete": False, "uname": os.uname().release}
def save():
    with open(os.path.join(OUT, "sriov.json"), "w") as f:
        json.dump(res, f)
def vfs():
    return sorted(os.path.basename(os.readlink(f"{SYS}/{n}")) for n in os.listdir(SYS) if n.startswith("virtfn"))
def numvfs():
    return int(open(f"{SYS}/sriov_numvfs").read())
def members(group):
    return sorted(os.listdir(f"/sys/kernel/iommu_groups/{group}/devices"))
ensure_user(1000, "lessee")
ensure_user(1002, "dra")
res["pf"] = {"id": open(f"{SYS}/vendor").read().strip() + ":" + open(f"{SYS}/device").read().strip(),
             "driver": driver(PF), "totalvfs": int(open(f"{SYS}/sriov_totalvfs").read()),
             "group_members": members(group_of(PF))}
# The PF carries the host's default route, as an uplink does.
IF = os.listdir(f"{SYS}/net")[0]
for cmd in (["ip", "link", "set", IF, "up"], ["ip", "addr", "add", "192.0.2.1/24", "dev", IF],
            ["ip", "route", "add", "default", "via", "192.0.2.254", "dev", IF, "onlink"]):
    p = subprocess.run(cmd, capture_output=True, text=True)
    res.setdefault("route_cmds", []).append([cmd, p.returncode, p.stderr])
rules = (f'[[rule]]\nvf_of = ["{PF}"]\nuids = [1000]\nbackends = ["vfio"]\npersistent = true\nmemlock = "512M"\n\n'
         f'[[rule]]\naddress = ["{PF}"]\nuids = [1000]\nmax_vfs = 2\nallow_protected = true\n\n'
         f'[[rule]]\naddress = ["{PF}"]\nuids = [1000]\n\n'
         f'[[rule]]\nvf_of = ["{PF}"]\nk8s_namespaces = ["vm-*"]\nk8s_delegates = ["dra"]\n')
SLICE = ("import asyncio, json, sys\n"
         "from vfiod.dra.link import Vfiod\nfrom vfiod.dra.slices import build_slice\n"
         "async def main():\n    v = await Vfiod(sys.argv[1]).connect()\n"
         "    try:\n        print(json.dumps(await build_slice(v, 'node-1')))\n    finally:\n        v.close()\n"
         "asyncio.run(main())\n")
TESTPMD = ["dpdk-testpmd", "-l", "0-1", "--no-huge", "-m", "128", "--iova-mode=va", "-a", "VF", "--",
           "-i", "--total-num-mbufs=2048"]
stack = Stack("/run/vfiod-sriov", {"50-vfs.toml": rules})
try:
    stack.start()
    # A user the max_vfs rule names: within it, then above it.
    p = stack.vfioctl(1000, "vfs", PF, "2", timeout=120)
    res["user_vfs"] = {"rc": p.returncode, "out": p.stdout + p.stderr, "present": until(lambda: len(vfs()) == 2, 60)}
    p = stack.vfioctl(1000, "vfs", PF, "3", timeout=120)
    res["user_over"] = {"rc": p.returncode, "err": p.stderr, "numvfs": numvfs()}
    p = stack.vfioctl(1000, "lease", PF, timeout=120)
    res["pf_lease"] = {"rc": p.returncode, "err": p.stderr, "driver": driver(PF)}
    res["pf_show"] = json.loads(stack.vfioctl(0, "show", PF, "--json", timeout=60).stdout or "null")
    # Root makes three.
    p = stack.vfioctl(0, "vfs", PF, "3", timeout=120)
    res["create"] = {"rc": p.returncode, "out": p.stdout + p.stderr, "present": until(lambda: len(vfs()) == 3, 60)}
    V = vfs()
    res["vfs"] = {a: {"group": group_of(a), "members": members(group_of(a)), "driver": driver(a),
                      "id": open(f"/sys/bus/pci/devices/{a}/device").read().strip()} for a in V}
    # vfiod's own view: the VFs under their PF
    until(lambda: all(a in stack.vfioctl(0, "show", a, "--json", timeout=60).stdout for a in V), 30)
    res["show"] = {a: json.loads(stack.vfioctl(0, "show", a, "--json", timeout=60).stdout or "null") for a in V}
    # vfiod-dra's slice, built as its delegate: the VFs, not the protected PF.
    p = as_user(1002, ["env", "PYTHONPATH=" + os.environ["VFIOD_CHECKOUT"], sys.executable, "-c", SLICE,
                       stack.address], timeout=120)
    res["slice"] = {"rc": p.returncode, "err": p.stderr,
                    "body": json.loads(p.stdout) if p.returncode == 0 and p.stdout else None}
    save()

    # A VF leased by the user, who does the whole handshake on it.
    p = stack.vfioctl(1000, "lease", V[0], "--persistent", timeout=120)
    res["lease"] = {"rc": p.returncode, "err": p.stderr}
    lid = p.stdout.split()[-1]
    res["lease_id"] = lid
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

    # The persistent VF lease survives a restart of vfiod.
    res["restart_rc"] = stack.stop()
    stack.start()
    res["after_restart"] = {"driver": driver(V[0]), "leases": [
        (r["id"], r["persistent"]) for r in json.loads(stack.vfioctl(0, "leases", "--json", timeout=60).stdout)["leases"]]}

    # dpdk-testpmd on a VF, as the lessee, under vfioctl lease.
    cmd = ["vfioctl", "lease", "--bus", stack.address, V[2], "--", *[V[2] if a == "VF" else a for a in TESTPMD]]
    res["testpmd"] = converse(cmd, "show port info 0\n", "Link status", "quit\n",
                              give_up=("Invalid port", "Bus (pci) probe failed"), timeout=300,
                              user=1000, group=1000, extra_groups=[], env=user_env(1000), cwd="/tmp")
    res["testpmd"]["driver_after"] = driver(V[2])
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


def test_a_user_a_max_vfs_rule_names_sets_the_count_within_it_and_no_further(run):
    assert run["user_vfs"]["rc"] == 0 and run["user_vfs"]["present"], run["user_vfs"]
    over = run["user_over"]
    assert over["rc"] != 0 and "allows at most 2 VFs" in over["err"], over
    assert over["numvfs"] == 2 and "Traceback" not in over["err"]


def test_the_pf_carrying_the_default_route_is_protected_while_its_vfs_are_leased(run):
    assert all(rc == 0 for _, rc, _ in run["route_cmds"]), run["route_cmds"]
    pf = run["pf_lease"]
    assert pf["rc"] != 0 and "default route" in pf["err"] and pf["driver"] == "igb", pf
    assert "default route" in json.dumps(run["pf_show"]), run["pf_show"]
    assert run["lease"]["rc"] == 0 and run["pf_driver_after"] == "igb"


def test_vfiod_dras_slice_lists_the_vfs_and_not_the_protected_pf(run):
    sl = run["slice"]
    assert sl["rc"] == 0 and sl["body"], sl
    devices = {d["attributes"]["resource.kubernetes.io/pciBusID"]["string"]: d for d in sl["body"]["spec"]["devices"]}
    granted = sorted(a for a, d in devices.items() if d["attributes"]["kubernetes"]["bool"])
    assert granted == sorted(run["vfs"]) and PF not in devices, devices
    assert all(devices[a]["attributes"]["physfn"]["string"] == PF and
               devices[a]["attributes"]["namespaces"]["string"] == "vm-*" for a in granted), devices


def test_a_persistent_vf_lease_survives_a_restart_of_vfiod(run):
    assert run["restart_rc"] == 0
    after = run["after_restart"]
    assert after["driver"] == "vfio-pci", after
    assert [list(x) for x in after["leases"]] == [[run["lease_id"], True]], after


def test_dpdk_testpmd_runs_on_a_vf_as_the_lessee(run):
    t = run["testpmd"]
    vf = sorted(run["vfs"])[2]
    assert t["rc"] == 0, t["stdout"][-4000:]
    assert re.search(rf"Probe PCI driver: net_e1000_igb_vf \(8086:10ca\) device: {re.escape(vf)}", t["stdout"]), \
        t["stdout"][-4000:]
    assert "Link status" in t["stdout"], t["stdout"][-4000:]
    assert t["driver_after"] == "igbvf", t


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
