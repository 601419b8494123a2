#!/usr/bin/env python3
"""Bus speed: what D-Bus costs vfiod's callers, against the cheapest call there is.

Printed in one run:

* (a) on this machine, a private system-type dbus-daemon (vfiod's own D-Bus
  policy included) and ``vfiod --simulate ich10``: the round trip of a bare
  ``org.freedesktop.DBus.Peer.Ping`` to org.vfiod1 (median of N calls);
* (b) the same for what ``vfioctl`` asks (``GetManagedObjects`` as ``vfioctl
  groups``/``leases`` read it, ``CheckAccess`` and ``Explain``), through
  ``vfiod.client.Client`` like vfioctl, each as a ratio to the ping
  (target <= 3x);
* (c) with ``--guest``: in the QEMU guest on the real kernel (``bridge``
  topology), vfiod on the guest's real sysfs behind a private bus, a full
  lease + release over the bus (``RequestLease`` + ``Lease.Release`` via
  Client, as root) of the bridge group, against the raw driver_override
  rebind of the same group (both e1000 to vfio-pci and the shpchp bridge
  unbound, then everything back; bench/lease.py's ``rounds_for``), with the
  in-process LeaseManager of bench/lease.py alongside to show what the bus
  edge adds; rounds interleaved, medians, and the ratio (target <= 1.10x).

Every call runs as the user running the bench (root, normally); one
connection is kept for all calls, as a client process would.

With ``--guest``, where the in-process grant + release's time goes, span by span
between the manager's journaled steps (medians), and with ``--profile N``, a cProfile
of N more in-process grants and releases in the guest (top functions by cumulative
and by own time).

    .venv/bin/python bench/bus.py [--pings 500] [--queries 200] [--guest] [--rounds 8] [--profile N]
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
VENV_BIN = os.path.join(ROOT, ".venv", "bin")

class World:
    """dbus-daemon + vfiod in `directory`; `vfiod_args` pick the host (--simulate or real)."""

    def __init__(self, directory: str, policy: str, vfiod_args=(), vfiod=None, ready_timeout=60.0, prefix=()):
        self.dir = directory
        os.chmod(directory, 0o755)
        pdir = os.path.join(directory, "policy")
        os.makedirs(pdir, exist_ok=True)
        with open(os.path.join(pdir, "50-bench.toml"), "w") as f:
            f.write(policy)
        self.log_path = os.path.join(directory, "vfiod.log")
        from vfiod.sim.privatebus import PrivateBus

        # the system bus's denials plus vfiod's own policy file, as in tests/bus
        self.bus = PrivateBus(directory, os.path.join(ROOT, "systemd/org.vfiod1.conf"))
        self.address = self.bus.address
        self.daemon = None
        self.log = open(self.log_path, "w")
        self.daemon = subprocess.Popen(
            [*prefix, vfiod or os.path.join(VENV_BIN, "vfiod"), "--bus", self.address, "--policy-dir", pdir,
             "--state-dir", os.path.join(directory, "state"), *vfiod_args],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while "ready on" not in self.read_log():
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"vfiod did not come up (rc {self.daemon.returncode}):\n{self.read_log()}")
            time.sleep(0.05)

    def read_log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def close(self) -> int | None:
        from vfiod.sim.privatebus import stop_process
        rc = stop_process(self.daemon, 60) if self.daemon else None
        self.log.close()
        self.bus.stop()
        return rc


def rss_mb(pid: int) -> float:
    """A process's resident memory, in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def summary(samples: list[float]) -> dict:
    """Milliseconds: median, p10, p90, n."""
    ms = sorted(s * 1000 for s in samples)
    q = statistics.quantiles(ms, n=10) if len(ms) >= 2 else [ms[0]] * 9
    return {"median": statistics.median(ms), "p10": q[0], "p90": q[-1], "n": len(ms)}


async def timed(n: int, fn, warmup: int = 20) -> list[float]:
    for _ in range(min(warmup, n)):
        await fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------- (a) + (b)

LOCAL_POLICY = '[[rule]]\ngroup = [8]\nuids = [{uid}]\nbackends = ["vfio", "pci-stub"]\n'


def local(pings: int, queries: int) -> dict:
    from vfiod.client import Client

    if not shutil.which("dbus-daemon"):
        return {"skipped": "dbus-daemon is not installed"}
    tmp = tempfile.mkdtemp(prefix="vfiod-bench-bus-")
    world = None
    try:
        world = World(tmp, LOCAL_POLICY.format(uid=os.getuid()),
                      ["--simulate", "ich10", "--sim-dir", os.path.join(tmp, "sim")])

        async def go():
            c = await Client(world.address, timeout=30).connect()
            try:
                async def ping():
                    await c.call("/org/vfiod1", "org.freedesktop.DBus.Peer", "Ping")

                async def objects():
                    await c.managed_objects()

                async def check():
                    await c.call("/org/vfiod1", "org.vfiod1.Manager", "CheckAccess", "ss", ["group:8", ""])

                async def explain():
                    await c.call("/org/vfiod1", "org.vfiod1.Manager", "Explain", "s", ["0000:04:00.0"])

                res = {"ping": summary(await timed(pings, ping))}
                for name, fn in (("GetManagedObjects", objects), ("CheckAccess", check), ("Explain", explain)):
                    res[name] = summary(await timed(queries, fn))
                # Ping again at the end: the ratio should not hide a drift.
                res["ping_after"] = summary(await timed(pings, ping))
                res["objects"] = len((await c.managed_objects()))
                return res
            finally:
                c.close()
        res = asyncio.run(go())
        res["vfiod_rc"] = world.close()
        log = world.read_log()
        res["log_problems"] = [l for l in log.splitlines() if "Traceback" in l or "ERROR" in l or "internal error" in l]
        return res
    finally:
        if world:
            world.close()
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- (c) in the guest

GUEST_SCRIPT = r'''
import asyncio, importlib.util, json, os, sys, time, traceback
sys.path.insert(0, ROOT)
OUT = os.environ["OUT"]
res = {}
try:
    spec = importlib.util.spec_from_file_location("bench_bus", ROOT + "/bench/bus.py")
    bb = importlib.util.module_from_spec(spec); spec.loader.exec_module(bb)
    spec = importlib.util.spec_from_file_location("bench_lease", ROOT + "/bench/lease.py")
    bl = importlib.util.module_from_spec(spec); spec.loader.exec_module(bl)
    from vfiod.client import Client
    from vfiod.sysfs import Kernel, Roots, SysfsReader
    from vfiod.topology import Host

    kernel = Kernel(Roots())
    host = Host.scan(SysfsReader(Roots()))
    group = next(g for g in host.groups.values() if any(str(a) == "0000:02:01.0" for a in g.members))
    eps = [d.addr for d in host.endpoints(group)]
    bridges = [a for a in group.members if host.devices[a].is_bridge and host.devices[a].driver not in (None, "pcieport")]
    before = {str(a): kernel.driver_of(a) for a in group.members}
    res.update(group=group.number, endpoints=[str(a) for a in eps], bridges=[str(a) for a in bridges], before=before)

    os.makedirs("/run/vfiod-bench-bus", exist_ok=True)
    world = bb.World("/run/vfiod-bench-bus", f'[[rule]]\ngroup = [{group.number}]\nuids = [0]\nbackends = ["vfio", "pci-stub"]\n',
                     vfiod="vfiod", ready_timeout=240)
    os.makedirs("/run/vfiod-bench-lm", exist_ok=True)
    clock = bl.PhaseClock()
    manager = bl.manager_for(kernel, "/run/vfiod-bench-lm", group.number, on_step=clock.mark)
    raw_round, _ = bl.rounds_for(kernel, manager, group.number, eps, bridges)
    from vfiod.policy import Caller
    admin = Caller(0)
    phases = {"manager_grant": [], "manager_release": [], "bus_grant": [], "bus_release": []}

    def manager_round():          # bench/lease.py's lease round, with its two halves timed
        clock.start()
        t0 = time.perf_counter()
        lease = manager.request(admin, f"group:{group.number}", "vfio", {"force": True})
        t1 = time.perf_counter()
        clock.mark("request returned")
        manager.release(lease.id, admin)
        clock.stop("release returned")
        phases["manager_grant"].append(t1 - t0)
        phases["manager_release"].append(time.perf_counter() - t1)

    loop = asyncio.new_event_loop()
    client = loop.run_until_complete(Client(world.address, timeout=120).connect())
    seen = {}

    async def bus_lease():
        t0 = time.perf_counter()
        path = await client.request_lease(f"group:{group.number}", "vfio", force=True)
        t1 = time.perf_counter()
        if "leased" not in seen:      # the untimed first round records what a lease looks like
            seen["leased"] = {str(a): kernel.driver_of(a) for a in group.members}
            t1 = time.perf_counter()
        await client.lease_call(path, "Release")
        phases["bus_grant"].append(t1 - t0)
        phases["bus_release"].append(time.perf_counter() - t1)

    def bus_round():
        loop.run_until_complete(bus_lease())

    async def ping():
        await client.call("/org/vfiod1", "org.freedesktop.DBus.Peer", "Ping")

    # One untimed round of each first (module loads, page cache, first vfio group node).
    for fn in (raw_round, manager_round, bus_round):
        fn()
    for v in phases.values():
        v.clear()
    clock.rounds.clear()
    raw, lm, bus = [], [], []
    for _ in range(ROUNDS):
        for fn, out in ((raw_round, raw), (manager_round, lm), (bus_round, bus)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    res["ping"] = bb.summary(loop.run_until_complete(bb.timed(PINGS, ping, warmup=5)))
    res["split"] = clock.table()
    if PROFILE:                   # after the timed rounds: cProfile slows what it watches
        import cProfile
        grant_prof, release_prof = cProfile.Profile(), cProfile.Profile()
        for _ in range(PROFILE):
            lease = grant_prof.runcall(manager.request, admin, f"group:{group.number}", "vfio", {"force": True})
            release_prof.runcall(manager.release, lease.id, admin)
        res["profile"] = {"grant": bl.profile_text(grant_prof, PROFILE_TOP),
                          "release": bl.profile_text(release_prof, PROFILE_TOP)}
    res.update(rounds=ROUNDS, raw=bb.summary(raw), manager=bb.summary(lm), bus=bb.summary(bus),
               phases={k: bb.summary(v) for k, v in phases.items()},
               raw_all_ms=[x * 1000 for x in raw], manager_all_ms=[x * 1000 for x in lm], bus_all_ms=[x * 1000 for x in bus],
               leased=seen.get("leased"), after={str(a): kernel.driver_of(a) for a in group.members})
    client.close()
    res["vfiod_rc"] = world.close()
    if PROFILE:                   # the daemon's event loop (the bus edge) under cProfile, in a world of its own
        import shutil as sh
        os.makedirs("/run/vfiod-bench-bus-prof", exist_ok=True)
        out = "/run/vfiod-bench-bus-prof/vfiod.prof"
        pworld = bb.World("/run/vfiod-bench-bus-prof", f'[[rule]]\ngroup = [{group.number}]\nuids = [0]\nbackends = ["vfio", "pci-stub"]\n',
                          vfiod=sh.which("vfiod"), ready_timeout=240, prefix=(sys.executable, "-m", "cProfile", "-o", out))
        pclient = loop.run_until_complete(Client(pworld.address, timeout=120).connect())

        async def prof_lease():
            path = await pclient.request_lease(f"group:{group.number}", "vfio", force=True)
            await pclient.lease_call(path, "Release")
        for _ in range(PROFILE):
            loop.run_until_complete(prof_lease())
        pclient.close()
        pworld.close()
        res.setdefault("profile", {})["daemon loop"] = bl.profile_text(out, PROFILE_TOP)
    log = world.read_log()
    res["log_problems"] = [l for l in log.splitlines() if "Traceback" in l or "ERROR" in l or "internal error" in l]
    res["log_lines"] = len(log.splitlines())
except Exception:
    res["error"] = traceback.format_exc()
json.dump(res, open(os.path.join(OUT, "bus.json"), "w"))
'''


def guest(rounds: int, profile: int = 0, top: int = 30) -> dict:
    from tests.guest.harness import Guest, guest_available

    ok, why = guest_available()
    if not ok:
        return {"skipped": why}
    script = (f"ROOT = {ROOT!r}\nROUNDS = {int(rounds)}\nPINGS = 50\nPROFILE = {int(profile)}\n"
              f"PROFILE_TOP = {int(top)}\n" + GUEST_SCRIPT)
    res = Guest(topology="bridge").run("python3 - <<'EOF'\n" + script + "\nEOF\n", timeout=1800)
    if res.returncode != 0 or "bus.json" not in res.files:
        return {"error": res.output[-3000:]}
    return json.loads(res.files["bus.json"])


def fmt(s: dict) -> str:
    return f"{s['median']:.3f} ms (p10 {s['p10']:.3f}, p90 {s['p90']:.3f}, n={s['n']})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pings", type=int, default=500)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--guest", action="store_true", help="also measure leases on the real kernel in the QEMU guest")
    ap.add_argument("--rounds", type=int, default=8, help="lease rounds in the guest (default 8)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the timed rounds, N more in-process grants and releases in the guest under "
                         "cProfile: print the top functions of each")
    ap.add_argument("--top", type=int, default=30, help="functions in each --profile list (default 30)")
    ap.add_argument("--json", action="store_true", help="print the raw figures as JSON at the end")
    args = ap.parse_args()
    status = 0
    out = {}

    loc = out["local"] = local(args.pings, args.queries)
    if "skipped" in loc:
        print(f"(a)/(b) not measured: {loc['skipped']}")
    else:
        ping = loc["ping"]["median"]
        print(f"this machine, private system bus, vfiod --simulate ich10 ({loc['objects']} objects), "
              f"caller uid {os.getuid()}, one connection:")
        print(f"(a) Peer.Ping round trip:        {fmt(loc['ping'])}")
        print(f"    (again after the queries:    {fmt(loc['ping_after'])})")
        print("(b) vfioctl's queries, ratio to the ping (target <= 3.00x):")
        for name in ("GetManagedObjects", "CheckAccess", "Explain"):
            s = loc[name]
            ratio = s["median"] / ping
            print(f"    {name:<18} {fmt(s)}  {ratio:6.2f}x{'' if ratio <= 3 else '  OVER TARGET'}")
        if loc["log_problems"] or loc["vfiod_rc"] != 0:
            print(f"    vfiod: exit {loc['vfiod_rc']}; log problems: {loc['log_problems']}")
            status = 1

    if args.guest:
        g = out["guest"] = guest(args.rounds, args.profile, args.top)
        if "skipped" in g or "error" in g:
            print(f"(c) real kernel: not measured\n{g.get('skipped') or g.get('error')}")
            return status if "skipped" in g else 1
        ratio = g["bus"]["median"] / g["raw"]["median"]
        print(f"(c) real kernel (QEMU guest, TCG), group {g['group']}: endpoints {g['endpoints']}, "
              f"bridges held unbound {g['bridges']}; median of {g['rounds']} interleaved rounds:")
        print(f"    raw driver_override rebind + return:     {fmt(g['raw'])}")
        print(f"    LeaseManager grant + release (no bus):   {fmt(g['manager'])}  "
              f"{g['manager']['median'] / g['raw']['median']:.2f}x")
        print(f"    RequestLease + Release over the bus:     {fmt(g['bus'])}  "
              f"{ratio:.2f}x{'' if ratio <= 1.10 else '  OVER TARGET'} (target <= 1.10x)")
        ph = g["phases"]
        print(f"    bus edge on top of LeaseManager:         "
              f"{g['bus']['median'] - g['manager']['median']:.0f} ms per lease + release "
              f"(grant {ph['bus_grant']['median']:.0f} vs {ph['manager_grant']['median']:.0f} ms, "
              f"release {ph['bus_release']['median']:.0f} vs {ph['manager_release']['median']:.0f} ms; "
              f"a Peer.Ping in the guest: {g['ping']['median']:.1f} ms)")
        print(f"    drivers: before {g['before']}, leased {g['leased']}, after {g['after']}")
        print("    where the in-process grant + release goes (the manager's own marks, medians):")
        for span, ms, share in g.get("split", []):
            print(f"      {ms:8.1f} ms {share:6.1%}  {span}")
        for half, text in g.get("profile", {}).items():
            what = (f"vfiod's event loop (the bus edge: its main thread) over {args.profile} RequestLease + Release"
                    if half == "daemon loop" else f"{args.profile} in-process {half}s")
            print(f"    cProfile of {what} in the guest:\n{text}")
        if g["after"] != g["before"] or g["log_problems"] or g["vfiod_rc"] != 0:
            print(f"    PROBLEM: vfiod exit {g['vfiod_rc']}; log problems: {g['log_problems']}")
            status = 1
    if args.json:
        print(json.dumps(out, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
