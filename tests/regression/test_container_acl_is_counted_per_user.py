"""ACL entries on /dev/vfio/vfio are counted per user across leases, and only
vfiod's own are removed.

Before, releasing one of two leases of the same user removed the user's entry
on the container, cutting off the other lease; an admin's standing entry for
that user was deleted too."""

import os

from vfiod.sysfs import acl

from tests.sim.leasekit import Caller, Kit

USER = Caller(1000)


def kit_with_private_container(tmp_path):
    kit = Kit(tmp_path, "ich10")
    os.chmod(kit.kernel.vfio_container_path(), 0o600)
    return kit


def perm(kit, uid=1000):
    return acl.user_perm(kit.kernel.vfio_container_path(), uid)


def test_two_leases_of_one_user_share_the_entry(tmp_path):
    kit = kit_with_private_container(tmp_path)
    a = kit.manager.request(USER, "group:8", "vfio", {})
    b = kit.manager.request(USER, "group:4", "vfio", {})
    assert perm(kit) == 6
    kit.manager.release(a.id, USER)
    assert perm(kit) == 6, "the other lease lost its access to the container"
    kit.manager.release(b.id, USER)
    assert perm(kit) is None
    # and in the other order
    a = kit.manager.request(USER, "group:8", "vfio", {})
    b = kit.manager.request(USER, "group:4", "vfio", {})
    kit.manager.release(b.id, USER)
    assert perm(kit) == 6
    kit.manager.release(a.id, USER)
    assert perm(kit) is None


def test_an_admins_standing_entry_stays(tmp_path):
    kit = kit_with_private_container(tmp_path)
    acl.set_user(kit.kernel.vfio_container_path(), 1000, 6)     # the admin's own, before any lease
    lease = kit.manager.request(USER, "group:8", "vfio", {})
    kit.manager.release(lease.id, USER)
    assert perm(kit) == 6


def test_other_users_entries_are_their_own(tmp_path):
    kit = kit_with_private_container(tmp_path)
    a = kit.manager.request(USER, "group:8", "vfio", {})
    b = kit.manager.request(Caller(1001), "group:4", "vfio", {})
    kit.manager.release(a.id, USER)
    assert perm(kit) is None and perm(kit, 1001) == 6
    kit.manager.release(b.id, Caller(1001))
    assert perm(kit, 1001) is None
