"""A simulated host's directory (``vfiod --simulate --sim-dir DIR``): one topology per directory.

``DIR/host`` is the laid-out tree, ``DIR/topology`` the name of the simulated host
it was laid out for, ``DIR/writes.log`` the simulated kernel's record of writes.
A directory laid out for one topology and reused with another is refused: the
tree would be served as something it is not.  A directory from before the name
was recorded is accepted only when every function of the topology's table sits
in its tree with the table's ids (then the name is recorded)."""

from __future__ import annotations

import os

from ..errors import InvalidArgument
from .hosts.builder import HostSpec

TOPOLOGY_FILE = "topology"


def claim(sim_dir: str, spec: HostSpec) -> None:
    """Check that `sim_dir` holds `spec` (or nothing yet), and record its name; raise
    `InvalidArgument` naming both topologies when it holds another."""
    path = os.path.join(sim_dir, TOPOLOGY_FILE)
    recorded = _read(path)
    tree = os.path.join(sim_dir, "host")
    if recorded is None and os.path.isdir(tree):
        wrong = _mismatch(os.path.join(tree, "sys/bus/pci/devices"), spec)
        if wrong:
            raise InvalidArgument(f"--sim-dir {sim_dir} holds a simulated host that is not {spec.name!r} "
                                  f"({wrong}); give another --sim-dir")
    elif recorded is not None and recorded != spec.name:
        raise InvalidArgument(f"--sim-dir {sim_dir} holds the simulated host {recorded!r}, not {spec.name!r}; "
                              f"start it with --simulate {recorded}, or give another --sim-dir")
    if recorded is None:
        os.makedirs(sim_dir, exist_ok=True)
        with open(path, "w") as f:
            f.write(spec.name + "\n")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read(4096).strip()
    except FileNotFoundError:
        return None


def _mismatch(devices: str, spec: HostSpec) -> str:
    """What in the tree below `devices` differs from `spec`'s table ("" if nothing)."""
    for fn in spec.functions:
        if fn.vf_of is not None:        # VFs come and go with sriov_numvfs
            continue
        node = os.path.join(devices, fn.addr.sysfs_name)
        ids = tuple(_read(os.path.join(node, name)) for name in ("vendor", "device"))
        if ids != (f"0x{fn.vendor:04x}", f"0x{fn.device:04x}"):
            have = "nothing" if ids[0] is None else ":".join((i or "?").removeprefix("0x") for i in ids)
            return f"{fn.addr} is {have}, the table says {fn.vendor:04x}:{fn.device:04x}"
    return ""
