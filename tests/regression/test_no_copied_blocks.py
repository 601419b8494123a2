"""No block of code is written twice in ``vfiod/`` or ``plugins/``: six consecutive
lines (compared without indentation, blank lines and comments) may stand in one place
only.  Where the logic really is the same, one definition serves both places.

Windows made only of lines that carry no logic of their own (closing brackets,
``else:``, ``return``, ``pass``, decorators, imports) do not count."""

import os
import re
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WINDOW = 6
TRIVIAL = re.compile(r"""
    [)\]}]+[,:]?            # closing brackets
  | (else|try|finally):     # bare block keywords
  | return|pass|continue|break
  | "{3}|'{3}               # the end of a docstring
  | @.*                     # decorators
  | import\ .*|from\ \S+\ import\ .*
""", re.X)


def _sources(root):
    for top in ("vfiod", "plugins"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if name.endswith(".py"):
                    yield os.path.join(dirpath, name)


def _normalised(path):
    """(line number, text) of every line that is not blank or a comment, stripped."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            text = line.strip()
            if text and not text.startswith("#"):
                yield number, text


def copied_blocks(root=ROOT):
    """{window text: [(path, first line), ...]} for every window standing in two places or more."""
    seen = defaultdict(list)
    for path in _sources(root):
        lines = list(_normalised(path))
        for i in range(len(lines) - WINDOW + 1):
            window = lines[i:i + WINDOW]
            texts = tuple(text for _, text in window)
            if all(TRIVIAL.fullmatch(t) for t in texts):
                continue
            seen[texts].append((os.path.relpath(path, root), window[0][0]))
    return {texts: places for texts, places in seen.items() if len(places) > 1}


def test_no_block_is_written_twice():
    found = copied_blocks()
    report = []
    for texts, places in sorted(found.items(), key=lambda item: item[1]):
        where = ", ".join(f"{path}:{line}" for path, line in places)
        report.append(f"{where}:\n    " + "\n    ".join(texts))
    assert not found, f"{len(found)} blocks of {WINDOW} lines stand in more than one place:\n" + "\n".join(report)


def test_the_guard_sees_a_copy_and_ignores_brackets(tmp_path):
    block = "".join(f"    x{i} = compute({i})\n" for i in range(WINDOW))
    (tmp_path / "vfiod").mkdir()
    (tmp_path / "plugins").mkdir()
    (tmp_path / "vfiod" / "a.py").write_text("def a():\n" + block)
    (tmp_path / "plugins" / "b.py").write_text("def b():\n    # the same, again\n\n" + block)
    (tmp_path / "vfiod" / "c.py").write_text("@wrap\n)\n]\n}\nelse:\nreturn\npass\nimport os\n" * 2)
    found = copied_blocks(str(tmp_path))
    assert [sorted(places) for places in found.values()] == [[("plugins/b.py", 4), ("vfiod/a.py", 2)]]
