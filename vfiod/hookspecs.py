"""The backend author's manual: how a pluggy plugin hands IOMMU groups over.

A plugin is a module or object with `hookimpl`-marked functions; vfiod finds
plugins in its own ``plugins/`` package (imported as ``vfiod_plugins``) and
through the entry-point group ``vfiod.backends``.  There is one hook:
`vfiod_register_backends`, called once at start.  It registers backend
objects, which vfiod then calls directly, in this order, for every lease:

    check(ctx)                  before anything changes
    bind(ctx, addr)             once per endpoint, in address order
    hand_over(ctx) -> record    after every endpoint is on `driver`
    ... the lease is granted; open_group/open_container/hostdev_xml may be called ...
    take_back(ctx, record)      when the lease ends (or to roll back)
    unbind(ctx, addr, held)     once per endpoint, in reverse order

A backend object has:

``name`` (str)
    what users and policy files call it: ``vfio``, ``pci-stub``, …
``driver`` (str)
    the kernel driver every endpoint of the group is bound to while leased.
``check(ctx)``
    raise `vfiod.errors.Unsafe`, `BackendFailed` or `NotViable` to refuse a
    request before any device is touched (no undo needed).
``bind(ctx, addr)``
    move one endpoint to `driver`.  `BackendBase` does it with
    ``ctx.kernel.bind`` (driver_override, unbind, drivers_probe, verify).
    Raise on failure; vfiod rolls back every endpoint already moved, and
    this one, by calling `unbind` — so `unbind` must cope with a device in
    any intermediate state.
``hand_over(ctx) -> dict``
    give the lessee access (e.g. chown /dev/vfio/N).  Return a JSON-able
    record of what it changed; vfiod journals it *before* the change as the
    intent (from `plan_hand_over`) and after it as done.  Raise on failure
    after undoing its own partial work.
``plan_hand_over(ctx) -> dict``
    the record `take_back` needs even if vfiod dies half-way through
    `hand_over` (original owner and mode of the nodes it will touch).
``take_back(ctx, record)``
    undo `hand_over` from its record.  Must be idempotent: after a crash it
    may run on a half-done or already undone hand-over.
``unbind(ctx, addr, held)``
    return an endpoint to ``held.driver`` and ``held.override`` (the
    journal's record of the device before the lease).  `BackendBase` does it
    with ``ctx.kernel.restore``.  Idempotent, like `take_back`.
``open_group(ctx) -> int`` / ``open_container(ctx) -> int``
    optional: a new fd for the lessee (the caller closes it after sending).
    Raise `vfiod.errors.InvalidArgument` if the backend has none.
``hostdev_xml(ctx) -> str``
    optional (libvirt).

``ctx`` is a `vfiod.leases.LeaseContext`: ``lease`` (the journal row:
``id``, ``group``, ``uid``, ``backend``…), ``endpoints`` (PciAddress
tuple), ``kernel`` (`vfiod.sysfs.Kernel`: the only way to touch the
kernel), ``decision`` (the policy decision, with ``memlock``), ``host``
(the `vfiod.topology.Host` snapshot taken for the request).
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("vfiod")
hookimpl = pluggy.HookimplMarker("vfiod")


class BackendSpec:
    @hookspec
    def vfiod_register_backends(self, register):
        """Register this plugin's backends: call ``register(backend)`` for each.

        Runs once, when vfiod starts.  Must not touch the kernel.  Registering
        a name another plugin already registered is an error at start."""
