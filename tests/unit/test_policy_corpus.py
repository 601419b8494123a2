"""The policy corpus: every good file loads, every bad one fails with exactly its message
and leaves the last good policy in force."""

import os
import re
import shutil

import pytest

from vfiod.errors import PolicyError
from vfiod.policy import Policy, PolicyStore

from .policy_corpus.kit import BAD, GOOD, USERS

GOOD_FILES = sorted(n for n in os.listdir(GOOD) if n.endswith(".toml"))
BAD_FILES = sorted(n for n in os.listdir(BAD) if n.endswith(".toml"))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_the_corpus_is_complete():
    assert len(GOOD_FILES) >= 10 and len(BAD_FILES) >= 60
    errs = sorted(n[:-4] for n in os.listdir(BAD) if n.endswith(".err"))
    assert errs == sorted(n[:-5] for n in BAD_FILES), "every bad file needs its .err and vice versa"


@pytest.mark.parametrize("name", GOOD_FILES)
def test_every_good_file_loads(name):
    Policy.from_sources([(name, _read(os.path.join(GOOD, name)))], users=USERS)


def test_the_good_files_load_together():
    pol = Policy.load(GOOD, users=USERS)
    assert [os.path.basename(f) for f in pol.files] == GOOD_FILES
    assert len(pol.rules) == 33 and len(pol.resources) == 5 and len(pol.claims) == 5
    assert sorted(pol.pools) == ["later", "nics", "one-vf"] and [g.name for g in pol.admin_groups] == ["wheel"]
    assert all(re.fullmatch(rf"{re.escape(GOOD)}/\d\d-[a-z-]+\.toml:\d+", r.source) for r in pol.rules)


@pytest.mark.parametrize("name", BAD_FILES)
def test_every_bad_file_fails_with_its_message_and_keeps_the_last_good_policy(name, tmp_path, monkeypatch):
    with open(os.path.join(BAD, name[:-5] + ".err")) as f:
        expected = f.read().rstrip("\n")
    assert re.match(rf"policy\.d/{re.escape(name)}:\d+: ", expected)
    monkeypatch.chdir(tmp_path)
    os.mkdir("policy.d")
    shutil.copy(os.path.join(GOOD, "02-every-matcher.toml"), "policy.d/00-good.toml")
    store = PolicyStore("policy.d", users=USERS)
    good = store.reload()
    assert len(good.rules) == 13
    shutil.copy(os.path.join(BAD, name), os.path.join("policy.d", name))
    with pytest.raises(PolicyError) as e:
        store.reload()
    assert str(e.value) == expected
    assert store.current is good and store.error == expected
    # the same message when the file is read on its own
    with pytest.raises(PolicyError) as e:
        Policy.from_sources([(f"policy.d/{name}", _read(os.path.join(BAD, name)))], users=USERS)
    assert str(e.value) == expected
