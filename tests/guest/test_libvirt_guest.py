"""The libvirt backend with real libvirt on the real kernel: an unprivileged
user's session VM gets a leased NIC.

One boot of the ``rootport`` topology (an 82574L at 0000:01:00.0, alone in its
group).  Inside the guest, as root: the system bus (``dbus-daemon --system``,
with vfiod's bus policy in ``/etc/dbus-1/system.d``), ``systemd-udevd`` (libvirt's
node-device driver learns PCI devices from udev), ``libvirtd``, and vfiod on
the system bus with a policy giving uid 1000 the group through the libvirt
backend with a 2G memlock grant.  Then, as uid 1000:

    vfioctl lease 0000:01:00.0 --backend libvirt --xml -- python3 session.py

session.py puts ``$VFIOD_HOSTDEV_XML`` into a transient q35 TCG domain (32 MiB,
no disk), runs ``virsh -c qemu:///session create`` (session libvirt is spawned
by that virsh, so it inherits the lease's memlock grant: it raises its QEMU's
limit to RAM + 1 GiB), records QEMU's uid and whether it holds /dev/vfio/N
open, then waits for root to look (``virsh nodedev-dumpxml`` and vfiod's bus
view) and destroys the domain.  vfioctl releases the lease when it exits;
root looks once more.  Before that, uid 1001, whose rule grants no memlock,
runs the same and session libvirt refuses to start the domain.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.guest.harness import Guest, guest_available

_ok, _why = guest_available()
pytestmark = [pytest.mark.guest, pytest.mark.skipif(not _ok, reason=f"guest not available: {_why}")]

NIC = "0000:01:00.0"
UID = 1000

SESSION_PY = r'''
import json, os, subprocess, sys, time
S = sys.argv[1]          # this run's directory
out = {"env_xml": os.environ.get("VFIOD_HOSTDEV_XML", ""), "group_path": os.environ.get("VFIOD_GROUP_PATH")}
import resource
out["memlock"] = list(resource.getrlimit(resource.RLIMIT_MEMLOCK))
dom = f"""<domain type='qemu'>
  <name>vfiod-session-vm</name>
  <memory unit='MiB'>32</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{out["env_xml"]}  </devices>
</domain>
"""
with open(f"{S}/dom.xml", "w") as f:
    f.write(dom)
def virsh(*args, timeout=300):
    p = subprocess.run(["virsh", "-c", "qemu:///session", *args], capture_output=True, text=True, timeout=timeout)
    return {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
t = time.monotonic()
out["create"] = virsh("create", f"{S}/dom.xml")
out["create_seconds"] = round(time.monotonic() - t, 1)
out["list"] = virsh("list", "--name")
# QEMU of the domain: its uid, and whether it holds the group open
node = out["group_path"]
out["qemu"] = []
for pid in os.listdir("/proc"):
    if not pid.isdigit():
        continue
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")
        if not cmd[0].endswith(b"qemu-system-x86_64") or b"vfiod-session-vm" not in b" ".join(cmd):
            continue
        fds = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                fds.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                pass
        with open(f"/proc/{pid}/status") as f:
            uid = [int(l.split()[1]) for l in f if l.startswith("Uid:")][0]
        out["qemu"].append({"pid": int(pid), "uid": uid, "has_group": node in fds,
                            "has_container": "/dev/vfio/vfio" in fds})
    except OSError:
        continue
with open(f"{S}/running.json", "w") as f:
    json.dump(out, f)
deadline = time.monotonic() + 300
while not os.path.exists(f"{S}/destroy") and time.monotonic() < deadline:
    time.sleep(0.2)
if out["create"]["rc"] == 0:
    out["destroy"] = virsh("destroy", "vfiod-session-vm")
with open(f"{S}/done.json", "w") as f:
    json.dump(out, f)
'''

GUEST_PY = r'''
import json, os, shutil, signal, subprocess, sys, time, traceback
sys.path.insert(0, os.environ["VFIOD_CHECKOUT"])
from tests.guest.instack import device_path, driver, ensure_user, group_of, managed_objects, node, user_env
from vfiod.sim.privatebus import stop_process
OUT = os.environ["OUT"]
NIC, UID = %(nic)r, %(uid)d
W = "/run/vfiod-lv"
res = {"errors": []}
t0 = time.monotonic()
def stamp(name):
    res.setdefault("timings", {})[name] = round(time.monotonic() - t0, 2)
def sh(*cmd, timeout=120):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
def nodedev_driver():
    p = sh("virsh", "-c", "qemu:///system", "nodedev-dumpxml", "pci_" + NIC.replace(":", "_").replace(".", "_"))
    import re
    m = re.search(r"<driver>\s*<name>([^<]+)</name>", p["stdout"])
    return m.group(1) if m else ("(none)" if p["rc"] == 0 else "error: " + p["stderr"].strip())
def vfiod_view():
    objs = managed_objects("system")
    dev = objs[device_path(NIC)]["org.vfiod1.Device"]
    leases = [i["org.vfiod1.Lease"] for p, i in objs.items() if "org.vfiod1.Lease" in i]
    return {"driver": dev["Driver"], "leases": [(l["Owner"], l["Backend"]) for l in leases]}
def snap():
    return {"driver": driver(NIC), "node": node(GROUP), "nodedev": nodedev_driver()}

def vm_run(uid, snapshots):
    """As `uid`: vfioctl lease --backend libvirt -- session.py; root looks while the domain runs."""
    out = {}
    S = f"{W}/session-{uid}"
    home = f"/home/vfiod-vm-{uid}"
    ensure_user(uid, f"vfiod-vm-{uid}")
    for d in (S, home):
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o755)
        os.chown(d, uid, uid)
    env = user_env(uid)
    env["HOME"] = home
    lessee = subprocess.Popen(
        ["vfioctl", "lease", NIC, "--backend", "libvirt", "--xml", "--timeout", "120", "--",
         "python3", f"{W}/session.py", S],
        user=uid, group=uid, extra_groups=[], env=env, cwd=home,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 400
    while not os.path.exists(f"{S}/running.json"):
        if lessee.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if snapshots:
        stamp("domain_running")
        out["during"] = snap()
        try:
            out["during_vfiod"] = vfiod_view()
        except Exception:
            res["errors"].append("vfiod view: " + traceback.format_exc())
    open(f"{S}/destroy", "w").close()
    try:
        stdout, stderr = lessee.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        lessee.kill()
        stdout, stderr = lessee.communicate()
    out["vfioctl"] = {"rc": lessee.returncode, "stdout": stdout, "stderr": stderr}
    try:
        with open(f"{S}/done.json") as f:
            out["session"] = json.load(f)
    except OSError as e:
        res["errors"].append(f"session.py as uid {uid} left no record: {e}")
    return out

NO_GRANT = UID + 1
GROUP = group_of(NIC)
res["group"] = GROUP
os.makedirs(f"{W}/policy", exist_ok=True)
os.chmod(W, 0o755)
shutil.copy(f"{OUT}/session.py", f"{W}/session.py")
os.chmod(f"{W}/session.py", 0o644)
with open(f"{W}/policy/50-vm.toml", "w") as f:
    f.write(f'[[rule]]\naddress = "{NIC}"\nuids = [{UID}]\nbackends = ["libvirt"]\nmemlock = "2G"\n\n'
            f'[[rule]]\naddress = "{NIC}"\nuids = [{NO_GRANT}]\nbackends = ["libvirt"]\n')
# The system bus, with vfiod's policy where a distribution puts it.
os.makedirs("/etc/dbus-1/system.d", exist_ok=True)
shutil.copy(os.environ["VFIOD_CHECKOUT"] + "/systemd/org.vfiod1.conf", "/etc/dbus-1/system.d/org.vfiod1.conf")
os.makedirs("/run/dbus", exist_ok=True)
daemon = None
try:
    res["dbus"] = sh("dbus-daemon", "--system", "--fork")
    res["udevd"] = sh("/lib/systemd/systemd-udevd", "--daemon")
    sh("udevadm", "trigger", "--subsystem-match=pci", "--action=add")
    sh("udevadm", "settle", "-t", "60", timeout=90)
    res["libvirtd"] = sh("libvirtd", "-d")
    for _ in range(100):
        if os.path.exists("/run/libvirt/libvirt-sock"):
            break
        time.sleep(0.1)
    stamp("services")
    res["before"] = snap()
    log = open(f"{W}/vfiod.log", "w")
    daemon = subprocess.Popen(["vfiod", "--bus", "system", "--policy-dir", f"{W}/policy", "--state-dir", f"{W}/state"],
                              stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while "ready on" not in open(f"{W}/vfiod.log").read():
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("vfiod did not come up")
        time.sleep(0.1)
    stamp("vfiod_ready")
    res["without_grant"] = vm_run(NO_GRANT, snapshots=False)
    res["after_without_grant"] = snap()
    stamp("without_grant")
    r = vm_run(UID, snapshots=True)
    res.update(r)
    res["after"] = snap()
    res["after_vfiod"] = vfiod_view()
except Exception:
    res["errors"].append(traceback.format_exc())
finally:
    if daemon is not None:
        res["vfiod_rc"] = stop_process(daemon, 60)
    try:
        res["vfiod_log"] = open(f"{W}/vfiod.log").read()
    except OSError:
        pass
    for u in (UID, UID + 1):
        subprocess.run(["pkill", "-u", str(u)], check=False)
    stamp("done")
    with open(os.path.join(OUT, "libvirt.json"), "w") as f:
        json.dump(res, f)
''' % {"nic": NIC, "uid": UID}


@pytest.fixture(scope="module")
def run():
    res = Guest(topology="rootport").run("python3 - <<'EOF'\n" + GUEST_PY + "\nEOF\n", timeout=1200,
                                         inputs={"session.py": SESSION_PY.encode()})
    assert res.returncode == 0 and "libvirt.json" in res.files, res.output[-4000:]
    r = json.loads(res.files["libvirt.json"])
    r["_wall_seconds"] = res.wall_seconds
    assert not r["errors"], "\n".join(r["errors"]) + "\n" + r.get("vfiod_log", "")[-4000:]
    return r


def _ctx(r):
    return (json.dumps(r.get("vfioctl"), indent=1)[-3000:] + "\n" + json.dumps(r.get("session"), indent=1)[-3000:]
            + "\n" + r.get("vfiod_log", "")[-3000:])


def test_the_nic_starts_on_its_host_driver_and_libvirt_agrees(run):
    assert run["before"] == {"driver": "e1000e", "node": None, "nodedev": "e1000e"}


def test_the_session_domain_starts_with_the_leased_nic(run):
    s = run["session"]
    assert s["create"]["rc"] == 0, _ctx(run)
    assert "vfiod-session-vm" in s["list"]["stdout"]
    # session libvirt's QEMU runs as the user and holds the group open
    assert [(q["uid"], q["has_group"], q["has_container"]) for q in s["qemu"]] == [(UID, True, True)], s["qemu"]
    assert s["memlock"] == [2 << 30, 2 << 30]


def test_without_a_memlock_grant_session_libvirt_cannot_start_the_domain(run):
    # Session libvirt raises its QEMU's RLIMIT_MEMLOCK to RAM + 1 GiB; unprivileged, it can
    # only do so within the hard limit it inherited: that is what the policy's grant is for.
    r = run["without_grant"]
    create = r["session"]["create"]
    assert create["rc"] != 0, create
    assert "cannot limit locked memory" in create["stderr"] and "Operation not permitted" in create["stderr"], create
    assert r["session"]["memlock"][1] < (1 << 30)
    assert r["vfioctl"]["rc"] == 0          # session.py itself finished; the lease was released
    assert run["after_without_grant"] == {"driver": "e1000e", "node": None, "nodedev": "e1000e"}


def test_libvirt_and_vfiod_agree_while_the_domain_runs(run):
    assert run["during"] == {"driver": "vfio-pci", "node": [UID, "0o600"], "nodedev": "vfio-pci"}, _ctx(run)
    assert run["during_vfiod"] == {"driver": "vfio-pci", "leases": [[UID, "libvirt"]]}


def test_vfioctl_prints_the_hostdev_xml_it_hands_the_command(run):
    xml = run["session"]["env_xml"]
    assert re.search(r"<hostdev mode='subsystem' type='pci' managed='no'>\s*<driver name='vfio'/>\s*<source>\s*"
                     r"<address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>", xml), xml
    assert xml.strip() in run["vfioctl"]["stdout"]


def test_after_destroy_and_release_the_nic_is_back_and_libvirt_agrees(run):
    assert run["session"]["destroy"]["rc"] == 0, _ctx(run)
    assert run["vfioctl"]["rc"] == 0, _ctx(run)
    assert run["after"] == {"driver": "e1000e", "node": None, "nodedev": "e1000e"}, _ctx(run)
    assert run["after_vfiod"] == {"driver": "e1000e", "leases": []}
    log = run["vfiod_log"]
    assert "outcome=granted" in log and "outcome=released" in log
    assert "libvirt left" not in log and "could not reattach" not in log, log[-3000:]
    assert run["vfiod_rc"] == 0 and "Traceback" not in log
