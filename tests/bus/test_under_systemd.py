"""vfiod as vfiod.service runs it: READY and STATUS on the notify socket, and the
unit's ExecReload (`vfiod reload`) failing when the policy is refused."""

import json
import os
import shutil
import socket
import subprocess
import time

import pytest

from .conftest import TEST_USER, VENV_BIN, BusWorld, unprivileged_uid


class Notify:
    """A notify socket like systemd's: collects what the daemon sends."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        os.chmod(path, 0o777)
        self.messages = []

    def drain(self):
        self.sock.setblocking(False)
        try:
            while True:
                self.messages.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        return self.messages

    def statuses(self):
        return [line[len("STATUS="):] for m in self.drain() for line in m.splitlines()
                if line.startswith("STATUS=")]

    def wait_status(self, predicate, timeout=10):
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.statuses()
            if s and predicate(s[-1]):
                return s[-1]
            time.sleep(0.1)
        raise AssertionError(f"no matching STATUS= line; got {self.statuses()}")


@pytest.fixture
def unit_world(tmp_path):
    if not shutil.which("dbus-daemon"):
        pytest.skip("dbus-daemon is not installed")
    unprivileged_uid()
    notify = Notify(str(tmp_path / "notify"))
    w = BusWorld(env=dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify")))
    try:
        yield w, notify
    finally:
        w.close()


def reload(world, user=None):
    return subprocess.run([os.path.join(VENV_BIN, "vfiod"), "reload", "--bus", world.address, "--timeout", "20"],
                          capture_output=True, text=True, timeout=60, user=user)


def test_ready_and_status_say_what_the_daemon_holds(unit_world):
    world, notify = unit_world
    assert any("READY=1" in m for m in notify.drain())
    groups = len(json.loads(world.ctl("groups", "--json").stdout)["groups"])
    first = notify.wait_status(lambda s: True)
    assert first == f"{groups} groups, 0 leases (0 persistent), policy: 1 file"
    lease = world.ctl("lease", "group:8", "--persistent").stdout.strip()
    assert notify.wait_status(lambda s: s.startswith(f"{groups} groups, 1 lease (1 persistent)"))
    world.ctl("release", lease)
    assert notify.wait_status(lambda s: s.startswith(f"{groups} groups, 0 leases"))


def test_reload_fails_visibly_on_a_refused_policy_and_the_last_good_one_stays(unit_world):
    world, notify = unit_world
    p = reload(world)
    assert p.returncode == 0 and "new policy is in force" in p.stdout, p.stderr
    assert reload(world, user=TEST_USER).returncode == 3
    with open(os.path.join(world.policy_dir, "60-broken.toml"), "w") as f:
        f.write("[[rule]]\nusres = ['x']\n")
    p = reload(world)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "60-broken.toml:2" in p.stderr and "usres" in p.stderr and "Traceback" not in p.stderr
    assert notify.wait_status(lambda s: "last reload was refused" in s)
    assert world.daemon.poll() is None
    assert world.ctl("check", "group:8", check=False).returncode == 0     # the last good policy decides
    assert "policy reload by uid 0 refused" in world.read_log()
    os.unlink(os.path.join(world.policy_dir, "60-broken.toml"))
    assert reload(world).returncode == 0
    assert notify.wait_status(lambda s: "refused" not in s)


def test_reload_without_a_daemon_says_so(unit_world):
    world, _ = unit_world
    world.stop_daemon()
    p = reload(world)
    assert p.returncode == 1 and "not running" in p.stderr


def test_the_event_loop_feeds_the_watchdog(tmp_path):
    """WatchdogSec= in the unit: the loop sends WATCHDOG=1 twice per timeout, so a loop
    that stops turning gets the daemon restarted."""
    if not shutil.which("dbus-daemon"):
        pytest.skip("dbus-daemon is not installed")
    unprivileged_uid()
    notify = Notify(str(tmp_path / "notify"))
    w = BusWorld(env=dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="400000"))
    try:
        time.sleep(2.0)
        pings = [m for m in notify.drain() if "WATCHDOG=1" in m]
        assert len(pings) >= 5, notify.messages          # one every 0.2 s
    finally:
        w.close()


def test_a_lost_bus_connection_ends_the_daemon_with_a_failure_status():
    """The bus daemon goes away: vfiod exits 1 (so Restart=on-failure starts it again),
    says why in one line, and leaves its leases in the journal."""
    if not shutil.which("dbus-daemon"):
        pytest.skip("dbus-daemon is not installed")
    unprivileged_uid()
    w = BusWorld()
    try:
        lease = w.ctl("lease", "group:8", "--persistent").stdout.strip()
        w.bus.process.kill()
        w.bus.process.wait()
        assert w.daemon.wait(30) == 1
        log = w.read_log()
        assert "lost the" in log and "bus connection" in log and "Traceback" not in log, log
        import sqlite3
        db = sqlite3.connect(os.path.join(w.state_dir, "state.db"))
        assert [r[0] for r in db.execute("SELECT id FROM leases")] == [lease]
    finally:
        w.close()
