"""Regression tests, one file per bug, named after what each guards.

Bus-level regressions reuse the bus tier's world (a private dbus-daemon with
vfiod's own policy, vfiod on a simulated host, clients as a real unprivileged
uid)."""

import shutil

import pytest

from tests.bus.conftest import BusWorld, unprivileged_uid


@pytest.fixture
def make_world():
    """`make_world(policy=..., topology=...)`: a BusWorld, closed after the test."""
    if not shutil.which("dbus-daemon"):
        pytest.skip("dbus-daemon is not installed")
    unprivileged_uid()
    made = []

    def make(**kw):
        w = BusWorld(**kw)
        made.append(w)
        return w
    yield make
    for w in made:
        w.close()
