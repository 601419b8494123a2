"""The simulation: built-in simulated hosts (`hosts`), a simulated kernel with the
real kernel's bind/unbind/probe semantics and fault injection (`kernel`), and a
private system-type bus (`privatebus`).  Everything here runs on fake trees;
nothing touches this machine's devices.  `vfiod --simulate` and the tests use it."""

#: The built-in simulated hosts by name, and the default one: what the command lines
#: offer without importing the host tables (`vfiod.sim.hosts.EXAMPLES` holds the same
#: names; a test keeps them equal).
BUILT_IN = ("bridge", "gpu", "ich10", "sriov", "switch")
DEFAULT = "ich10"


def topology_arg(name: str) -> str:
    """argparse type for --simulate: a built-in name or server[:N], checked when given."""
    from .hosts import topology_arg as check

    return check(name)
