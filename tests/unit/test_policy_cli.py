"""`vfioctl policy check` and `vfioctl policy test`, run in-process (no daemon, no bus)."""

import os
import shutil

import pytest

from vfiod import policy
from vfiod.cmd.ctl import main as vfioctl_main

from .policy_corpus.kit import BAD, EXAMPLES, ROOT, USERS


@pytest.fixture(autouse=True)
def users(monkeypatch):
    """The example policies name alice, bob, dpdk-svc and the group dpdk: use the test database."""
    monkeypatch.setattr(policy, "system_users", lambda: USERS)
    monkeypatch.chdir(ROOT)


def run(capsys, *argv):
    code = vfioctl_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- check

def test_check_lists_rules_resources_and_claims_with_where_they_come_from(capsys):
    code, out, err = run(capsys, "policy", "check", "policy/")
    assert code == 0, err
    assert out.startswith("Policy policy/: 5 files, 4 rules, 2 resources, 1 claim.")
    assert "  policy/10-dpdk-nics.toml:11: allow — Intel and Broadcom NICs for the dpdk group\n" in out
    assert "      devices: ids 8086:*, 14e4:*; class 02\n      who:     group dpdk\n" in out
    assert "grants:  backend vfio (default); no duration cap; persistent leases; memlock 1G" in out
    assert "  policy/20-gpu-alice.toml:17: allow — alice's VM GPU\n" in out
    assert "backend libvirt (default), vfio; at most 12h; no persistent leases; memlock 16G" in out
    assert "  policy/30-pci-stub-admins.toml:8: allow" in out and "who:     user root" in out
    assert "  gpu (policy/20-gpu-alice.toml:9) — GTX 1080 in the first x16 slot\n" in out
    assert "      0000:01:00.1 10de:10f0 subsystem 1458:3702\n" in out
    assert ("  policy/40-dpdk-claim.toml:15: name:fast-nic for dpdk-svc (uid 990) with vfio"
            " — dpdk-testpmd.service\n") in out
    assert out.rstrip().endswith("The policy is valid.")


def test_check_refuses_a_broken_directory_with_file_line_and_key(capsys, tmp_path):
    os.chdir(tmp_path)
    os.mkdir("policy.d")
    for name in os.listdir(EXAMPLES):
        shutil.copy(os.path.join(EXAMPLES, name), "policy.d")
    shutil.copy(os.path.join(BAD, "unknown-key.toml"), "policy.d/50-unknown-key.toml")
    code, out, err = run(capsys, "policy", "check", "policy.d")
    assert code == 2 and out == ""
    assert err == "vfioctl: policy.d/50-unknown-key.toml:6: key 'backnds': unknown key (did you mean 'backends'?)\n"


def test_check_a_missing_directory(capsys, tmp_path):
    code, _, err = run(capsys, "policy", "check", str(tmp_path / "nope"))
    assert code == 2 and "no such policy directory" in err


def test_check_an_empty_directory(capsys, tmp_path):
    code, out, _ = run(capsys, "policy", "check", str(tmp_path))
    assert code == 0 and "No rules: every request is denied." in out


def test_check_against_the_system_database(capsys, monkeypatch, tmp_path):
    """Without a test database, users are looked up on this system."""
    monkeypatch.undo()
    (tmp_path / "10-root.toml").write_text('[[rule]]\naddress = "00:1b.0"\nusers = ["root"]\n'
                                           '[[rule]]\naddress = "00:1b.0"\nusers = ["no-such-user-vfiod"]\n')
    code, _, err = run(capsys, "policy", "check", str(tmp_path))
    assert code == 2 and f"{tmp_path}/10-root.toml:6: key 'users': no user named 'no-such-user-vfiod'" in err


# ---------------------------------------------------------------- test

def test_a_dpdk_member_gets_group_8(capsys):
    code, out, err = run(capsys, "policy", "test", "--user", "bob", "--policy-dir", "policy",
                         "--simulate", "ich10", "group:8")
    assert code == 0, err
    assert "User bob (uid 1001; groups: 1001, dpdk)" in out
    assert "Target group:8: IOMMU group 8 (4 devices)" in out
    lines = out.splitlines()
    assert any(l.split()[:1] == ["0000:00:1c.0"] and "exempt" in l for l in lines)
    assert any(l.split()[:1] == ["0000:04:00.0"] and "allowed  rule policy/10-dpdk-nics.toml:11" in l for l in lines)
    assert any(l.split()[:1] == ["0000:05:00.0"] and "allowed  rule policy/10-dpdk-nics.toml:11" in l for l in lines)
    assert ("ALLOWED by rule policy/10-dpdk-nics.toml:11: backend vfio; no duration cap; "
            "persistent leases allowed; RLIMIT_MEMLOCK 1G") in out


def test_someone_else_is_denied_by_default(capsys):
    code, out, _ = run(capsys, "policy", "test", "group:8", "--user", "alice", "--policy-dir", "policy",
                       "--simulate")                      # the default topology: ich10
    assert code == 3
    assert "0000:05:00.0  14e4:167b  tg3            denied   no rule matched (deny by default)" in out
    assert "DENIED: group 8: 0000:04:00.0: no rule matched (deny by default); " in out


def test_a_numeric_uid_and_an_address(capsys):
    code, out, _ = run(capsys, "policy", "test", "--user", "0", "--policy-dir", "policy",
                       "--simulate", "ich10", "00:1b.0")
    assert code == 0 and "User root (uid 0" in out and "backend pci-stub" in out
    code, out, _ = run(capsys, "policy", "test", "--user", "0", "--backend", "vfio", "--policy-dir",
                       "policy", "--simulate", "ich10", "00:1b.0")
    assert code == 3 and "does not allow the vfio backend (it allows pci-stub)" in out


@pytest.mark.parametrize("extra, code, text", [
    ([], 0, "ALLOWED by rule policy/20-gpu-alice.toml:17: backend libvirt; at most 12h"),
    (["--duration", "12h"], 0, "ALLOWED"),
    (["--duration", "13h"], 3, "asked for 13h, rule policy/20-gpu-alice.toml:17 allows at most 12h"),
    (["--persistent"], 3, "does not allow persistent leases"),
    (["--backend", "vfio"], 0, "backend vfio"),
    (["--backend", "pci-stub"], 3, "does not allow the pci-stub backend"),
])
def test_terms_of_a_request(capsys, extra, code, text):
    got, out, _ = run(capsys, "policy", "test", "--user", "alice", "--policy-dir", "policy",
                      "--simulate", "gpu", *extra, "name:gpu")
    assert got == code and text in out


def test_a_swapped_card_and_other_failures(capsys):
    code, _, err = run(capsys, "policy", "test", "--user", "alice", "--policy-dir", "policy",
                       "--simulate", "ich10", "name:gpu")
    assert code == 1 and "resource gpu: 0000:01:00.0 is now 10de:1b80 subsystem 10de:119e" in err
    code, _, err = run(capsys, "policy", "test", "--user", "nobody-here", "--policy-dir", "policy",
                       "--simulate", "ich10", "group:8")
    assert code == 2 and "no user named 'nobody-here'" in err
    code, _, err = run(capsys, "policy", "test", "--user", "bob", "--policy-dir", "policy",
                       "--simulate", "ich10", "../etc")
    assert code == 2 and "not a target" in err
    code, _, err = run(capsys, "policy", "test", "--user", "bob", "--policy-dir", "policy",
                       "--simulate", "ich10", "group:77")
    assert code == 1 and "no IOMMU group 77" in err
    code, _, err = run(capsys, "policy", "test", "--user", "bob", "--policy-dir", "/nonexistent",
                       "--simulate", "ich10", "group:8")
    assert code == 2 and "no such policy directory" in err
    with pytest.raises(SystemExit) as e:
        run(capsys, "policy", "test", "--user", "bob", "--duration", "soon", "group:8")
    assert e.value.code == 2 and "not a duration" in capsys.readouterr().err


def test_explicit_roots(capsys, build_host):
    roots = build_host("sriov")
    code, out, _ = run(capsys, "policy", "test", "--user", "alice", "--policy-dir", "policy",
                       "--sysfs-root", roots.sysfs, "--proc-root", roots.proc, "0000:01:10.0")
    assert code == 0 and "ALLOWED by rule policy/15-vm-vfs.toml:10: backend libvirt; at most 7d" in out


# ---------------------------------------------------------------- help

def test_policy_without_a_command_prints_its_help(capsys):
    code, out, err = run(capsys, "policy")
    assert code == 2 and "check" in err and "test" in err


@pytest.mark.parametrize("argv, words", [
    (["policy"], ["first rule", "examples:", "vfioctl policy check"]),
    (["policy", "check"], ["the file, the line", "exit status:", "examples:", "vfioctl policy check ./policy.d"]),
    (["policy", "test"], ["deny by default", "exit status:", "examples:", "--simulate ich10 group:8",
                          "--user USER", "--persistent", "--sysfs-root"]),
])
def test_help_reads_like_a_man_page(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        vfioctl_main(argv + ["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for w in words:
        assert w in out, w
