"""`vfiod inspect` as a user runs it: the table, --explain, --json (DESIGN §4), bad trees."""

import json
import os
import subprocess
import sys

import attrs
import pytest

from vfiod.sim import hosts
from vfiod.cmd.server import main as vfiod_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args):
    p = subprocess.run([sys.executable, "-m", "vfiod", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    return p.returncode, p.stdout, p.stderr


def test_simulated_ich10_table_reads_like_the_guide():
    rc, out, err = run("inspect", "--simulate", "--explain")
    assert rc == 0, err
    block = out.split("IOMMU group 8")[1].split("IOMMU group")[0]
    assert "not viable" in block and "no-acs-port" in block
    for addr in ("0000:00:1c.0", "0000:00:1c.4", "0000:04:00.0", "0000:05:00.0"):
        assert addr in block
    assert "82574L" in block and "tg3" in block
    assert "unbind 0000:05:00.0 from tg3 or lease it too" in block
    assert "why:" in block
    # --explain tells how each endpoint can be reset (sysfs reset_method); ports are left out
    assert block.count("      reset: bus") == 2
    assert "Traceback" not in err


def test_json_has_the_contract_fields():
    rc, out, _ = run("inspect", "--simulate", "bridge", "--json")
    assert rc == 0
    doc = json.loads(out)
    assert (doc["version"], doc["kind"]) == (1, "groups")
    groups = doc["groups"]
    assert [g["group"] for g in groups] == [0, 1, 2, 3, 4]
    for g in groups:
        assert {"group", "viable", "state", "lease", "blockers", "isolation", "devices"} <= set(g)
        for d in g["devices"]:
            assert {"address", "vendor", "device", "class", "name", "driver", "bridge", "protected"} <= set(d)
    g2 = groups[2]
    assert g2["isolation"] == "alias" and g2["viable"] is False and g2["state"] == "host"
    assert [d["address"] for d in g2["devices"]] == ["0000:01:00.0", "0000:02:01.0", "0000:02:02.0"]
    assert g2["devices"][0]["bridge"] is True and g2["devices"][1]["driver"] == "e1000"
    assert g2["devices"][1]["vendor"] == "8086" and g2["devices"][1]["device"] == "100e"
    assert g2["blockers"][0] == {"device": "0000:02:01.0", "code": "host-driver",
                                 "text": "bound to e1000: unbind 0000:02:01.0 from e1000 or lease it too"}


def test_no_iommu_prints_no_groups_and_exits_0(tmp_path):
    roots = hosts.build_spec(attrs.evolve(hosts.ICH10, iommu=False), str(tmp_path / "h"))
    rc, out, err = run("inspect", "--json", "--sysfs-root", roots.sysfs, "--proc-root", roots.proc)
    assert (rc, json.loads(out)["groups"]) == (0, [])
    assert json.loads(out)["findings"][0]["code"] == "no-iommu"
    assert "intel_iommu=on" in err
    rc, out, _ = run("inspect", "--sysfs-root", roots.sysfs, "--proc-root", roots.proc)
    assert rc == 0 and "No IOMMU groups" in out


def test_a_missing_tree_is_named_and_an_empty_bus_is_no_iommu(tmp_path):
    # A --sysfs-root with no PCI bus is a mistake to name, not a host without an IOMMU.
    rc, out, err = run("inspect", "--json", "--sysfs-root", str(tmp_path / "nothing"),
                       "--proc-root", str(tmp_path / "nothing"))
    assert rc == 1 and out == "" and "no PCI bus here" in err and "Traceback" not in err
    (tmp_path / "sys/bus/pci/devices").mkdir(parents=True)
    rc, out, err = run("inspect", "--json", "--sysfs-root", str(tmp_path / "sys"),
                       "--proc-root", str(tmp_path / "nothing"))
    assert (rc, json.loads(out)["groups"]) == (0, []) and "Traceback" not in err


def test_broken_tree_degrades_fields_without_traceback(tmp_path):
    roots = hosts.build("ich10", str(tmp_path / "h"))
    n = os.path.realpath(os.path.join(roots.sysfs, "bus/pci/devices/0000:05:00.0"))
    os.unlink(os.path.join(n, "config"))
    os.unlink(os.path.join(n, "vendor"))
    os.symlink("../../../devices/gone", os.path.join(roots.sysfs, "bus/pci/devices/0000:09:00.0"))
    rc, out, err = run("inspect", "--sysfs-root", roots.sysfs, "--proc-root", roots.proc, "--explain")
    assert rc == 0 and "Traceback" not in err
    assert "0000:05:00.0" in out and "dangling" in out


def test_unknown_topology_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        vfiod_main(["inspect", "--simulate", "../etc"])
    assert exc.value.code == 2
