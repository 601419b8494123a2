#!/usr/bin/env python3
"""Scan speed: whole `vfiod inspect --json` processes against `lspci -vmm` on the same tree.

For each size (default 64, 1,024 and 4,096 functions) it lays out an SR-IOV tree
(root ports, each with a PF and its VFs: `vfiod.sim.hosts.sriov_farm`) on a tmpfs
(/dev/shm where there is one), then times whole processes of both tools reading it,
alternating them run by run so both see the same machine, and prints best and
median wall time of each, the median CPU time (user + system: what a busy machine
disturbs least) and the ratios of the medians.  Target: vfiod no slower than lspci.

It also prints what no scan can go below: the interpreter's start (`python -S -c
pass`) and the start with the modules `vfiod inspect` imports, so a ratio at a
small size can be read against the part that does not grow with the tree.
`--profile` adds, at the largest size, the in-process split (scan, model, JSON)
and, where strace is installed, the system calls per function of each tool.

    .venv/bin/python bench/scan.py [--runs 9] [--sizes 64,1024,4096] [--profile]
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vfiod.sim.hosts import sriov_farm  # noqa: E402
from vfiod.sim.hosts.builder import build  # noqa: E402

IMPORTS = "import vfiod.cmd.server, vfiod.report, vfiod.pciids, vfiod.topology, vfiod.sysfs, json"


def farm_for(functions: int):
    """An SR-IOV farm of exactly `functions` functions: root ports of (PF + up to 254 VFs)."""
    ports = max(1, -(-functions // 256))
    vfs = functions // ports - 2
    if ports * (vfs + 2) != functions:
        raise SystemExit(f"{functions} functions do not split into equal root ports; pick a multiple of 256 or ≤ 256")
    return sriov_farm(ports, vfs)


def run(cmd):
    """(wall seconds, CPU seconds (user + system), stdout) of one whole process."""
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode:
            raise SystemExit(f"{cmd[0]} exited {p.returncode}")
        out.seek(0)
        return wall, usage.ru_utime + usage.ru_stime, out.read()


def alternate(cmds, runs, cpu=None):
    """Each command `runs` times, round-robin; (wall times per command, last output per
    command); CPU times go to `cpu` (a list per command) where given."""
    times = [[] for _ in cmds]
    outs = [b""] * len(cmds)
    for _ in range(runs):
        for i, cmd in enumerate(cmds):
            t, c, outs[i] = run(cmd)
            times[i].append(t)
            if cpu is not None:
                cpu[i].append(c)
    return times, outs


def ms(seconds):
    return f"{seconds * 1000:.0f} ms"


def vfiod_cmd():
    exe = os.path.join(os.path.dirname(sys.executable), "vfiod")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "vfiod"]


def syscalls(cmd, functions):
    """System calls per function of one run of `cmd` (strace -c -f), as text."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as f:
        subprocess.run(["strace", "-f", "-c", "-o", f.name] + cmd, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        rows = [line.split() for line in f.read().splitlines()]
    total = next((int(r[3]) for r in rows if r and r[-1] == "total"), 0)
    top = sorted(((int(r[3]), r[-1]) for r in rows if len(r) >= 5 and r[3].isdigit() and r[-1] != "total"),
                 reverse=True)[:5]
    return f"{total / functions:.1f} per function (" + ", ".join(f"{n} {name}" for n, name in top) + ")"


def profile_split(roots, runs):
    """In-process: the scan, the model, the JSON, as `vfiod inspect --json` runs them."""
    code = f"""
import json, sys, time
t0 = time.perf_counter()
{IMPORTS}
from vfiod.sysfs import Roots, SysfsReader
from vfiod.topology import Host
from vfiod.report import host_json, findings_json, envelope
from vfiod.pciids import PciIds
t1 = time.perf_counter()
r = SysfsReader(Roots({roots.sysfs!r}, {roots.proc!r}))
a = time.perf_counter(); raws = r.scan(); facts = r.facts()
b = time.perf_counter(); host = Host.from_raw(raws, facts)
c = time.perf_counter(); doc = json.dumps(envelope("groups", groups=host_json(host, PciIds()), findings=findings_json(host)))
d = time.perf_counter()
print(json.dumps([t1 - t0, b - a, c - b, d - c]))
"""
    parts = [json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                       text=True).stdout) for _ in range(runs)]
    med = [statistics.median(p[i] for p in parts) for i in range(4)]
    return (f"in-process medians: imports {ms(med[0])}, sysfs scan {ms(med[1])}, model (groups, "
            f"isolation) {ms(med[2])}, JSON {ms(med[3])}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--sizes", default="64,1024,4096")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    lspci = shutil.which("lspci")
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; trees on {base or tempfile.gettempdir()}; "
          f"{args.runs} alternating runs each, whole processes")
    import vfiod
    cache = os.path.join(os.path.dirname(vfiod.__file__), "__pycache__")
    if not os.path.isdir(cache) or not os.listdir(cache):
        print(f"note: {cache} holds no byte code, so each run compiles vfiod's sources (with "
              "PYTHONDONTWRITEBYTECODE set no import writes it): `python -m compileall vfiod`, as "
              "scripts/setup does, makes the figures the ones an installed vfiod gives")
    floor, _ = alternate([[sys.executable, "-S", "-c", "pass"], [sys.executable, "-c", IMPORTS]], args.runs)
    floor = [sorted(f) for f in floor]
    print(f"interpreter start {ms(statistics.median(floor[0]))}; with inspect's imports "
          f"{ms(statistics.median(floor[1]))} (paid at every size)")
    for n in (int(s) for s in args.sizes.split(",")):
        tmp = tempfile.mkdtemp(prefix="vfiod-bench-scan-", dir=base)
        try:
            spec = farm_for(n)
            roots = build(spec, os.path.join(tmp, "host"))
            vcmd = vfiod_cmd() + ["inspect", "--json", "--sysfs-root", roots.sysfs, "--proc-root", roots.proc]
            cmds = [vcmd]
            if lspci:
                cmds.append([lspci, "-A", "linux-sysfs", "-O", f"sysfs.path={roots.sysfs}/bus/pci", "-vmm"])
            cpu = [[] for _ in cmds]
            times, outs = alternate(cmds, args.runs, cpu)
            groups = json.loads(outs[0])["groups"]
            ndev = sum(len(g["devices"]) for g in groups)
            vmed, vcpu = statistics.median(times[0]), statistics.median(cpu[0])
            line = f"{n:>5} functions: vfiod {ms(vmed)} (best {ms(min(times[0]))}, CPU {ms(vcpu)}; {ndev} devices)"
            if lspci:
                lmed, lcpu = statistics.median(times[1]), statistics.median(cpu[1])
                nl = outs[1].count(b"\nSlot:") + outs[1].startswith(b"Slot:")
                line += (f", lspci {ms(lmed)} (best {ms(min(times[1]))}, CPU {ms(lcpu)}; {nl} devices): "
                         f"ratio {vmed / lmed:.2f}x wall, {vcpu / lcpu:.2f}x CPU "
                         f"(target <= 1.0x: {'met' if vmed <= lmed else 'NOT met'})")
            else:
                line += "; lspci not installed (Debian package pciutils): no ratio"
            print(line, flush=True)
            if args.profile and n == max(int(s) for s in args.sizes.split(",")):
                print("  " + profile_split(roots, args.runs))
                if shutil.which("strace"):
                    print("  vfiod system calls: " + syscalls(vcmd, n))
                    if lspci:
                        print("  lspci system calls: " + syscalls(cmds[1], n))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
