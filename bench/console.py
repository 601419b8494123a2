#!/usr/bin/env python3
"""The Cockpit page's load-to-interactive time on simulated servers of N PCI functions.

For each size: a private system bus, ``vfiod --simulate server:N`` (the tree on tmpfs
where there is room), ``cockpit-ws --local-session=cockpit-bridge`` serving the page from
this checkout, and headless Chromium over the DevTools protocol (the console test tier's
harness, `tests/console/`). Each round opens the page in a fresh browser context and
waits for it to say it is interactive (every group rendered, the leases listed, the
signals subscribed):

* ``interactive``: the page's own clock, from navigation start to the frame that shows the
  groups, and a task after it (median, min, max of the rounds); target at 4,096 functions:
  <= 2 s. The table draws the first 200 matching groups (more on request, the filters find
  any): drawing all 4,096 rows took the browser 1.5 s of layout, again at every change;
* ``wall``: the same seen from outside, from ``Page.navigate`` to the answer that says so;
* ``GroupsJson``: the one call the groups come from, timed alone (``vfioctl groups --json``
  as a whole process, for comparison);
* ``filter``: typing a search that matches one device: the table drawn again, in the page;
* ``open``: a click on a group row until its detail (with vfiod's Explain) is shown;
* where the load's time goes: when the script started, GroupsJson answered, its JSON was
  parsed, the leases were listed, the table was built.

    .venv/bin/python bench/console.py [--sizes 64,4096] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.bus.conftest import VENV_BIN  # noqa: E402
from tests.console.cdp import Browser, find_chromium  # noqa: E402
from tests.console.conftest import served  # noqa: E402

POLICY = '[[rule]]\nids = ["8086:1889"]\nusers = ["{user}"]\nbackends = ["vfio"]\n'


def spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
            "max": round(max(values), 1)}


def measure(browser: Browser, n: int, rounds: int) -> dict[str, object]:
    t0 = time.perf_counter()
    with served(f"server:{n}", policy=POLICY) as world:
        started = time.perf_counter() - t0
        console = world.consoles["root"]
        functions = len(world.drivers())
        t = time.perf_counter()
        subprocess.run([os.path.join(VENV_BIN, "vfioctl"), "groups", "--json", "--bus", world.address],
                       check=True, capture_output=True)
        cli = (time.perf_counter() - t) * 1000
        interactive, wall, groups_json, filtering, opening = [], [], [], [], []
        drawn, shown = 0, ""
        parts: dict[str, list[float]] = {}
        for _ in range(rounds):
            browser.new_tab()
            t = time.perf_counter()
            browser.navigate(console.url)
            ready = browser.wait_for("document.body && document.body.dataset.ready", timeout=120)
            wall.append((time.perf_counter() - t) * 1000)
            if ready == "failed":
                raise RuntimeError(browser.evaluate("document.getElementById('problem').textContent"))
            interactive.append(float(ready))
            marks = browser.evaluate("window.vfiodTiming")
            for key in ("started", "answered", "parsed", "leases", "rendered"):
                parts.setdefault(key, []).append(marks[key])
            drawn = browser.evaluate("document.querySelectorAll('#groups tbody tr.group').length")
            shown = browser.evaluate("document.getElementById('groups-count').textContent")
            groups_json.append(browser.evaluate(
                "(async () => { const t = performance.now();"
                " await cockpit.dbus('org.vfiod1', {bus: 'system'}).call('/org/vfiod1', 'org.vfiod1.Manager',"
                " 'GroupsJson', [[]], {type: 'as'}); return performance.now() - t; })()"))
            filtering.append(browser.evaluate(
                "(() => { const i = document.getElementById('text-filter'); const t = performance.now();"
                " i.value = '0000:00:00.0'; i.dispatchEvent(new Event('input'));"
                " const d = performance.now() - t; i.value = ''; i.dispatchEvent(new Event('input')); return d; })()"))
            first = browser.evaluate("document.querySelector('#groups tbody tr.group').dataset.group")
            t = time.perf_counter()
            browser.click(f'tr.group[data-group="{first}"]')
            browser.wait_for(f"(() => {{ const p = document.querySelector('tr[data-detail=\"{first}\"] pre.explain');"
                             " return p && !p.textContent.includes('Asking vfiod'); })()")
            opening.append((time.perf_counter() - t) * 1000)
        return {"functions": functions, "rows_drawn": drawn, "table_says": shown, "vfiod_up_s": round(started, 1),
                "interactive_ms": spread(interactive), "wall_ms": spread(wall),
                "groups_json_call_ms": spread(groups_json), "vfioctl_groups_json_ms": round(cli),
                "filter_ms": spread(filtering), "open_detail_ms": spread(opening),
                "load_marks_ms": {k: round(statistics.median(v)) for k, v in parts.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,4096")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    binary = find_chromium()
    if not binary:
        print("no Chromium (chromium-headless-shell or chromium): run scripts/setup", file=sys.stderr)
        return 1
    browser = Browser(binary)
    results = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            results.append(measure(browser, n, args.rounds))
            if not args.json:
                r = results[-1]
                print(f"server:{n}: {r['functions']} functions; the table: {r['table_says']} "
                      f"(vfiod up in {r['vfiod_up_s']} s, its simulated tree laid out included)")
                for key in ("interactive_ms", "wall_ms", "groups_json_call_ms", "filter_ms", "open_detail_ms"):
                    s = r[key]
                    print(f"  {key:22} median {s['median']:7.1f}   min {s['min']:7.1f}   max {s['max']:7.1f}")
                print(f"  {'vfioctl groups --json':22} {r['vfioctl_groups_json_ms']} ms (whole process)")
                marks = r["load_marks_ms"]
                print(f"  the load, medians in ms from navigation start: script running {marks['started']}, "
                      f"GroupsJson answered {marks['answered']}, parsed {marks['parsed']}, leases listed "
                      f"{marks['leases']}, table built {marks['rendered']}, drawn and answering "
                      f"{r['interactive_ms']['median']:.0f}")
    finally:
        browser.close()
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
