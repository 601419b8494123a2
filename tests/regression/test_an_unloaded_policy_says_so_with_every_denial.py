"""The shipped example copied unedited names the unix group dpdk, which a stock host does
not have: the policy was refused at start and every request, root's included, was denied
as "no rule matched (deny by default)"; only the log said the policy was not loaded.  The
README's own `policy test --user bob ...` examples failed with "no user named 'bob'".

Now every denial says the policy is not loaded and how to see why; the loader names the
command that creates a missing group; and with --simulate the policy commands know the
simulated hosts' people (alice, bob, dpdk-svc, the dpdk group), so the examples run."""

import os
import subprocess

import pytest

from tests.bus.conftest import ROOT, VENV_BIN

EXAMPLE = open(os.path.join(ROOT, "policy", "10-dpdk-nics.toml")).read().replace("{", "{{").replace("}", "}}")


@pytest.mark.bus
def test_every_denial_says_the_policy_is_not_loaded(make_world):
    w = make_world(policy=EXAMPLE.replace('"dpdk"', '"no-such-group-x"'))
    for user in (None, "vfiotest"):
        p = w.ctl("check", "group:8", user=user, check=False)
        assert p.returncode == 3, p.stdout + p.stderr
        assert "policy is not loaded" in p.stdout and "vfioctl reload" in p.stdout, p.stdout
        p = w.ctl("lease", "group:8", "--", "true", user=user, check=False)
        assert p.returncode == 3 and "policy is not loaded" in p.stderr, p.stderr
    assert "no group named 'no-such-group-x'" in w.read_log() and "groupadd --system" in w.read_log()
    assert w.writes() == []


def vfioctl(*argv):
    return subprocess.run([os.path.join(VENV_BIN, "vfioctl"), *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_the_examples_check_and_test_on_a_simulated_host():
    p = vfioctl("policy", "check", "--simulate", "--policy-dir", "policy")
    assert p.returncode == 0 and p.stdout.rstrip().endswith("The policy is valid."), p.stderr
    p = vfioctl("policy", "test", "--user", "dpdk-svc", "--simulate", "ich10", "--policy-dir", "policy", "group:8")
    assert p.returncode == 0 and "ALLOWED by rule policy/10-dpdk-nics.toml:11" in p.stdout, p.stderr
    p = vfioctl("policy", "test", "--user", "bob", "--simulate", "ich10", "--policy-dir", "policy/", "group:8")
    assert p.returncode == 3 and "DENIED" in p.stdout, p.stderr
    p = vfioctl("policy", "test", "--user", "alice", "--simulate", "gpu", "--policy-dir", "policy", "name:gpu")
    assert p.returncode == 0, p.stdout + p.stderr


def test_a_missing_group_is_named_with_the_command_that_creates_it(tmp_path):
    (tmp_path / "10.toml").write_text(EXAMPLE.replace('"dpdk"', '"no-such-group-x"'))
    os.chmod(tmp_path, 0o755)
    p = vfioctl("policy", "check", str(tmp_path))
    assert p.returncode == 2
    assert "no group named 'no-such-group-x' on this system (a typo? or create it: groupadd --system " \
           "no-such-group-x)" in p.stderr
    p = vfioctl("policy", "check", "--policy-dir", str(tmp_path))      # as `policy test` takes it
    assert p.returncode == 2 and "no-such-group-x" in p.stderr
