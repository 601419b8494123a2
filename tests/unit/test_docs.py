"""The reference documents every D-Bus member and error name (docs/dbus.md) and every hook
(docs/architecture.md); it fails when one is missing."""

import ast
import os
import re
from tests.source import parse

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The reference: the bus API and the plugin manual (the README is the admin's guide).
README = "\n".join(open(os.path.join(ROOT, "docs", name)).read() for name in ("dbus.md", "architecture.md"))


def _bus_members():
    tree = parse(os.path.join(ROOT, "vfiod/daemon/interfaces.py"))
    for cls in tree.body:
        if isinstance(cls, ast.ClassDef) and cls.name.endswith("Interface"):
            for fn in cls.body:
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name[:1].isupper():
                    yield cls.name, fn.name


def test_every_bus_member_is_documented():
    members = list(_bus_members())
    assert len(members) > 30
    missing = [f"{c}.{m}" for c, m in members if not re.search(rf"`{m}[`(]", README)]
    assert not missing, missing


def test_every_error_name_is_documented():
    from vfiod import errors
    names = {cls.dbus_name for cls in errors.ALL_ERRORS if cls is not errors.VfiodError}
    for name in names:
        short = "." + name.rsplit(".", 1)[1]
        assert name in README or f"`{short}`" in README or short in README, name


def test_every_hook_is_documented_in_the_hookspecs_and_readme():
    from vfiod import hookspecs
    hooks = [n for n in dir(hookspecs.BackendSpec) if n.startswith("vfiod_")]
    assert hooks == ["vfiod_register_backends"]
    for h in hooks:
        assert getattr(hookspecs.BackendSpec, h).__doc__
        assert h in README
    methods = [n for n, v in vars(hookspecs.Backend).items() if callable(v) and not n.startswith("_")]
    assert {"check", "bind", "plan_hand_over", "hand_over", "take_back", "unbind", "open_group"} <= set(methods)
    for method in methods:
        assert getattr(hookspecs.Backend, method).__doc__, f"Backend.{method} has no manual"
        assert re.search(rf"``{method}", hookspecs.__doc__), method
        assert f"`{method}`" in README, method
