"""The guest harness itself: boot the ``all`` topology once and check that the
kernel formed the IOMMU groups the harness documents, that the drivers bound
and that VFIO works inside the guest."""

import json

import pytest

from tests.guest.harness import Guest, GuestTimeout, guest_available

_ok, _why = guest_available()
pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(not _ok, reason=f"guest not available: {_why}"),
]

# One python3 does the survey: every exec costs 0.1-0.4 s under TCG.
SCRIPT = r"""
python3 - <<'EOF'
import json, os
devs = {}
for a in sorted(os.listdir("/sys/bus/pci/devices")):
    d = f"/sys/bus/pci/devices/{a}"
    rd = lambda n: open(f"{d}/{n}").read().strip()
    drv = os.path.join(d, "driver")
    devs[a] = {
        "id": rd("vendor")[2:] + ":" + rd("device")[2:],
        "class": rd("class"),
        "group": os.path.basename(os.readlink(f"{d}/iommu_group")),
        "driver": os.path.basename(os.readlink(drv)) if os.path.islink(drv) else None,
    }
json.dump(devs, open("/out/pci.json", "w"), indent=1)
EOF
mkdir -p $OUT/sub && echo nested > $OUT/sub/file.txt
echo "hello from $(uname -r) as $(id -u) HOME=$HOME"
# rebind the lone e1000e to vfio-pci, the way vfiod will
dev=/sys/bus/pci/devices/0000:01:00.0
echo vfio-pci > $dev/driver_override
echo 0000:01:00.0 > $dev/driver/unbind
echo 0000:01:00.0 > /sys/bus/pci/drivers_probe
echo "rebound to $(basename $(readlink $dev/driver)) group $(basename $(readlink $dev/iommu_group))"
ls /dev/vfio > $OUT/dev-vfio.txt
exit 7
"""


@pytest.fixture(scope="module")
def run():
    return Guest(topology="all").run(SCRIPT, timeout=600)


@pytest.fixture(scope="module")
def pci(run):
    assert "pci.json" in run.files, run.output + run.console
    return json.loads(run.files["pci.json"])


def _members(pci, addr):
    group = pci[addr]["group"]
    return sorted(a for a, d in pci.items() if d["group"] == group)


def test_script_result(run):
    assert run.returncode == 7
    assert "hello from 6." in run.output
    assert " as 0 HOME=/root" in run.output
    assert run.files["sub/file.txt"] == b"nested\n"
    assert "script.sh" not in run.files and "output.txt" not in run.files
    assert run.boot_seconds is not None and run.boot_seconds > 0


def test_rootport_e1000e_alone(pci):
    assert pci["0000:01:00.0"]["id"] == "8086:10d3"
    assert _members(pci, "0000:01:00.0") == ["0000:01:00.0"]
    assert _members(pci, "0000:00:02.0") == ["0000:00:02.0"]


def test_bridge_group(pci):
    assert pci["0000:02:00.0"]["id"] == "1b36:000e"  # pcie-pci-bridge
    assert _members(pci, "0000:03:01.0") == ["0000:02:00.0", "0000:03:01.0", "0000:03:02.0"]
    assert pci["0000:03:01.0"]["driver"] == pci["0000:03:02.0"]["driver"] == "e1000"


def test_multifunction_group(pci):
    assert _members(pci, "0000:04:00.0") == ["0000:04:00.0", "0000:04:00.1"]
    assert pci["0000:04:00.0"]["driver"] == pci["0000:04:00.1"]["driver"] == "e1000e"


def test_switch_groups(pci):
    assert pci["0000:05:00.0"]["id"] == "104c:8232"  # upstream port
    assert _members(pci, "0000:05:00.0") == ["0000:05:00.0"]
    assert _members(pci, "0000:07:00.0") == ["0000:06:00.0", "0000:07:00.0"]
    assert _members(pci, "0000:08:00.0") == ["0000:06:01.0", "0000:08:00.0"]
    assert pci["0000:07:00.0"]["driver"] == "nvme"
    assert pci["0000:08:00.0"]["driver"] == "e1000e"


def test_ich9_group(pci):
    assert _members(pci, "0000:00:1f.0") == ["0000:00:1f.0", "0000:00:1f.2", "0000:00:1f.3"]


def test_root_ports_alone(pci):
    for rp in ("0000:00:02.0", "0000:00:03.0", "0000:00:04.0", "0000:00:05.0"):
        assert pci[rp]["id"] == "1b36:000c"
        assert _members(pci, rp) == [rp]


def test_vfio_bind(run, pci):
    group = pci["0000:01:00.0"]["group"]
    assert f"rebound to vfio-pci group {group}" in run.output
    assert run.files["dev-vfio.txt"].split() == sorted([group.encode(), b"vfio"])


def test_timeout_raises():
    with pytest.raises(GuestTimeout):
        Guest(topology="none").run("sleep 600", timeout=3)
