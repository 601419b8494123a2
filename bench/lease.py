#!/usr/bin/env python3
"""Lease speed: vfiod's grant + release against a raw driver_override rebind of the same group.

Printed in one run:

* simulated kernel, in-process (always): vfiod's own overhead per grant + release
  of the ICH10 host's group 8 (two endpoints), journal included, against the same
  rebinding done with the kernel calls alone; median of N rounds, and the ratio;
* simulated kernel, over the bus (where dbus-daemon is installed): the same lease
  + release as a client does it (`vfiod.client`, as root) of ``vfiod --simulate
  ich10`` on a private bus, against the raw rebind on the daemon's own tree, rounds
  interleaved; the ratio, and where the bus edge's time goes: the grant and the
  release apart, and a bare ``Peer.Ping`` round trip (each call pays one);
* real kernel (``--guest``, needs QEMU): inside the QEMU guest, a raw
  driver_override rebind to vfio-pci and return of the two-e1000 bridge
  group, then a LeaseManager grant + release of the same group; median of
  N rounds each, and their ratio (target on the real kernel <= 1.10x).

    .venv/bin/python bench/lease.py [--rounds 20] [--guest]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

POLICY = '[[rule]]\ngroup = [{group}]\nuids = [0]\nbackends = ["vfio", "pci-stub"]\n'


def manager_for(kernel, state_dir, group, on_step=None):
    from vfiod.backends import load_backends
    from vfiod.leases import LeaseManager
    from vfiod.policy import Policy
    from vfiod.state import Journal

    pdir = os.path.join(state_dir, "policy")
    os.makedirs(pdir, exist_ok=True)
    with open(os.path.join(pdir, "bench.toml"), "w") as f:
        f.write(POLICY.format(group=group))
    policy = Policy.load(pdir)
    return LeaseManager(kernel, Journal(os.path.join(state_dir, "state.db")), lambda: policy, load_backends(),
                        on_step=on_step)


class PhaseClock:
    """Where a grant + release's wall time goes, from the manager's own marks: pass
    `mark` as the manager's ``on_step``, call `start` before a request and `stop` after
    the release; `table` gives each span (from one mark to the next) as a median."""

    def __init__(self):
        self.rounds: list[list[tuple[str, float]]] = []
        self._now: list[tuple[str, float]] | None = None

    def start(self, name: str = "request") -> None:
        self._now = [(name, time.perf_counter())]

    def mark(self, name: str) -> None:
        if self._now is not None:
            self._now.append((name, time.perf_counter()))

    def stop(self, name: str = "returned") -> None:
        if self._now is not None:
            self.mark(name)
            self.rounds.append(self._now)
            self._now = None

    def table(self) -> list[tuple[str, float, float]]:
        """(span "a -> b", median ms, share of the round's median) in the rounds' order."""
        spans: dict[str, list[float]] = {}
        totals = []
        for marks in self.rounds:
            for (a, ta), (b, tb) in zip(marks, marks[1:]):
                spans.setdefault(f"{a} -> {b}", []).append((tb - ta) * 1000)
            totals.append((marks[-1][1] - marks[0][1]) * 1000)
        total = statistics.median(totals) if totals else 0.0
        return [(k, statistics.median(v), statistics.median(v) / total if total else 0.0) for k, v in spans.items()]


def profile_text(profile, top: int = 30) -> str:
    """A cProfile run's top functions, by cumulative and by own time."""
    import io
    import pstats

    out = io.StringIO()
    st = pstats.Stats(profile, stream=out)
    st.strip_dirs()
    st.sort_stats("cumulative").print_stats(top)
    st.sort_stats("tottime").print_stats(top)
    # who calls the system calls and the journal's queries (where reads repeat)
    st.sort_stats("tottime").print_callers(r"posix\.(listdir|open|stat)|sqlite3|_lease_rows|readable|holdings")
    return out.getvalue()


def measure(rounds, raw_round, lease_round):
    raw, lease = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        raw_round()
        t1 = time.perf_counter()
        lease_round()
        t2 = time.perf_counter()
        raw.append(t1 - t0)
        lease.append(t2 - t1)
    return statistics.median(raw), statistics.median(lease)


def rounds_for(kernel, manager, group, endpoints, bridges=()):
    """The raw round does by hand what makes the group usable: endpoints to vfio-pci,
    bridges on a driver VFIO refuses (shpchp) unbound; then everything back."""
    from vfiod.policy import Caller

    admin = Caller(0)
    held = [(a, kernel.driver_of(a), kernel.override_of(a)) for a in endpoints]
    held_bridges = [(a, kernel.driver_of(a), kernel.override_of(a)) for a in bridges]

    def raw_round():
        for a, _, _ in held:
            kernel.bind(a, "vfio-pci")
        for a, _, _ in held_bridges:
            kernel.detach(a)
        for a, drv, ovr in reversed(held + held_bridges):
            kernel.restore(a, drv, ovr)

    def lease_round():
        lease = manager.request(admin, f"group:{group}", "vfio", {"force": True})
        manager.release(lease.id, admin)

    return raw_round, lease_round


def simulated(rounds: int) -> dict:
    from vfiod.sim import hosts
    from vfiod.address import PciAddress
    from vfiod.sim.kernel import SimKernel

    with tempfile.TemporaryDirectory() as tmp:
        roots = hosts.build("ich10", os.path.join(tmp, "host"))
        kernel = SimKernel.for_spec(hosts.ICH10, roots)
        manager = manager_for(kernel, os.path.join(tmp, "state"), 8)
        eps = [PciAddress.parse("0000:04:00.0"), PciAddress.parse("0000:05:00.0")]
        raw, lease = measure(rounds, *rounds_for(kernel, manager, 8, eps))
    return {"raw_ms": raw * 1000, "lease_ms": lease * 1000, "overhead_ms": (lease - raw) * 1000}


def over_the_bus(rounds: int) -> dict:
    """Lease + release through the bus on the simulated ICH10 host, against the raw rebind
    of the same group on the daemon's tree (rounds interleaved)."""
    import asyncio
    import shutil

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bus import World, summary, timed      # bench/bus.py
    from vfiod.address import PciAddress
    from vfiod.client import Client
    from vfiod.sim import hosts
    from vfiod.sim.kernel import SimKernel

    if not shutil.which("dbus-daemon"):
        return {"skipped": "dbus-daemon is not installed"}
    tmp = tempfile.mkdtemp(prefix="vfiod-bench-lease-")
    world = None
    try:
        sim = os.path.join(tmp, "sim")
        roots = hosts.build("ich10", os.path.join(sim, "host"))
        world = World(tmp, POLICY.format(group=8), ["--simulate", "ich10", "--sim-dir", sim])
        kernel = SimKernel.for_spec(hosts.ICH10, roots)
        eps = [PciAddress.parse("0000:04:00.0"), PciAddress.parse("0000:05:00.0")]
        raw_round, _ = rounds_for(kernel, None, 8, eps)
        loop = asyncio.new_event_loop()
        client = loop.run_until_complete(Client(world.address, timeout=60).connect())
        grant, release = [], []

        async def bus_lease() -> None:
            t0 = time.perf_counter()
            path = await client.request_lease("group:8", "vfio", force=True)
            t1 = time.perf_counter()
            await client.lease_call(path, "Release")
            grant.append(t1 - t0)
            release.append(time.perf_counter() - t1)

        async def ping() -> None:
            await client.call("/org/vfiod1", "org.freedesktop.DBus.Peer", "Ping")

        raw_round()
        loop.run_until_complete(bus_lease())
        grant.clear()
        release.clear()
        raw, bus = measure(rounds, raw_round, lambda: loop.run_until_complete(bus_lease()))
        pings = summary(loop.run_until_complete(timed(200, ping)))
        client.close()
        loop.close()
        return {"raw_ms": raw * 1000, "bus_ms": bus * 1000, "grant_ms": statistics.median(grant) * 1000,
                "release_ms": statistics.median(release) * 1000, "ping_ms": pings["median"]}
    finally:
        if world is not None:
            world.close()
        shutil.rmtree(tmp, ignore_errors=True)


GUEST_SCRIPT = r'''
import json, os, sys, time
sys.path.insert(0, "{root}")
sys.argv = ["lease.py"]
import importlib.util
spec = importlib.util.spec_from_file_location("bench_lease", "{root}/bench/lease.py")
b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
from vfiod.address import PciAddress
from vfiod.sysfs import Kernel, Roots
from vfiod.topology import Host
from vfiod.sysfs import SysfsReader
kernel = Kernel(Roots())
host = Host.scan(SysfsReader(Roots()))
group = next(g for g in host.groups.values() if any(str(a) == "0000:02:01.0" for a in g.members))
eps = [d.addr for d in host.endpoints(group)]
bridges = [a for a in group.members if host.devices[a].is_bridge and host.devices[a].driver not in (None, "pcieport")]
os.makedirs("/run/vfiod-bench", exist_ok=True)
manager = b.manager_for(kernel, "/run/vfiod-bench", group.number)
kernel.load_driver("vfio-pci")
raw, lease = b.measure({rounds}, *b.rounds_for(kernel, manager, group.number, eps, bridges))
drivers = {{str(a): kernel.driver_of(a) for a in eps}}
json.dump({{"raw_ms": raw * 1000, "lease_ms": lease * 1000, "group": group.number,
           "endpoints": [str(a) for a in eps], "bridges": [str(a) for a in bridges], "drivers_after": drivers}}, open(os.environ["OUT"] + "/lease.json", "w"))
'''


def guest(rounds: int) -> dict:
    from tests.guest.harness import Guest, guest_available

    ok, why = guest_available()
    if not ok:
        return {"skipped": why}
    res = Guest(topology="bridge").run(
        "python3 - <<'EOF'\n" + GUEST_SCRIPT.format(root=ROOT, rounds=rounds) + "\nEOF\n", timeout=900)
    if res.returncode != 0 or "lease.json" not in res.files:
        return {"error": res.output[-2000:]}
    return json.loads(res.files["lease.json"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--guest", action="store_true", help="also measure on the real kernel in the QEMU guest")
    args = ap.parse_args()
    sim = simulated(args.rounds)
    print(f"simulated kernel, ICH10 group 8 (2 endpoints), median of {args.rounds}:")
    print(f"  raw rebind + return:      {sim['raw_ms']:.1f} ms")
    print(f"  vfiod grant + release:    {sim['lease_ms']:.1f} ms")
    print(f"  vfiod's own overhead:     {sim['overhead_ms']:.1f} ms per grant + release (journal included)")
    print(f"  in-process ratio:         {sim['lease_ms'] / sim['raw_ms']:.2f}x")
    bus = over_the_bus(args.rounds)
    if "skipped" in bus:
        print(f"over the bus: not measured ({bus['skipped']})")
    else:
        print(f"simulated kernel over the bus (vfiod --simulate ich10, private bus, client as root), "
              f"median of {args.rounds}:")
        print(f"  raw rebind + return:      {bus['raw_ms']:.1f} ms")
        print(f"  RequestLease + Release:   {bus['bus_ms']:.1f} ms (grant {bus['grant_ms']:.1f} ms, "
              f"release {bus['release_ms']:.1f} ms; a bare Ping round trip {bus['ping_ms']:.2f} ms)")
        print(f"  over-the-bus ratio:       {bus['bus_ms'] / bus['raw_ms']:.2f}x; the bus edge adds "
              f"{bus['bus_ms'] - bus['raw_ms'] - sim['overhead_ms']:.1f} ms over the in-process overhead")
    if args.guest:
        g = guest(max(3, args.rounds // 4))
        if "skipped" in g or "error" in g:
            print(f"real kernel: not measured ({g.get('skipped') or g.get('error')})")
            return 1 if "error" in g else 0
        print(f"real kernel (QEMU guest, TCG), group {g['group']}: endpoints {g['endpoints']}, "
              f"bridges held unbound {g['bridges']}:")
        print(f"  raw driver_override rebind + return: {g['raw_ms']:.0f} ms")
        print(f"  LeaseManager grant + release:        {g['lease_ms']:.0f} ms")
        ratio = g['lease_ms'] / g['raw_ms']
        print(f"  ratio: {ratio:.2f}{'' if ratio <= 1.10 else '  OVER TARGET'} (target <= 1.10); "
              f"drivers after: {g['drivers_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
