"""One exit-code table: the README's "Exit codes" section is `vfiod.cmd.common.EXIT_CODES`,
every error carries a code of it, and the commands return nothing else.

Before, `show group:99` exited 2 while `check|lease|explain group:99` exited 1,
and vfioctl kept its own copy of the codes."""

import ast
import os
import re

from vfiod import errors
from vfiod.cmd import common
from tests.source import parse

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def readme_table():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| (.+?) \|$", section, re.M)
    return tuple((int(code), meaning) for code, meaning in rows)


def test_the_readme_table_is_the_table_in_common():
    assert readme_table() == common.EXIT_CODES


def test_every_error_carries_a_documented_code():
    codes = {code for code, _ in common.EXIT_CODES}
    for cls in errors.ALL_ERRORS:
        assert cls.exit_code in codes, cls


def test_commands_return_only_named_codes():
    """No command module returns a bare number: each uses common's names."""
    names = {n for n in dir(common) if n.startswith("EXIT_") and n != "EXIT_CODES"}
    for module in ("ctl", "policy", "server", "monitor", "common"):
        path = os.path.join(ROOT, "vfiod/cmd", module + ".py")
        if not os.path.exists(path):
            continue
        tree = parse(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant) \
                    and isinstance(node.value.value, int) and not isinstance(node.value.value, bool):
                raise AssertionError(f"{module}.py:{node.lineno}: return {node.value.value} (use common's names)")
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Name) and t.id.startswith("EXIT_") and module != "common":
                        raise AssertionError(f"{module}.py:{node.lineno}: a second definition of {t.id}")
    assert {"EXIT_OK", "EXIT_FAIL", "EXIT_USAGE", "EXIT_DENIED", "EXIT_BUSY"} <= names
