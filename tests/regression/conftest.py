"""Regression tests, one file per bug, named after what each guards.

Bus-level regressions reuse the bus tier's world (a private dbus-daemon with
vfiod's own policy, vfiod on a simulated host, clients as a real unprivileged
uid)."""

import os
import shutil
import tempfile

import pytest

from tests.bus.conftest import ROOT
from tests.bus.conftest import make_world  # noqa: F401  (the bus tier's fixture, shared)
from vfiod.sim.privatebus import PrivateBus


@pytest.fixture(scope="module")
def bare_bus():
    """A private system-type bus with vfiod's bus policy and nobody serving org.vfiod1."""
    if not shutil.which("dbus-daemon"):
        pytest.skip("dbus-daemon is not installed")
    d = tempfile.mkdtemp(prefix="vfiod-bare-")
    os.chmod(d, 0o755)
    bus = PrivateBus(d, os.path.join(ROOT, "systemd/org.vfiod1.conf"))
    yield bus.address
    bus.stop()
    shutil.rmtree(d, ignore_errors=True)
