"""`vfioctl status` / `vfiod inspect --all`: every PCI device by class and driver, with
interfaces, groups and *Active* marks, like dpdk-devbind.py --status, IOMMU or not."""

import json

import attrs

from vfiod.cmd.ctl import main as vfioctl_main
from vfiod.cmd.server import main as vfiod_main
from vfiod.sim import hosts


def test_status_lists_every_device_by_section_and_marks_what_the_host_uses(capsys):
    assert vfioctl_main(["status", "--simulate", "ich10", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["version"], status["kind"]) == (1, "status") and status["iommu"] is True
    by = {d["address"]: d for d in status["devices"]}
    assert len(by) == len(hosts.ICH10.functions)
    assert by["0000:00:19.0"]["active"] and by["0000:00:19.0"]["net"] == ["eno1"]
    assert by["0000:00:1f.2"]["active"] and by["0000:00:1f.2"]["section"] == "Storage devices"
    assert not by["0000:04:00.0"]["active"] and by["0000:04:00.0"]["iommu_group"] == 8
    assert vfioctl_main(["status", "--simulate", "ich10"]) == 0
    text = capsys.readouterr().out
    assert "Network devices using a kernel driver" in text
    line = next(l for l in text.splitlines() if l.startswith("0000:00:19.0"))
    assert "if=eno1" in line and "drv=e1000e" in line and "*Active*" in line
    assert vfiod_main(["inspect", "--all", "--simulate", "ich10"]) == 0
    assert capsys.readouterr().out == text


def test_status_without_an_iommu_says_so_once_and_lists_everything(tmp_path, capsys):
    spec = attrs.evolve(hosts.ICH10, iommu=False)
    roots = hosts.build_spec(spec, str(tmp_path / "h"))
    assert vfioctl_main(["status", "--sysfs-root", roots.sysfs, "--proc-root", roots.proc]) == 0
    text = capsys.readouterr().out
    assert text.count("no IOMMU groups") == 1
    assert "0000:04:00.0" in text and "group=-" in text
