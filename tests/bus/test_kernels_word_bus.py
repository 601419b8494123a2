"""The caller's process is proven, never taken from a bare pid: on a private bus with real
processes, an unprivileged lessee whose connection outlives the process that opened it,
whose pid then goes to a root process, asks for a scope; and a lessee parks its group
fd in a bus message nobody reads."""

import json
import os
import signal
import subprocess
import time

from .conftest import ROOT, TEST_USER, VENV_BIN

# Opens its connection, calls vfiod once, forks; the opener exits and the child keeps the
# connection; when told (a line on stdin) the child asks for a lease with a scope.
ATTACKER = r"""
import asyncio, os, sys
from vfiod.client import Client
async def main():
    c = await Client(os.environ["VFIOD_BUS"], timeout=30).connect()
    await c.managed_objects()
    loop = asyncio.get_running_loop()
    if os.fork():
        print("opener", os.getpid(), flush=True)
        os._exit(0)
    asyncio.events._set_running_loop(loop)       # the same loop, now this process's
    sys.stdin.readline()
    print("child", os.getpid(), flush=True)
    try:
        path = await c.request_lease("group:8", "", scope=True)
        print("granted", path, flush=True)
    except Exception as e:
        print("refused", type(e).__name__, e, flush=True)
asyncio.run(main())
"""


def _take_pid(pid):
    """Start a root process with exactly `pid` (as an attacker recycling pids would get one)."""
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        p = subprocess.Popen(["sleep", "600"], start_new_session=True)
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    return None


def test_a_recycled_pid_of_a_root_process_is_never_moved_into_a_scope(world):
    env = dict(os.environ, VFIOD_BUS=world.address, PYTHONPATH=ROOT)
    p = subprocess.Popen([os.path.join(VENV_BIN, "python"), "-c", ATTACKER], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, user=TEST_USER, env=env,
                         cwd=world.dir)
    opener = int(p.stdout.readline().split()[1])
    p.wait(30)                                     # the opener is gone; its child has the connection
    root = _take_pid(opener)
    assert root is not None, "could not give the opener's pid to a root process"
    child = None
    try:
        # The bus still says the connection's pid is the opener's: now root's process.
        p.stdin.write("go\n")
        p.stdin.flush()
        line = p.stdout.readline()
        assert line.startswith("child"), line
        child = int(line.split()[1])
        out = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not out:
            line = p.stdout.readline()
            out = line if line.startswith(("granted", "refused")) else ""
        assert out.startswith("refused PermissionDenied"), out
        assert f"process {opener} runs as uid 0/0/0, not as the lessee" in out, out
        assert root.poll() is None
        assert json.loads(world.ctl("leases", "--json", user=None).stdout)["leases"] == []
        assert "vfio-pci" not in world.drivers().values()
        assert "Traceback" not in world.read_log()
    finally:
        root.kill()
        root.wait()
        p.stdin.close()
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_vfioctl_proves_its_own_process_with_a_pidfd(world):
    """vfioctl lease -- CMD sends its pidfd: vfiod proves it (uid, start time) and grants."""
    r = world.ctl("lease", "group:8", "--", "/bin/true")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in world.read_log()


# A connection that never reads: it says its unique name and stops itself.
DEAF = r"""
import asyncio, os, signal
from dbus_next.aio import MessageBus
async def main():
    bus = await MessageBus(bus_address=os.environ["VFIOD_BUS"], negotiate_unix_fd=True).connect()
    print(bus.unique_name, flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
asyncio.run(main())
"""

# The lessee: leases group:8, opens it, fills the deaf connection's socket with signals and
# then sends it the group fd in one more, which the bus daemon keeps queued; closes its own.
PARK = r"""
import asyncio, os, sys
from dbus_next import Message, MessageType
from vfiod.client import Client
async def main():
    c = await Client(os.environ["VFIOD_BUS"], timeout=30).connect()
    path = await c.request_lease("group:8", "", persistent=True)
    reply = await c.lease_call(path, "OpenGroup")
    fd = reply.unix_fds[reply.body[0]] if reply.unix_fds else reply.body[0]
    for _ in range(64):
        await c.connected().send(Message(message_type=MessageType.SIGNAL, destination=sys.argv[1], path="/x",
                                         interface="x.y", member="Fill", signature="s", body=["x" * 65536]))
    await c.connected().send(Message(message_type=MessageType.SIGNAL, destination=sys.argv[1], path="/x",
                                     interface="x.y", member="Fd", signature="h", body=[0], unix_fds=[fd]))
    os.close(fd)
    await asyncio.sleep(1)
    print("parked", path.rsplit("/", 1)[-1], flush=True)
    sys.stdin.readline()
asyncio.run(main())
"""


def test_an_fd_queued_in_the_bus_daemon_neither_kills_the_bus_nor_hangs_the_revoke_silently(make_world):
    from .conftest import POLICY
    world = make_world(policy=POLICY.replace('max_duration = "8h"',
                                             'max_duration = "8h"\nrevoke_grace = "1s"\nrevoke_others = true'))
    env = dict(os.environ, VFIOD_BUS=world.address, PYTHONPATH=ROOT)
    py = os.path.join(VENV_BIN, "python")
    deaf = subprocess.Popen([py, "-c", DEAF], stdout=subprocess.PIPE, text=True, user=TEST_USER, env=env,
                            cwd=world.dir, start_new_session=True)
    park = None
    try:
        name = deaf.stdout.readline().strip()
        park = subprocess.Popen([py, "-c", PARK, name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                user=TEST_USER, env=env, cwd=world.dir, start_new_session=True)
        line = park.stdout.readline()
        assert line.startswith("parked"), line
        lease_id = line.split()[1]
        r = world.ctl("release", lease_id)
        assert "vfiod is revoking it" in r.stdout + r.stderr
        time.sleep(4)                                  # the grace (1 s) is long over
        leases = json.loads(world.ctl("leases", "--json", user=None).stdout)["leases"]
        assert [x["state"] for x in leases] == ["revoking"], leases
        waits = leases[0]["revoke_waiting"] or ""
        assert "the bus daemon, which vfiod never ends" in waits, waits
        assert world.bus.process.poll() is None        # the bus lives; vfiod still answers
        assert "vfio-pci" in world.drivers().values()
        os.kill(deaf.pid, signal.SIGKILL)              # its queue goes, and the fd with it
        deaf.wait()
        deadline = time.monotonic() + 30
        while "vfio-pci" in world.drivers().values() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "vfio-pci" not in world.drivers().values()

        def leases_left():
            return json.loads(world.ctl("leases", "--json", user=None).stdout)["leases"]
        # the lease ends right after its devices are back (its object goes on vfiod's loop)
        while leases_left() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert leases_left() == []
        log = world.read_log()
        assert "the revoke waits" in log and "SIGTERM to" not in log and "Traceback" not in log
    finally:
        for p in (deaf, park):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
