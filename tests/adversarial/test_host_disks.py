"""The host's disks, whatever their filesystem and however deep they sit, on the bus.

vfiod on simulated ICH10 hosts whose root disk is btrfs, ZFS or overlay (device
numbers with major 0) and with a USB disk whose mounted partition sits ten levels
below its controller: the root disk's controller is protected, and neither it nor
the USB controller is leased, not even to root without ``force``; a user is refused
by name and nothing is written."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.bus

POLICY = """
[[rule]]
group = [3, 7]
users = ["root", "{user}"]
backends = ["vfio"]
allow_protected = true
address = ["0000:00:1f.0", "0000:00:1f.2", "0000:00:1f.3", "0000:00:1a.0", "0000:00:1a.7"]
"""


@pytest.mark.parametrize("fs", ["btrfs", "zfs", "overlay"])
def test_a_major_zero_root_is_protected_and_in_use(make_world, fs):
    w = make_world(topology=f"ich10+{fs}+usb", policy=POLICY)
    groups = {g["group"]: g for g in json.loads(w.ctl("groups", "--json").stdout)["groups"]}
    sata = next(d for d in groups[7]["devices"] if d["address"] == "0000:00:1f.2")
    assert sata["protected"], sata
    for who in ("vfiotest", None):
        for target, why in (("group:7", "sda1 is mounted on / "), ("group:3", "sdb1 is mounted on /media/usb")):
            p = w.ctl("lease", target, "--", "true", user=who, check=False)
            assert p.returncode != 0, (who, target, p.stdout)
            assert why in p.stderr, p.stderr
    assert w.writes() == []
    assert "Traceback" not in w.read_log()
