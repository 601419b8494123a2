"""Kubernetes rules: a delegate speaks for a namespace, and only a delegate may.

Host: the ICH10 example; group 8 holds 04:00.0 (8086:10d3) and 05:00.0 (14e4:167b)."""

from __future__ import annotations

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
