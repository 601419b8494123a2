#!/usr/bin/env python3
"""Scale: vfiod on simulated two-socket servers of 64, 1,024 and 4,096 PCI functions.

For each size, in one run (the tree laid out on tmpfs first, its time printed
apart), with a private system-type dbus-daemon and ``vfiod --simulate server:N``:

* ``ready``: from starting vfiod to its "ready" line (the scan, the journal, the
  export of every object, owning the name); target at 4,096: <= 2 s;
* ``rss``: vfiod's resident memory once ready; target <= 60 MB;
* ``groups``: ``vfioctl groups`` as a whole process (median of 3); target <= 1 s;
* ``ping`` and ``check``: a bare ``Peer.Ping`` and ``CheckAccess`` round trip
  (medians), and their ratio; target <= 3x;
* ``GetManagedObjects``, the whole host, as clients nobody here wrote see it, all as an
  unprivileged user (``vfiotest`` where it exists, else ``nobody``): on a raw socket
  (bench/rawbus.py: from the call to the last byte of the reply, nothing unmarshalled),
  the first call after start (every object marshalled) and the median of the next 5;
  ``busctl call`` as a whole process (median of 5); and one call through
  vfiod.client (dbus-next, whose unmarshalling in pure Python is the client's cost);
  target at 4,096: <= 0.5 s;
* ``lease``: ``RequestLease`` + ``Release`` of a VF's group on the simulated
  kernel (median of 20), and its ratio to the same on a 16-function server,
  the rounds interleaved; target <= 1.25x;
* ``hotplug``: in-process, 1,000 uevents (500 VFs unbound and bound again behind
  vfiod's back) until the snapshot shows them all: the time, the partial and
  full rescans (target: no full rescan).

    .venv/bin/python bench/scale.py [--sizes 64,1024,4096] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(ROOT, ".venv", "bin")

from bus import World, rss_mb, summary, timed  # noqa: E402  (bench/bus.py)

POLICY = '[[rule]]\nids = ["8086:1889"]\nuids = [{uid}]\nbackends = ["vfio"]\n'
# tmpfs when there is room (a 4,096-function tree is ~230 MB of small files)
SCRATCH = ("/dev/shm" if os.access("/dev/shm", os.W_OK) and shutil.disk_usage("/dev/shm").free > 1 << 30
           else None)


def start(n: int) -> tuple[str, "World", float, float]:
    """A private bus and vfiod on server:N (tree laid out first); (dir, world, layout s, ready s)."""
    from vfiod.sim import hosts

    tmp = tempfile.mkdtemp(prefix="vfiod-bench-scale-", dir=SCRATCH)
    sim = os.path.join(tmp, "sim")
    t0 = time.perf_counter()
    hosts.build(f"server:{n}", os.path.join(sim, "host"))
    layout = time.perf_counter() - t0
    t0 = time.perf_counter()
    world = World(tmp, POLICY.format(uid=os.getuid()),
                  ["--simulate", f"server:{n}", "--sim-dir", sim], ready_timeout=300)
    return tmp, world, layout, time.perf_counter() - t0


def unprivileged() -> tuple[int, int]:
    import pwd

    for name in ("vfiotest", "nobody"):
        try:
            pw = pwd.getpwnam(name)
            return pw.pw_uid, pw.pw_gid
        except KeyError:
            continue
    return os.getuid(), os.getgid()


def managed_objects_outside(address: str) -> dict:
    """GetManagedObjects as an unprivileged client of no vfiod code: raw socket and busctl."""
    uid, gid = unprivileged()
    raw = json.loads(subprocess.run([sys.executable, os.path.join(ROOT, "bench", "rawbus.py"), address, "6"],
                                    check=True, capture_output=True, text=True, user=uid, group=gid,
                                    env={"PYTHONPATH": ROOT}).stdout)
    if any(r["error"] for r in raw):
        raise RuntimeError("GetManagedObjects answered with an error")
    out = {"raw_first_ms": raw[0]["seconds"] * 1000, "raw_ms": statistics.median(r["seconds"] for r in raw[1:]) * 1000,
           "bytes": raw[0]["bytes"], "uid": uid}
    if shutil.which("busctl"):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            subprocess.run(["busctl", f"--address={address}", "call", "org.vfiod1", "/org/vfiod1",
                            "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"],
                           check=True, stdout=subprocess.DEVNULL, user=uid, group=gid)
            times.append(time.perf_counter() - t0)
        out["busctl_ms"] = statistics.median(times) * 1000
    return out


def one_size(n: int, base: "World") -> dict:
    from vfiod.client import Client

    tmp, world, layout, ready = start(n)
    try:
        rss = rss_mb(world.daemon.pid)
        outside = managed_objects_outside(world.address)

        groups = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run([os.path.join(VENV_BIN, "vfioctl"), "groups", "--bus", world.address],
                           check=True, stdout=subprocess.DEVNULL)
            groups.append(time.perf_counter() - t0)

        vf = "0000:10:00.1"

        async def go() -> dict:
            c = await Client(world.address, timeout=120).connect()
            b = await Client(base.address, timeout=120).connect()
            try:
                async def ping() -> None:
                    await c.call("/org/vfiod1", "org.freedesktop.DBus.Peer", "Ping")

                async def check() -> None:
                    await c.call("/org/vfiod1", "org.vfiod1.Manager", "CheckAccess", "ss", [vf, "vfio"])

                async def lease(client: Client) -> float:
                    t0 = time.perf_counter()
                    r = await client.call("/org/vfiod1", "org.vfiod1.Manager", "RequestLease", "ssa{sv}",
                                          [vf, "vfio", {}])
                    await client.call(r.body[0], "org.vfiod1.Lease", "Release")
                    return time.perf_counter() - t0

                out = {"ping": summary(await timed(200, ping)), "check": summary(await timed(100, check))}
                t0 = time.perf_counter()
                objects = await c.managed_objects()
                out["GetManagedObjects"] = {"ms": (time.perf_counter() - t0) * 1000, "objects": len(objects)}
                # rounds on this host and on the 16-function one interleaved, so a busy
                # machine slows both alike
                here, there = [], []
                for i in range(24):
                    t_here, t_there = await lease(c), await lease(b)
                    if i >= 4:
                        here.append(t_here)
                        there.append(t_there)
                out["lease"], out["lease16"] = summary(here), summary(there)
                return out
            finally:
                c.close()
                b.close()

        res = asyncio.run(go())
        res["GetManagedObjects"].update(outside)
        res.update(functions=n, layout_s=layout, ready_s=ready, rss_mb=rss,
                   groups_ms=statistics.median(groups) * 1000,
                   check_ratio=res["check"]["median"] / res["ping"]["median"],
                   lease_ratio=res["lease"]["median"] / res["lease16"]["median"])
        return res
    finally:
        world.close()
        shutil.rmtree(tmp, ignore_errors=True)


def hotplug(n: int, events: int = 1000) -> dict:
    """`events` uevents on a server of `n` functions, in-process: time and rescans."""
    from vfiod.backends import load_backends
    from vfiod.daemon import Service
    from vfiod.policy import PolicyStore
    from vfiod.sim import hosts
    from vfiod.sim.kernel import SimKernel
    from vfiod.state import Journal

    tmp = tempfile.mkdtemp(prefix="vfiod-bench-hotplug-", dir=SCRATCH)
    try:
        spec = hosts.spec(f"server:{n}")
        roots = hosts.build(spec.name, os.path.join(tmp, "host"))
        kernel = SimKernel.for_spec(spec, roots)
        os.makedirs(os.path.join(tmp, "policy"))
        store = PolicyStore(os.path.join(tmp, "policy"))
        store.reload()
        service = Service(kernel, Journal(os.path.join(tmp, "state.db")), store, load_backends())
        vfs = [fn.addr for fn in spec.functions if fn.vf_of][: events // 2]

        async def go() -> dict:
            loop = asyncio.get_running_loop()
            service.loop = loop
            kernel.event_sink = lambda *e: loop.call_soon_threadsafe(service.on_pci_event, *e)
            before = dict(service.snapshot.scans)

            def storm() -> None:
                for a in vfs:
                    kernel.unbind(a)
                for a in vfs:
                    kernel.bind(a, "iavf")

            t0 = time.perf_counter()
            await loop.run_in_executor(None, storm)
            # settled: every event seen, and the snapshot shows every VF back on iavf
            while (service.snapshot.scans["events"] - before["events"] < 2 * len(vfs)
                   or any(service.host.devices[a].driver != "iavf" for a in vfs)):
                await asyncio.sleep(0.005)
            took = time.perf_counter() - t0
            after = service.snapshot.scans
            return {"events": after["events"] - before["events"], "seconds": took,
                    "partial": after["partial"] - before["partial"], "full": after["full"] - before["full"]}

        return asyncio.run(go())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: GetManagedObjects of the whole tree, as a client nobody here wrote reads it (busctl, and
#: the raw reply): at most this, at every size
OBJECTS_TARGET_MS = 500


def _objects(g: dict) -> str:
    busctl = (f"{g['busctl_ms']:.0f} ms{'' if g['busctl_ms'] <= OBJECTS_TARGET_MS else ' OVER TARGET'}"
              if "busctl_ms" in g else "no busctl")
    raw = f"{g['raw_ms']:.0f} ms{'' if g['raw_ms'] <= OBJECTS_TARGET_MS else ' OVER TARGET'}"
    return (f"{g['objects']} objects, {g['bytes'] / 1e6:.1f} MB: raw {g['raw_first_ms']:.0f} / {raw}, "
            f"busctl {busctl} (target <= {OBJECTS_TARGET_MS} ms), dbus-next {g['ms']:.0f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,1024,4096")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not shutil.which("dbus-daemon"):
        print("bench/scale.py needs dbus-daemon", file=sys.stderr)
        return 1
    sizes = [int(s) for s in args.sizes.split(",")]
    base_dir, base, _, _ = start(16)
    rows = []
    try:
        for n in sizes:
            r = one_size(n, base)
            r["hotplug"] = hotplug(n) if n >= 1024 else None
            rows.append(r)
    finally:
        base.close()
        shutil.rmtree(base_dir, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("lease+release: median of 20 rounds, each beside a round on a 16-function server (the ratio)\n")
    head = ("functions", "layout", "ready", "RSS", "vfioctl groups", "ping", "CheckAccess",
            "GetManagedObjects: raw first / next, busctl, dbus-next client", "lease+release", "1,000 uevents")
    print(" | ".join(head))
    for r in rows:
        hp = r["hotplug"]
        print(" | ".join([
            f"{r['functions']:,}", f"{r['layout_s']:.1f} s", f"{r['ready_s']:.2f} s", f"{r['rss_mb']:.0f} MB",
            f"{r['groups_ms']:.0f} ms", f"{r['ping']['median']:.2f} ms",
            f"{r['check']['median']:.2f} ms ({r['check_ratio']:.1f}x)",
            _objects(r["GetManagedObjects"]),
            f"{r['lease']['median']:.1f} ms ({r['lease_ratio']:.2f}x)",
            f"{hp['seconds']:.2f} s, {hp['partial']} partial / {hp['full']} full rescans" if hp else "-",
        ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
