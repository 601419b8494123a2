"""The whole stack on the real kernel: dbus-daemon + vfiod + `vfioctl lease -- CMD`.

One boot of the ``bridge`` topology (two conventional e1000 at 0000:02:01.0
and 0000:02:02.0 behind the pcie-pci-bridge 0000:01:00.0 on shpchp, one IOMMU
group).  Inside the guest one root python3 process (the project's venv;
every python start costs seconds under TCG):

* starts a private system-type dbus-daemon whose config includes vfiod's own
  ``systemd/org.vfiod1.conf`` (the same config as the bus tier), writes a
  policy granting uid 1000 the bridge group, and starts ``vfiod`` as root on
  the guest's real sysfs (no ``--simulate``);
* waits for vfiod's "ready" line, then for ``vfioctl leases`` (as uid 1000)
  to answer;
* runs, as uid 1000 with no supplementary groups,
  ``vfioctl lease --bus ADDR 0000:02:01.0 --pass-fd -- python3 check.py``; check.py
  issues ``VFIO_GROUP_GET_STATUS`` on ``VFIOD_GROUP_FD`` and records its
  uid, the fd, the node and the drivers of both NICs and the bridge while it
  holds the lease, then exits with status 7;
* records the kernel's view right after vfioctl exits (and once more after a
  second, to tell a race from a leak), vfiod's own view over the bus, and
  vfiod's exit status and log after SIGTERM.

The tests read that record on the host side.
"""

from __future__ import annotations

import json

import pytest

from tests.guest.harness import Guest, guest_available

_ok, _why = guest_available()
pytestmark = [pytest.mark.guest, pytest.mark.skipif(not _ok, reason=f"guest not available: {_why}")]

NICS = ["0000:02:01.0", "0000:02:02.0"]
BRIDGE = "0000:01:00.0"
BEFORE = {NICS[0]: "e1000", NICS[1]: "e1000", BRIDGE: "shpchp"}
LEASED = {NICS[0]: "vfio-pci", NICS[1]: "vfio-pci", BRIDGE: None}
CHECK_EXIT = 7
UID = 1000

# The bus tier's private system-type bus (tests/bus), copied so this file stands alone:
# the system bus's denials, plus vfiod's own policy file.

# Runs as uid 1000 under `vfioctl lease`; prints one JSON object and exits with CHECK_EXIT.
CHECK_PY = r'''
import fcntl, json, os, struct, sys
def drv(a):
    link = f"/sys/bus/pci/devices/{a}/driver"
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None
out = {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
       "env": {k: v for k, v in os.environ.items() if k.startswith("VFIOD_")},
       "drivers": {a: drv(a) for a in %(devices)r}}
import resource
out["memlock"] = list(resource.getrlimit(resource.RLIMIT_MEMLOCK))
try:
    fd = int(os.environ["VFIOD_GROUP_FD"])
    out["fd_target"] = os.readlink(f"/proc/self/fd/{fd}")
    buf = bytearray(struct.pack("II", 8, 0))
    fcntl.ioctl(fd, 0x3B67, buf)                     # VFIO_GROUP_GET_STATUS
    out["status_flags"] = struct.unpack("II", buf)[1]
except Exception as e:
    out["status_error"] = repr(e)
node = os.environ.get("VFIOD_GROUP_PATH", "")
try:
    st = os.stat(node)
    out["node"] = [st.st_uid, oct(st.st_mode & 0o777)]
except OSError as e:
    out["node"] = repr(e)
print(json.dumps(out), flush=True)
sys.exit(%(exit)d)
''' % {"devices": NICS + [BRIDGE], "exit": CHECK_EXIT}

GUEST_PY = r'''
import json, os, signal, subprocess, sys, time, traceback
sys.path.insert(0, os.environ["VFIOD_CHECKOUT"])
from tests.guest import instack
from tests.guest.instack import device_path, driver, ensure_user, group_of, managed_objects, node
OUT = os.environ["OUT"]
UID = %(uid)d
NICS = %(nics)r
BRIDGE = %(bridge)r
W = "/run/vfiod-bus"
ADDR = f"unix:path={W}/bus"
res = {"errors": []}
t0 = time.monotonic()

def stamp(name):
    res.setdefault("timings", {})[name] = round(time.monotonic() - t0, 2)

def snap():
    return {"drivers": {a: driver(a) for a in NICS + [BRIDGE]}, "node": node(GROUP)}

def snap_present():
    return {a: (driver(a) if os.path.exists(f"/sys/bus/pci/devices/{a}") else "absent")
            for a in NICS + [BRIDGE]}

def as_user(cmd, timeout=300):
    return instack.as_user(UID, cmd, timeout=timeout)

def bus_view():
    objs = managed_objects(ADDR)
    dev = lambda a: objs.get(device_path(a))
    return {
        "leases": sorted(p for p, i in objs.items() if "org.vfiod1.Lease" in i),
        "group": {k: objs[f"/org/vfiod1/group/{GROUP}"]["org.vfiod1.Group"][k] for k in ("State", "Lease", "Viable")},
        "drivers": {a: (dev(a)["org.vfiod1.Device"]["Driver"] or None) if dev(a) else "absent"
                    for a in NICS + [BRIDGE]},
    }

def vfiod_log():
    with open(f"{W}/vfiod.log") as f:
        return f.read()

ensure_user(UID, "vfiod-user")
GROUP = group_of(NICS[0])
res["group"] = GROUP
os.makedirs(f"{W}/policy", exist_ok=True)
os.makedirs(f"{W}/state", exist_ok=True)
os.chmod(W, 0o755)
with open(f"{W}/policy/50-test.toml", "w") as f:
    f.write(f'[[rule]]\ngroup = [{GROUP}]\nuids = [{UID}]\nbackends = ["vfio", "pci-stub"]\nmemlock = "256M"\npersistent = true\n')
    # the same NICs as a named resource (leased as name:bridged-nics)
    f.write('[[resource]]\nname = "bridged-nics"\n'
            f'devices = [{{ address = "{NICS[0]}", ids = "8086:100e" }}, {{ address = "{NICS[1]}", ids = "8086:100e" }}]\n')
with open(f"{OUT}/check.py") as f, open(f"{W}/check.py", "w") as g:
    g.write(f.read())
os.chmod(f"{W}/check.py", 0o644)
res["before"] = snap()

from vfiod.sim.privatebus import PrivateBus
bus = PrivateBus(W, os.environ["VFIOD_CHECKOUT"] + "/systemd/org.vfiod1.conf")
res["bus_address"] = bus.address
stamp("bus_up")
log = open(f"{W}/vfiod.log", "w")
daemon = subprocess.Popen(["vfiod", "--bus", ADDR, "--policy-dir", f"{W}/policy", "--state-dir", f"{W}/state"],
                          stdout=log, stderr=subprocess.STDOUT)
try:
    # Wait on the log first: every vfioctl start costs seconds here.
    deadline = time.monotonic() + 180
    while "ready on" not in vfiod_log():
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"vfiod did not come up (rc {daemon.poll()})")
        time.sleep(0.1)
    stamp("vfiod_ready")
    while True:
        p = as_user(["vfioctl", "leases", "--bus", ADDR, "--json", "--timeout", "20"], timeout=120)
        if p.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    res["leases_before"] = {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
    stamp("vfioctl_leases")

    # A named resource through the daemon: check, show and a lease by name.
    named = {}
    for what, cmd in (("check", ["check", "name:bridged-nics"]), ("show", ["show", "name:bridged-nics", "--json"]),
                      ("lease", ["lease", "name:bridged-nics", "--", "true"])):
        p = as_user(["vfioctl", cmd[0], "--bus", ADDR, *cmd[1:]])
        named[what] = {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
    named["after"] = snap()
    res["named"] = named
    stamp("named")

    p = as_user(["vfioctl", "lease", "--bus", ADDR, NICS[0], "--pass-fd", "--", "python3", f"{W}/check.py"])
    res["after"] = snap()
    stamp("vfioctl_lease")
    res["lease"] = {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
    time.sleep(1.0)
    res["after_settle"] = snap()

    # vfiod's own view, over the bus, in this process (as root).
    try:
        res["bus_view"] = bus_view()
    except Exception:
        res["errors"].append("bus view: " + traceback.format_exc())
    stamp("bus_view")

    # Hotplug: a leased NIC removed through sysfs ends its lease ("removed"); a rescan
    # brings it back on its host driver.
    p = as_user(["vfioctl", "lease", "--bus", ADDR, "--persistent", NICS[0]])
    res["hotplug_lease"] = {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
    res["hotplug_leased"] = snap_present()
    with open(f"/sys/bus/pci/devices/{NICS[1]}/remove", "w") as f:
        f.write("1")
    for _ in range(100):
        if "outcome=removed" in vfiod_log():
            break
        time.sleep(0.2)
    stamp("hotplug_removed")
    p = as_user(["vfioctl", "leases", "--bus", ADDR, "--json"])
    res["hotplug_leases_after_remove"] = p.stdout
    res["hotplug_after_remove"] = snap_present()
    with open("/sys/bus/pci/rescan", "w") as f:
        f.write("1")
    for _ in range(100):
        res["hotplug_after_rescan"] = snap_present()
        if res["hotplug_after_rescan"][NICS[1]] == "e1000":
            break
        time.sleep(0.2)
    for _ in range(50):        # vfiod refreshes the touched group once per burst of events
        res["bus_view_after_rescan"] = bus_view()
        if res["bus_view_after_rescan"]["drivers"] == res["hotplug_after_rescan"]:
            break
        time.sleep(0.2)
    stamp("hotplug")

    # A client killed (SIGKILL) at many points of its grant leaves no lease behind: a grant
    # whose caller left the bus before the reply is undone, and the group goes home.
    orphans = {}
    for delay in (1.0, 2.0, 3.0, 4.0, 5.0, 6.5, 8.0):
        try:
            p = as_user(["vfioctl", "lease", "--bus", ADDR, NICS[0], "--", "sleep", "30"], timeout=delay)
            killed = False
        except subprocess.TimeoutExpired:
            killed = True
        for _ in range(150):
            view = bus_view()
            if not view["leases"] and snap()["drivers"] == res["before"]["drivers"]:
                break
            time.sleep(0.2)
        orphans[str(delay)] = {"killed": killed, "leases": view["leases"], "drivers": snap()["drivers"]}
    res["orphans"] = orphans
    stamp("orphans")
except Exception:
    res["errors"].append(traceback.format_exc())
finally:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            res["errors"].append("vfiod did not stop within 60 s of SIGTERM")
            daemon.kill()
            daemon.wait()
    res["vfiod_rc"] = daemon.returncode
    res["final"] = snap()
    log.close()
    res["vfiod_log"] = vfiod_log()
    bus.stop()
    stamp("done")
    with open(os.path.join(OUT, "bus.json"), "w") as f:
        json.dump(res, f)
''' % {"uid": UID, "nics": NICS, "bridge": BRIDGE}


@pytest.fixture(scope="module")
def guest_run():
    res = Guest(topology="bridge").run(
        "python3 - <<'EOF'\n" + GUEST_PY + "\nEOF\n", timeout=900,
        inputs={"check.py": CHECK_PY.encode()})
    assert res.returncode == 0 and "bus.json" in res.files, res.output[-4000:]
    r = json.loads(res.files["bus.json"])
    r["_wall_seconds"] = res.wall_seconds
    return r


def _context(r) -> str:
    return ("\n--- errors ---\n" + "\n".join(r.get("errors", []))
            + "\n--- vfioctl lease stderr ---\n" + r.get("lease", {}).get("stderr", "")
            + "\n--- vfiod log ---\n" + r.get("vfiod_log", "")[-6000:])


def test_vfiod_comes_up_on_the_real_kernel_and_answers_vfioctl(guest_run):
    r = guest_run
    assert not r["errors"], _context(r)
    assert r["before"] == {"drivers": BEFORE, "node": None}
    assert r["leases_before"]["rc"] == 0, r["leases_before"]
    assert json.loads(r["leases_before"]["stdout"])["leases"] == []


def test_a_named_resource_is_checked_shown_and_leased_through_the_daemon(guest_run):
    named = guest_run["named"]
    assert named["check"]["rc"] == 0 and named["check"]["stdout"].startswith("allowed"), named
    shown = json.loads(named["show"]["stdout"])["group"]
    assert shown["group"] == guest_run["group"] and [d["address"] for d in shown["devices"]] == [BRIDGE] + NICS
    assert named["lease"]["rc"] == 0, named["lease"]
    assert named["after"]["drivers"] == BEFORE


def test_cmd_runs_as_the_user_with_a_viable_group_fd(guest_run):
    r = guest_run
    assert r["lease"]["stdout"].strip(), _context(r)
    check = json.loads(r["lease"]["stdout"].strip().splitlines()[-1])
    group = r["group"]
    assert (check["uid"], check["euid"], check["gid"], check["groups"]) == (UID, UID, UID, [])
    assert check["env"]["VFIOD_GROUP"] == str(group)
    assert check["env"]["VFIOD_GROUP_PATH"] == f"/dev/vfio/{group}"
    assert check["fd_target"] == f"/dev/vfio/{group}"
    assert check.get("status_flags") == 1, check          # VFIO_GROUP_FLAGS_VIABLE, no container yet
    assert check["drivers"] == LEASED                      # both NICs on vfio-pci, the bridge held unbound
    assert check["node"] == [UID, "0o600"]


def test_the_policys_memlock_grant_reaches_the_command(guest_run):
    # DESIGN fact 9: DPDK's testpmd needs a memlock limit of this order; the default 8M fails.
    check = json.loads(guest_run["lease"]["stdout"].strip().splitlines()[-1])
    assert check["memlock"] == [256 << 20, 256 << 20], check


def test_vfioctl_exits_with_the_commands_status(guest_run):
    r = guest_run
    assert r["lease"]["rc"] == CHECK_EXIT, _context(r)
    # released by vfioctl's Release call (not by its connection going away), and audited as such
    assert "released" in r["lease"]["stderr"], r["lease"]["stderr"]
    audit = [l for l in r["vfiod_log"].splitlines() if "vfiod.audit" in l]
    assert [l for l in audit if "uid=1000" in l and "outcome=granted" in l], audit
    assert [l for l in audit if "uid=1000" in l and "outcome=released" in l], audit


def test_everything_is_back_when_vfioctl_exits(guest_run):
    r = guest_run
    assert r["after"]["drivers"] == BEFORE, _context(r)
    assert r["after"]["node"] is None, (r["after"], r["after_settle"])
    assert r["after_settle"] == r["after"]


def test_a_leased_device_removed_through_sysfs_ends_its_lease(guest_run):
    r = guest_run
    assert r["hotplug_lease"]["rc"] == 0, (r["hotplug_lease"], _context(r))
    assert r["hotplug_leased"] == LEASED, r["hotplug_leased"]
    audit = [l for l in r["vfiod_log"].splitlines() if "vfiod.audit" in l and "outcome=removed" in l]
    assert len(audit) == 1, _context(r)
    assert json.loads(r["hotplug_leases_after_remove"])["leases"] == []
    # the surviving NIC and the bridge are given back; the removed one is gone
    assert r["hotplug_after_remove"] == {NICS[0]: "e1000", NICS[1]: "absent", BRIDGE: "shpchp"}


def test_a_rescan_brings_the_removed_device_back_on_its_host_driver(guest_run):
    r = guest_run
    assert r["hotplug_after_rescan"] == BEFORE, _context(r)
    # and vfiod followed: the device is a bus object again, on its driver, the group is the host's
    view = r["bus_view_after_rescan"]
    assert view["drivers"] == BEFORE and view["leases"] == [], view
    assert view["group"]["State"] == "host"


def test_vfiod_agrees_and_stops_cleanly(guest_run):
    r = guest_run
    view = r.get("bus_view")
    assert view, _context(r)
    assert view["leases"] == []
    assert view["group"]["State"] == "host" and view["group"]["Lease"] == "/"
    assert view["drivers"] == BEFORE
    assert r["vfiod_rc"] == 0, _context(r)
    assert r["final"] == {"drivers": BEFORE, "node": None}
    log = r["vfiod_log"]
    assert "Traceback" not in log and "internal error" not in log, log[-6000:]


def test_a_client_killed_at_any_point_of_its_grant_leaves_no_lease(guest_run):
    orphans = guest_run["orphans"]
    assert any(o["killed"] for o in orphans.values()), orphans
    for delay, o in orphans.items():
        assert o["leases"] == [], (delay, o, _context(guest_run))
        assert o["drivers"] == BEFORE, (delay, o, _context(guest_run))
