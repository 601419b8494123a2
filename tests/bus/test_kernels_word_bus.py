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
