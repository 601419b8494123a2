"""Revoke over the bus: `Revoke`, `LeaseRevoking`, the lease's State, `vfioctl revoke`,
and `vfioctl lease -- CMD` passing the revoke on to CMD as SIGTERM."""

import json
import os
import subprocess
import time

from .conftest import POLICY, TEST_USER, VENV_BIN

# CMD: holds /dev/vfio/N open (the path vfioctl gives it); on SIGTERM says so, lets go and
# exits, unless told to be stubborn (then only the ladder's SIGKILL ends it).
CMD = r"""
import os, signal, sys, time
fd = os.open(os.environ["VFIOD_GROUP_PATH"], os.O_RDWR)
def term(*_):
    if sys.argv[1] == "stubborn":
        print("ignoring SIGTERM", flush=True)
        return
    print("got SIGTERM, letting go", flush=True)
    os.close(fd)
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
print("holding", flush=True)
while True:
    time.sleep(0.1)
"""


def _lease_with_holder(world, mode="polite"):
    p = subprocess.Popen([os.path.join(VENV_BIN, "vfioctl"), "lease", "--bus", world.address, "group:8", "--",
                          os.path.join(VENV_BIN, "python"), "-c", CMD, mode],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, user=TEST_USER, cwd=world.dir)
    assert p.stdout.readline().strip() == "holding", p.stderr.read() if p.poll() is not None else ""
    return p


def _monitor(world):
    return subprocess.Popen([os.path.join(VENV_BIN, "vfioctl"), "monitor", "--bus", world.address, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _events(mon):
    mon.terminate()
    out, _ = mon.communicate(timeout=30)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_revoke_tells_the_command_which_lets_go_and_the_lease_ends_as_revoked(world):
    mon = _monitor(world)
    time.sleep(1.0)
    p = _lease_with_holder(world)
    before = world.drivers()
    assert before["0000:00:19.0"] != "vfio-pci" and "vfio-pci" in before.values()
    t0 = time.monotonic()
    r = world.ctl("revoke", "group:8", "--reason", "maintenance at noon", "--json", user=None, timeout=120)
    took = time.monotonic() - t0
    doc = json.loads(r.stdout)
    assert (doc["kind"], doc["reason"], doc["ended"]) == ("revoke", "maintenance at noon", True)
    out, err = p.communicate(timeout=30)
    assert "got SIGTERM, letting go" in out
    assert "vfiod is revoking the lease (maintenance at noon); sending SIGTERM" in err
    assert took < 25, took                         # well inside the default 30 s grace: it let go
    assert "vfio-pci" not in world.drivers().values()
    assert world.ctl("leases", "--json", user=None).stdout.count('"id"') == 0
    events = _events(mon)
    kinds = [(e["event"], e.get("reason")) for e in events if e["event"].startswith("lease-")]
    assert kinds == [("lease-granted", None), ("lease-revoking", "maintenance at noon"), ("lease-ended", "revoked")]
    revoking = next(e for e in events if e["event"] == "lease-revoking")
    assert revoking["deadline"] >= time.time() - took and revoking["lease"]["state"] == "revoking"
    assert "Traceback" not in world.read_log()


def test_only_root_may_revoke_and_a_refused_revoke_changes_nothing(world):
    p = _lease_with_holder(world)
    try:
        r = world.ctl("revoke", "group:8", check=False)          # as the lessee
        assert r.returncode != 0 and "only root or a member of the policy's admin_groups may revoke" in r.stderr, r.stderr
        r = world.ctl("revoke", "ffffffffffffffff", check=False, user=None)
        assert r.returncode != 0 and "no lease" in r.stderr and "Traceback" not in r.stderr
        leases = json.loads(world.ctl("leases", "--json").stdout)["leases"]
        assert [lease["state"] for lease in leases] == ["granted"]
        assert p.poll() is None
    finally:
        p.terminate()
        p.communicate(timeout=30)


def test_a_stubborn_command_is_ended_after_the_grace_and_leases_show_the_revoke(make_world):
    world = make_world(policy=POLICY.replace('max_duration = "8h"', 'max_duration = "8h"\nrevoke_grace = "2s"'))
    p = _lease_with_holder(world, "stubborn")
    t0 = time.monotonic()
    world.ctl("revoke", "group:8", "--wait", "0", user=None)
    leases = json.loads(world.ctl("leases", "--json").stdout)["leases"]
    assert [(x["state"], x["revoke_reason"]) for x in leases] == [("revoking", "revoked")]
    assert leases[0]["revoke_deadline"] <= time.time() + 2.5
    assert "revoking (" in world.ctl("leases").stdout
    out, err = p.communicate(timeout=60)
    took = time.monotonic() - t0
    assert "ignoring SIGTERM" in out
    assert p.returncode != 0                      # its CMD was killed: vfioctl says so in its status
    deadline = time.monotonic() + 30
    while "vfio-pci" in world.drivers().values() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "vfio-pci" not in world.drivers().values()
    assert 2.0 <= took < 2 + 3 + 5, took         # grace, SIGTERM, SIGKILL three seconds later
    log = world.read_log()
    assert "SIGKILL to pid" in log and "Traceback" not in log
