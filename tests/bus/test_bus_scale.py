"""A server-sized host and hostile clients, on the private system-type bus.

- vfiod starts and answers on a simulated two-socket server of 4,096 PCI
  functions (dbus-next's writer used to drop the connection at 128).
- A burst of thousands of signals (the VFs of every PF going away and coming
  back) reaches a listener whole and in the order sent; the daemon stays up.
- An unprivileged client that pipelines hundreds of calls and sends oversized
  messages does not hold up another client's CheckAccess.
"""

import json
import os
import subprocess
import time

import pytest

from tests.bus.conftest import TEST_USER, VENV_BIN, ROOT

pytestmark = pytest.mark.bus

SERVER_POLICY = """
[[rule]]
ids = ["8086:1889"]
users = ["{user}"]
backends = ["vfio"]
"""

LISTENER = r'''
import asyncio, json, os, sys
from dbus_next import Message, MessageType
from dbus_next.aio import MessageBus

async def main():
    bus = await MessageBus(bus_address=os.environ["VFIOD_BUS"]).connect()
    owner = await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                   interface="org.freedesktop.DBus", member="GetNameOwner",
                                   signature="s", body=["org.vfiod1"]))
    daemon = owner.body[0]
    counts, serials = {}, []
    def seen(msg):
        if msg.message_type == MessageType.SIGNAL and msg.sender == daemon:
            counts[msg.member] = counts.get(msg.member, 0) + 1
            serials.append(msg.serial)
    bus.add_message_handler(seen)
    await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                           interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                           body=[f"type='signal',sender='{daemon}'"]))
    print("listening", flush=True)
    want = int(sys.argv[1])
    quiet_since = asyncio.get_running_loop().time()
    last = 0
    while True:
        await asyncio.sleep(0.2)
        now = asyncio.get_running_loop().time()
        if len(serials) != last:
            last, quiet_since = len(serials), now
        if counts.get("InterfacesAdded", 0) >= want and now - quiet_since > 2 or now - quiet_since > 60:
            break
    print(json.dumps({"counts": counts, "in_order": serials == sorted(serials),
                      "distinct": len(set(serials)) == len(serials)}), flush=True)

asyncio.run(main())
'''


def test_a_4096_function_server_starts_answers_and_sends_a_burst_of_signals_whole(make_world):
    w = make_world(topology="server:4096", policy=SERVER_POLICY)
    assert "4096 groups" in w.read_log()

    groups = json.loads(w.ctl("groups", "--json").stdout)
    groups = groups["groups"] if isinstance(groups, dict) else groups
    assert len(groups) == 4096
    vf = "0001:10:00.1"
    assert w.ctl("check", vf).stdout.startswith("allowed")

    # Every object in one GetManagedObjects, read as an unprivileged user.
    count = w.python(
        "import asyncio, os\n"
        "from dbus_next.aio import MessageBus\n"
        "from dbus_next import Message\n"
        "async def main():\n"
        "    bus = await MessageBus(bus_address=os.environ['VFIOD_BUS']).connect()\n"
        "    r = await bus.call(Message(destination='org.vfiod1', path='/org/vfiod1',\n"
        "        interface='org.freedesktop.DBus.ObjectManager', member='GetManagedObjects'))\n"
        "    print(len(r.body[0]))\n"
        "asyncio.run(main())\n")
    assert count.returncode == 0, count.stderr
    assert int(count.stdout) == 4096 * 2          # a Group and a Device object each

    # The VFs of all 16 PFs go and come back: thousands of InterfacesRemoved and
    # InterfacesAdded (each carrying every property), far more than a socket buffer.
    pfs = [d["address"] for g in groups for d in g["devices"] if d.get("driver") == "ice"]
    assert len(pfs) == 16
    numvfs = {}
    for pf in pfs:
        path = os.path.join(w.sim_dir, "host/sys/bus/pci/devices", pf, "sriov_numvfs")
        with open(path) as f:
            numvfs[pf] = int(f.read())
    total = sum(numvfs.values())
    assert total == 4096 - 8 - 2 * 16
    env = dict(os.environ, VFIOD_BUS=w.address, PYTHONPATH=ROOT)
    listener = subprocess.Popen([os.path.join(VENV_BIN, "python"), "-c", LISTENER, str(2 * total)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                user=TEST_USER, env=env, cwd=w.dir)
    try:
        assert listener.stdout.readline().strip() == "listening"
        for pf in pfs:
            w.ctl("vfs", pf, "0", user=None, timeout=120)
        for pf in pfs:
            w.ctl("vfs", pf, str(numvfs[pf]), user=None, timeout=120)
        out, err = listener.communicate(timeout=240)
    finally:
        listener.kill()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["counts"].get("InterfacesRemoved") == 2 * total, result
    assert result["counts"].get("InterfacesAdded") == 2 * total, result
    assert result["in_order"] and result["distinct"], result
    assert w.daemon.poll() is None
    groups = json.loads(w.ctl("groups", "--json").stdout)
    groups = groups["groups"] if isinstance(groups, dict) else groups
    assert len(groups) == 4096
    assert "Traceback" not in w.read_log()


FLOOD = r'''
import asyncio, os, sys, time
from dbus_next import Message, Variant
from vfiod.wire import PatientBus as MessageBus   # dbus-next's own writer gives up on a full socket

SECONDS = float(sys.argv[1])

def call(member, signature="", body=(), interface="org.vfiod1.Manager", path="/org/vfiod1"):
    return Message(destination="org.vfiod1", path=path, interface=interface, member=member,
                   signature=signature, body=list(body))

async def main():
    bus = await MessageBus(bus_address=os.environ["VFIOD_BUS"]).connect()
    kinds = [lambda: call("CheckAccess", "ss", ["group:8", "vfio"]),
             lambda: call("Explain", "s", ["group:8"]),
             lambda: call("GetManagedObjects", interface="org.freedesktop.DBus.ObjectManager"),
             lambda: call("GetAll", "s", ["org.vfiod1.Group"], "org.freedesktop.DBus.Properties",
                          "/org/vfiod1/group/8")]
    answers = {}
    def count(reply):
        key = reply.error_name or "ok"
        answers[key] = answers.get(key, 0) + 1
    pending = set()
    i = 0
    def one():
        nonlocal i
        i += 1
        fut = asyncio.ensure_future(bus.call(kinds[i % len(kinds)]()))
        fut.add_done_callback(lambda f: (pending.discard(f), count(f.result())))
        pending.add(fut)
    # Oversized: a 4 MiB option in RequestLease's a{sv}, refused unread.
    big = call("RequestLease", "ssa{sv}", ["group:8", "vfio", {"junk": Variant("s", "x" * (4 << 20))}])
    print("flooding", flush=True)
    deadline = time.monotonic() + SECONDS
    sent_big = 0
    while time.monotonic() < deadline:
        while len(pending) < 300:
            one()
        if sent_big < 3:
            sent_big += 1
            r = await bus.call(big)
            answers["oversize:" + (r.error_name or "ok")] = answers.get("oversize:" + (r.error_name or "ok"), 0) + 1
        await asyncio.sleep(0.05)            # bursts: top up to 300 pipelined calls, 20 times a second
    await asyncio.gather(*pending, return_exceptions=True)
    print(i, sorted(answers.items()), flush=True)

asyncio.run(main())
'''

PROBE = r'''
import asyncio, os, statistics, sys, time
from dbus_next import Message
from dbus_next.aio import MessageBus

async def main():
    bus = await MessageBus(bus_address=os.environ["VFIOD_BUS"]).connect()
    msg = lambda: Message(destination="org.vfiod1", path="/org/vfiod1", interface="org.vfiod1.Manager",
                          member="CheckAccess", signature="ss", body=["group:8", "vfio"])
    times = []
    for _ in range(int(sys.argv[1])):
        t0 = time.perf_counter()
        r = await bus.call(msg())
        times.append(time.perf_counter() - t0)
        assert r.error_name is None, r.body
        await asyncio.sleep(0.01)
    print(statistics.median(times))

asyncio.run(main())
'''


def test_a_flooding_client_does_not_hold_up_another(make_world):
    """Round-robin service keeps another client's CheckAccess within 10x its idle
    latency while one unprivileged connection keeps 300 calls in flight and sends
    4 MiB messages.  Without it the probe waits behind the whole queue (hundreds of
    calls: 100x and more); with it, 1.5-4x was seen on 2 busy cores.  The machine is shared by four busy processes here (flood,
    dbus-daemon, vfiod, probe), so a bound missed once by scheduling noise gets two
    more tries; a real loss of fairness misses every time."""
    w = make_world()
    probe = [os.path.join(VENV_BIN, "python"), "-c", PROBE]
    env = dict(os.environ, VFIOD_BUS=w.address, PYTHONPATH=ROOT)

    def median(samples):
        p = subprocess.run(probe + [str(samples)], capture_output=True, text=True, timeout=120,
                           user=TEST_USER, env=env, cwd=w.dir)
        assert p.returncode == 0, p.stderr
        return float(p.stdout)

    tries = []
    for _ in range(3):
        idle = median(40)
        flood = subprocess.Popen([os.path.join(VENV_BIN, "python"), "-c", FLOOD, "6"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 user=TEST_USER, env=env, cwd=w.dir)
        try:
            assert flood.stdout.readline().strip() == "flooding"
            time.sleep(0.5)
            busy = median(40)
            out, err = flood.communicate(timeout=120)
        finally:
            flood.kill()
        assert flood.returncode == 0, err
        print(f"CheckAccess median: idle {idle * 1000:.2f} ms, during the flood {busy * 1000:.2f} ms; "
              f"flood: {out.strip()}")
        assert "org.vfiod1.Error.LimitsExceeded" in out          # the flood met the per-client limit
        assert "oversize:org.vfiod1.Error.LimitsExceeded" in out  # and the 4 MiB message was refused
        assert w.daemon.poll() is None
        tries.append((idle, busy))
        if busy <= 10 * idle:
            break
    assert any(busy <= 10 * idle for idle, busy in tries), tries
    assert "Traceback" not in w.read_log()
