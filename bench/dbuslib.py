#!/usr/bin/env python3
"""dbus-next against dbus-fast, side by side, on an object tree shaped like vfiod's.

Each library serves, in its own process on a private dbus-daemon, a tree like
vfiod's on a host of N functions: a Group object (8 properties) and a Device
object (14 properties) per function.  A client of the same library then times,
in one run: a bare ``Peer.Ping`` round trip (median of 300), ``Properties.Get``
of one property (median of 300), ``GetManagedObjects`` of the whole tree
(median of 3) and the server's RSS once everything is exported.

Both libraries send ``InterfacesAdded`` for every object exported and take
``EAGAIN`` on a full socket for a lost connection, so the servers here export in
batches of 16 objects and let the loop drain the socket in between (vfiod waits
out a full socket itself); everything else is each library's own code.

dbus-fast is not a dependency of vfiod: install it beside dbus-next in a
scratch venv and run this with that venv's Python:

    python3 -m venv /tmp/fastvenv && /tmp/fastvenv/bin/pip install dbus-fast dbus-next
    /tmp/fastvenv/bin/python bench/dbuslib.py [--sizes 27,4096]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bus import rss_mb  # noqa: E402  (bench/bus.py: the standard library only at import)

SERVER = r'''
import asyncio, os, sys
lib, n = sys.argv[1], int(sys.argv[2])
aio = __import__(lib + ".aio", fromlist=["MessageBus"])
service = __import__(lib + ".service", fromlist=["ServiceInterface"])
constants = __import__(lib + ".constants", fromlist=["PropertyAccess"])
ServiceInterface, dbus_property, method = service.ServiceInterface, service.dbus_property, service.method
R = constants.PropertyAccess.READ

class Group(ServiceInterface):
    def __init__(self, i):
        super().__init__("org.vfiod1.Group"); self.i = i
    @dbus_property(access=R)
    def Number(self) -> "u": return self.i
    @dbus_property(access=R)
    def Devices(self) -> "as": return [f"0000:{self.i >> 8:02x}:{(self.i >> 3) & 31:02x}.{self.i & 7}"]
    @dbus_property(access=R)
    def Viable(self) -> "b": return False
    @dbus_property(access=R)
    def Blockers(self) -> "a(ss)": return [["0000:10:00.1", "bound to iavf: a lease unbinds it"]]
    @dbus_property(access=R)
    def State(self) -> "s": return "host"
    @dbus_property(access=R)
    def Lease(self) -> "o": return "/"
    @dbus_property(access=R)
    def Isolation(self) -> "s": return "alone"
    @dbus_property(access=R)
    def IsolationText(self) -> "s": return "alone in its group: the IOMMU can isolate it"

class Device(ServiceInterface):
    def __init__(self, i):
        super().__init__("org.vfiod1.Device"); self.i = i
    @dbus_property(access=R)
    def Address(self) -> "s": return f"0000:{self.i >> 8:02x}:{(self.i >> 3) & 31:02x}.{self.i & 7}"
    @dbus_property(access=R)
    def VendorId(self) -> "q": return 0x8086
    @dbus_property(access=R)
    def DeviceId(self) -> "q": return 0x1889
    @dbus_property(access=R)
    def Class(self) -> "u": return 0x020000
    @dbus_property(access=R)
    def Name(self) -> "s": return "Intel Corporation Ethernet Adaptive Virtual Function"
    @dbus_property(access=R)
    def Driver(self) -> "s": return "iavf"
    @dbus_property(access=R)
    def OriginalDriver(self) -> "s": return ""
    @dbus_property(access=R)
    def Group(self) -> "o": return f"/org/vfiod1/group/{self.i}"
    @dbus_property(access=R)
    def Bridge(self) -> "b": return False
    @dbus_property(access=R)
    def Protected(self) -> "s": return ""
    @dbus_property(access=R)
    def PhysicalFunction(self) -> "o": return "/org/vfiod1/device/0000_10_00_0"
    @dbus_property(access=R)
    def ResetMethods(self) -> "as": return ["flr"]

class Manager(ServiceInterface):
    def __init__(self):
        super().__init__("org.vfiod1.Manager")
    @dbus_property(access=R)
    def Version(self) -> "s": return "0"

async def main():
    bus = await aio.MessageBus(bus_address=os.environ["BUS"]).connect()
    bus.export("/org/vfiod1", Manager())
    for i in range(n):
        bus.export(f"/org/vfiod1/group/{i}", Group(i))
        bus.export(f"/org/vfiod1/device/d{i}", Device(i))
        if i % 16 == 15:          # let the writer drain the InterfacesAdded signals
            await asyncio.sleep(0.002)
    await bus.request_name("org.vfiod1")
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
'''

CLIENT = r'''
import asyncio, json, os, statistics, sys, time
lib = sys.argv[1]
aio = __import__(lib + ".aio", fromlist=["MessageBus"])
Message = __import__(lib, fromlist=["Message"]).Message

def call(member, interface, path="/org/vfiod1", signature="", body=()):
    return Message(destination="org.vfiod1", path=path, interface=interface, member=member,
                   signature=signature, body=list(body))

async def timed(n, make):
    out = []
    for i in range(n + 5):
        t0 = time.perf_counter()
        r = await bus.call(make())
        if i >= 5:
            out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1000, r

async def main():
    global bus
    bus = await aio.MessageBus(bus_address=os.environ["BUS"]).connect()
    ping, _ = await timed(300, lambda: call("Ping", "org.freedesktop.DBus.Peer"))
    get, _ = await timed(300, lambda: call("Get", "org.freedesktop.DBus.Properties", "/org/vfiod1/device/d0",
                                           "ss", ["org.vfiod1.Device", "Name"]))
    gmo, r = await timed(3, lambda: call("GetManagedObjects", "org.freedesktop.DBus.ObjectManager"))
    print(json.dumps({"ping_ms": ping, "get_ms": get, "gmo_ms": gmo, "objects": len(r.body[0])}))

asyncio.run(main())
'''


def measure(lib: str, functions: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="vfiod-bench-dbuslib-")
    sock = os.path.join(tmp, "bus")
    daemon = subprocess.Popen(["dbus-daemon", "--session", f"--address=unix:path={sock}", "--nofork",
                               "--print-address"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    server = None
    try:
        daemon.stdout.readline()
        env = dict(os.environ, BUS=f"unix:path={sock}")
        t0 = time.perf_counter()
        server = subprocess.Popen([sys.executable, "-c", SERVER, lib, str(functions)], stdout=subprocess.PIPE,
                                  text=True, env=env)
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{lib} server did not start")
        ready = time.perf_counter() - t0
        rss = rss_mb(server.pid)
        out = subprocess.run([sys.executable, "-c", CLIENT, lib], capture_output=True, text=True, env=env,
                             timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        res = json.loads(out.stdout)
        res.update(lib=lib, functions=functions, server_ready_s=ready, server_rss_mb=rss)
        return res
    finally:
        for p in (server, daemon):
            if p is not None:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="27,4096")
    ap.add_argument("--libs", default="dbus_next,dbus_fast")
    args = ap.parse_args()
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        for lib in args.libs.split(","):
            try:
                __import__(lib)
            except ImportError:
                print(f"{lib}: not installed in {sys.executable}; skipped", file=sys.stderr)
                continue
            rows.append(measure(lib, n))
    print("library | functions | objects | server ready | server RSS | Ping | Get | GetManagedObjects")
    for r in rows:
        print(f"{r['lib']} | {r['functions']:,} | {r['objects']:,} | {r['server_ready_s']:.2f} s | "
              f"{r['server_rss_mb']:.0f} MB | {r['ping_ms']:.2f} ms | {r['get_ms']:.2f} ms | {r['gmo_ms']:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
