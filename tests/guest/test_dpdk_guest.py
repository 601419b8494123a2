"""DPDK on the real kernel: Debian's ``dpdk-testpmd`` on the e1000e of the
``rootport`` topology (0000:01:00.0, alone in its group), on demand and at boot.

One boot.  Inside the guest one root python3 process (tests/guest/instack.py):

On demand.  vfiod runs with a policy that gives the NIC's group to uid 1000
with a 512M memlock grant and to uid 1001 without one.  Both run
``vfioctl check``; then each runs
``vfioctl lease 0000:01:00.0 -- dpdk-testpmd -l 0-1 --no-huge -m 128 --iova-mode=va -a 0000:01:00.0 -- -i --total-num-mbufs=2048``
(stdin: ``show port info 0`` and ``quit``).
The NIC's driver is recorded after each.

At boot.  vfiod is restarted with a ``[[claim]]`` of the NIC for the
``vfiotest`` user; the moment its READY=1 reaches our notify socket (as it
would reach systemd) the NIC's driver and /dev/vfio/N's owner are recorded.
Then testpmd runs as that user directly, the way a unit ordered
``After=vfiod.service`` with ``LimitMEMLOCK=`` would start it: no vfioctl, no
fd passing, EAL opens /dev/vfio/N by path.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.guest.harness import Guest, guest_available

_ok, _why = guest_available()
pytestmark = [pytest.mark.guest, pytest.mark.skipif(not _ok, reason=f"guest not available: {_why}")]

NIC = "0000:01:00.0"
# --total-num-mbufs: testpmd otherwise sizes its pool for 32 ports (~330 MB).
# Interactive: asked "show port info 0" each second until the link is up (the
# link comes up a moment after the port starts), then "quit".
TESTPMD = ["dpdk-testpmd", "-l", "0-1", "--no-huge", "-m", "128", "--iova-mode=va",
           "-a", NIC, "--", "-i", "--total-num-mbufs=2048"]
GRANTED, UNGRANTED = 1000, 1001
# testpmd mlockall()s its whole address space (128M of DPDK memory, its
# libraries, its mbufs); 256M is not enough for a clean exit.
MEMLOCK = 512 << 20

GUEST_PY = r'''
import json, os, pwd, subprocess, sys, time, traceback
sys.path.insert(0, os.environ["VFIOD_CHECKOUT"])
from tests.guest.instack import Stack, converse, driver, ensure_user, group_of, node, record, user_env
OUT = os.environ["OUT"]
NIC, TESTPMD, GRANTED, UNGRANTED, MEMLOCK = %(nic)r, %(testpmd)r, %(granted)d, %(ungranted)d, %(memlock)d
def testpmd(cmd, **kw):
    return converse(cmd, "show port info 0\n", "Link status: up", "quit\n",
                    give_up=("Invalid port", "Bus (pci) probe failed"), timeout=300, **kw)
res = {"errors": []}
t0 = time.monotonic()
def stamp(name):
    res.setdefault("timings", {})[name] = round(time.monotonic() - t0, 2)

GROUP = group_of(NIC)
res["group"] = GROUP
res["before"] = driver(NIC)
with open(f"/sys/bus/pci/devices/{NIC}/reset_method") as f:
    res["reset_method"] = f.read().split()
ensure_user(GRANTED, "dpdk-user")
ensure_user(UNGRANTED, "dpdk-nolock")
svc = pwd.getpwnam("vfiotest")
res["svc_uid"] = svc.pw_uid
on_demand = {"50-dpdk.toml":
    f'[[rule]]\ngroup = [{GROUP}]\nuids = [{GRANTED}]\nbackends = ["vfio"]\nmemlock = "512M"\nreset_on_release = true\n\n'
    f'[[rule]]\ngroup = [{GROUP}]\nuids = [{UNGRANTED}]\nbackends = ["vfio"]\n'}
stack = Stack("/run/vfiod-dpdk", on_demand)
try:
    stack.start()
    stamp("ready")
    for uid in (GRANTED, UNGRANTED):
        res[f"check_{uid}"] = record(stack.vfioctl(uid, "check", NIC, timeout=120))
    stamp("checks")
    for uid in (GRANTED, UNGRANTED):
        res[f"testpmd_{uid}"] = testpmd(["vfioctl", "lease", "--bus", stack.address, NIC, "--", *TESTPMD],
                                        user=uid, group=uid, extra_groups=[], env=user_env(uid), cwd="/tmp")
        res[f"after_{uid}"] = {"driver": driver(NIC), "node": node(GROUP)}
        stamp(f"testpmd_{uid}")
    res["on_demand_rc"] = stack.stop()

    # At boot: a claim for the service user, applied before READY.
    stack.set_policy({"40-claim.toml":
        f'[[claim]]\ntarget = "{NIC}"\nuser = "vfiotest"\nbackend = "vfio"\n\n'
        f'[[rule]]\ngroup = [{GROUP}]\nuids = [{svc.pw_uid}]\nbackends = ["vfio"]\npersistent = true\nmemlock = "512M"\n'})
    res["at_ready"] = stack.start(on_ready=lambda: {"driver": driver(NIC), "node": node(GROUP)})
    stamp("claim_ready")
    # What systemd does for User=vfiotest, LimitMEMLOCK=512M: limit first, then the uid.
    svc_cmd = ["prlimit", f"--memlock={MEMLOCK}:{MEMLOCK}", "setpriv", f"--reuid={svc.pw_uid}",
               f"--regid={svc.pw_gid}", "--clear-groups", "--", *TESTPMD]
    res["testpmd_service"] = testpmd(svc_cmd, env=user_env(svc.pw_uid), cwd="/tmp")
    res["after_service"] = {"driver": driver(NIC), "node": node(GROUP)}
    stamp("testpmd_service")
    res["leases_after_service"] = record(stack.vfioctl(svc.pw_uid, "leases", "--json", timeout=120))
    res["claim_rc"] = stack.stop()
    res["after_stop"] = {"driver": driver(NIC), "node": node(GROUP)}
except Exception:
    res["errors"].append(traceback.format_exc())
finally:
    stack.close()
    res["vfiod_log"] = stack.read_log()
    stamp("done")
    with open(os.path.join(OUT, "dpdk.json"), "w") as f:
        json.dump(res, f)
''' % {"nic": NIC, "testpmd": TESTPMD, "granted": GRANTED, "ungranted": UNGRANTED, "memlock": MEMLOCK}


@pytest.fixture(scope="module")
def run():
    res = Guest(topology="rootport").run("python3 - <<'EOF'\n" + GUEST_PY + "\nEOF\n", timeout=1200)
    assert res.returncode == 0 and "dpdk.json" in res.files, res.output[-4000:]
    r = json.loads(res.files["dpdk.json"])
    r["_wall_seconds"] = res.wall_seconds
    assert not r["errors"], "\n".join(r["errors"]) + r.get("vfiod_log", "")[-4000:]
    return r


def _out(p: dict) -> str:
    return p["stdout"] + p["stderr"]


def test_check_tells_the_user_about_memlock_before_leasing(run):
    granted, ungranted = _out(run[f"check_{GRANTED}"]), _out(run[f"check_{UNGRANTED}"])
    assert run[f"check_{GRANTED}"]["rc"] == 0, granted
    assert "raises RLIMIT_MEMLOCK of your process to 512M" in granted, granted
    assert "warning" not in granted
    assert run[f"check_{UNGRANTED}"]["rc"] == 0, ungranted          # allowed, but warned
    assert re.search(r"warning: no memlock grant in the policy and your RLIMIT_MEMLOCK is 8M", ungranted), ungranted


def test_testpmd_under_vfioctl_lease_probes_the_nic_and_brings_the_link_up(run):
    p = run[f"testpmd_{GRANTED}"]
    out = _out(p)
    assert p["rc"] == 0, out[-4000:]
    assert re.search(r"Probe PCI driver: net_e1000_em \(8086:10d3\) device: 0000:01:00\.0", out), out[-4000:]
    assert re.search(r"Link status: up", out), out[-4000:]
    assert run[f"after_{GRANTED}"] == {"driver": "e1000e", "node": None}


def test_the_policys_reset_on_release_resets_the_nic_before_the_host_gets_it(run):
    # uid 1000's rule has reset_on_release; uid 1001's has not
    log = run["vfiod_log"]
    assert run["reset_method"], "the kernel offers no reset method for the 82574L"
    resets = re.findall(r"lease (\w+): 0000:01:00\.0 reset \((.*)\)", log)
    assert len(resets) == 1 and resets[0][1] == " ".join(run["reset_method"]), log[-4000:]
    assert "was not reset" not in log
    assert "raises RLIMIT_MEMLOCK" in run[f"check_{GRANTED}"]["stdout"]
    assert "reset before it goes back to the host" in run[f"check_{GRANTED}"]["stdout"]
    assert "reset before" not in run[f"check_{UNGRANTED}"]["stdout"]


def test_without_the_memlock_grant_dma_remapping_fails_as_check_warned(run):
    p = run[f"testpmd_{UNGRANTED}"]
    out = _out(p)
    assert re.search(r"0000:01:00\.0 DMA remapping failed, error 12", out), out[-4000:]
    assert "Link status" not in out and "Bus (pci) probe failed" in out, out[-4000:]
    assert run[f"after_{UNGRANTED}"] == {"driver": "e1000e", "node": None}
    assert run["on_demand_rc"] == 0


def test_a_boot_claim_is_applied_before_ready(run):
    uid = run["svc_uid"]
    assert run["before"] == "e1000e"
    assert run["at_ready"] == {"driver": "vfio-pci", "node": [uid, "0o600"]}, run["vfiod_log"][-4000:]
    log = run["vfiod_log"]
    applied = log.rindex(f"claim {NIC} for vfiotest applied")
    assert applied < log.rindex("ready on"), log[-4000:]


def test_a_service_started_after_vfiod_runs_testpmd_on_the_claimed_nic(run):
    p = run["testpmd_service"]
    out = _out(p)
    assert p["rc"] == 0, out[-4000:]
    assert re.search(r"Link status: up", out), out[-4000:]
    # the claim outlives the service, and vfiod's own stop: it is persistent
    assert run["after_service"]["driver"] == "vfio-pci"
    leases = json.loads(run["leases_after_service"]["stdout"])["leases"]
    assert [(l["owner"], l["persistent"]) for l in leases] == [(run["svc_uid"], True)], leases
    assert run["claim_rc"] == 0
    assert run["after_stop"] == {"driver": "vfio-pci", "node": [run["svc_uid"], "0o600"]}
    assert "Traceback" not in run["vfiod_log"]
