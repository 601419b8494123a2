"""A reload that narrows the policy says which leases it revokes, can be tried first
(`vfioctl reload --dry-run`), and its audit records name who reloaded.

Before: "The new policy is in force." and nothing else; no dry run; the audit rows of a
reload's revokes and caps said uid=None.  Now they name the uid that reloaded (0 for
root and SIGHUP); the steps vfiod takes on its own afterwards say uid=-."""

import os
import re

import pytest

from tests.bus.conftest import POLICY

pytestmark = pytest.mark.bus


def test_reload_lists_the_leases_it_revokes_and_a_dry_run_changes_nothing(make_world):
    w = make_world()
    lease_id = w.ctl("lease", "group:8", "--persistent").stdout.strip()
    narrowed = POLICY.split("[[rule]]")[2].format(user="vfiotest")       # only root's rule is left
    with open(os.path.join(w.policy_dir, "50-test.toml"), "w") as f:
        f.write("[[rule]]" + narrowed)
    p = w.ctl("reload", "--dry-run", user=None)
    assert "nothing was changed" in p.stdout and "It would revoke 1 lease" in p.stdout, p.stdout
    assert f"  {lease_id}  vfiotest: " in p.stdout and "no rule matched" in p.stdout
    assert lease_id in w.ctl("leases", user=None).stdout                 # still there
    assert w.drivers()["0000:04:00.0"] == "vfio-pci"
    p = w.ctl("reload", "--dry-run", check=False)
    assert p.returncode == 3                                             # root only
    p = w.ctl("reload", user=None)
    assert "The new policy is in force." in p.stdout and "It revokes 1 lease" in p.stdout, p.stdout
    assert lease_id in p.stdout
    log = w.read_log()
    assert re.search(rf"revoke uid=0 target='group:8' lease={lease_id} .*outcome=revoking", log), log[-3000:]
    assert "uid=None" not in log
    assert "1 files" not in log and "1 file, 1 rule" in log


def test_a_dry_run_of_a_broken_policy_lists_every_error(make_world):
    w = make_world()
    with open(os.path.join(w.policy_dir, "60-bad.toml"), "w") as f:
        f.write('[[rule]]\nidz = "8086:*"\nusers = ["root"]\nbacknds = ["vfio"]\n')
    p = w.ctl("reload", "--dry-run", "--json", user=None, check=False)
    assert p.returncode == 2 and '"dry_run": true' in p.stdout
    assert "key 'idz'" in p.stdout and "key 'backnds'" in p.stdout
