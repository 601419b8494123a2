"""`Explain` and `CheckAccess` tell other users' lease ids and uids, and the
policy's file:line, to root only.

Before, any user learnt from `Explain` who held a group (uid, lease id) and
from `CheckAccess` which policy file and line decided: a map of the policy
and of who leases what."""

import json

import pytest

pytestmark = pytest.mark.bus

POLICY = """
[[rule]]
group = [8]
users = ["root", "{user}"]
backends = ["vfio"]
persistent = true
"""


def test_explain_and_check_hide_what_is_not_the_callers(make_world):
    w = make_world(policy=POLICY)
    lease = json.loads(w.ctl("lease", "group:8", "--persistent", "--json", user=None).stdout)
    lease_id = lease.get("id") or lease.get("lease", {}).get("id")
    assert lease_id, lease
    as_user = w.ctl("explain", "group:8").stdout
    assert lease_id not in as_user and "uid 0" not in as_user
    assert "Leased (by another user)" in as_user
    as_root = w.ctl("explain", "group:8", user=None).stdout
    assert lease_id in as_root and "uid 0" in as_root
    check_user = w.ctl("check", "group:8", "--json", check=False)
    assert ".toml:" not in check_user.stdout + check_user.stderr, check_user.stdout
    check_root = w.ctl("check", "group:8", "--json", user=None, check=False)
    assert ".toml:" in check_root.stdout, check_root.stdout
    w.ctl("release", lease_id, user=None)
