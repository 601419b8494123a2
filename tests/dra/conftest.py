"""The bus tier's fixtures (a private bus and vfiod on a simulated host), for vfiod-dra."""

from tests.bus.conftest import make_world, world  # noqa: F401  (fixtures)
