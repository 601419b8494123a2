"""The type checker runs with the tests: ``mypy --strict`` (the ``[tool.mypy]`` of
pyproject.toml) finds nothing in ``vfiod/`` and ``plugins/``.

mypy also checks that every built-in backend is a `vfiod.hookspecs.Backend`: the
plugins' ``vfiod_register_backends(register)`` takes a ``register`` that only
accepts one."""

import ast
import importlib.util
import os
import re
import subprocess
import sys

import pytest
from tests.source import parse

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _mypy(tmp_path, *args):
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed: pip install -e '.[test]' (./scripts/setup does)")
    return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy-cache"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_mypy_strict_finds_nothing(tmp_path):
    proc = _mypy(tmp_path, "--config-file", os.path.join(ROOT, "pyproject.toml"), "vfiod", "plugins")
    assert proc.returncode == 0, f"mypy found type errors:\n{proc.stdout}{proc.stderr}"


def test_the_bus_module_hides_only_dbus_signatures(tmp_path):
    """pyproject.toml lets vfiod/daemon/interfaces.py use undefined names (name-defined) for dbus-next's
    signature strings (``-> "s"``); no other undefined name may hide behind that."""
    path = os.path.join(ROOT, "vfiod", "daemon", "interfaces.py")
    signatures = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for ann in [node.returns, *(a.annotation for a in node.args.args)]:
                if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
                    signatures |= {ann.value, ann.value.strip("()")}      # mypy reads "(bss)" as bss
    proc = _mypy(tmp_path, "--config-file", os.devnull, "--follow-imports", "silent", "vfiod/daemon/interfaces.py")
    names = set(re.findall(r'Name "([^"]+)" is not defined', proc.stdout))
    assert names, proc.stdout + proc.stderr        # the check itself still sees them
    odd = sorted(names - signatures)
    assert not odd, f"undefined names in vfiod/daemon/interfaces.py that are no D-Bus signature: {odd}"


def test_every_builtin_backend_is_a_backend_and_others_are_refused():
    from vfiod.backends import load_backends, plugin_manager
    from vfiod.errors import BackendFailed
    from vfiod.hookspecs import Backend, hookimpl

    backends = load_backends(plugin_manager(entry_points=False))
    assert set(backends) == {"vfio", "pci-stub", "libvirt"}
    assert all(isinstance(b, Backend) for b in backends.values())

    class NameOnly:
        name, driver = "half", "vfio-pci"

    class Plugin:
        @hookimpl
        def vfiod_register_backends(self, register):
            register(NameOnly())

    with pytest.raises(BackendFailed, match="not a backend"):
        load_backends(plugin_manager(extra=[Plugin()], entry_points=False))
