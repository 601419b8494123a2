"""The kernel's word on who holds a group, on the real kernel (Debian's 6.1): one boot
of the ``all`` topology, vfiod as root on the guest's sysfs (tests/guest/instack.py),
holders forked as real uids (tests/guest/vfioholder.py).

* a group fd in flight: the lessee sends it to itself over a socketpair, does not
  receive it, closes its own and releases: no process holds it, the kernel still
  does (the group node does not open: EBUSY), so the release goes to the ladder and
  says why.  6.1's word once every member has left vfio-pci: the group is gone (no
  node); the group of the devices bound again is a new one, whose node opens for the
  next grant, and the file in flight cannot reach its device (ENODEV);
* a device fd in flight, the same way, under a root revoke: the unbind does not
  return, nobody is killed, the revoke waits and says why, and ends once it lands;
* another user's QEMU-style holder: a bare ``[vfio-device]`` fd (6.1 does not
  name its device) of uid 1001's own lease; a lease of uid 1000 with
  ``revoke_others = true`` is released and revoked at once, and that holder lives.
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest

from tests.guest.harness import Guest, guest_available

_ok, _why = guest_available()
pytestmark = [pytest.mark.guest, pytest.mark.skipif(not _ok, reason=f"guest not available: {_why}")]

NIC, SPARE = "0000:01:00.0", "0000:08:00.0"
GRACE = 2

GUEST_PY = r'''
import errno, json, os, signal, sys, time, traceback
sys.path.insert(0, os.environ["VFIOD_CHECKOUT"])
from tests.guest.instack import Stack, driver, ensure_user, group_of, until
from tests.guest.vfioholder import gone, hold
OUT = os.environ["OUT"]
NIC, SPARE, GRACE = %(nic)r, %(spare)r, %(grace)d
res = {"errors": [], "complete": False}
def save():
    with open(os.path.join(OUT, "word.json"), "w") as f:
        json.dump(res, f)
def root_open(group):
    """What the kernel says to root's open of the group node now ("ok" or the errno's name)."""
    try:
        os.close(os.open(f"/dev/vfio/{group}", os.O_RDWR))
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

ensure_user(1000, "lessee")
ensure_user(1001, "other")
G, GS = group_of(NIC), group_of(SPARE)
rules = (f'[[rule]]\naddress = ["{NIC}"]\nuids = [1000, 1001]\nbackends = ["vfio"]\npersistent = true\n'
         f'revoke_grace = "{GRACE}s"\nrevoke_others = true\n\n'
         f'[[rule]]\naddress = ["{SPARE}"]\nuids = [1001]\nbackends = ["vfio"]\npersistent = true\n')
stack = Stack("/run/vfiod-word", {"50-word.toml": rules})

def lease(uid, target):
    p = stack.vfioctl(uid, "lease", target, "--persistent", timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"lease {target} as {uid}: {p.stderr}")
    return p.stdout.split()[-1]

def leases():
    return json.loads(stack.vfioctl(0, "leases", "--json", timeout=60).stdout)["leases"]

try:
    stack.start()

    # 1. A group fd in flight over SCM_RIGHTS, then a release.
    lid = lease(1000, NIC)
    h = hold(G, NIC, "fly-group")
    h.expect("ready")
    opened_while_in_flight = root_open(G)
    rel = stack.vfioctl(1000, "release", lid, timeout=120)
    rows = leases()
    time.sleep(GRACE + 3)
    other = stack.vfioctl(1001, "lease", NIC, "--persistent", timeout=120)
    res["fly_group"] = {"root_open": opened_while_in_flight, "release": rel.stdout + rel.stderr,
                        "rows": rows, "driver_while": driver(NIC), "other": {"rc": other.returncode,
                                                                              "err": other.stderr},
                        "holder_alive": h.poll() is None}
    res["fly_group"]["other_granted_while_in_flight"] = other.returncode == 0
    os.kill(h.pid, signal.SIGUSR1)
    res["fly_group"]["stale_fd"] = h.expect("landed").split()[1]      # with another lease's group bound
    if other.returncode == 0:
        stack.vfioctl(1001, "release", other.stdout.split()[-1], timeout=120)
    res["fly_group"]["ended_after_it_landed"] = until(lambda: driver(NIC) == "e1000e" and not leases(), 30)
    again = stack.vfioctl(1001, "lease", NIC, "--persistent", timeout=120)
    res["fly_group"]["other_after"] = again.returncode
    if again.returncode == 0:
        stack.vfioctl(1001, "release", again.stdout.split()[-1], timeout=120)
    until(lambda: driver(NIC) == "e1000e", 30)
    h.kill()
    save()

    # 2. A device fd in flight, then a root revoke.
    lid = lease(1000, NIC)
    h = hold(G, NIC, "fly-device")
    h.expect("ready")
    r = stack.vfioctl(0, "revoke", lid, "--json", "--wait", str(GRACE + 5), timeout=120)
    res["fly_device"] = {"rc": r.returncode, "doc": json.loads(r.stdout) if r.stdout.strip() else None,
                         "stderr": r.stderr, "rows": leases(), "driver_while": driver(NIC),
                         "holder_alive": h.poll() is None}
    os.kill(h.pid, signal.SIGUSR1)
    h.expect("landed")
    res["fly_device"]["ended_after_it_landed"] = until(lambda: driver(NIC) == "e1000e" and not leases(), 30)
    h.kill()
    save()

    # 3. Another user's bare [vfio-device] fd (its own lease of SPARE) and an unrelated lease's end.
    spare = lease(1001, SPARE)
    q = hold(GS, SPARE, "pass", uid=1001)
    qchild = int(q.expect("child").split()[1])
    q.expect("ready")
    lid = lease(1000, NIC)
    rel = stack.vfioctl(1000, "release", lid, timeout=120)
    res["other_user"] = {"release": rel.stdout + rel.stderr, "released_at_once": driver(NIC) == "e1000e"}
    lid = lease(1000, NIC)
    r = stack.vfioctl(0, "revoke", lid, "--json", "--wait", "30", timeout=120)
    res["other_user"].update({"revoke": json.loads(r.stdout) if r.stdout.strip() else r.stderr,
                              "qemu_alive": not gone(qchild), "driver": driver(NIC)})
    os.kill(qchild, signal.SIGKILL)
    q.kill()
    stack.vfioctl(1001, "release", spare, timeout=120)
    res["other_user"]["spare_back"] = until(lambda: driver(SPARE) == "e1000e", 60)
    save()
    res["rc"] = stack.stop()
except Exception:
    res["errors"].append(traceback.format_exc())
finally:
    stack.close()
    res["vfiod_log"] = stack.read_log()
    res["complete"] = True
    save()
''' % {"nic": NIC, "spare": SPARE, "grace": GRACE}


@pytest.fixture(scope="module")
def run():
    from tests.guest.harness import GuestTimeout
    try:
        res = Guest(topology="all").run("python3 - <<'EOF'\n" + GUEST_PY + "\nEOF\n", timeout=1200)
    except GuestTimeout as e:
        raise AssertionError(f"the guest timed out: {e}") from None
    assert res.returncode == 0 and "word.json" in res.files, res.output[-4000:]
    r = json.loads(res.files["word.json"])
    with open(os.path.join(tempfile.gettempdir(), "vfiod-kernels-word-guest.json"), "w") as f:
        json.dump(r, f, indent=1)              # the kernel's answers, for whoever reads a failure
    assert not r["errors"] and r["complete"], "\n".join(r["errors"]) + r.get("vfiod_log", "")[-4000:]
    return r


def test_a_group_fd_in_flight_is_the_kernels_to_judge_and_never_reaches_a_later_lease(run):
    f = run["fly_group"]
    assert f["root_open"] == "EBUSY", f                  # the kernel's word: a file of the group exists
    assert "vfiod is revoking it" in f["release"], f     # a /proc scan finds nobody; the kernel did
    assert 'outcome=waiting detail="the kernel refuses to open /dev/vfio/' in run["vfiod_log"]
    # Given to another only where the kernel lets vfiod open the group's node again: then the
    # file in flight is of a group that is gone, and it cannot reach the new lease's device.
    if f["other_granted_while_in_flight"]:
        assert f["stale_fd"] == "refused:19", f          # ENODEV: its group is gone
    else:
        assert "already leased" in f["other"]["err"], f
    assert f["holder_alive"] is True                     # it holds nothing vfiod can see: never signalled
    assert f["ended_after_it_landed"] is True and f["other_after"] == 0, f


def test_a_device_fd_in_flight_keeps_a_revoke_waiting_and_nobody_is_killed(run):
    d = run["fly_device"]
    assert d["rc"] == 1 and d["doc"]["ended"] is False, d
    assert [x["state"] for x in d["rows"]] == ["revoking"] and d["driver_while"] in ("vfio-pci", None), d
    assert "held by a process vfiod cannot find" in (d["rows"][0]["revoke_waiting"] or ""), d
    assert d["holder_alive"] is True
    assert d["ended_after_it_landed"] is True, d


def test_another_users_bare_device_fd_neither_blocks_nor_is_killed_by_an_unrelated_release(run):
    o = run["other_user"]
    assert o["released_at_once"] is True and "revoking" not in o["release"], o
    assert o["revoke"]["ended"] is True and o["revoke"]["seconds"] < GRACE, o
    assert o["qemu_alive"] is True and o["driver"] == "e1000e", o
    assert o["spare_back"] is True


def test_the_admin_is_told_and_no_traceback(run):
    log = run["vfiod_log"]
    assert "held by a process vfiod cannot find" in log
    assert "Traceback" not in log
