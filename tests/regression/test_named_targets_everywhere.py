"""`name:RESOURCE` targets work through the daemon, the CLI and boot claims.

They used to fail over the bus with an internal error (`'Resource' object has
no attribute 'addresses'` in the lease manager), `vfioctl show name:X` said
"not a PCI address", and a `[[claim]]` of a `name:` target crashed the daemon
at start."""

import json

import pytest

pytestmark = pytest.mark.bus

NICS = """
[[resource]]
name = "nics"
devices = [
    {{ address = "0000:04:00.0", ids = "8086:10d3", subsystem = "8086:a01f" }},
    {{ address = "0000:05:00.0", ids = "14e4:167b" }},
]

[[rule]]
resource = "nics"
users = ["{user}"]
backends = ["vfio", "pci-stub"]
persistent = true
"""

CLAIMS = NICS + """
[[claim]]
target = "name:nics"
user = "{user}"
backend = "pci-stub"

[[claim]]
target = "group:99"
user = "{user}"
"""


def test_check_explain_show_and_lease_by_name_over_the_bus(make_world):
    w = make_world(policy=NICS)
    p = w.ctl("check", "name:nics", check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("allowed")
    text = w.ctl("explain", "name:nics").stdout
    assert "IOMMU group 8" in text and "0000:05:00.0" in text
    shown = json.loads(w.ctl("show", "name:nics", "--json").stdout)["group"]
    assert shown["group"] == 8
    assert [d["address"] for d in shown["devices"]][-2:] == ["0000:04:00.0", "0000:05:00.0"]
    p = w.ctl("lease", "name:nics", "--backend", "pci-stub", "--", "true", check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert w.drivers()["0000:04:00.0"] == "e1000e" and w.drivers()["0000:05:00.0"] == "tg3"
    assert "Traceback" not in w.read_log() and "internal error" not in w.read_log()


def test_a_claim_of_a_named_resource_is_applied_and_a_bad_claim_is_skipped(make_world):
    w = make_world(policy=CLAIMS)
    drivers = w.drivers()
    assert drivers["0000:04:00.0"] == "pci-stub" and drivers["0000:05:00.0"] == "pci-stub"
    leases = json.loads(w.ctl("leases", "--json", user=None).stdout)["leases"]
    assert [l["group"] for l in leases] == [8]
    log = w.read_log()
    assert "claim group:99" in log and "not applied" in log
    assert "Traceback" not in log
