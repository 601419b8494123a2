"""A lease request's terms: the options of RequestLease, typed, in one place.

`LeaseTerms.from_options` is the one list of option names and their types: the
bus edge builds terms from a request's ``a{sv}``, the policy judges them
(`Policy.decide`), the lease keeps what outlives the request (`persistent`,
`k8s_namespace`: `vfiod.state.LeaseRow.terms`), and a renewal or a policy
reload judges the lease by them again."""

from __future__ import annotations

from typing import ClassVar, Mapping

import attrs

from .errors import InvalidArgument


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


@attrs.frozen
class LeaseTerms:
    #: Seconds asked for (0: none; the rule's cap applies).
    duration: int = 0
    #: The lease outlives the caller's connection (the policy must allow it).
    persistent: bool = False
    #: An admin leases a group in use on the host anyway.
    force: bool = False
    #: Run the caller in a transient systemd scope that a revoke ends whole.
    scope: bool = False
    #: The Kubernetes namespace a delegate leases for (the policy's ``k8s_delegates``).
    k8s_namespace: str | None = None
    #: The caller's own process, as a pidfd it sent (D-Bus ``h``), for its scope and
    #: memlock grant where the bus gives no ``ProcessFD``; checked, never trusted (an
    #: fd of vfiod's, valid for the request only, never kept with the lease).
    pidfd: int | None = attrs.field(default=None, eq=False, repr=False)

    #: Each option: its Python type, and how a person says it.
    OPTIONS: ClassVar[dict[str, tuple[type, str]]] = {
        "duration": (int, "a number of seconds"), "persistent": (bool, "a boolean"), "force": (bool, "a boolean"),
        "scope": (bool, "a boolean"), "k8s_namespace": (str, "a string"), "pidfd": (int, "a pidfd (D-Bus type h)")}

    @classmethod
    def from_options(cls, options: Mapping[str, object] | LeaseTerms | None) -> LeaseTerms:
        """Terms from a request's options; `InvalidArgument` names an unknown option or a
        value of the wrong kind."""
        if options is None:
            return cls()
        if isinstance(options, LeaseTerms):
            return options
        for key in options:
            if key not in cls.OPTIONS:
                raise InvalidArgument(f"unknown option {_short(key)} (known: {', '.join(cls.OPTIONS)})")
        duration = options.get("duration") or 0
        if isinstance(duration, bool) or not isinstance(duration, int) or duration < 0:
            raise InvalidArgument(f"duration must be a number of seconds, got {_short(duration)}")
        for key in ("persistent", "force", "scope"):
            if not isinstance(options.get(key, False), bool):
                raise InvalidArgument(f"{key} must be true or false, got {_short(options[key])}")
        namespace = options.get("k8s_namespace")
        if "k8s_namespace" in options and not isinstance(namespace, str):
            raise InvalidArgument(f"k8s_namespace must be a Kubernetes namespace name, got {_short(namespace)}")
        pidfd = options.get("pidfd")
        if "pidfd" in options and (isinstance(pidfd, bool) or not isinstance(pidfd, int) or pidfd < 0):
            raise InvalidArgument(f"pidfd must be a file descriptor (D-Bus type h), got {_short(pidfd)}")
        return cls(duration=duration, persistent=bool(options.get("persistent", False)),
                   force=bool(options.get("force", False)), scope=bool(options.get("scope", False)),
                   k8s_namespace=namespace if isinstance(namespace, str) else None,
                   pidfd=pidfd if isinstance(pidfd, int) else None)
