"""The core stories on Debian's Linux 6.12 (bookworm-backports' linux-image-6.12 on
Debian 12, the release's own on Debian 13): one boot of the ``all`` topology with
that kernel, vfiod on a private bus (tests/guest/instack.py):

* a lease as an unprivileged user, who then does the whole VFIO handshake (group,
  container, type1 IOMMU, device fd: tests/guest/vfioholder.py);
* a revoke that ends that holder after the grace and gives the NIC back;
* the fdinfo of a ``[vfio-device]`` fd: kernels newer than 6.12 name its device
  there (``vfio-device-syspath:``), Debian's 6.12 does not (measured), so, as on
  6.1 (test_revoke_guest), a bare device fd passed to a child over SCM_RIGHTS while
  its uid holds another VFIO lease is left alone, and the revoke ends once it goes;
* hotplug: a leased NIC removed through sysfs ends its lease as ``removed``, and a
  rescan brings it back on e1000e.
"""

from __future__ import annotations

import json

import pytest

from tests.guest.harness import Guest, guest_available

KERNEL = "6.12"
_ok, _why = guest_available(kernel=KERNEL)
pytestmark = [pytest.mark.guest, pytest.mark.skipif(not _ok, reason=f"guest not available: {_why}")]

NIC, SPARE, GRACE = "0000:01:00.0", "0000:08:00.0", 3

GUEST_PY = r'''
import glob, json, os, signal, sys, time
sys.path.insert(0, os.environ["VFIOD_CHECKOUT"])
from tests.guest.instack import Stack, driver, ensure_user, group_of, until
from tests.guest.vfioholder import device_fd_holders, gone, hold
OUT = os.environ["OUT"]
NIC, SPARE, GRACE = %(nic)r, %(spare)r, %(grace)d
res = {"errors": [], "complete": False, "uname": os.uname().release}
def save():
    with open(os.path.join(OUT, "matrix.json"), "w") as f:
        json.dump(res, f)
ensure_user(1000, "lessee")
G = group_of(NIC)
rules = (f'[[rule]]\naddress = ["{NIC}", "{SPARE}"]\nuids = [1000]\nbackends = ["vfio"]\npersistent = true\n'
         f'revoke_grace = "{GRACE}s"\nmemlock = "512M"\n')
stack = Stack("/run/vfiod-matrix", {"50-matrix.toml": rules})
def lease(target):
    p = stack.vfioctl(1000, "lease", target, "--persistent", timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"lease {target}: {p.stderr}")
    return p.stdout.split()[-1]
def revoke(lid, *extra):
    p = stack.vfioctl(0, "revoke", lid, "--json", "--wait", "60", *extra, timeout=120)
    return {"rc": p.returncode, "doc": json.loads(p.stdout) if p.stdout.strip() else None, "stderr": p.stderr}
def fdinfo_of_device_fds(pid):
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[vfio-device]":
                out.append(open(f"/proc/{pid}/fdinfo/{fd}").read())
        except OSError:
            pass
    return out
try:
    stack.start()
    # 1. Lease and the whole handshake as the user; 2. revoke ends the holder.
    lid = lease(NIC)
    res["node_owner"] = os.stat(f"/dev/vfio/{G}").st_uid
    h = hold(G, NIC, "stubborn")
    res["handshake"] = h.expect("ready")
    res["holder_fdinfo"] = fdinfo_of_device_fds(h.pid)
    r = revoke(lid, "--reason", "matrix")
    res["revoke"] = {"revoke": r, "status": h.wait(10), "driver": driver(NIC), "holders": device_fd_holders()}
    save()

    # 3. A bare device fd in a child, its uid holding another lease: does the kernel name
    # the fd's device?  Where it does not, the holder is left alone and the revoke ends
    # once it goes.
    other = lease(SPARE)
    lid = lease(NIC)
    h = hold(G, NIC, "pass")
    child = int(h.expect("child").split()[1])
    h.expect("ready")
    res["child_fdinfo"] = fdinfo_of_device_fds(child)
    r = revoke(lid, "--reason", "bare fd", "--wait", str(GRACE + 5))
    res["bare"] = {"revoke": r, "child_alive": not gone(child)}
    os.kill(child, signal.SIGKILL)
    res["bare"]["ended_after_it_went"] = until(lambda: driver(NIC) == "e1000e", 30)
    h.kill()
    stack.vfioctl(1000, "release", other, timeout=120)
    res["bare"]["spare_back"] = until(lambda: driver(SPARE) == "e1000e", 30)
    save()

    # 4. Hotplug: the leased NIC removed through sysfs, then a rescan.
    lid = lease(NIC)
    with open(f"/sys/bus/pci/devices/{NIC}/remove", "w") as f:
        f.write("1")
    res["removed_logged"] = until(lambda: "outcome=removed" in stack.read_log(), 60)
    res["leases_after_remove"] = json.loads(stack.vfioctl(0, "leases", "--json", timeout=60).stdout)["leases"]
    with open("/sys/bus/pci/rescan", "w") as f:
        f.write("1")
    res["after_rescan"] = until(lambda: driver(NIC) == "e1000e", 60)
    # vfiod has taken the rescan in before it is stopped
    res["vfiod_sees_it_back"] = until(
        lambda: '"e1000e"' in stack.vfioctl(0, "show", NIC, "--json", timeout=60).stdout, 60)
    res["complete"] = True
except Exception as e:
    import traceback
    res["errors"].append(traceback.format_exc())
finally:
    stack.close()
    res["vfiod_log"] = stack.read_log()
    save()
'''


@pytest.fixture(scope="module")
def run():
    script = GUEST_PY % {"nic": NIC, "spare": SPARE, "grace": GRACE}
    res = Guest(topology="all", kernel=KERNEL).run("python3 - <<'EOF'\n" + script + "\nEOF\n", timeout=1200)
    assert "matrix.json" in res.files, res.output[-4000:] + res.console[-3000:]
    r = json.loads(res.files["matrix.json"])
    print(f"\nLinux {r['uname']}: boot to script {res.boot_seconds}s, script {res.script_seconds}s, "
          f"wall {res.wall_seconds:.0f}s")
    seen = json.dumps({k: v for k, v in r.items() if k != "vfiod_log"}, indent=1)[-6000:]
    assert not r["errors"] and r["complete"], "\n".join(r["errors"]) + seen + r.get("vfiod_log", "")[-4000:]
    return r


def test_the_guest_runs_debians_6_12(run):
    assert run["uname"].startswith(KERNEL + ".") and run["uname"].endswith("-amd64"), run["uname"]


def test_a_user_leases_the_nic_and_does_the_whole_vfio_handshake(run):
    assert run["node_owner"] == 1000
    assert run["handshake"] == "ready"
    assert len(run["holder_fdinfo"]) == 1, run["holder_fdinfo"]


def test_a_revoke_ends_the_holder_after_the_grace_and_the_nic_goes_home(run):
    r = run["revoke"]
    assert r["revoke"]["rc"] == 0 and r["revoke"]["doc"]["ended"], r
    assert GRACE <= r["revoke"]["doc"]["seconds"] < GRACE + 5, r
    assert r["status"] == -15 and r["driver"] == "e1000e" and r["holders"] == [], r


def test_debians_6_12_does_not_name_the_device_of_a_vfio_device_fd(run):
    """fdinfo's ``vfio-device-syspath:`` came after 6.12: Debian's 6.12 says as little as 6.1."""
    [info] = run["child_fdinfo"]
    assert "vfio-device-syspath:" not in info and "ino:" in info, info


def test_a_bare_device_fd_of_a_uid_with_another_lease_is_left_alone_until_it_goes(run):
    b = run["bare"]
    assert b["revoke"]["rc"] == 1 and b["revoke"]["doc"]["ended"] is False, b
    assert b["child_alive"] is True
    assert b["ended_after_it_went"] is True and b["spare_back"] is True, b
    assert "this kernel does not say which device it is and uid 1000 holds another VFIO lease" in run["vfiod_log"]


def test_a_leased_nic_removed_through_sysfs_ends_its_lease_and_a_rescan_brings_it_back(run):
    assert run["removed_logged"] is True, run["vfiod_log"][-3000:]
    assert run["leases_after_remove"] == []
    assert run["after_rescan"] is True and run["vfiod_sees_it_back"] is True


def test_no_traceback_in_the_daemon_log(run):
    log = run["vfiod_log"]
    assert "Traceback" not in log, log[max(0, log.find("Traceback") - 1500):][:5000]
