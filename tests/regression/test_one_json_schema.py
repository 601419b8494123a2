"""One versioned JSON schema: every command that prints data takes --json, and what each
prints validates against docs/json.md (tests/jsondoc.py reads its tables as the schema).

Before, only inspect, groups, show and leases had --json, their group objects differed,
the output was a bare list without a version, and protected/blocker reasons were prose."""

import argparse
import json
import os
import signal
import subprocess
import time

import attrs
import pytest

from tests.bus.conftest import TEST_USER, VENV_BIN
from tests.jsondoc import Schema
from vfiod.sim import hosts

SCHEMA = Schema()


def valid(p, kind, codes=(0,)):
    """The document `p` printed: of `kind`, valid against the doc, exit code in `codes`."""
    assert p.returncode in codes, (p.args, p.returncode, p.stdout, p.stderr)
    doc = json.loads(p.stdout)
    errors = SCHEMA.validate(doc)
    assert not errors, (p.args, errors)
    assert doc["kind"] == kind, (p.args, doc["kind"])
    return doc


def offline(prog, *argv):
    return subprocess.run([os.path.join(VENV_BIN, prog), *argv], capture_output=True, text=True, timeout=120,
                          cwd="/")


def test_every_command_that_prints_data_takes_json():
    from vfiod.cmd.ctl import vfioctl_parser
    from vfiod.cmd.server import vfiod_parser

    def commands(parser, prefix=()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from commands(sub, prefix + (name,))
        yield prefix, parser
    printing_toml = {("policy", "generate")}        # its output is a policy file
    no_data = {(), ("policy",)}                       # they only dispatch
    log_only = {("end-leases",)}                      # it logs what it did (to stderr) and prints no data
    for prog, parser in (("vfioctl", vfioctl_parser()), ("vfiod", vfiod_parser())):
        for name, sub in commands(parser):
            if prog == "vfiod" and name == ():
                continue                              # the daemon itself
            if name in printing_toml or name in no_data or (prog == "vfiod" and name in log_only):
                continue
            options = {o for a in sub._actions for o in a.option_strings}
            assert "--json" in options, (prog, name)


def test_the_doc_is_a_whole_schema():
    """Every object and codes table the doc's types name is documented, and the codes the
    code defines are the ones documented."""
    from vfiod.cmd.monitor import REASONS
    from vfiod.topology import ALIAS, ISOLATED, MULTIFUNCTION, NO_ACS_PORT, PROTECTED_REASONS, UNKNOWN
    assert set(SCHEMA.documents) == SCHEMA.codes["kind"]
    assert set(REASONS) == SCHEMA.codes["lease-end"]
    assert set(PROTECTED_REASONS) | {"other"} == SCHEMA.codes["protected"]
    assert {ISOLATED, ALIAS, MULTIFUNCTION, NO_ACS_PORT, UNKNOWN} == SCHEMA.codes["isolation"]
    errors = []
    for name, fields in list(SCHEMA.objects.items()) + list(SCHEMA.documents.items()):
        for field, (typ, _) in fields.items():
            SCHEMA._check(None, typ, f"{name}.{field}", trial := [])
            errors += [e for e in trial if "unknown type" in e or "no codes table" in e]
    assert not errors, errors


@pytest.mark.parametrize("topology", sorted(hosts.EXAMPLES))
def test_offline_commands_on_every_simulated_host(topology):
    doc = valid(offline("vfiod", "inspect", "--simulate", topology, "--json"), "groups")
    assert doc["groups"] and doc["findings"] == []
    valid(offline("vfiod", "inspect", "--all", "--simulate", topology, "--json"), "status")
    valid(offline("vfioctl", "status", "--simulate", topology, "--json"), "status")


def test_codes_for_protected_devices_blockers_and_findings(tmp_path):
    doc = valid(offline("vfiod", "inspect", "--simulate", "ich10", "--json"), "groups")
    codes = {p["code"] for g in doc["groups"] for p in g["protected"]}
    assert {"default-route", "root-disk"} <= codes
    assert {b["code"] for g in doc["groups"] for b in g["blockers"]} == {"host-driver"}
    roots = hosts.build_spec(attrs.evolve(hosts.ICH10, iommu=False), str(tmp_path / "h"))
    doc = valid(offline("vfiod", "inspect", "--json", "--sysfs-root", roots.sysfs, "--proc-root", roots.proc),
                "groups")
    assert doc["groups"] == [] and [f["code"] for f in doc["findings"]] == ["no-iommu"]
    doc = valid(offline("vfioctl", "status", "--json", "--sysfs-root", roots.sysfs, "--proc-root", roots.proc),
                "status")
    assert doc["iommu"] is False and all(d["iommu_group"] is None for d in doc["devices"])


def test_every_command_against_the_daemon(make_world, tmp_path):
    w = make_world()
    ctl = w.ctl
    # policy check and test, offline, on the daemon's own policy and on a broken one
    valid(offline("vfioctl", "policy", "check", w.policy_dir, "--json"), "policy-check")
    os.chmod(tmp_path, 0o755)
    (tmp_path / "10-bad.toml").write_text("[[rule]]\nusres = ['x']\n\n[[rule]]\ngroup = 'eight'\n")
    doc = valid(offline("vfioctl", "policy", "check", str(tmp_path), "--json"), "policy-check", codes=(2,))
    assert doc["valid"] is False and [e["line"] for e in doc["errors"]] == [2, 5]
    for user, code in ((TEST_USER, 0), ("root", 3)):
        doc = valid(offline("vfioctl", "policy", "test", "--user", user, "--policy-dir", w.policy_dir,
                            "--simulate", "ich10", "group:8", "--json"), "policy-test", codes=(code,))
        assert doc["allowed"] is (code == 0) and (doc["grant"] is None) is (code != 0)

    # the bus commands, as the user and as root
    monitor = subprocess.Popen([os.path.join(VENV_BIN, "vfioctl"), "monitor", "--json", "--bus", w.address],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, user=TEST_USER)
    time.sleep(1.0)
    doc = valid(ctl("groups", "--json"), "groups")
    assert "findings" not in doc and len(doc["groups"]) > 5
    valid(ctl("show", "0000:04:00.0", "--json"), "group")
    doc = valid(ctl("explain", "04:00.0", "--json"), "explain")
    assert doc["group"]["group"] == 8 and "IOMMU group 8" in doc["text"]
    assert valid(ctl("check", "group:8", "--json"), "check")["allowed"] is True
    assert valid(ctl("check", "group:7", "--json", check=False), "check", codes=(3,))["allowed"] is False
    lease = valid(ctl("lease", "group:8", "--persistent", "--json"), "lease")["lease"]
    assert lease["group"] == 8 and lease["user"] == TEST_USER and lease["devices"] == ["0000:04:00.0", "0000:05:00.0"]
    leased = valid(ctl("show", "group:8", "--json"), "group")["group"]
    assert leased["lease"] == lease["id"] and leased["state"] == "leased" and leased["lease_owner"] > 0
    for user in (TEST_USER, None):
        assert [x["id"] for x in valid(ctl("leases", "--json", user=user), "leases")["leases"]] == [lease["id"]]
    assert valid(ctl("release", "group:8", "--json"), "release")["released"] == [lease["id"]]
    assert valid(ctl("reload", "--json", user=None), "reload")["taken"] is True
    time.sleep(1.0)
    monitor.send_signal(signal.SIGINT)
    out, err = monitor.communicate(timeout=20)
    assert monitor.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    for e in events:
        assert not SCHEMA.validate(e), (e, SCHEMA.validate(e))
    assert {"lease-granted", "lease-ended", "changed"} <= {e["event"] for e in events}


def test_vfs_and_hotplug_events_on_the_sriov_host(make_world):
    w = make_world(topology="sriov")
    monitor = subprocess.Popen([os.path.join(VENV_BIN, "vfioctl"), "monitor", "--json", "--bus", w.address],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    doc = valid(w.ctl("vfs", "0000:01:00.0", "2", "--json", user=None), "vfs")
    assert (doc["before"], doc["after"]) == (4, 2)
    time.sleep(1.0)
    monitor.send_signal(signal.SIGTERM)
    out, _ = monitor.communicate(timeout=20)
    events = [json.loads(line) for line in out.splitlines()]
    assert {"added", "removed"} <= {e["event"] for e in events}
    for e in events:
        assert not SCHEMA.validate(e), (e, SCHEMA.validate(e))
