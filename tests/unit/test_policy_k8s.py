"""Kubernetes rules: a delegate speaks for a namespace, and only a delegate may.

Host: the ICH10 example; group 8 holds 04:00.0 (8086:10d3) and 05:00.0 (14e4:167b)."""

from __future__ import annotations

import json

import pytest

from vfiod.errors import InvalidArgument, PermissionDenied
from vfiod.policy import Refusal

from .policy_corpus.kit import caller, host, policy

ICH10 = host("ich10")

K8S = """
[[rule]]
comment = "ML namespaces get the NIC pair"
group = 8
k8s_namespaces = ["ml-*", "gpu"]
k8s_delegates = ["dpdk-svc"]
persistent = true
memlock = "1G"

[[rule]]
action = "deny"
comment = "no other namespace"
group = 8
k8s_namespaces = ["*"]
k8s_delegates = ["dpdk-svc"]

[[rule]]
group = 8
users = ["alice", "dpdk-svc"]
"""


def ns(name: str, persistent: bool = True) -> dict[str, object]:
    return {"k8s_namespace": name, "persistent": persistent}


def test_a_delegate_speaks_for_a_matching_namespace():
    d = policy(K8S).decide(ICH10, caller("dpdk-svc"), 8, "", ns("ml-train"))
    assert d.allowed and d.rule == "p/10-t.toml:2" and d.persistent and d.memlock == 1 << 30
    assert policy(K8S).decide(ICH10, caller("dpdk-svc"), 8, "", ns("gpu")).allowed


def test_another_namespace_is_refused_by_the_rule_that_names_it():
    d = policy(K8S).decide(ICH10, caller("dpdk-svc"), 8, "", ns("web"))
    assert not d.allowed and d.refusal is Refusal.DENIED
    assert "denied by rule p/10-t.toml:10 (no other namespace)" in d.reason


def test_no_kubernetes_rule_for_the_namespace_is_deny_by_default():
    text = K8S.split("[[rule]]\naction")[0]
    d = policy(text).decide(ICH10, caller("dpdk-svc"), 8, "", ns("web"))
    assert not d.allowed and d.refusal is Refusal.NO_RULE
    assert "no rule matched Kubernetes namespace web (deny by default)" in d.reason


def test_only_a_delegate_may_speak_for_a_namespace():
    # alice may lease group 8 herself, but may not claim a namespace's rule
    assert policy(K8S).decide(ICH10, caller("alice"), 8).allowed
    with pytest.raises(PermissionDenied, match="uid 1000 may not speak for Kubernetes namespaces"):
        policy(K8S).decide(ICH10, caller("alice"), 8, "", ns("ml-train"))
    with pytest.raises(PermissionDenied):
        policy(K8S).decide(ICH10, caller("root"), 8, "", ns("ml-train"))


def test_user_rules_do_not_cover_namespaced_requests_nor_the_reverse():
    # the delegate's own user rule allows group 8 without persistence; the namespaced
    # request is decided by the Kubernetes rules alone
    d = policy(K8S).decide(ICH10, caller("dpdk-svc"), 8, "", {"persistent": True})
    assert not d.allowed and d.refusal is Refusal.TERMS       # the user rule: no persistence
    d = policy(K8S).decide(ICH10, caller("dpdk-svc"), 8)
    assert d.allowed and d.rule == "p/10-t.toml:17"


@pytest.mark.parametrize("bad", ["", "ML", "a_b", "-x", "x" * 64, 5, None, "ml-*"])
def test_a_malformed_namespace_is_an_invalid_argument(bad):
    with pytest.raises(InvalidArgument, match="k8s_namespace must be a Kubernetes namespace name"):
        policy(K8S).decide(ICH10, caller("dpdk-svc"), 8, "", {"k8s_namespace": bad})


def test_rules_say_who_they_name():
    rules = policy(K8S).rules
    assert rules[0].describe_who() == "Kubernetes namespace ml-*, gpu through delegate dpdk-svc"
    assert [r.source for r in policy(K8S).kubernetes_rules(990)] == ["p/10-t.toml:2", "p/10-t.toml:10"]
    assert policy(K8S).kubernetes_rules(1000) == ()


# ---------------------------------------------------------------- vfioctl policy test / check

def _cli(capsys, monkeypatch, tmp_path, *argv):
    from vfiod import policy as policy_module
    from vfiod.cmd.ctl import main as vfioctl_main

    from .policy_corpus.kit import USERS

    monkeypatch.setattr(policy_module, "system_users", lambda: USERS)
    (tmp_path / "policy.d").mkdir(exist_ok=True)
    (tmp_path / "policy.d" / "10-t.toml").write_text(K8S)
    code = vfioctl_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_policy_test_asks_as_a_delegate_for_a_namespace(capsys, monkeypatch, tmp_path):
    pdir = str(tmp_path / "policy.d")
    code, out, err = _cli(capsys, monkeypatch, tmp_path, "policy", "test", "--user", "dpdk-svc", "--policy-dir",
                          pdir, "--simulate", "ich10", "--persistent", "--k8s-namespace", "ml-train", "group:8")
    assert code == 0, err
    assert "for Kubernetes namespace ml-train" in out and f"ALLOWED by rule {pdir}/10-t.toml:2" in out
    code, out, _ = _cli(capsys, monkeypatch, tmp_path, "policy", "test", "--user", "dpdk-svc", "--policy-dir",
                        pdir, "--simulate", "ich10", "--k8s-namespace", "web", "group:8")
    assert code == 3 and f"denied by rule {pdir}/10-t.toml:10 (no other namespace)" in out
    code, out, err = _cli(capsys, monkeypatch, tmp_path, "policy", "test", "--user", "alice", "--policy-dir",
                          pdir, "--simulate", "ich10", "--k8s-namespace", "ml-train", "--json", "group:8")
    assert code == 3 and "uid 1000 may not speak for Kubernetes namespaces" in err and "Traceback" not in err
    code, out, _ = _cli(capsys, monkeypatch, tmp_path, "policy", "test", "--user", "dpdk-svc", "--policy-dir",
                        pdir, "--simulate", "ich10", "--k8s-namespace", "ml-a", "--json", "group:8")
    doc = json.loads(out)
    assert code == 0 and doc["request"]["k8s_namespace"] == "ml-a" and doc["rule"] == f"{pdir}/10-t.toml:2"


def test_policy_check_shows_namespaces_and_delegates(capsys, monkeypatch, tmp_path):
    code, out, err = _cli(capsys, monkeypatch, tmp_path, "policy", "check", str(tmp_path / "policy.d"))
    assert code == 0, err
    assert "who:     Kubernetes namespace ml-*, gpu through delegate dpdk-svc" in out
