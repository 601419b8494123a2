#!/usr/bin/env python3
"""Scan speed: a full `vfiod inspect --json` process against `lspci -vmm` on one fake tree.

Builds a tree of 4096 functions (16 root ports, each with a PF and 254 VFs),
then times, in one run, whole processes of both tools reading it (best and
median of N runs) and prints both and their ratio.  Target: vfiod under
250 ms and no slower than lspci.

    .venv/bin/python bench/scan.py [--runs 7] [--root-ports 16] [--vfs 254]
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vfiod.sim.hosts import sriov_farm  # noqa: E402
from vfiod.sim.hosts.builder import build  # noqa: E402


def time_cmd(cmd, runs):
    times = []
    out = b""
    for _ in range(runs):
        t0 = time.perf_counter()
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE).stdout
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--root-ports", type=int, default=16)
    ap.add_argument("--vfs", type=int, default=254)
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="vfiod-bench-scan-")
    try:
        spec = sriov_farm(args.root_ports, args.vfs)
        t0 = time.perf_counter()
        roots = build(spec, os.path.join(tmp, "host"))
        print(f"tree: {len(spec.functions)} functions, built in {time.perf_counter() - t0:.1f} s")

        vfiod = [os.path.join(os.path.dirname(sys.executable), "vfiod")]
        if not os.path.exists(vfiod[0]):
            vfiod = [sys.executable, "-m", "vfiod"]
        vcmd = vfiod + ["inspect", "--json", "--sysfs-root", roots.sysfs, "--proc-root", roots.proc]
        vbest, vmed, vout = time_cmd(vcmd, args.runs)
        groups = json.loads(vout)["groups"]
        ndev = sum(len(g["devices"]) for g in groups)
        print(f"vfiod inspect --json: best {vbest * 1000:.0f} ms, median {vmed * 1000:.0f} ms "
              f"({len(groups)} groups, {ndev} devices)")

        lspci = shutil.which("lspci")
        if not lspci:
            print("lspci: not installed (Debian package pciutils); no ratio")
            return 0
        lcmd = [lspci, "-A", "linux-sysfs", "-O", f"sysfs.path={roots.sysfs}/bus/pci", "-vmm"]
        lbest, lmed, lout = time_cmd(lcmd, args.runs)
        nl = lout.count(b"\nSlot:") + lout.startswith(b"Slot:")
        print(f"lspci -vmm:           best {lbest * 1000:.0f} ms, median {lmed * 1000:.0f} ms ({nl} devices)")
        print(f"ratio vfiod/lspci (median): {vmed / lmed:.2f}")
        target = vmed < 0.250 and vmed <= lmed
        print(f"target (< 250 ms and no slower than lspci): {'met' if target else 'NOT met'}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
