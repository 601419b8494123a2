"""Over a real bus, as the real unprivileged user vfiotest: the policy's admin_groups make
a member an admin only while its process carries the group and the user database lists
it; pools lease their first free member and say which, and why none is free."""

import json
import os

from .conftest import TEST_USER

# As an admin of admin_groups: the test user's own group; its process carries it only when
# started with it (subprocess keeps root's groups otherwise).
AS_MEMBER = {"group": TEST_USER, "extra_groups": []}
WITHOUT_GROUP = {"group": "nogroup", "extra_groups": []}

ADMIN_POLICY = """admin_groups = ["{user}", "users"]

[[rule]]
address = "0000:00:1b.0"
users = ["root"]
persistent = true
"""


def _root_lease(world):
    lease_id = world.ctl("lease", "00:1b.0", "--persistent", user=None).stdout.strip()
    assert world.drivers()["0000:00:1b.0"] == "vfio-pci"
    return lease_id


def _lease_ids(world, **groups):
    return [r["id"] for r in json.loads(world.ctl("leases", "--json", **groups).stdout)["leases"]]


def test_a_member_of_admin_groups_reloads_sees_and_revokes_but_gets_no_device(make_world):
    world = make_world(policy=ADMIN_POLICY)
    lease_id = _root_lease(world)
    assert _lease_ids(world, **AS_MEMBER) == [lease_id]
    assert "Leased to uid 0 with the vfio backend" in world.ctl("explain", "00:1b.0", **AS_MEMBER).stdout
    assert world.ctl("reload", **AS_MEMBER).returncode == 0
    assert "policy reloaded by uid" in world.read_log() and f"(admin group {TEST_USER})" in world.read_log()
    # Neither the fds nor a renewal of another's lease: that would be a device the rules did not give.
    p = world.python(
        "import asyncio,os\n"
        "from vfiod.client import Client\n"
        "async def m():\n"
        "  c=await Client(os.environ['VFIOD_BUS']).connect()\n"
        f"  for call in ('OpenGroup', 'OpenContainer'):\n"
        "    try:\n"
        f"      await c.lease_call('/org/vfiod1/lease/{lease_id}', call)\n"
        "      print(call, 'opened')\n"
        "    except Exception as e:\n"
        "      print(call, type(e).__name__)\n"
        "  print((await c.caller_rights()))\n"
        "asyncio.run(m())\n", **AS_MEMBER)
    assert p.stdout.splitlines() == ["OpenGroup PermissionDenied", "OpenContainer PermissionDenied",
                                     f"(True, 'group {TEST_USER}')"], p.stderr
    # Leasing by policy only: no rule names the test user.
    assert world.ctl("lease", "00:1f.2", "--force", check=False, **AS_MEMBER).returncode == 3
    world.ctl("revoke", lease_id, "--reason", "maintenance", **AS_MEMBER)
    assert world.drivers()["0000:00:1b.0"] == "snd_hda_intel"
    assert _lease_ids(world, user=None) == []


def test_the_group_counts_only_while_the_process_carries_it_and_the_database_lists_it(make_world):
    world = make_world(policy=ADMIN_POLICY)
    lease_id = _root_lease(world)
    # The process dropped the group (a sandboxed service, say): no admin.
    # The process carries "users", which the user database does not list vfiotest in
    # (as a login session still carries a group the user was removed from): no admin.
    for groups in (WITHOUT_GROUP, {"group": "nogroup", "extra_groups": ["users"]}):
        p = world.ctl("reload", check=False, **groups)
        assert p.returncode == 3 and "admin_groups" in p.stderr, p.stderr
        assert _lease_ids(world, **groups) == []
        p = world.ctl("revoke", lease_id, check=False, **groups)
        assert p.returncode == 3 and "only root or a member of the policy's admin_groups" in p.stderr
        p = world.ctl("release", lease_id, check=False, **groups)
        assert p.returncode == 3
    assert world.drivers()["0000:00:1b.0"] == "vfio-pci" and _lease_ids(world, user=None) == [lease_id]
    # Without admin_groups in the policy, after a reload, the member is no admin either.
    with open(os.path.join(world.policy_dir, "50-test.toml"), "w") as f:
        f.write(ADMIN_POLICY.split("\n", 1)[1])
    world.ctl("reload", **AS_MEMBER)
    assert world.ctl("reload", check=False, **AS_MEMBER).returncode == 3


POOL_POLICY = """
[[pool]]
name = "vfs"
members = [
    {{ address = "0000:01:10.0", ids = "8086:1515" }},
    {{ address = "0000:01:10.4", ids = "8086:1520" }},
    {{ address = "0000:01:11.0", ids = "8086:1520" }},
]

[[rule]]
pool = "vfs"
users = ["{user}"]
persistent = true
"""


def test_a_pool_is_checked_and_leased_member_by_member(make_world):
    world = make_world(policy=POOL_POLICY, topology="sriov")
    p = world.ctl("check", "pool:vfs")
    assert p.stdout.startswith("allowed: pool vfs: a lease would take member 0000:01:10.4 (IOMMU group 4)")
    first = world.ctl("lease", "pool:vfs", "--persistent")
    assert "(pool member 0000:01:10.4)" in first.stderr
    world.ctl("lease", "pool:vfs", "--persistent")
    rows = json.loads(world.ctl("leases", "--json").stdout)["leases"]
    assert sorted((r["target"], r["member"]) for r in rows) == [("pool:vfs", "0000:01:10.4"),
                                                               ("pool:vfs", "0000:01:11.0")]
    drivers = world.drivers()
    assert drivers["0000:01:10.0"] == "igbvf"          # its card is not the one the policy names
    assert drivers["0000:01:10.4"] == drivers["0000:01:11.0"] == "vfio-pci"
    # None free: check and lease both say why for each member, and nothing changes.
    p = world.ctl("check", "pool:vfs", check=False)
    assert p.returncode == 4 and p.stdout.startswith("busy: pool vfs: no member is free for you: 0000:01:10.0: ")
    assert "card swapped?" in p.stdout and "0000:01:11.0: IOMMU group 5 is already leased" in p.stdout
    p = world.ctl("lease", "pool:vfs", "--persistent", check=False)
    assert p.returncode == 4 and "no member is free for you" in p.stderr and "Traceback" not in p.stderr
    assert world.drivers() == drivers
    # Bad pool targets: a named error, no traceback, nothing changed.
    for target, code in (("pool:gpus", 1), ("pool:../x", 2)):
        p = world.ctl("lease", target, check=False)
        assert p.returncode != 0 and "Traceback" not in p.stderr + world.read_log()
    assert "no pool named 'gpus'" in world.ctl("check", "pool:gpus", check=False).stderr
    assert world.drivers() == drivers
