"""Tier 3: a private, real dbus-daemon with vfiod's own policy file, vfiod on a
simulated host, and clients running as a real unprivileged uid."""

import os
import pwd
import shutil
import subprocess
import tempfile
import time

import pytest

from vfiod.sim.privatebus import PrivateBus

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.join(ROOT, ".venv", "bin")
TEST_USER = "vfiotest"

POLICY = """
[[rule]]
group = [8]
users = ["{user}"]
backends = ["vfio", "pci-stub"]
default_backend = "vfio"
persistent = true
max_duration = "8h"

[[rule]]
ids = ["8086:10bd"]
users = ["root"]
backends = ["vfio", "pci-stub"]
allow_protected = true
address = ["0000:00:19.0"]
"""


def unprivileged_uid():
    try:
        return pwd.getpwnam(TEST_USER).pw_uid
    except KeyError:
        pytest.skip(f"no user {TEST_USER} (scripts/setup creates it)")


class BusWorld:
    """A private system bus, vfiod on a simulated host, and ways to call it as anyone."""

    def __init__(self, topology="ich10", policy=None, env=None):
        self.env = env        # the daemon's environment (None: this one)
        self.dir = tempfile.mkdtemp(prefix="vfiod-bus-")
        os.chmod(self.dir, 0o755)
        self.socket = os.path.join(self.dir, "bus")
        self.address = f"unix:path={self.socket}"
        self.policy_dir = os.path.join(self.dir, "policy.d")
        os.makedirs(self.policy_dir)
        with open(os.path.join(self.policy_dir, "50-test.toml"), "w") as f:
            f.write((policy or POLICY).format(user=TEST_USER))
        self.state_dir = os.path.join(self.dir, "state")
        self.sim_dir = os.path.join(self.dir, "sim")
        if (topology.startswith("server") and os.access("/dev/shm", os.W_OK)
                and shutil.disk_usage("/dev/shm").free > 1 << 30):
            # A server-sized tree is tens of thousands of small files: on tmpfs it is
            # laid out in seconds, on a busy disk it can take a minute.
            self.sim_dir = tempfile.mkdtemp(prefix="vfiod-sim-", dir="/dev/shm")
        self.topology = topology
        self.bus = PrivateBus(self.dir, os.path.join(ROOT, "systemd/org.vfiod1.conf"))
        assert self.bus.address == self.address
        self.daemon = None
        self.start_daemon()

    def start_daemon(self):
        self.log = open(os.path.join(self.dir, "vfiod.log"), "a")
        self.daemon = subprocess.Popen(
            [os.path.join(VENV_BIN, "vfiod"), "--bus", self.address, "--simulate", self.topology,
             "--sim-dir", self.sim_dir, "--state-dir", self.state_dir, "--policy-dir", self.policy_dir],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.time() + (180 if self.topology.startswith("server") else 30)
        while time.time() < deadline:
            if self.daemon.poll() is not None:
                raise RuntimeError("vfiod exited:\n" + self.read_log())
            if self.ctl("leases", "--timeout", "2", check=False, user=None).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("vfiod did not come up:\n" + self.read_log())

    def read_log(self):
        with open(os.path.join(self.dir, "vfiod.log")) as f:
            return f.read()

    def stop_daemon(self, sig=15):
        if self.daemon and self.daemon.poll() is None:
            self.daemon.send_signal(sig)
            self.daemon.wait(30)
        self.log.close()

    def ctl(self, command, *args, user=TEST_USER, check=True, timeout=60, env=None, **groups):
        """Run `vfioctl COMMAND --bus ADDRESS ARGS...` as `user` (None: as root); `groups`:
        subprocess's ``group`` and ``extra_groups`` (by default the process keeps this one's)."""
        p = subprocess.run([os.path.join(VENV_BIN, "vfioctl"), command, "--bus", self.address, *args],
                           capture_output=True, text=True, timeout=timeout, user=user, env=env, cwd=self.dir,
                           **groups)
        if check and p.returncode != 0:
            raise AssertionError(f"vfioctl {command} {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def python(self, code, user=TEST_USER, timeout=120, **kw):
        """Run a Python snippet (with VFIOD_BUS set) as `user`."""
        env = dict(os.environ, VFIOD_BUS=self.address, PYTHONPATH=ROOT)
        return subprocess.run([os.path.join(VENV_BIN, "python"), "-c", code], capture_output=True, text=True,
                              timeout=timeout, user=user, env=env, cwd=self.dir, **kw)

    def tree(self):
        from vfiod.sysfs import Roots
        h = os.path.join(self.sim_dir, "host")
        return Roots(h + "/sys", h + "/proc", h + "/dev")

    def drivers(self):
        roots = self.tree()
        out = {}
        base = os.path.join(roots.sysfs, "bus/pci/devices")
        for name in sorted(os.listdir(base)):
            link = os.path.join(base, name, "driver")
            out[name] = os.path.basename(os.readlink(link)) if os.path.islink(link) else None
        return out

    def writes(self):
        try:
            with open(os.path.join(self.sim_dir, "writes.log")) as f:
                return [line.rstrip("\n").split("\t") for line in f]
        except FileNotFoundError:
            return []

    def close(self):
        self.stop_daemon()
        self.bus.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.sim_dir, ignore_errors=True)


@pytest.fixture
def world():
    if not shutil.which("dbus-daemon"):
        pytest.skip("dbus-daemon is not installed")
    unprivileged_uid()
    w = BusWorld()
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def make_world():
    """`make_world(policy=..., topology=...)`: a BusWorld, closed after the test."""
    if not shutil.which("dbus-daemon"):
        pytest.skip("dbus-daemon is not installed")
    unprivileged_uid()
    made = []

    def make(**kw):
        w = BusWorld(**kw)
        made.append(w)
        return w
    yield make
    for w in made:
        w.close()
