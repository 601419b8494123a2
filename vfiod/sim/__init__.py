"""The simulation: built-in simulated hosts (`hosts`), a simulated kernel with the
real kernel's bind/unbind/probe semantics and fault injection (`kernel`), and a
private system-type bus (`privatebus`).  Everything here runs on fake trees;
nothing touches this machine's devices.  `vfiod --simulate` and the tests use it."""
