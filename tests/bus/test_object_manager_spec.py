"""The ObjectManager's signals as the D-Bus specification has them: `InterfacesAdded`
and `InterfacesRemoved` come from `/org/vfiod1`, the object that implements
`org.freedesktop.DBus.ObjectManager`, so a client that follows the specification sees
objects come and go.  The client here is GLib's `GDBusObjectManagerClient` (Debian's
python3-gi, run by the system Python as the unprivileged test user), which subscribes
to those signals on the manager's path only."""

import pwd
import shutil
import subprocess
import time

import pytest

from tests.bus.conftest import TEST_USER

GLIB_CLIENT = r"""
import sys
from gi.repository import Gio, GLib

conn = Gio.DBusConnection.new_for_address_sync(
    sys.argv[1],
    Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
    None, None)
manager = Gio.DBusObjectManagerClient.new_sync(
    conn, Gio.DBusObjectManagerClientFlags.NONE, "org.vfiod1", "/org/vfiod1", None, None, None)

def say(*words):
    print(*words, flush=True)

def added(_m, obj):
    ifaces = sorted(i.get_interface_name() for i in obj.get_interfaces())
    owner = ""
    lease = obj.get_interface("org.vfiod1.Lease")
    if lease is not None:
        owner = str(lease.get_cached_property("Owner").unpack())
    say("added", obj.get_object_path(), ",".join(ifaces), owner)

def removed(_m, obj):
    say("removed", obj.get_object_path())

manager.connect("object-added", added)
manager.connect("object-removed", removed)
say("ready", len(manager.get_objects()))
loop = GLib.MainLoop()
GLib.timeout_add_seconds(60, loop.quit)
loop.run()
"""


def _python_with_gi():
    p = subprocess.run(["/usr/bin/python3", "-c", "import gi; gi.require_version('Gio', '2.0')"],
                       capture_output=True)
    if p.returncode != 0:
        pytest.skip("python3-gi is not installed (scripts/setup installs it)")
    return "/usr/bin/python3"


def _read_until(proc, want, timeout=30):
    """Lines of `proc` until one starts with `want`; that line."""
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith(want):
            return line.split()
    raise AssertionError(f"no {want!r} line; seen: {seen}; stderr: {proc.stderr.read() if proc.poll() else ''}")


def test_a_glib_object_manager_client_sees_a_lease_come_and_go(world):
    python = _python_with_gi()
    client = subprocess.Popen([python, "-c", GLIB_CLIENT, world.address], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, user=TEST_USER)
    try:
        ready = _read_until(client, "ready")
        assert int(ready[1]) > 10           # the ICH10 host's groups and devices, from GetManagedObjects
        lease_id = world.ctl("lease", "group:8", "--persistent").stdout.strip()
        path = f"/org/vfiod1/lease/{lease_id}"
        added = _read_until(client, "added")
        assert added[1:3] == [path, "org.vfiod1.Lease"]
        assert added[3] == str(pwd.getpwnam(TEST_USER).pw_uid)       # its properties came with it
        world.ctl("release", lease_id)
        assert _read_until(client, "removed")[1] == path
    finally:
        client.kill()
        client.wait()
    log = world.read_log()
    assert "Traceback" not in log, log


def test_the_signals_come_from_the_object_manager(world):
    """What `gdbus monitor` shows: each signal's path is /org/vfiod1, the object's is in its body."""
    if not shutil.which("gdbus"):
        pytest.skip("gdbus is not installed")
    mon = subprocess.Popen(["gdbus", "monitor", "--address", world.address, "--dest", "org.vfiod1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        lease_id = world.ctl("lease", "group:8", "--persistent").stdout.strip()
        world.ctl("release", lease_id)
        lines = []
        deadline = time.time() + 20
        while time.time() < deadline and not any("InterfacesRemoved" in x for x in lines):
            lines.append(mon.stdout.readline())
    finally:
        mon.kill()
        mon.wait()
    om = [x for x in lines if "org.freedesktop.DBus.ObjectManager.Interfaces" in x]
    assert len(om) == 2, lines
    for line in om:
        assert line.startswith("/org/vfiod1: org.freedesktop.DBus.ObjectManager.Interfaces"), line
        assert f"/org/vfiod1/lease/{lease_id}" in line, line
