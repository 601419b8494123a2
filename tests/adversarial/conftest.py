"""The adversarial suite runs in the bus tier: a private dbus-daemon with vfiod's own
policy, vfiod on a simulated host, clients as the unprivileged test user."""

from tests.bus.conftest import BusWorld, make_world, unprivileged_uid, world  # noqa: F401  (shared fixtures)
