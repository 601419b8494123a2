"""The backend author's manual: how a pluggy plugin hands IOMMU groups over.

A plugin is a module or object with `hookimpl`-marked functions; vfiod finds
plugins in its own ``plugins/`` package (imported as ``vfiod_plugins``) and
through the entry-point group ``vfiod.backends``.  There is one hook,
`BackendSpec.vfiod_register_backends`, called once at start.  It registers
backend objects, which vfiod then calls directly.  What such an object must
be is the `Backend` protocol below; its docstrings say when each method runs,
what it receives, what it must undo and what it may raise.  For every lease,
in this order:

    ``check(ctx)``                  before anything changes
    ``bind(ctx, addr)``             once per endpoint, in address order
    ``plan_hand_over(ctx)``         the undo record, journaled before the hand-over
    ``hand_over(ctx) -> record``    after every endpoint is on `driver`
    ... the lease is granted; ``open_group``/``open_container``/``open_device``/
        ``open_iommu``/``hostdev_xml`` may be called ...
    ``take_back(ctx, record)``      when the lease ends (or to roll back)
    ``unbind(ctx, addr, held)``     once per endpoint, in address order

`vfiod.backends.BackendBase` gives the usual defaults; subclass it and
override what differs.  The pluggy hookspec is the dispatch mechanism and the
protocol is the contract: ``register`` takes a `Backend`, so mypy checks every
built-in backend against it, and vfiod refuses at start an object that lacks
one of its members.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import attrs
import pluggy

from .address import PciAddress
from .policy import Decision
from .state import HeldDevice, LeaseRow, Record
from .sysfs import Kernel
from .topology import Host

hookspec = pluggy.HookspecMarker("vfiod")
hookimpl = pluggy.HookimplMarker("vfiod")


@attrs.frozen
class LeaseContext:
    """What a backend hook is told about the lease it works on.

    `decision` is the policy's verdict while a lease is granted, and None when
    the lease is taken from the journal (a release, a restart, a revocation):
    hooks that run then must not need it.

    `handed_over` is this lease's hand-over record as journaled before (a kept
    lease whose hand-over is applied again after a restart), None on a first
    grant.  `container_acl_uids` are the uids for which another lease still
    holds an ACL entry on the container that vfiod added (the hand-over records
    of the other leases say so): such an entry is shared, and stays until the
    last of them ends.  `iommu_acl_uids` are the same for ``/dev/iommu``."""

    lease: LeaseRow
    endpoints: tuple[PciAddress, ...]
    kernel: Kernel
    decision: Decision | None
    host: Host
    handed_over: Record | None = None
    container_acl_uids: frozenset[int] = frozenset()
    iommu_acl_uids: frozenset[int] = frozenset()


@runtime_checkable
class Backend(Protocol):
    """One way of handing a leased IOMMU group to its lessee.

    Every method gets ``ctx``, a `LeaseContext`:

    ``ctx.lease``
        the journal's row (`vfiod.state.LeaseRow`): ``id``, ``group``,
        ``uid`` (the lessee), ``backend``, ``memlock``, ``expires``…
    ``ctx.endpoints``
        the group's endpoints (`PciAddress` tuple, address order); bridges
        and ports are vfiod's business, not the backend's.
    ``ctx.kernel``
        `vfiod.sysfs.Kernel`: the only way to touch the kernel (sysfs writes,
        ``/dev/vfio``, ACLs).  Never open or write kernel files directly.
    ``ctx.decision``
        the policy's `Decision` while a lease is granted; None when the lease
        comes from the journal (release, restart, revocation), so the undo
        methods must not need it.
    ``ctx.host``
        the `vfiod.topology.Host` snapshot at hand: the one taken for the
        request while granting, the daemon's last scan for ``open_group``,
        ``open_container`` and ``hostdev_xml``, and one without devices when
        the lease comes from the journal.

    Errors: raise a `vfiod.errors.VfiodError` (`Unsafe`, `Busy`,
    `NotViable`, `BackendFailed`, `InvalidArgument`…); the lessee sees its
    message and D-Bus name.  Anything else is logged with its traceback and
    reported as ``BackendFailed``.
    """

    #: What users and policy files call the backend: ``vfio``, ``pci-stub``, …
    name: str
    #: The kernel driver every endpoint of the group is bound to while leased.
    driver: str
    #: The lessee uses the group through VFIO (its endpoints sit on vfio-pci): processes
    #: may hold the group or its devices open, and a lease ends only once they let go
    #: (the revoke ladder asks them, then ends them).  False: nothing can hold it.
    uses_vfio: bool

    def check(self, ctx: LeaseContext) -> None:
        """Refuse a request before any device is touched: raise `Unsafe`,
        `Busy`, `BackendFailed` or `NotViable`.  Nothing to undo."""

    def bind(self, ctx: LeaseContext, addr: PciAddress) -> None:
        """Move one endpoint to `driver` (called once per endpoint, in address order).

        `BackendBase` does it with ``ctx.kernel.bind`` (driver_override,
        unbind, drivers_probe, verify).  Raise on failure: vfiod then rolls
        back every endpoint already moved, and this one, through `unbind`,
        so `unbind` must cope with a device in any intermediate state.  Also
        called again on start for a kept lease whose endpoint is on another
        driver."""

    def unbind(self, ctx: LeaseContext, addr: PciAddress, held: HeldDevice) -> None:
        """Return an endpoint to ``held.driver`` and ``held.override`` (the
        journal's record of the device before the lease).

        Runs when the lease ends and on every rollback, after `take_back`.
        `BackendBase` does it with ``ctx.kernel.restore``.  Idempotent: after a
        crash it may run on a device that is already back."""

    def plan_hand_over(self, ctx: LeaseContext) -> Record:
        """The record `take_back` needs even if vfiod dies half-way through
        `hand_over` (e.g. the original owner and mode of the nodes it will
        touch).  vfiod journals it as the intent before calling `hand_over`.
        Must not change anything."""

    def hand_over(self, ctx: LeaseContext) -> Record:
        """Give the lessee access (e.g. chown ``/dev/vfio/N``), after every
        endpoint is on `driver`.

        Returns a JSON-able record of what it changed (an empty one: the
        planned record stands); vfiod journals it as done.  Raise on failure
        after undoing its own partial work.  Also called again on start for
        a kept lease (re-applying ownership), so it must be idempotent."""

    def take_back(self, ctx: LeaseContext, record: Record) -> None:
        """Undo `hand_over` from its record (journaled by `plan_hand_over`
        or `hand_over`), before the endpoints are unbound.  Idempotent: after
        a crash it may run on a half-done or already undone hand-over."""

    def open_group(self, ctx: LeaseContext) -> int:
        """A new fd of the lease's group for the lessee (the caller closes it
        after sending).  Raise `InvalidArgument` if the backend has none."""

    def open_container(self, ctx: LeaseContext) -> int:
        """A new fd of the VFIO container for the lessee (the caller closes it
        after sending).  Raise `InvalidArgument` if the backend has none."""

    def open_device(self, ctx: LeaseContext, addr: PciAddress) -> int:
        """A new fd of endpoint `addr`'s VFIO device cdev (``/dev/vfio/devices/vfioX``)
        for the lessee (the caller closes it after sending).  Raise `InvalidArgument` if
        the backend or the kernel has none, or `addr` is not one of the lease's."""

    def open_iommu(self, ctx: LeaseContext) -> int:
        """A new fd of iommufd (``/dev/iommu``) for the lessee, where the lease's devices
        have cdevs (the caller closes it after sending).  Raise `InvalidArgument` if
        the backend or the kernel has none."""

    def hostdev_xml(self, ctx: LeaseContext) -> str:
        """libvirt ``<hostdev>`` elements for the lease's endpoints.  Raise
        `InvalidArgument` if the backend has none."""


#: What `vfiod_register_backends` is given: call it once per backend.
Register = Callable[[Backend], None]


class BackendSpec:
    @hookspec
    def vfiod_register_backends(self, register: Register) -> None:
        """Register this plugin's backends: call ``register(backend)`` for each
        `Backend`.

        Runs once, when vfiod starts.  Must not touch the kernel.  Registering
        a name another plugin already registered, or an object that is not a
        `Backend` (or whose name or driver is empty), is an error at start."""
