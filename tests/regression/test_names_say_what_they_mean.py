"""Names that said something else: `--persistent` showed as "OUTLIVES CLIENT", a lease
with no end as "TIME LEFT never", `policy generate --group` took a unix group where
`group:N` is an IOMMU group, `revoke` had --wait, --no-wait and --timeout, a 3 s grace
was printed as "2 s to let go", and on a host without systemd every lease logged
"systemd refused StartTransientUnit"."""

import os
import subprocess
import time

import pytest

from tests.bus.conftest import ROOT, VENV_BIN

from tests.bus.test_bus import CLAIM_POLICY

OPEN = CLAIM_POLICY.split("[[claim]]")[0]        # group 8 for the test user, persistent, no duration cap


def vfioctl(*argv):
    return subprocess.run([os.path.join(VENV_BIN, "vfioctl"), *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


@pytest.mark.bus
def test_leases_say_persistent_and_no_limit_and_no_systemd_is_said_once(make_world):
    w = make_world(policy=OPEN)
    for _ in range(2):
        w.ctl("lease", "group:8", "--", "true")
    lease_id = w.ctl("lease", "group:8", "--persistent").stdout.strip()
    p = w.ctl("leases")
    header, row = p.stdout.splitlines()[:2]
    assert "PERSISTENT" in header and "OUTLIVES" not in header
    assert row.startswith(lease_id) and " yes " in row and "no limit" in row and "never" not in row
    p = w.ctl("revoke", lease_id, "--wait", "0", user=None)
    p = w.ctl("revoke", "group:8", "--no-wait", user=None, check=False)
    assert p.returncode == 2
    log = w.read_log()
    assert "systemd refused" not in log
    assert log.count("no systemd on the bus") <= 1


def test_a_grace_just_begun_is_said_in_whole_seconds_rounded_up():
    from vfiod.cmd.ctl import _seconds_left

    assert _seconds_left(time.time() + 3 - 0.02) == 3
    assert _seconds_left(time.time() - 5) == 0


def test_generate_names_a_unix_group_as_such():
    p = vfioctl("policy", "generate", "group:8", "--unix-group", "dpdk", "--simulate")
    assert p.returncode == 0 and 'groups = ["dpdk"]' in p.stdout, p.stderr
    p = vfioctl("policy", "generate", "group:8", "--group", "dpdk", "--simulate")
    assert p.returncode == 2
