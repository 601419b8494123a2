"""The revoke ladder on the real kernel: one boot of the ``all`` topology.

Inside the guest one root python3 process runs vfiod (tests/guest/instack.py)
with a 3 s ``revoke_grace`` and forks the holders (tests/guest/vfioholder.py),
which open the group as VFIO users do (group, container, IOMMU, device fd):

* a cooperative holder that registers the device's request eventfd and lets go
  when the kernel fires it; an uncooperative one; one that passed its device fd
  to a child over SCM_RIGHTS and closed its own; root's own process;
* a lease that expires while held; ``dpdk-testpmd`` under ``vfioctl lease --``;
* a group whose host driver is vfio-pci (bound before vfiod starts, as
  ``vfio-pci.ids=`` would), released while its holder keeps it, asked for by
  another user meanwhile;
* with the daemon stopped, a LeaseManager forked and SIGKILLed at each step of
  the ladder, then a new one that finishes it.
The tests read what the script recorded.
"""

from __future__ import annotations

import json

import pytest

from tests.guest.harness import Guest, guest_available

_ok, _why = guest_available()
pytestmark = [pytest.mark.guest, pytest.mark.skipif(not _ok, reason=f"guest not available: {_why}")]

NIC, PAIR, SPARE = "0000:01:00.0", ["0000:04:00.0", "0000:04:00.1"], "0000:08:00.0"
GRACE = 3
TESTPMD = ["dpdk-testpmd", "-l", "0-1", "--no-huge", "-m", "128", "--iova-mode=va", "-a", NIC, "--",
           "--total-num-mbufs=2048"]

GUEST_PY = r'''
import json, os, shutil, signal, subprocess, sys, threading, time, traceback
sys.path.insert(0, os.environ["VFIOD_CHECKOUT"])
from tests.guest.instack import Stack, driver, ensure_user, group_of, user_env
from tests.guest.vfioholder import device_fd_holders, gone, hold
OUT = os.environ["OUT"]
NIC, PAIR, SPARE, GRACE, TESTPMD = %(nic)r, %(pair)r, %(spare)r, %(grace)d, %(testpmd)r
# The pair's grace outlasts any delay of a loaded machine between the release and the
# other user's request, so that request always comes while the old holder lives.
PAIR_GRACE = 20
res = {"errors": [], "complete": False}
t0 = time.monotonic()
def save():
    with open(os.path.join(OUT, "revoke.json"), "w") as f:
        json.dump(res, f)
def stamp(name):
    res.setdefault("timings", {})[name] = round(time.monotonic() - t0, 2)
    save()
def watch():
    """Every 5 s: any task in uninterruptible sleep, with its kernel stack (for a failure's story)."""
    while True:
        time.sleep(5)
        seen = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/stat") as f:
                        stat = f.read()
                    if stat.rsplit(")", 1)[1].split()[0] == "D":
                        with open(f"/proc/{pid}/task/{tid}/stack") as f:
                            seen.append(f"{pid}/{tid} {stat.split('(', 1)[1].rsplit(')', 1)[0]}\n{f.read()}")
            except OSError:
                pass
        if seen:
            with open(os.path.join(OUT, "dstate.txt"), "a") as f:
                f.write(f"--- {time.monotonic() - t0:.0f} s\n" + "".join(seen))
        try:
            shutil.copy("/run/vfiod-revoke/vfiod.log", os.path.join(OUT, "vfiod.log"))
        except OSError:
            pass
threading.Thread(target=watch, daemon=True).start()

ensure_user(1000, "lessee")
ensure_user(1001, "other")
G, GP, GS = group_of(NIC), group_of(PAIR[0]), group_of(SPARE)
res["groups"] = [G, GP, GS]
# The pair's host driver is vfio-pci, as vfio-pci.ids= would make it at boot.
for a in PAIR:
    with open(f"/sys/bus/pci/devices/{a}/driver_override", "w") as f:
        f.write("vfio-pci")
    with open(f"/sys/bus/pci/devices/{a}/driver/unbind", "w") as f:
        f.write(a)
    with open("/sys/bus/pci/drivers_probe", "w") as f:
        f.write(a)
res["pair_at_start"] = [driver(a) for a in PAIR]

rules = (f'[[rule]]\naddress = ["{NIC}", "{SPARE}"]\nuids = [1000]\nbackends = ["vfio"]\npersistent = true\n'
         f'max_duration = "1h"\nrevoke_grace = "{GRACE}s"\nmemlock = "512M"\n\n'
         f'[[rule]]\naddress = {json.dumps(PAIR)}\nuids = [1000, 1001]\nbackends = ["vfio"]\npersistent = true\n'
         f'revoke_grace = "{PAIR_GRACE}s"\n')
os.environ["PYTHONFAULTHANDLER"] = "1"       # a failure below asks vfiod for its threads' stacks (SIGABRT)
stack = Stack("/run/vfiod-revoke", {"50-revoke.toml": rules})

def lease(uid, target, *extra):
    p = stack.vfioctl(uid, "lease", target, "--persistent", *extra, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"lease {target} as {uid}: {p.stderr}")
    return p.stdout.split()[-1]

def revoke(lease_id, *extra):
    p = stack.vfioctl(0, "revoke", lease_id, "--json", "--wait", "60", *extra, timeout=120)
    return {"rc": p.returncode, "doc": json.loads(p.stdout) if p.stdout.strip() else None, "stderr": p.stderr}

def until(pred, timeout=60):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.1)
    return pred()

try:
    stack.start()
    stamp("ready")

    # 1. Cooperative: lets go when the kernel asks through the request eventfd.
    lid = lease(1000, NIC)
    h = hold(G, NIC, "coop")
    h.expect("ready")
    r = revoke(lid, "--reason", "cooperative")
    res["coop"] = {"revoke": r, "said": [h.expect("request"), h.expect("closed")], "alive": h.poll() is None,
                   "driver": driver(NIC)}
    h.kill()
    stamp("coop")

    # 2. Uncooperative: holds group, container and device fd, and sleeps.
    lid = lease(1000, NIC)
    h = hold(G, NIC, "stubborn")
    h.expect("ready")
    r = revoke(lid, "--reason", "uncooperative")
    res["stubborn"] = {"revoke": r, "status": h.wait(10), "driver": driver(NIC),
                       "device_fd_holders": device_fd_holders()}
    stamp("stubborn")

    # 3. The device fd passed to a child over SCM_RIGHTS, the sender's own closed.
    lid = lease(1000, NIC)
    h = hold(G, NIC, "pass")
    child = int(h.expect("child").split()[1])
    h.expect("ready")
    r = revoke(lid, "--reason", "passed on")
    res["pass"] = {"revoke": r, "child_gone": until(lambda: gone(child), 10), "sender_alive": h.poll() is None,
                   "driver": driver(NIC)}
    h.kill()
    stamp("pass")

    # 3b. The same, while the lessee holds another VFIO lease: on 6.1 the bare device fd does
    # not say which device it is, so it may be that lease's: it is left alone.
    other_lid = lease(1000, SPARE)
    lid = lease(1000, NIC)
    h = hold(G, NIC, "pass")
    child = int(h.expect("child").split()[1])
    h.expect("ready")
    named = []
    for fd in os.listdir(f"/proc/{child}/fd"):
        with open(f"/proc/{child}/fdinfo/{fd}") as f:
            named.append("vfio-device-syspath:" in f.read())
    r = revoke(lid, "--reason", "ambiguous", "--wait", str(GRACE + 5))
    res["ambiguous"] = {"revoke": r, "child_alive": not gone(child), "kernel_names_it": any(named)}
    os.kill(child, signal.SIGKILL)
    res["ambiguous"]["ended_after_it_went"] = until(lambda: driver(NIC) == "e1000e", 30)
    h.kill()
    stack.vfioctl(1000, "release", other_lid, timeout=120)
    res["ambiguous"]["spare_back"] = until(lambda: driver(SPARE) == "e1000e", 30)
    stamp("ambiguous")

    # 4. Root's own process holding the lessee's group is never ended (no revoke_others).
    lid = lease(1000, NIC)
    h = hold(G, NIC, "stubborn", uid=0)
    h.expect("ready")
    r = revoke(lid, "--reason", "root holds it", "--wait", str(GRACE + 6))   # the last --wait counts
    leases = json.loads(stack.vfioctl(0, "leases", "--json", timeout=60).stdout)["leases"]
    res["root"] = {"revoke": r, "alive_after_grace": h.poll() is None, "leases": leases, "driver": driver(NIC)}
    h.kill()
    res["root"]["ended_after_it_went"] = until(lambda: driver(NIC) == "e1000e", 30)
    stamp("root")

    # 5. Expiry of a held lease: the same ladder, reason "expired".
    lid = lease(1000, NIC, "--duration", "4s")
    h = hold(G, NIC, "stubborn")
    h.expect("ready")
    t = time.monotonic()
    back = until(lambda: driver(NIC) == "e1000e", 60)
    res["expiry"] = {"back": back, "seconds_after_grant": round(time.monotonic() - t, 2), "status": h.wait(10),
                     "device_fd_holders": device_fd_holders()}
    stamp("expiry")

    # 6. A group on vfio-pci from boot: released while held, wanted by another user.
    lid = lease(1000, PAIR[0])
    h = hold(GP, PAIR[0], "deaf")
    h.expect("ready")
    rel = stack.vfioctl(1000, "release", lid, timeout=120)
    other = stack.vfioctl(1001, "lease", PAIR[0], "--persistent", timeout=120)
    res["vfio_host"] = {"release": {"rc": rel.returncode, "out": rel.stdout + rel.stderr},
                        "other_while_held": {"rc": other.returncode, "err": other.stderr}}
    res["vfio_host"]["alive_at_other"] = h.poll() is None
    res["vfio_host"]["holder"] = h.wait(PAIR_GRACE + 15)
    until(lambda: not json.loads(stack.vfioctl(0, "leases", "--json").stdout)["leases"], 30)
    again = stack.vfioctl(1001, "lease", PAIR[0], "--persistent", timeout=120)
    res["vfio_host"].update({"other_after": again.returncode, "drivers": [driver(a) for a in PAIR],
                             "device_fd_holders": device_fd_holders()})
    if again.returncode == 0:
        stack.vfioctl(1001, "release", again.stdout.split()[-1], timeout=120)
    stamp("vfio_host")

    # 7. dpdk-testpmd under vfioctl lease --, revoked.
    p = subprocess.Popen(["vfioctl", "lease", "--bus", stack.address, NIC, "--", *TESTPMD], user=1000, group=1000,
                         extra_groups=[], env=user_env(1000), cwd="/tmp", stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    threading.Thread(target=lambda: out.extend(iter(p.stdout.readline, "")), daemon=True).start()
    started = until(lambda: any("Press enter to exit" in line for line in out), 240)
    lid = json.loads(stack.vfioctl(0, "leases", "--json").stdout)["leases"][0]["id"] if started else None
    r = revoke(lid, "--reason", "testpmd") if lid else None
    try:
        rc = p.wait(60)
    except subprocess.TimeoutExpired:
        p.kill()
        rc = p.wait()
    res["testpmd"] = {"started": started, "revoke": r, "rc": rc, "out": "".join(out)[-6000:], "driver": driver(NIC)}
    stamp("testpmd")
    res["rc"] = stack.stop()

    # 8. SIGKILL of the lease manager at each step of the ladder; a new one finishes it.
    from vfiod.backends import load_backends
    from vfiod.leases import Ended, LeaseManager
    from vfiod.policy import Caller, Policy
    from vfiod.state import Journal
    from vfiod.sysfs import Kernel, Roots
    pol = Policy.from_sources([("crash.toml", f'[[rule]]\naddress = ["{SPARE}"]\nuids = [1000]\n'
                                              'persistent = true\nrevoke_grace = "1s"\n')])
    def manager(state, on_step=None):
        m = LeaseManager(Kernel(Roots()), Journal(state), lambda: pol, load_backends(), on_step=on_step)
        m.kill_after = 0.5
        return m
    def ladder(m, lid):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if isinstance(m.advance(lid), Ended):
                return True
            time.sleep(0.1)
        return False
    POINTS = ["revoke", "ask-intent", "ask-done", "end-holder-intent:TERM", "end-holder-done:TERM",
              "releasing", f"restored:{SPARE}", "released"]
    res["crash"] = {}
    for i, point in enumerate(POINTS):
        state = f"/run/vfiod-crash-{i}.db"
        m = manager(state)
        lid = m.request(Caller(1000), SPARE, "vfio", {"persistent": True}).id
        m.journal.close()
        h = hold(GS, SPARE, "stubborn")
        h.expect("ready")
        pid = os.fork()
        if pid == 0:
            def die(name, point=point):
                if name == point:
                    os.kill(os.getpid(), signal.SIGKILL)
            try:
                mm = manager(state, die)
                mm.revoke(lid, "crash test")
                ladder(mm, lid)
            finally:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        m = manager(state)
        ended = m.reconcile()
        row = m.journal.lease(lid)
        finished = row is None or ladder(m, lid)
        res["crash"][point] = {"killed": killed, "finished": finished, "driver": driver(SPARE),
                               "leases": len(m.journal.leases()), "holder": h.wait(10),
                               "reconciled": [e.reason for e in ended]}
        h.kill()
        m.journal.close()
    stamp("crash")
except Exception:
    res["errors"].append(traceback.format_exc())
    if stack.daemon is not None and stack.daemon.poll() is None:
        os.kill(stack.daemon.pid, signal.SIGABRT)        # its threads' stacks go to its log
        time.sleep(2)
finally:
    stack.close()
    res["vfiod_log"] = stack.read_log()
    res["complete"] = True
    stamp("done")
''' % {"nic": NIC, "pair": PAIR, "spare": SPARE, "grace": GRACE, "testpmd": TESTPMD}


def run_guest(timeout: float = 1200) -> dict:
    """Boot, run every scenario, return the results (also bench/revoke.py's figures);
    "_stuck": what the guest said of processes in D state, if anything."""
    from tests.guest.harness import GuestTimeout
    try:
        res = Guest(topology="all").run("python3 - <<'EOF'\n" + GUEST_PY + "\nEOF\n", timeout=timeout)
    except GuestTimeout as e:
        raise AssertionError(f"the guest timed out: {e}") from None
    stuck = res.files.get("dstate.txt", b"").decode()[-6000:]
    assert res.returncode == 0 and "revoke.json" in res.files, res.output[-4000:] + stuck
    r = json.loads(res.files["revoke.json"])
    r["_wall_seconds"] = res.wall_seconds
    r["_stuck"] = stuck
    return r


@pytest.fixture(scope="module")
def run():
    r = run_guest()
    assert not r["errors"] and r["complete"], ("\n".join(r["errors"]) + r.get("vfiod_log", "")[-4000:] + r["_stuck"]
                                               + json.dumps(r.get("timings")))
    return r


def test_a_cooperative_holder_lets_go_when_the_kernel_asks_and_is_not_killed(run):
    c = run["coop"]
    assert c["revoke"]["rc"] == 0 and c["revoke"]["doc"]["ended"], c
    assert c["said"] == ["request", "closed"]
    assert c["alive"] is True
    assert c["revoke"]["doc"]["seconds"] < GRACE, c        # inside the grace: nobody was ended
    assert c["driver"] == "e1000e"


def test_an_uncooperative_holder_is_ended_after_the_grace_and_nothing_holds_the_device(run):
    s = run["stubborn"]
    assert s["revoke"]["rc"] == 0 and s["revoke"]["doc"]["ended"], s
    assert s["status"] == -15                               # SIGTERM ended it
    assert GRACE <= s["revoke"]["doc"]["seconds"] < GRACE + 5, s
    assert s["driver"] == "e1000e"
    assert s["device_fd_holders"] == []


def test_a_device_fd_passed_over_scm_rights_is_found_in_the_child(run):
    p = run["pass"]
    assert p["revoke"]["doc"]["ended"] and p["child_gone"] is True, p
    assert p["sender_alive"] is True                        # it held nothing any more: left alone
    assert p["driver"] == "e1000e"


def test_a_bare_device_fd_of_a_uid_with_another_vfio_lease_is_not_ended(run):
    a = run["ambiguous"]
    if a["kernel_names_it"]:
        pytest.skip("this guest kernel names a [vfio-device] fd's device in fdinfo (Linux 6.12 does): "
                    "test_kernel_matrix_guest tests that branch")
    assert a["revoke"]["rc"] == 1 and a["revoke"]["doc"]["ended"] is False, a
    assert a["child_alive"] is True
    assert a["ended_after_it_went"] is True and a["spare_back"] is True
    assert "this kernel does not say which device it is and uid 1000 holds another VFIO lease" in run["vfiod_log"]


def test_roots_process_is_never_ended_unless_the_policy_says_so(run):
    r = run["root"]
    assert r["revoke"]["rc"] == 1 and r["revoke"]["doc"]["ended"] is False, r
    assert r["alive_after_grace"] is True
    assert [x["state"] for x in r["leases"]] == ["revoking"]
    assert r["ended_after_it_went"] is True
    # Root's process is not the lessee's: not even searched; the kernel's word keeps the revoke waiting.
    assert "a process vfiod does not search (not the lessee's)" in run["vfiod_log"]


def test_expiry_of_a_held_lease_ends_the_holder_and_brings_the_nic_home(run):
    e = run["expiry"]
    assert e["back"] is True and e["status"] == -15, e
    assert e["seconds_after_grant"] < 4 + GRACE + 5 + 3, e
    assert e["device_fd_holders"] == []
    assert "is being revoked (expired)" in run["vfiod_log"]


def test_a_group_on_vfio_pci_from_boot_is_not_regranted_while_the_old_holder_has_it(run):
    v = run["vfio_host"]
    assert run["pair_at_start"] == ["vfio-pci", "vfio-pci"]
    assert v["release"]["rc"] == 0 and "vfiod is revoking it" in v["release"]["out"], v
    assert v["alive_at_other"], v
    assert v["other_while_held"]["rc"] != 0 and "already leased" in v["other_while_held"]["err"], v
    assert v["holder"] == -9                                 # it ignored SIGTERM
    assert v["other_after"] == 0 and v["drivers"] == ["vfio-pci", "vfio-pci"]
    assert v["device_fd_holders"] == []


def test_testpmd_on_a_leased_nic_is_revoked_and_the_nic_goes_back_to_e1000e(run):
    t = run["testpmd"]
    assert t["started"], t["out"]
    assert t["revoke"]["doc"]["ended"], t
    assert "vfiod is revoking the lease (testpmd); sending SIGTERM to dpdk-testpmd" in t["out"], t["out"]
    assert t["driver"] == "e1000e"


def test_sigkill_at_each_step_of_the_ladder_then_a_restart_finishes_it(run):
    crash = run["crash"]
    assert len(crash) == 8
    for point, c in crash.items():
        assert c["killed"], point
        assert c["finished"] and c["leases"] == 0, (point, c)
        assert c["driver"] == "e1000e", (point, c)
        assert c["holder"] == -15, (point, c)


def test_no_traceback_in_the_daemon_log(run):
    assert "Traceback" not in run["vfiod_log"]
    print("timings:", run["timings"], "coop:", run["coop"]["revoke"]["doc"]["seconds"],
          "stubborn:", run["stubborn"]["revoke"]["doc"]["seconds"])
