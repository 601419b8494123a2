"""Policy files, and every directory above them, must be root's and written by root alone.

Before, only the other-write bit was checked: a policy file owned by a user, a
group-writable file, a symlink to a user-owned file, a user-owned policy.d and
a world-writable parent directory were all accepted, so their owners could
grant themselves devices.  Now each is refused by name; tests that lay out
their own files pass their uid through the explicit `owners` parameter."""

import os
import pwd

import pytest

from vfiod.errors import PolicyError
from vfiod.policy import Policy, StaticUserDb

ALLOW = '[[rule]]\ngroup = 8\nusers = ["alice"]\nbackends = ["vfio"]\n'
USERS = StaticUserDb(users={"alice": 1000, "root": 0}, groups={})
NOBODY = pwd.getpwnam("nobody").pw_uid


@pytest.fixture
def tree(tmp_path):
    base = tmp_path / "etc"
    d = base / "vfiod" / "policy.d"
    d.mkdir(parents=True)
    (d / "10-a.toml").write_text(ALLOW)
    for p in (tmp_path, base, base / "vfiod", d):
        os.chmod(p, 0o755)
    os.chmod(d / "10-a.toml", 0o644)
    assert Policy.load(str(d), users=USERS).rules
    return d


def refused(d, match, **kw):
    with pytest.raises(PolicyError, match=match):
        Policy.load(str(d), users=USERS, **kw)


def test_a_file_owned_by_a_user_is_refused(tree):
    os.chown(tree / "10-a.toml", NOBODY, -1)
    refused(tree, rf"10-a.toml: owned by uid {NOBODY}, not root")


def test_a_group_writable_file_is_refused(tree):
    os.chmod(tree / "10-a.toml", 0o664)
    refused(tree, r"10-a.toml: writable by its group \(mode 0664\)")


def test_a_symlink_is_not_followed(tree, tmp_path):
    target = tmp_path / "mine.toml"
    target.write_text(ALLOW)
    os.chown(target, NOBODY, -1)
    os.rename(tree / "10-a.toml", tmp_path / "old.toml")
    os.symlink(target, tree / "10-a.toml")
    refused(tree, r"10-a.toml: a symbolic link")


def test_a_user_owned_policy_directory_is_refused(tree):
    os.chown(tree, NOBODY, -1)
    refused(tree, rf"policy.d: owned by uid {NOBODY}")


def test_a_world_writable_parent_is_refused(tree):
    os.chmod(tree.parent, 0o777)
    refused(tree, r"vfiod: writable by anyone \(mode 0777\)")
    os.chmod(tree.parent, 0o1777)          # sticky, as /tmp: nobody may swap what root owns
    assert Policy.load(str(tree), users=USERS).rules


def test_a_user_owned_parent_is_refused(tree):
    os.chown(tree.parent, NOBODY, -1)
    refused(tree, rf"vfiod: owned by uid {NOBODY}")


def test_a_symlinked_directory_is_refused(tree, tmp_path):
    os.symlink(tree, tmp_path / "link.d")
    refused(tmp_path / "link.d", r"link.d: a symbolic link")


def test_owners_are_explicit(tree):
    os.chown(tree / "10-a.toml", NOBODY, -1)
    assert Policy.load(str(tree), users=USERS, owners=(0, NOBODY)).rules
