"""`vfioctl monitor`: lease, hotplug and tamper events as they happen, in text and JSON;
it ends with exit 0 on Ctrl-C/SIGTERM and with a named error when vfiod goes away."""

import asyncio
import json
import os
import signal
import subprocess
import time

import pytest

from tests.bus.conftest import ROOT, TEST_USER, VENV_BIN, BusWorld, unprivileged_uid

VFIOCTL = os.path.join(VENV_BIN, "vfioctl")


class Watch:
    """`vfioctl monitor` running as a user, its lines collected."""

    def __init__(self, address, *args, user=TEST_USER):
        self.p = subprocess.Popen([VFIOCTL, "monitor", "--bus", address, *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, user=user)
        self.json = "--json" in args
        if not self.json:       # the text mode says when it listens
            assert "monitoring vfiod" in self.p.stderr.readline()
        else:
            time.sleep(1.0)

    def stop(self, sig=signal.SIGINT, timeout=20):
        if sig:
            self.p.send_signal(sig)
        out, err = self.p.communicate(timeout=timeout)
        self.err = err
        assert "Traceback" not in out + err and "internal error" not in out + err, out + err
        self.lines = out.splitlines()
        self.events = [json.loads(line) for line in self.lines] if self.json else []
        return self.p.returncode


def test_lease_events_in_text_and_json_and_a_clean_end(world):
    text, js = Watch(world.address), Watch(world.address, "--json")
    lease_id = world.ctl("lease", "group:8", "--persistent").stdout.strip()
    world.ctl("release", lease_id)
    time.sleep(1.0)
    assert text.stop() == 0 and js.stop(signal.SIGTERM) == 0

    granted = [e for e in js.events if e["event"] == "lease-granted"]
    ended = [e for e in js.events if e["event"] == "lease-ended"]
    assert [e["lease"]["id"] for e in granted] == [lease_id] == [e["lease"]["id"] for e in ended]
    assert granted[0]["lease"]["group"] == 8 and granted[0]["lease"]["user"] == TEST_USER
    assert granted[0]["lease"]["devices"] == ["0000:04:00.0", "0000:05:00.0"]
    assert ended[0]["reason"] == "released" and ended[0]["lease"]["group"] == 8
    assert all(e["version"] == 1 and e["kind"] == "event" and isinstance(e["time"], float) for e in js.events)
    drivers = [e["changed"]["Driver"] for e in js.events
               if e["event"] == "changed" and e["object"] == "/org/vfiod1/device/0000_04_00_0"]
    assert drivers[-1] == "e1000e" and "vfio-pci" in drivers
    assert any(e["event"] == "changed" and e["changed"].get("State") == "leased" for e in js.events)

    assert any(f"lease-granted lease {lease_id}" in line and "leased to " + TEST_USER in line for line in text.lines)
    assert any("lease-ended" in line and "released" in line for line in text.lines)
    assert any("device 0000:04:00.0" in line and "-> vfio-pci" in line for line in text.lines)


def test_the_daemon_going_away_is_a_named_error(world):
    text, js = Watch(world.address), Watch(world.address, "--json")
    world.stop_daemon()
    assert text.stop(None) == 1 and "vfiod left the bus" in text.err
    assert js.stop(None) == 1 and js.events[-1]["event"] == "vfiod-gone"
    world.start_daemon()


def test_no_daemon_is_a_named_error(world):
    world.stop_daemon()
    p = world.ctl("monitor", "--timeout", "5", check=False)
    assert p.returncode == 1 and "vfiod is not running" in p.stderr and "Traceback" not in p.stderr
    world.start_daemon()


def test_vfs_coming_and_going_are_hotplug_events():
    if not os.path.exists("/usr/bin/dbus-daemon"):
        pytest.skip("dbus-daemon is not installed")
    unprivileged_uid()
    w = BusWorld(topology="sriov")
    try:
        js = Watch(w.address, "--json")
        w.ctl("vfs", "0000:01:00.0", "0", user=None)
        w.ctl("vfs", "0000:01:00.0", "2", user=None)
        time.sleep(1.0)
        assert js.stop() == 0
        removed = [e["object"] for e in js.events if e["event"] == "removed"]
        added = [e for e in js.events if e["event"] == "added"]
        assert "/org/vfiod1/device/0000_01_10_0" in removed and "/org/vfiod1/device/0000_01_11_4" in removed
        assert any(o.startswith("/org/vfiod1/group/") for o in removed)
        dev = [e for e in added if e["object"] == "/org/vfiod1/device/0000_01_10_0"]
        assert dev and dev[0]["interfaces"] == ["org.vfiod1.Device"]
        assert dev[0]["properties"]["org.vfiod1.Device"]["VendorId"] == 0x8086
        # InterfacesAdded leaves the explicit properties out (docs/dbus.md), as GetManagedObjects does
        assert not {"ResetMethods", "Parent", "NumaNode", "Link"} & set(dev[0]["properties"]["org.vfiod1.Device"])
        group = [e for e in added if e["object"].startswith("/org/vfiod1/group/")]
        assert group and "IsolationText" not in group[0]["properties"]["org.vfiod1.Group"]
    finally:
        w.close()


def test_removed_and_tampered_leases_are_said():
    """The daemon in this process, so the simulated kernel can remove a device and move one
    behind vfiod's back; the monitor (a user's process) sees both leases end, with why."""
    if not os.path.exists("/usr/bin/dbus-daemon"):
        pytest.skip("dbus-daemon is not installed")
    uid = unprivileged_uid()
    from vfiod.daemon import connection as busmod
    from vfiod import wire
    from vfiod.address import PciAddress
    from vfiod.backends import load_backends
    from vfiod.daemon import Service
    from vfiod.policy import Caller, PolicyStore
    from vfiod.sim import hosts
    from vfiod.sim.kernel import SimKernel
    from vfiod.sim.privatebus import PrivateBus
    from vfiod.state import Journal

    import pathlib
    import shutil
    import tempfile
    tmp_path = pathlib.Path(tempfile.mkdtemp(prefix="vfiod-monitor-"))
    os.chmod(tmp_path, 0o755)          # the user's monitor must reach the bus socket
    pbus = PrivateBus(str(tmp_path), os.path.join(ROOT, "systemd/org.vfiod1.conf"))
    roots = hosts.build("ich10", str(tmp_path / "host"))
    kernel = SimKernel.for_spec(hosts.ICH10, roots)
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "10.toml").write_text(f'[[rule]]\ngroup = [8]\nuids = [{uid}]\nbackends = ["vfio"]\n')
    store = PolicyStore(str(tmp_path / "policy"))
    store.reload()

    async def main():
        loop = asyncio.get_running_loop()
        service = Service(kernel, Journal(str(tmp_path / "state.db")), store, load_backends())
        service.loop = loop
        kernel.event_sink = lambda *e: loop.call_soon_threadsafe(service.on_pci_event, *e)
        bus = await busmod.VfiodBus(negotiate_unix_fd=True, bus_address=pbus.address).connect()
        service.attach(bus)
        busmod.install_caller_tracking(bus)
        listening = asyncio.Event()

        def seen(msg):
            if msg.member == "GetManagedObjects":
                listening.set()
        bus.add_message_handler(seen)
        service.export_all()
        await bus.request_name(wire.BUS_NAME)
        mon = await asyncio.create_subprocess_exec(VFIOCTL, "monitor", "--json", "--bus", pbus.address,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, user=TEST_USER)
        try:
            await asyncio.wait_for(listening.wait(), 20)
        except asyncio.TimeoutError:
            mon.kill()
            raise AssertionError((await mon.communicate())[1].decode()) from None
        await asyncio.sleep(0.3)

        async def until_ended(reason):
            while True:
                line = await asyncio.wait_for(mon.stdout.readline(), 20)
                event = json.loads(line)
                if event["event"] == "lease-ended":
                    assert event["reason"] == reason, event
                    return event

        first = await service.request(Caller(uid), "group:8", "vfio", {})
        await loop.run_in_executor(None, kernel.remove_device, PciAddress.parse("0000:05:00.0"))
        removed = await until_ended("removed")
        assert removed["lease"]["id"] == first.id and "removed" in removed["text"]
        second = await service.request(Caller(uid), "group:8", "vfio", {})
        await loop.run_in_executor(None, kernel.bind_behind_vfiods_back, PciAddress.parse("0000:04:00.0"), "e1000e")
        tampered = await until_ended("tampered")
        assert tampered["lease"]["id"] == second.id and "behind vfiod's back" in tampered["text"]
        mon.send_signal(signal.SIGTERM)
        rest, err = await asyncio.wait_for(mon.communicate(), 20)
        assert mon.returncode == 0 and b"Traceback" not in rest + err
        bus.disconnect()

    try:
        asyncio.run(main())
    finally:
        pbus.stop()
        shutil.rmtree(tmp_path, ignore_errors=True)
