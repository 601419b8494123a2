"""`vfioctl check` answers what `vfioctl lease` would do, in the same words.

Before: `check` said "allowed" for a group the host was using and a lease was then
refused as in use; `check` hid the deciding rule's file:line from a user while a
refused `lease` named it; `lease --xml` with the vfio backend granted the lease, then
failed asking for the XML and released it."""

import os

import pytest

pytestmark = pytest.mark.bus


def test_a_group_in_use_or_leased_is_busy_for_check_as_for_lease(make_world):
    w = make_world()
    with open(os.path.join(w.tree().proc, "net/route"), "a") as f:
        f.write("enp4s0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")
    p = w.ctl("check", "04:00.0", check=False)
    assert p.returncode == 4, p.stdout + p.stderr
    assert p.stdout.startswith("busy: in use on the host: 0000:04:00.0: network interface enp4s0 is up with routes")
    p = w.ctl("lease", "04:00.0", "--", "true", check=False)
    assert p.returncode == 4 and "in use on the host" in p.stderr
    assert w.writes() == []


def test_a_leased_group_is_busy_for_check(make_world):
    w = make_world()
    lease_id = w.ctl("lease", "group:8", "--persistent").stdout.strip()
    p = w.ctl("check", "group:8", "--json", check=False)
    assert p.returncode == 4 and '"busy": true' in p.stdout and "already leased" in p.stdout, p.stdout
    w.ctl("release", lease_id)


def test_a_refused_lease_hides_the_rules_place_from_users_as_check_does(make_world):
    w = make_world()
    p = w.ctl("lease", "group:8", "--duration", "9h", "--", "true", check=False)
    assert p.returncode == 3, p.stderr
    assert "8h" in p.stderr and ".toml:" not in p.stderr, p.stderr
    p = w.ctl("lease", "group:8", "--duration", "9h", "--", "true", check=False, user=None)
    assert p.returncode == 3                     # root's rules do not cover group 8 at all


def test_xml_with_another_backend_is_refused_before_anything_is_granted(make_world):
    w = make_world()
    p = w.ctl("lease", "group:8", "--backend", "vfio", "--xml", "--", "true", check=False)
    assert p.returncode == 2 and "--xml is the libvirt backend's" in p.stderr, p.stderr
    assert w.writes() == [] and "granted" not in w.read_log()
