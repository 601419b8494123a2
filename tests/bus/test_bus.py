"""The daemon over a real private system bus, called by a real unprivileged uid."""

import json
import os
import signal
import subprocess
import time

import pytest

from .conftest import TEST_USER, unprivileged_uid

pytestmark = pytest.mark.bus

ICH10_GROUP8 = ["0000:04:00.0", "0000:05:00.0"]


def test_groups_json_and_explain_as_a_user(world):
    groups = json.loads(world.ctl("groups", "--json").stdout)["groups"]
    g8 = next(g for g in groups if g["group"] == 8)
    assert g8["viable"] is False and g8["state"] == "host" and g8["isolation"] == "no-acs-port"
    assert [d["address"] for d in g8["devices"]] == ["0000:00:1c.0", "0000:00:1c.4"] + ICH10_GROUP8
    assert g8["devices"][2]["driver"] == "e1000e" and "82574L" in g8["devices"][2]["name"]
    text = world.ctl("explain", "0000:04:00.0").stdout
    assert "cannot be leased alone" in text and "0000:05:00.0" in text and "tg3" in text


def test_check_access_names_the_rule(world):
    p = world.ctl("check", "0000:04:00.0", check=False)
    assert p.returncode == 0, p.stderr
    assert "allowed" in p.stdout and ".toml" not in p.stdout     # where the policy says so: root's to know
    p = world.ctl("check", "0000:00:19.0", check=False, user=None)
    assert "allowed" in p.stdout and "50-test.toml" in p.stdout
    p = world.ctl("check", "group:7", check=False)
    assert p.returncode == 3 and "denied" in p.stdout


def test_lease_with_command_gets_the_group_fd_and_returns_devices(world):
    from .conftest import VENV_BIN
    uid = unprivileged_uid()
    before = world.drivers()
    script = os.path.join(world.dir, "probe.py")
    with open(script, "w") as f:
        f.write("import os\n"
                "fd = int(os.environ['VFIOD_GROUP_FD'])\n"
                "a, b = os.fstat(fd), os.stat(os.environ['VFIOD_GROUP_PATH'])\n"
                "print((a.st_dev, a.st_ino) == (b.st_dev, b.st_ino), b.st_uid, oct(b.st_mode & 0o777),"
                " os.environ['VFIOD_GROUP'])\n")
    os.chmod(script, 0o644)
    p = world.ctl("lease", "0000:04:00.0", "--pass-fd", "--", os.path.join(VENV_BIN, "python"), script)
    same, owner, mode, group = p.stdout.split()
    assert (same, int(owner), mode, group) == ("True", uid, "0o600", "8")
    assert not os.path.exists(os.path.join(world.tree().dev, "vfio", "8"))   # gone with vfio-pci
    assert world.drivers() == before


def test_without_pass_fd_the_command_gets_the_path_and_no_open_group(world):
    # A VFIO group opens once: DPDK and QEMU open /dev/vfio/N themselves, so by
    # default nothing in the command's process may hold it open already.
    p = world.ctl("lease", "0000:04:00.0", "--", "/bin/sh", "-c",
                  'echo "${VFIOD_GROUP_FD-unset} $VFIOD_GROUP $VFIOD_GROUP_PATH"; ls -l /proc/self/fd/')
    first, *fds = p.stdout.splitlines()
    assert first == f"unset 8 {os.path.join(world.tree().dev, 'vfio', '8')}"
    assert not [l for l in fds if "/vfio/" in l], fds


def test_command_exit_status_is_passed_on(world):
    p = world.ctl("lease", "group:8", "--", "/bin/sh", "-c", "exit 7", check=False)
    assert p.returncode == 7
    assert world.drivers()["0000:04:00.0"] == "e1000e"


def test_release_by_another_user_is_denied(world):
    lease = world.python(
        "import asyncio,os\n"
        "from vfiod.client import Client\n"
        "async def m():\n"
        "  c=await Client(os.environ['VFIOD_BUS']).connect()\n"
        "  print(await c.request_lease('group:8', persistent=True))\n"
        "asyncio.run(m())\n")
    assert lease.returncode == 0, lease.stderr
    path = lease.stdout.strip()
    lease_id = path.rsplit("/", 1)[-1]
    p = world.ctl("release", lease_id, user="nobody", check=False)
    assert p.returncode == 3 and "belongs to uid" in p.stderr
    assert world.drivers()["0000:04:00.0"] == "vfio-pci"
    world.ctl("release", lease_id)
    assert world.drivers()["0000:04:00.0"] == "e1000e"


def test_disconnect_ends_a_non_persistent_lease(world):
    before = world.drivers()
    holder = subprocess.Popen([os.path.join(os.path.dirname(world.daemon.args[0]), "vfioctl"), "lease",
                               "--bus", world.address, "group:8"], user=TEST_USER,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline and world.drivers()["0000:05:00.0"] != "vfio-pci":
        time.sleep(0.1)
    assert world.drivers()["0000:05:00.0"] == "vfio-pci"
    holder.kill()                                   # SIGKILL: no Release, only the disconnect
    holder.wait()
    deadline = time.time() + 30
    while time.time() < deadline and world.drivers() != before:
        time.sleep(0.1)
    assert world.drivers() == before
    assert json.loads(world.ctl("leases", "--json").stdout)["leases"] == []


def test_identity_comes_from_the_bus_not_from_arguments(world):
    # Claiming another uid in the options is refused, whoever asks.
    p = world.python(
        "import asyncio,os\n"
        "from dbus_next import Variant\n"
        "from vfiod.client import Client\n"
        "async def m():\n"
        "  c=await Client(os.environ['VFIOD_BUS']).connect()\n"
        "  r=await c.call('/org/vfiod1','org.vfiod1.Manager','RequestLease','ssa{sv}',"
        "['group:8','',{'uid':Variant('u',0)}])\n"
        "asyncio.run(m())\n")
    assert p.returncode != 0 and "InvalidArgument" in p.stderr + p.stdout or "unknown option" in p.stderr
    # A user the policy does not name is denied even though the rule allows another user.
    p = world.ctl("lease", "group:8", "--persistent", user="nobody", check=False)
    assert p.returncode == 3 and "deny" in p.stderr.lower()
    assert world.drivers()["0000:04:00.0"] == "e1000e"


def test_reload_policy_is_admin_only_and_a_broken_one_is_refused(world):
    p = world.python(
        "import asyncio,os\n"
        "from vfiod.client import Client\n"
        "async def m():\n"
        "  c=await Client(os.environ['VFIOD_BUS']).connect()\n"
        "  await c.call('/org/vfiod1','org.vfiod1.Manager','ReloadPolicy')\n"
        "asyncio.run(m())\n")
    assert "PermissionDenied" in p.stderr or "only root" in p.stderr
    with open(os.path.join(world.policy_dir, "60-broken.toml"), "w") as f:
        f.write("[[rule]]\nusres = ['x']\n")
    p = world.python((
        "import asyncio,os\n"
        "from vfiod.client import Client\n"
        "async def m():\n"
        "  c=await Client(os.environ['VFIOD_BUS']).connect()\n"
        "  await c.call('/org/vfiod1','org.vfiod1.Manager','ReloadPolicy')\n"
        "asyncio.run(m())\n"), user=None)
    assert p.returncode != 0 and "60-broken.toml" in p.stderr
    # the last good policy still answers
    assert world.ctl("check", "group:8", check=False).returncode == 0


def test_sigterm_ends_plain_leases_and_keeps_persistent_ones(world):
    p = world.ctl("lease", "group:8", "--persistent")
    lease_id = p.stdout.strip()
    world.stop_daemon(signal.SIGTERM)
    assert world.drivers()["0000:04:00.0"] == "vfio-pci"         # persistent: kept
    world.start_daemon()
    rows = json.loads(world.ctl("leases", "--json").stdout)["leases"]
    assert [r["id"] for r in rows] == [lease_id]
    world.ctl("release", lease_id)
    assert world.drivers()["0000:04:00.0"] == "e1000e"


MEMLOCK_POLICY = """
[[rule]]
group = [8]
users = ["{user}"]
backends = ["vfio"]
memlock = "64M"
"""


def test_the_memlock_grant_reaches_the_command_and_check_says_so_first():
    """DPDK and QEMU pin their DMA memory: the policy's grant must be in place before they
    start (`ulimit -l` in the command, in KiB), and `vfioctl check` says so beforehand."""
    from .conftest import BusWorld
    caps = int(next(l for l in open("/proc/self/status") if l.startswith("CapEff")).split()[1], 16)
    if not caps & (1 << 24):
        pytest.skip("root here lacks CAP_SYS_RESOURCE, which raising another process's rlimit needs "
                    "(the guest tier checks the grant on a real kernel)")
    w = BusWorld(policy=MEMLOCK_POLICY)
    try:
        p = w.ctl("check", "group:8")
        assert "raises RLIMIT_MEMLOCK of your process to 64M" in p.stdout
        p = w.ctl("lease", "group:8", "--", "/bin/sh", "-c", "ulimit -l; ulimit -H -l")
        assert p.stdout.split() == ["65536", "65536"], p.stdout + p.stderr
    finally:
        w.close()


def test_check_warns_when_no_grant_covers_a_small_memlock(world):
    p = world.ctl("check", "group:8")
    soft = subprocess.run(["sh", "-c", "ulimit -l"], capture_output=True, text=True).stdout.strip()
    if soft != "unlimited" and int(soft) < 256 * 1024:
        assert "warning: no memlock grant" in p.stdout


CLAIM_POLICY = """
[[rule]]
group = [8]
users = ["{user}"]
backends = ["vfio"]
persistent = true

[[claim]]
target = "0000:04:00.0"
user = "{user}"
backend = "vfio"

[[claim]]
target = "group:7"
user = "{user}"
"""


def test_boot_claims_are_applied_before_ready_and_a_bad_one_does_not_stop_the_rest():
    from .conftest import BusWorld
    uid = unprivileged_uid()
    w = BusWorld(policy=CLAIM_POLICY)        # returns once vfiod answers, i.e. after READY
    try:
        drivers = w.drivers()
        assert drivers["0000:04:00.0"] == drivers["0000:05:00.0"] == "vfio-pci"
        st = os.stat(os.path.join(w.tree().dev, "vfio", "8"))
        assert (st.st_uid, st.st_mode & 0o777) == (uid, 0o600)
        rows = json.loads(w.ctl("leases", "--json").stdout)["leases"]
        assert [(r["group"], r["owner"], r["persistent"]) for r in rows] == [(8, uid, True)]
        log = w.read_log()
        assert "claim group:7" in log and "not applied" in log          # no rule grants group 7
        assert log.index("claim 0000:04:00.0") < log.index("ready on")
        # a restart keeps the claimed lease instead of taking it twice
        w.stop_daemon()
        w.start_daemon()
        assert [r["id"] for r in json.loads(w.ctl("leases", "--json").stdout)["leases"]] == [r["id"] for r in rows]
    finally:
        w.close()
