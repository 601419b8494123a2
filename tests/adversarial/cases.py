"""The hostile calls, one `Case` each, shared by the suite and the client it runs.

`who` says whose lease a Lease call goes to: ``own`` (the test user's, on group 4),
``other`` (root's, on group 8) or ``none`` (a lease path that does not exist).
`expect` lists the replies that pass: ``ok`` or error names.  Whatever else comes
back (a Python error name, a traceback in the message, no reply) fails."""

from __future__ import annotations

from typing import NamedTuple

from dbus_next import Variant

MANAGER = "org.vfiod1.Manager"
LEASE = "org.vfiod1.Lease"
PROPS = "org.freedesktop.DBus.Properties"

INVALID = "org.vfiod1.Error.InvalidArgument"
NOT_FOUND = "org.vfiod1.Error.NotFound"
DENIED = "org.vfiod1.Error.PermissionDenied"
BUSY = "org.vfiod1.Error.Busy"
LIMITS = "org.vfiod1.Error.LimitsExceeded"
UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"
UNKNOWN_PROPERTY = "org.freedesktop.DBus.Error.UnknownProperty"
UNKNOWN_INTERFACE = "org.freedesktop.DBus.Error.UnknownInterface"
READ_ONLY = "org.freedesktop.DBus.Error.PropertyReadOnly"
NOT_SUPPORTED = "org.freedesktop.DBus.Error.NotSupported"
INVALID_SIGNATURE = "org.freedesktop.DBus.Error.InvalidSignature"
NO_SUCH_THING = (UNKNOWN_METHOD, UNKNOWN_OBJECT, UNKNOWN_INTERFACE)
BAD_TARGET = (INVALID, NOT_FOUND)

U64 = (1 << 64) - 1
BIG = "x" * 200_000                     # well past every length limit, under the bus's message limit


class Case(NamedTuple):
    label: str
    member: str
    signature: str
    body: list[object]
    expect: tuple[str, ...]
    interface: str = MANAGER
    who: str = ""                       # "": the Manager; own, other, none: a lease


HOSTILE_TARGETS: list[tuple[str, str]] = [
    ("empty", ""), ("long", "g" * 300), ("huge", BIG), ("superscript", "group:²"),
    ("arabic-digit", "group:٣"), ("fullwidth-digit", "group:８"), ("math-digit", "group:𝟠"),
    ("negative", "group:-1"), ("past-u32", "group:4294967296"), ("past-i64", "group:" + "9" * 40),
    ("leading-space", " group:8"), ("trailing-newline", "group:8\n"), ("rtl-override", "\u202egroup:8"),
    ("dotdot", "../../../etc/passwd"), ("addr-dotdot", "0000:04:00.0/../../../x"),
    ("addr-slash", "0000:04:00.0/driver"), ("addr-long", "0000:04:00.0" + "0" * 50),
    ("libvirt-dotdot", "pci_0000_04_00_0/.."), ("name-dotdot", "name:../../x"),
    ("name-long", "name:" + "a" * 300), ("name-unknown", "name:nosuch"), ("group-absent", "group:999"),
    ("addr-absent", "0000:7f:1f.7"), ("hex-fullwidth", "０000:04:00.0"), ("format", "%s%s%n{0}"),
]

HOSTILE_BACKENDS: list[tuple[str, str]] = [
    ("long", "b" * 300), ("huge", BIG), ("dotdot", "../vfio"), ("upper", "VFIO"), ("space", "vfio "),
    ("unicode", "vfiö"), ("path", "/usr/lib/vfio"),
]

HOSTILE_OPTIONS: list[tuple[str, dict[str, Variant]]] = [
    ("duration-u64", {"duration": Variant("t", U64)}),
    ("duration-over-ceiling", {"duration": Variant("t", 365 * 86400 + 1)}),
    ("duration-i64-min", {"duration": Variant("x", -(1 << 63))}),
    ("duration-negative", {"duration": Variant("i", -1)}),
    ("duration-text", {"duration": Variant("s", "1h")}),
    ("duration-double", {"duration": Variant("d", 1e300)}),
    ("duration-bool", {"duration": Variant("b", True)}),
    ("duration-nested", {"duration": Variant("v", Variant("t", 60))}),
    ("duration-array", {"duration": Variant("at", [1, 2])}),
    ("persistent-text", {"persistent": Variant("s", "yes")}),
    ("persistent-int", {"persistent": Variant("u", 1)}),
    ("force-text", {"force": Variant("s", "true")}),
    ("unknown-key", {"uid": Variant("u", 0)}),
    ("unicode-key", {"durаtion": Variant("t", 60)}),                # a Cyrillic а
    ("huge-key", {BIG: Variant("b", True)}),
    ("many-keys", {f"k{i}": Variant("u", i) for i in range(20_000)}),
    ("huge-value", {"duration": Variant("s", BIG)}),
    ("k8s-namespace-int", {"k8s_namespace": Variant("u", 1)}),
    ("k8s-namespace-path", {"k8s_namespace": Variant("s", "../../etc")}),
    ("k8s-namespace-glob", {"k8s_namespace": Variant("s", "*")}),
    ("k8s-namespace-huge", {"k8s_namespace": Variant("s", BIG)}),
]


def _manager_cases() -> list[Case]:
    cases = []
    for name, target in HOSTILE_TARGETS:
        cases.append(Case(f"RequestLease target {name}", "RequestLease", "ssa{sv}", [target, "vfio", {}], BAD_TARGET))
        cases.append(Case(f"Explain target {name}", "Explain", "s", [target], BAD_TARGET))
        cases.append(Case(f"CheckAccess target {name}", "CheckAccess", "ss", [target, ""], BAD_TARGET))
        cases.append(Case(f"GroupsJson target {name}", "GroupsJson", "as", [[target]], BAD_TARGET))
        cases.append(Case(f"KubernetesAccess target {name}", "KubernetesAccess", "s", [target], BAD_TARGET))
    for name, backend in HOSTILE_BACKENDS:
        # group 3: allowed to the test user, and free (group 4 is the user's own lease)
        cases.append(Case(f"RequestLease backend {name}", "RequestLease", "ssa{sv}", ["group:3", backend, {}],
                          (INVALID,)))
        cases.append(Case(f"CheckAccess backend {name}", "CheckAccess", "ss", ["group:3", backend], (INVALID,)))
    for name, options in HOSTILE_OPTIONS:
        cases.append(Case(f"RequestLease options {name}", "RequestLease", "ssa{sv}", ["group:3", "vfio", options],
                          (INVALID,)))
    cases += [
        Case("RequestLease force as a user", "RequestLease", "ssa{sv}",
             ["group:7", "vfio", {"force": Variant("b", True)}], (DENIED, BUSY, "org.vfiod1.Error.Protected")),
        Case("RequestLease another user's group", "RequestLease", "ssa{sv}", ["group:8", "vfio", {}], (BUSY, DENIED)),
        Case("RequestLease own group again", "RequestLease", "ssa{sv}", ["group:4", "vfio", {}], (BUSY,)),
        Case("RequestLease a group not allowed", "RequestLease", "ssa{sv}", ["group:1", "", {}], (DENIED,)),
        Case("RequestLease for a namespace, no delegate", "RequestLease", "ssa{sv}",
             ["group:3", "vfio", {"k8s_namespace": Variant("s", "ml-a")}], (DENIED,)),
        Case("KubernetesAccess, no delegate", "KubernetesAccess", "s", ["group:3"], ("ok",)),
        Case("KubernetesAccessAll, no delegate", "KubernetesAccessAll", "", [], ("ok",)),
        Case("KubernetesAccessAll with arguments", "KubernetesAccessAll", "s", ["group:3"],
             NO_SUCH_THING + (INVALID_SIGNATURE,)),
        Case("RequestLease wrong signature", "RequestLease", "s", ["group:4"], NO_SUCH_THING + (INVALID_SIGNATURE,)),
        Case("RequestLease wrong types", "RequestLease", "uua{sv}", [1, 2, {}], NO_SUCH_THING + (INVALID_SIGNATURE,)),
        Case("GroupsJson 65 targets", "GroupsJson", "as", [["group:4"] * 65], (INVALID,)),
        Case("GroupsJson 20000 targets", "GroupsJson", "as", [["group:4"] * 20_000], (INVALID,)),
        Case("GroupsJson every group", "GroupsJson", "as", [[]], ("ok",)),
        Case("SetVfCount as a user", "SetVfCount", "su", ["0000:04:00.0", 4], (DENIED, INVALID)),
        Case("SetVfCount u32 max", "SetVfCount", "su", ["0000:04:00.0", (1 << 32) - 1], (DENIED, INVALID)),
        Case("SetVfCount path trick", "SetVfCount", "su", ["../../../../proc/sys", 0], (INVALID, DENIED)),
        Case("SetVfCount huge address", "SetVfCount", "su", [BIG, 0], (INVALID, DENIED)),
        Case("ReloadPolicy as a user", "ReloadPolicy", "", [], (DENIED,)),
        Case("ReloadPolicy with arguments", "ReloadPolicy", "s", ["x"], NO_SUCH_THING + (INVALID_SIGNATURE,)),
        Case("Unknown member", "Shutdown", "", [], NO_SUCH_THING),
    ]
    for prop in ("Version", "IommuEnabled", "AcsOverride", "NoIommu", "Leases"):
        cases.append(Case(f"Get {prop}", "Get", "ss", [MANAGER, prop], ("ok",), PROPS))
    cases += [
        Case("GetAll Manager", "GetAll", "s", [MANAGER], ("ok",), PROPS),
        Case("Set Version", "Set", "ssv", [MANAGER, "Version", Variant("s", "0")], (READ_ONLY, UNKNOWN_PROPERTY), PROPS),
        Case("Set Leases", "Set", "ssv", [MANAGER, "Leases", Variant("ao", [])], (READ_ONLY, UNKNOWN_PROPERTY), PROPS),
        Case("Get unknown property", "Get", "ss", [MANAGER, "Owner"], (UNKNOWN_PROPERTY,), PROPS),
        Case("Get huge property name", "Get", "ss", [MANAGER, BIG], (UNKNOWN_PROPERTY,), PROPS),
        Case("Get empty interface", "Get", "ss", ["", "Version"], (NOT_SUPPORTED, UNKNOWN_INTERFACE), PROPS),
        Case("Get unknown interface", "Get", "ss", ["org.vfiod1.Nope", "Version"], (UNKNOWN_INTERFACE,), PROPS),
        Case("GetAll huge interface", "GetAll", "s", [BIG], (UNKNOWN_INTERFACE,), PROPS),
        Case("GetManagedObjects", "GetManagedObjects", "", [], ("ok",), "org.freedesktop.DBus.ObjectManager"),
    ]
    return cases


LEASE_PROPS = ("Id", "Group", "Owner", "Backend", "Created", "Expires", "Persistent", "Memlock",
               "ResetOnRelease", "Warnings", "GroupPath")


def _lease_cases() -> list[Case]:
    cases = []
    for prop in LEASE_PROPS:
        cases.append(Case(f"Get other's {prop}", "Get", "ss", [LEASE, prop], ("ok",), PROPS, "other"))
    cases.append(Case("GetAll other's lease", "GetAll", "s", [LEASE], ("ok",), PROPS, "other"))
    cases.append(Case("Set own Expires", "Set", "ssv", [LEASE, "Expires", Variant("t", 0)],
                      (READ_ONLY, UNKNOWN_PROPERTY), PROPS, "own"))
    cases.append(Case("Set own Owner", "Set", "ssv", [LEASE, "Owner", Variant("u", 0)],
                      (READ_ONLY, UNKNOWN_PROPERTY), PROPS, "own"))
    for member, sig, body in (("OpenGroup", "", []), ("OpenContainer", "", []), ("HostdevXml", "", []),
                              ("Renew", "t", [60]), ("Renew", "t", [U64]), ("Release", "", [])):
        label = f"{member}({body[0] if body else ''})"
        cases.append(Case(f"{label} on other's lease", member, sig, body, (DENIED,), LEASE, "other"))
        cases.append(Case(f"{label} on no lease", member, sig, body, NO_SUCH_THING, LEASE, "none"))
    cases += [
        Case("Renew(0) own", "Renew", "t", [0], (INVALID,), LEASE, "own"),
        Case("Renew(u64 max) own", "Renew", "t", [U64], (INVALID,), LEASE, "own"),
        Case("Renew(ceiling + 1) own", "Renew", "t", [365 * 86400 + 1], (INVALID,), LEASE, "own"),
        Case("Renew(2^63) own", "Renew", "t", [1 << 63], (INVALID,), LEASE, "own"),
        Case("Renew wrong type own", "Renew", "s", ["1h"], NO_SUCH_THING + (INVALID_SIGNATURE,), LEASE, "own"),
        Case("Renew negative own", "Renew", "x", [-5], NO_SUCH_THING + (INVALID_SIGNATURE,), LEASE, "own"),
        Case("HostdevXml own (vfio)", "HostdevXml", "", [], (INVALID,), LEASE, "own"),
        Case("Release with arguments own", "Release", "s", ["x"], NO_SUCH_THING + (INVALID_SIGNATURE,), LEASE, "own"),
        Case("Renew(60) own", "Renew", "t", [60], ("ok",), LEASE, "own"),
        Case("Get own Expires after renew", "Get", "ss", [LEASE, "Expires"], ("ok",), PROPS, "own"),
    ]
    return cases


CASES = _manager_cases() + _lease_cases()
