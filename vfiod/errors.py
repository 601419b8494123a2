"""The one error table of vfiod.

Every error a user can meet is a `VfiodError` subclass that carries the D-Bus
error name clients see and the exit code `vfioctl`/`vfiod` return.  The bus
edge and the CLI translate these and nothing else; any other exception is a
bug, logged and reported as `BackendFailed` without a traceback.
"""

from __future__ import annotations


class VfiodError(Exception):
    """Base of every error vfiod reports to a person or a client."""

    dbus_name = "org.vfiod1.Error.Failed"
    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(VfiodError):
    dbus_name = "org.vfiod1.Error.InvalidArgument"
    exit_code = 2


class InvalidAddress(InvalidArgument):
    """A PCI address that does not parse (path tricks included)."""


class NotFound(VfiodError):
    dbus_name = "org.vfiod1.Error.NotFound"
    exit_code = 1


class PermissionDenied(VfiodError):
    dbus_name = "org.vfiod1.Error.PermissionDenied"
    exit_code = 3


class Busy(VfiodError):
    dbus_name = "org.vfiod1.Error.Busy"
    exit_code = 4


class LimitsExceeded(Busy):
    """One client asked for more at once than the daemon serves one client (calls in
    flight, message size); the others are served meanwhile."""

    dbus_name = "org.vfiod1.Error.LimitsExceeded"


class NotViable(VfiodError):
    dbus_name = "org.vfiod1.Error.NotViable"
    exit_code = 4


class Protected(VfiodError):
    dbus_name = "org.vfiod1.Error.Protected"
    exit_code = 3


class Unsafe(VfiodError):
    dbus_name = "org.vfiod1.Error.Unsafe"
    exit_code = 3


class BackendFailed(VfiodError):
    dbus_name = "org.vfiod1.Error.BackendFailed"
    exit_code = 1


class PolicyError(InvalidArgument):
    """A policy file that cannot be loaded; the message names file, line and key
    (`policy_key`: that key, when the problem is one key's)."""

    policy_key: str | None = None


class KernelError(BackendFailed):
    """A sysfs read or write the kernel refused or that timed out."""


class StateError(BackendFailed):
    """The state file is corrupt or from a newer vfiod; it is left untouched."""


#: Every error class, for the table test and the bus layer.
ALL_ERRORS = (
    VfiodError, InvalidArgument, InvalidAddress, NotFound, PermissionDenied, Busy, LimitsExceeded,
    NotViable, Protected, Unsafe, BackendFailed, PolicyError, KernelError, StateError,
)
