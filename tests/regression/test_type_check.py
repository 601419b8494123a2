"""The type checker runs with the tests: ``mypy --strict`` (the ``[tool.mypy]`` of
pyproject.toml) finds nothing in ``vfiod/`` and ``plugins/``.

mypy also checks that every built-in backend is a `vfiod.hookspecs.Backend`: the
plugins' ``vfiod_register_backends(register)`` takes a ``register`` that only
accepts one."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_mypy_strict_finds_nothing(tmp_path):
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed: pip install -e '.[test]' (./scripts/setup does)")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", os.path.join(ROOT, "pyproject.toml"),
         "--cache-dir", str(tmp_path / "mypy-cache"), "vfiod", "plugins"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mypy found type errors:\n{proc.stdout}{proc.stderr}"


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
