"""Fuzzing the policy loader: mutated and random files give `PolicyError`, never anything else.

20,000 documents: the good and bad corpus and the examples in
policy/, mutated (byte flips, truncation, key renames, type swaps, line
shuffles, splices, stray tokens), plus random documents.  Every refusal must
name the file and a line; every policy that loads must answer requests
without crashing.  Deterministic (fixed seed); prints a summary line.
"""

from __future__ import annotations

import os
import random
import re
import time
import traceback

from vfiod.errors import PolicyError, VfiodError
from vfiod.policy import CLAIM_KEYS, KNOWN_BACKENDS, RESOURCE_KEYS, RULE_KEYS, Caller, Policy

from .policy_corpus.kit import BAD, EXAMPLES, GOOD, USERS, host

COUNT = 20_000
SEED = 20261123
KEYS = sorted(set(RULE_KEYS) | set(RESOURCE_KEYS) | set(CLAIM_KEYS) | {"rule", "resource", "claim", "ids"})
VALUES = [
    '1', '0', '-1', '8', '99999999999999999999999', '0x8', '1e3', 'inf', 'nan', '-0.0', 'true', 'false',
    '"x"', '""', '"0000:04:00.0"', '"04:00.0"', '"group:8"', '"name:fast-nic"', '"8086:*"', '"*:*"', '"02"',
    '"1G"', '"8h"', '"0s"', '"vfio"', '"libvirt"', '"pci-stub"', '"alice"', '"root"', '"dpdk"', '"deny"',
    '"allow"', "'literal'", '"""multi\nline"""', '"\\u0000"', '"\\uD7FF"', '"a\\"b"', '"\\t\\n"',
    '[]', '[1, 2]', '["alice", 1]', '[[]]', '[{}]', '{}', '{ address = "04:00.0" }',
    '[{ address = "04:00.0", ids = "8086:10d3" }]', '1979-05-27T07:32:00Z', '1979-05-27', '07:32:00',
    '["0000:04:00.0", "0000:05:00.0"]', '[8, 8]', '"é"', '"\U0001F600"', '"' + "x" * 300 + '"',
]
TOKENS = ["[", "]", "[[", "]]", "{", "}", "=", ",", ".", '"', "'", '"""', "'''", "#", "\\", "\n", "\r\n",
          "\t", " ", "\x00", "\x7f", "\ufeff", "é", "[[rule]]\n", "[[resource]]\n", "[[claim]]\n",
          "[rule]\n", "[rule.x]\n", "[[resource.devices]]\n", "a.b = 1\n", "= =", "\n[[rule]]\nusers = 1\n"]
CALLERS = [Caller.from_uid(uid, USERS) for uid in (0, 1000, 1001, 990, 4242)]


def _seeds() -> list[bytes]:
    out = []
    for d in (GOOD, BAD, EXAMPLES):
        for name in sorted(os.listdir(d)):
            if name.endswith(".toml"):
                with open(os.path.join(d, name), "rb") as f:
                    data = f.read()
                if len(data) < 5000:             # the deep-nesting sample is covered on its own
                    out.append(data)
    return out


# ---------------------------------------------------------------- mutations

def flip_bytes(r: random.Random, doc: bytes) -> bytes:
    b = bytearray(doc or b" ")
    for _ in range(r.randint(1, 5)):
        b[r.randrange(len(b))] = r.randrange(256)
    return bytes(b)


def truncate(r: random.Random, doc: bytes) -> bytes:
    return doc[:r.randrange(len(doc) + 1)]


def rename_key(r: random.Random, doc: bytes) -> bytes:
    text = doc.decode("utf-8", "replace")
    spots = [m for m in re.finditer(r"^(\s*)([A-Za-z_\"'-]+)(\s*=)", text, re.M)]
    if not spots:
        return doc
    m = r.choice(spots)
    new = r.choice(KEYS)
    if r.random() < 0.4:                        # a typo of a real key
        i = r.randrange(len(new))
        new = new[:i] + r.choice(["", new[i] * 2, "x", new[i].upper()]) + new[i + 1:]
    return (text[:m.start(2)] + new + text[m.end(2):]).encode()


def swap_type(r: random.Random, doc: bytes) -> bytes:
    text = doc.decode("utf-8", "replace")
    spots = [m for m in re.finditer(r"=[ \t]*([^\n#]*)", text)]
    if not spots:
        return doc
    m = r.choice(spots)
    return (text[:m.start(1)] + r.choice(VALUES) + text[m.end(1):]).encode()


def shuffle_lines(r: random.Random, doc: bytes) -> bytes:
    lines = doc.split(b"\n")
    i, j = r.randrange(len(lines)), r.randrange(len(lines))
    op = r.randrange(3)
    if op == 0:
        del lines[i]
    elif op == 1:
        lines.insert(j, lines[i])
    else:
        lines[i], lines[j] = lines[j], lines[i]
    return b"\n".join(lines)


def insert_token(r: random.Random, doc: bytes) -> bytes:
    i = r.randrange(len(doc) + 1)
    return doc[:i] + r.choice(TOKENS).encode("utf-8", "surrogatepass") + doc[i:]


MUTATIONS = [flip_bytes, truncate, rename_key, swap_type, shuffle_lines, insert_token]


def random_document(r: random.Random) -> bytes:
    """A random TOML-ish document: random tables, known and unknown keys, any values."""
    out = []
    for _ in range(r.randint(0, 4)):
        kind = r.choice(["[[rule]]", "[[resource]]", "[[claim]]", "[[rule]]", "[[rules]]", "[rule]", ""])
        out.append(kind)
        for _ in range(r.randint(0, 7)):
            key = r.choice(KEYS) if r.random() < 0.9 else r.choice(["x", "a.b", '"q"', "'l'", "users.x"])
            value = r.choice(VALUES) if r.random() < 0.8 else \
                "[" + ", ".join(r.choice(VALUES) for _ in range(r.randint(0, 4))) + "]"
            out.append(f"{key} = {value}")
        if r.random() < 0.1:
            out.append(r.choice(TOKENS))
    return "\n".join(out).encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------- the test

def test_the_loader_only_ever_raises_policy_error(capsys):
    r = random.Random(SEED)
    seeds = _seeds()
    ich10 = host("ich10")
    counts = {"refused": 0, "loaded": 0, "decisions": 0}
    failures = []
    start = time.monotonic()

    def check(doc: bytes) -> None:
        users = USERS if r.random() < 0.9 else None          # sometimes the system's pwd/grp
        try:
            pol = Policy.from_sources([("fuzz.toml", doc)], users=users)
        except PolicyError as e:
            counts["refused"] += 1
            m = re.match(r"fuzz\.toml:(\d+): \S", str(e))
            if not m or not 1 <= int(m.group(1)) <= doc.count(b"\n") + 1:
                failures.append((doc, f"message without a file:line in the file: {e}"))
            return
        except Exception:
            failures.append((doc, traceback.format_exc()))
            return
        counts["loaded"] += 1
        try:
            for claim in pol.claims:
                try:
                    pol.resolve(ich10, claim.target)
                except VfiodError:
                    pass
            for n in (1, 2, 8):
                for caller in CALLERS:
                    for backend in ("", r.choice(KNOWN_BACKENDS)):
                        pol.decide(ich10, caller, n, backend, {"duration": 3600, "persistent": r.random() < 0.5})
                        counts["decisions"] += 1
        except Exception:
            failures.append((doc, traceback.format_exc()))

    n = 0
    while n < COUNT:
        if n % 10 == 9:
            doc = random_document(r)
        else:
            doc = r.choice(seeds)
            for _ in range(r.randint(1, 3)):
                if r.random() < 0.1:
                    other = r.choice(seeds)
                    doc = doc[:r.randrange(len(doc) + 1)] + other[r.randrange(len(other) + 1):]
                else:
                    doc = r.choice(MUTATIONS)(r, doc)
        check(doc)
        n += 1
    for deep in (b"a = " + b"[" * 5000, b"a = " + b"{b=" * 3000 + b"1" + b"}" * 3000, b"x" * ((1 << 20) + 1)):
        check(deep)
        n += 1
    elapsed = time.monotonic() - start
    with capsys.disabled():
        print(f"\npolicy loader fuzz: {n} documents in {elapsed:.1f} s: {counts['refused']} refused "
              f"with PolicyError, {counts['loaded']} loaded ({counts['decisions']} decisions), "
              f"{len(failures)} other exceptions")
    assert not failures, "\n\n".join(f"{doc[:300]!r}\n{tb}" for doc, tb in failures[:3])
    assert counts["refused"] > COUNT // 2 and counts["loaded"] > COUNT // 50
