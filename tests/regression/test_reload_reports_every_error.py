"""`vfioctl reload`: root reloads the policy and is told whether it was taken; a broken
policy is refused with every error of every file, and the policy in force stays."""

import json
import os

from tests.bus.conftest import TEST_USER


def test_reload_is_root_only_and_reports_every_error(make_world):
    w = make_world()
    p = w.ctl("reload", check=False, user=TEST_USER)
    assert p.returncode == 3 and "only root" in p.stderr and "Traceback" not in p.stderr

    p = w.ctl("reload", user=None)
    assert p.returncode == 0 and "in force" in p.stdout

    with open(os.path.join(w.policy_dir, "60-broken.toml"), "w") as f:
        f.write("[[rule]]\nusres = ['x']\ngroup = [8]\n\n[[rule]]\ngroup = [8]\nusers = ['nosuchuser']\n")
    with open(os.path.join(w.policy_dir, "70-broken.toml"), "w") as f:
        f.write("[[rule]]\nbackends = 'vfio'\n")
    p = w.ctl("reload", check=False, user=None)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "keeps the policy it had" in p.stderr
    assert "60-broken.toml:2" in p.stderr and "nosuchuser" in p.stderr and "70-broken.toml" in p.stderr
    assert "Traceback" not in p.stderr

    p = w.ctl("reload", "--json", check=False, user=None)
    doc = json.loads(p.stdout)
    assert p.returncode == 2 and doc["version"] == 1 and doc["kind"] == "reload" and doc["taken"] is False
    assert len(doc["errors"]) >= 3 and all(":" in e for e in doc["errors"])

    # the last good policy still answers, and the daemon said it once per refusal, without a traceback
    assert w.ctl("check", "group:8", check=False).returncode == 0
    log = w.read_log()
    assert "Traceback" not in log and log.count("policy reload by uid 0 refused") == 2
