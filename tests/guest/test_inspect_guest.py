"""`vfiod inspect` against a real kernel: one boot of the ``all`` topology.

Inside the guest, one python3 process (the project's venv) does everything,
because every python start costs 1-2.5 s under TCG:

* stage ``baseline``: the kernel's own view (``/sys/kernel/iommu_groups/*/devices/*``
  and every device's ``driver`` link), the real ``vfiod inspect --json``
  command, and the same report built in-process (``Host.scan`` + ``host_json``);
* stage ``one_bound``: 0000:04:00.0 moved to vfio-pci by hand (driver_override,
  unbind, drivers_probe), 0000:04:00.1 left on e1000e; the kernel's view, the
  kernel's VFIO_GROUP_GET_STATUS flags for the group, and the in-process report;
* stage ``both_bound``: 0000:04:00.1 moved too; the same three again.

The tests then hold vfiod's report against the kernel's answers: the groups,
members and drivers, the isolation causes, and viability versus the
``VFIO_GROUP_STATUS_VIABLE`` flag.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.guest.harness import Guest, guest_available

_ok, _why = guest_available()
pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(not _ok, reason=f"guest not available: {_why}"),
]

MF0, MF1 = "0000:04:00.0", "0000:04:00.1"
STAGES = ("baseline", "one_bound", "both_bound")

GUEST_PY = r'''
import fcntl, json, os, struct, subprocess, sys, time, traceback
t_start = time.monotonic()
sys.path.insert(0, os.environ["VFIOD_CHECKOUT"])
from vfiod.pciids import PciIds
from vfiod.report import host_json
from vfiod.sysfs import SysfsReader
from vfiod.topology import Host

OUT = os.environ.get("OUT", "/out")
VFIO_GROUP_GET_STATUS = 0x3B67          # _IO(';', VFIO_BASE + 3)
MF0, MF1 = "0000:04:00.0", "0000:04:00.1"
res = {"stages": {}, "timings": {"imports": time.monotonic() - t_start}}
names = PciIds()


def kernel():
    """The kernel's grouping and drivers, straight from sysfs."""
    groups = {}
    for g in os.listdir("/sys/kernel/iommu_groups"):
        groups[g] = sorted(os.listdir(f"/sys/kernel/iommu_groups/{g}/devices"))
    drivers = {}
    for a in sorted(os.listdir("/sys/bus/pci/devices")):
        link = f"/sys/bus/pci/devices/{a}/driver"
        drivers[a] = os.path.basename(os.readlink(link)) if os.path.islink(link) else None
    return {"groups": groups, "drivers": drivers}


def inspect():
    host = Host.scan(SysfsReader())
    facts = {}
    for a, d in host.devices.items():
        c = d.raw.config
        facts[str(a)] = {
            "parent": str(d.raw.parent) if d.raw.parent else None,
            "header_type": c.header_type, "multifunction": c.multifunction,
            "pcie_type": c.pcie_type, "acs_cap": c.acs_cap, "acs_ctrl": c.acs_ctrl,
            "known": c.known, "ext_known": c.ext_known, "config_len": c.length,
        }
    return host_json(host, names), facts


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def bind_vfio(addr):
    d = f"/sys/bus/pci/devices/{addr}"
    write(f"{d}/driver_override", "vfio-pci")
    if os.path.islink(f"{d}/driver"):
        write(f"{d}/driver/unbind", addr)
    write("/sys/bus/pci/drivers_probe", addr)


def group_status(n):
    """The kernel's VFIO_GROUP_GET_STATUS flags for group n (bit 0: viable)."""
    path = f"/dev/vfio/{n}"
    for _ in range(100):
        if os.path.exists(path):
            break
        time.sleep(0.05)
    fd = os.open(path, os.O_RDWR)
    try:
        argsz, flags = struct.unpack("II", fcntl.ioctl(fd, VFIO_GROUP_GET_STATUS, struct.pack("II", 8, 0)))
    finally:
        os.close(fd)
    return flags


def stage(name, flags_of=None):
    t = time.monotonic()
    s = res["stages"][name] = {}
    s["kernel"] = kernel()
    if flags_of is not None:
        s["vfio_flags"] = group_status(flags_of)
    s["inspect"], s["config"] = inspect()
    s["kernel_after"] = kernel()    # nothing moved while vfiod read
    res["timings"][name] = time.monotonic() - t


try:
    t = time.monotonic()
    cmd = subprocess.run([os.environ["VFIOD_CHECKOUT"] + "/.venv/bin/vfiod", "inspect", "--json"], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=120)
    res["command"] = {"rc": cmd.returncode, "stdout": cmd.stdout, "stderr": cmd.stderr}
    res["timings"]["command"] = time.monotonic() - t
    stage("baseline")
    group = int(os.path.basename(os.readlink(f"/sys/bus/pci/devices/{MF0}/iommu_group")))
    res["mf_group"] = group

    t = time.monotonic()
    bind_vfio(MF0)
    res["timings"]["bind_one"] = time.monotonic() - t
    stage("one_bound", group)

    t = time.monotonic()
    bind_vfio(MF1)
    res["timings"]["bind_two"] = time.monotonic() - t
    stage("both_bound", group)
except BaseException:
    res["error"] = traceback.format_exc()
finally:
    res["timings"]["total"] = time.monotonic() - t_start
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(res, f)
'''

SCRIPT = f"""cd $VFIOD_CHECKOUT
$VFIOD_CHECKOUT/.venv/bin/python - <<'EOF'
{GUEST_PY}
EOF
"""


@pytest.fixture(scope="module")
def run():
    t = time.monotonic()
    res = Guest(topology="all").run(SCRIPT, timeout=600)
    wall = time.monotonic() - t
    print(f"\n[guest inspect] run {wall:.1f} s (harness wall {res.wall_seconds:.1f} s, "
          f"boot-to-script {res.boot_seconds} s)")
    return res


@pytest.fixture(scope="module")
def data(run):
    assert run.returncode == 0, run.output + run.console[-3000:]
    assert "results.json" in run.files, run.output + run.console[-3000:]
    d = json.loads(run.files["results.json"])
    assert "error" not in d, d["error"]
    print("[guest inspect] in-guest seconds: "
          + ", ".join(f"{k} {v:.2f}" for k, v in d["timings"].items()))
    return d


def _by_addr(groups: list[dict]) -> dict[str, dict]:
    """Each device address -> the vfiod group that holds it."""
    return {dev["address"]: g for g in groups for dev in g["devices"]}


def _kernel_view(k: dict) -> tuple[dict, dict]:
    groups = {int(n): sorted(m) for n, m in k["groups"].items()}
    in_groups = {a for m in groups.values() for a in m}
    drivers = {a: drv for a, drv in k["drivers"].items() if a in in_groups}
    return groups, drivers


def _vfiod_view(inspect: list[dict]) -> tuple[dict, dict]:
    groups = {g["group"]: sorted(d["address"] for d in g["devices"]) for g in inspect}
    drivers = {d["address"]: d["driver"] for g in inspect for d in g["devices"]}
    return groups, drivers


# ------------------------------------------------------------------ 1. groups and drivers

def test_real_command_matches_in_process(data):
    """The real `vfiod inspect --json` ran and says what the in-process scan says."""
    cmd = data["command"]
    assert cmd["rc"] == 0, cmd["stderr"]
    assert json.loads(cmd["stdout"])["groups"] == data["stages"]["baseline"]["inspect"]


@pytest.mark.parametrize("stage", STAGES)
def test_groups_and_drivers_match_kernel(data, stage):
    s = data["stages"][stage]
    assert s["kernel"] == s["kernel_after"], "the guest changed while vfiod read it"
    k_groups, k_drivers = _kernel_view(s["kernel"])
    v_groups, v_drivers = _vfiod_view(s["inspect"])
    assert sorted(v_groups) == sorted(k_groups)
    assert v_groups == k_groups
    assert v_drivers == k_drivers
    # every PCI function is in some group, so nothing is missing from inspect either
    assert sorted(v_drivers) == sorted(s["kernel"]["drivers"])
    # one entry per group, in group order
    numbers = [g["group"] for g in s["inspect"]]
    assert numbers == sorted(set(numbers))


def test_real_command_matches_kernel(data):
    k_groups, k_drivers = _kernel_view(data["stages"]["baseline"]["kernel"])
    v_groups, v_drivers = _vfiod_view(json.loads(data["command"]["stdout"])["groups"])
    assert (v_groups, v_drivers) == (k_groups, k_drivers)


def test_expected_topology(data):
    """The guest is the topology the harness documents (guards the checks below)."""
    k_groups, k_drivers = _kernel_view(data["stages"]["baseline"]["kernel"])
    sets = sorted(k_groups.values())
    for members in (["0000:01:00.0"],
                    ["0000:02:00.0", "0000:03:01.0", "0000:03:02.0"],
                    [MF0, MF1],
                    ["0000:05:00.0"],
                    ["0000:06:00.0", "0000:07:00.0"],
                    ["0000:06:01.0", "0000:08:00.0"],
                    ["0000:00:1f.0", "0000:00:1f.2", "0000:00:1f.3"]):
        assert members in sets
    assert k_drivers[MF0] == k_drivers[MF1] == "e1000e"


# ------------------------------------------------------------------ 2. isolation

EXPECTED_ISOLATION = {
    "0000:00:00.0": "isolated",          # q35 host bridge
    "0000:00:02.0": "isolated",          # root ports (QEMU's have ACS)
    "0000:00:03.0": "isolated",
    "0000:00:04.0": "isolated",
    "0000:00:05.0": "isolated",
    "0000:00:1a.0": "isolated",          # virtio-9p
    "0000:00:1b.0": "isolated",
    "0000:01:00.0": "isolated",          # the lone e1000e
    "0000:02:00.0": "alias",             # pcie-pci-bridge + two e1000
    MF0: "multifunction",                # e1000e function pair
    "0000:05:00.0": "isolated",          # switch upstream port
    "0000:06:00.0": "no-acs-port",       # downstream port + nvme
    "0000:06:01.0": "no-acs-port",       # downstream port + e1000e
    "0000:00:1f.0": "multifunction",     # ICH9 LPC/AHCI/SMBus
}


def _describe(g: dict, config: dict) -> str:
    facts = {d["address"]: config.get(d["address"]) for d in g["devices"]}
    return (f"group {g['group']} {[d['address'] for d in g['devices']]}: "
            f"{g['isolation']}: {g['isolation_text']}\nconfig facts: {json.dumps(facts, indent=1)}")


@pytest.mark.parametrize("stage", STAGES)
def test_no_group_unknown(data, stage):
    """vfiod's recomputed partition equals the kernel's: no group is `unknown`."""
    s = data["stages"][stage]
    bad = [_describe(g, s["config"]) for g in s["inspect"] if g["isolation"] == "unknown"]
    assert not bad, "\n\n".join(bad)


@pytest.mark.parametrize("addr,cause", sorted(EXPECTED_ISOLATION.items()))
def test_isolation_cause(data, addr, cause):
    s = data["stages"]["baseline"]
    g = _by_addr(s["inspect"])[addr]
    assert g["isolation"] == cause, _describe(g, s["config"])


def test_isolation_does_not_depend_on_drivers(data):
    """Rebinding to vfio-pci changes drivers, never the isolation verdicts."""
    base = {g["group"]: (g["isolation"], g["isolation_text"]) for g in data["stages"]["baseline"]["inspect"]}
    for stage in STAGES[1:]:
        now = {g["group"]: (g["isolation"], g["isolation_text"]) for g in data["stages"][stage]["inspect"]}
        assert now == base, stage


# ------------------------------------------------------------------ 3. viability vs the kernel

def _mf_group(data, stage):
    g = _by_addr(data["stages"][stage]["inspect"])[MF0]
    assert g["group"] == data["mf_group"]
    assert sorted(d["address"] for d in g["devices"]) == [MF0, MF1]
    return g


def test_baseline_mf_group_not_viable(data):
    g = _mf_group(data, "baseline")
    assert g["viable"] is False and g["state"] == "host"
    assert sorted(b["device"] for b in g["blockers"]) == [MF0, MF1]


def test_one_bound_kernel_and_vfiod_say_not_viable(data):
    s = data["stages"]["one_bound"]
    assert s["kernel"]["drivers"][MF0] == "vfio-pci"
    assert s["kernel"]["drivers"][MF1] == "e1000e"
    assert s["vfio_flags"] & 1 == 0, f"kernel VFIO_GROUP_GET_STATUS flags {s['vfio_flags']:#x}"
    g = _mf_group(data, "one_bound")
    assert g["viable"] is False
    assert g["state"] == "host"
    assert [b["device"] for b in g["blockers"]] == [MF1]
    assert "e1000e" in g["blockers"][0]["text"]
    devs = {d["address"]: d for d in g["devices"]}
    assert devs[MF0]["driver"] == "vfio-pci" and devs[MF0]["driver_override"] == "vfio-pci"
    assert devs[MF1]["driver"] == "e1000e"


def test_both_bound_kernel_and_vfiod_say_viable(data):
    s = data["stages"]["both_bound"]
    assert s["kernel"]["drivers"][MF0] == s["kernel"]["drivers"][MF1] == "vfio-pci"
    assert s["vfio_flags"] == 1, f"kernel VFIO_GROUP_GET_STATUS flags {s['vfio_flags']:#x}"
    g = _mf_group(data, "both_bound")
    assert g["viable"] is True
    assert g["state"] == "parked"
    assert g["blockers"] == []


@pytest.mark.parametrize("stage", STAGES[1:])
def test_viability_equals_kernel_flag(data, stage):
    s = data["stages"][stage]
    g = _mf_group(data, stage)
    assert g["viable"] == bool(s["vfio_flags"] & 1)


def test_other_groups_untouched_by_rebinding(data):
    """Only the multifunction group changed between stages."""
    def rest(stage):
        return [g for g in data["stages"][stage]["inspect"] if g["group"] != data["mf_group"]]
    assert rest("baseline") == rest("one_bound") == rest("both_bound")
