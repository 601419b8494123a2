"""Mistakes in how a command is written are usage errors (exit 2) that say what was meant.

`vfioctl lease 04:00.0 sleep 1` printed the top-level usage with no word of `--`; a
misspelt `--bus sytem` was tried as a bus address and exited 1 ("cannot reach")."""

import os
import subprocess

import pytest

from tests.bus.conftest import ROOT, VENV_BIN


def run(prog, *argv):
    return subprocess.run([os.path.join(VENV_BIN, prog), *argv], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def test_a_command_without_dashes_is_shown_where_it_goes():
    p = run("vfioctl", "lease", "04:00.0", "sleep", "1")
    assert p.returncode == 2
    assert "put it after --: vfioctl lease 04:00.0 -- sleep 1" in p.stderr, p.stderr


@pytest.mark.parametrize("prog,argv", [
    ("vfioctl", ["groups", "--bus", "sytem"]),
    ("vfioctl", ["lease", "04:00.0", "--bus", "sesion", "--", "true"]),
    ("vfiod", ["--bus", "sytem", "--simulate"]),
    ("vfiod", ["reload", "--bus", "garbage"]),
    ("vfiod-dra", ["--bus", "sytem"]),
])
def test_a_misspelt_bus_is_a_usage_error(prog, argv):
    p = run(prog, *argv)
    assert p.returncode == 2, p.stderr
    assert "not a bus:" in p.stderr and "Traceback" not in p.stderr
    if "sytem" in argv:
        assert "did you mean 'system'?" in p.stderr


def test_addresses_still_pass():
    from vfiod.wire.names import bus_arg

    for spec in ("system", "session", "unix:path=/run/dbus/system_bus_socket", "unix:abstract=x,guid=1",
                 "tcp:host=localhost,port=1;unix:path=/x"):
        assert bus_arg(spec) == spec
