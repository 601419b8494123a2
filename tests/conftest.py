import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from vfiod.sim import hosts  # noqa: E402
from vfiod.sysfs import SysfsReader  # noqa: E402
from vfiod.topology import Host  # noqa: E402


@pytest.fixture
def build_host(tmp_path):
    """Lay out a named example host (or a HostSpec) in a fresh tree; returns its Roots."""
    count = [0]

    def build(spec="ich10"):
        count[0] += 1
        root = str(tmp_path / f"host{count[0]}")
        if isinstance(spec, str):
            return hosts.build(spec, root)
        return hosts.build_spec(spec, root)

    return build


@pytest.fixture
def scan():
    def scan(roots):
        return Host.scan(SysfsReader(roots))
    return scan
