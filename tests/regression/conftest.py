"""Regression tests, one file per bug, named after what each guards.

Bus-level regressions reuse the bus tier's world (a private dbus-daemon with
vfiod's own policy, vfiod on a simulated host, clients as a real unprivileged
uid)."""

from tests.bus.conftest import make_world  # noqa: F401  (the bus tier's fixture, shared)
