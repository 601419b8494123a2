"""Admin policy: which IOMMU groups may be leased by whom, with which backend, for how long.

This docstring, from "Files" on, is the one description of the policy format:
``python -m vfiod.cmd.manpage`` makes vfiod.policy(5) from it, and the README
points here.  Pure domain code: it reads the policy files and the user and group database,
and judges requests against a `vfiod.topology.Host` snapshot; it never
touches sysfs, the bus or udev.  Deny by default.

Files
=====

vfiod reads every ``*.toml`` file of the policy directory
(``/etc/vfiod/policy.d``; dotfiles and other names are skipped) in name order
(byte order: give files two-digit prefixes, ``10-nics.toml``).  A file holds
four kinds of tables, each any number of times: ``[[rule]]``,
``[[resource]]``, ``[[pool]]`` and ``[[claim]]``, and above its first table
the key ``admin_groups`` (see "Delegated administration").  Resource and pool
names and claims are shared by all files.  If any file is broken the whole policy is refused, with file, line
and key in the message (``policy.d/10-x.toml:7: key 'backnds': unknown key``),
and the daemon keeps the policy it had.  A policy directory or file anyone may
write is refused too.  Unknown keys, wrong types, unknown backends, users or
groups that do not exist and addresses that do not parse are all errors, so a
typo never widens access.

Rules
=====

For each device, the rules are tried in order (file name, then position in
the file); the first rule that matches both the device and the caller decides,
allow or deny.  No matching rule: denied.  A group is allowed only if every
endpoint in it is allowed (bridges and ports are exempt: VFIO does not hand
them out).  uid 0 gets nothing implicitly; admins write rules for themselves
too.  Every list-valued key also takes a single value::

    [[rule]]
    comment = "NICs for DPDK"     # optional; shown by `vfioctl policy check`
    action = "allow"              # or "deny" (default "allow")

    # Which devices.  At least one key; every key given must match the device,
    # and a key matches if any of its values does.
    address = ["0000:04:00.0"]    # DDDD:BB:DD.F, BB:DD.F or pci_DDDD_BB_DD_F
    group = [8]                   # IOMMU group numbers (may change with the kernel or firmware)
    ids = ["8086:10d3", "8086:*"] # vendor:device, "*" for any (never matches unreadable ids)
    class = ["02", "0300"]        # class code prefix: class (02 = network), + subclass, + prog-if
    driver = ["e1000e"]           # the driver bound *now* (a leased device is on vfio-pci or
                                  # pci-stub, so a renewal is judged on that driver)
    vf_of = "0000:01:00.0"        # the SR-IOV virtual functions of this physical function
    resource = "fast-nic"         # the devices of a [[resource]], while the hardware still matches
    pool = "nics"                 # the devices of a [[pool]]'s members, while their hardware matches
    # (or, alone: mdev_types = ["mtty/mtty-2"], types of mediated devices: see "Mediated devices")

    # Who.  At least one key; the caller matches if any of them does.
    users = ["alice"]             # user names (must exist)
    uids = [1000]
    groups = ["dpdk"]             # unix group names (must exist): primary or supplementary
    everyone = true

    # Or who, for Kubernetes (see "Kubernetes namespaces"; not with the keys above).
    k8s_namespaces = ["ml-*"]     # namespace names or globs ("*", "?")
    k8s_delegates = ["vfiod-dra"] # the users (must exist) that may speak for them

    # What an allow rule grants (these keys are errors in a deny rule).
    backends = ["vfio", "libvirt"]  # known: vfio, libvirt, pci-stub (+ plugins); default ["vfio"],
                                    # or [default_backend] when only that is given
    default_backend = "vfio"      # the backend of a request that names none; default: the first
    max_duration = "8h"           # cap on a lease's length: "90s", "30m", "8h", "2d", "1w",
                                  # "1h30m" or seconds; default: no cap
    persistent = false            # may a lease outlive its client and daemon restarts (default no)
    memlock = "1G"                # RLIMIT_MEMLOCK to grant: bytes or "512K", "256M", "1G", "1T"
                                  # (powers of 1024); default: none
    allow_protected = false       # see "Protected devices"
    reset_on_release = false      # reset each endpoint (BDF/reset) before it goes back to the host
    revoke_grace = "30s"          # a revoked or expired lease's holders get this long to let go
    on_revoke = "kill"            # then: "kill" (SIGTERM, then SIGKILL) or "wait" for them
    revoke_others = false         # may the ladder end processes of other uids (root's too)?

    # Or, instead of lease terms: the rule's users may set the SR-IOV VF count of the
    # PFs it names (vfioctl vfs PF N), from 0 to this many.  Such a rule grants no lease
    # (lease the VFs through a rule with vf_of); with allow_protected it may name a
    # protected PF (say, the one carrying the default route) by address.
    max_vfs = 4

A group's decision combines the rules that decided its endpoints:

* backend: a request that names a backend needs every deciding rule to allow
  it.  A request that names none gets the first deciding rule's
  ``default_backend`` that every deciding rule allows (endpoints in address
  order); if there is none, it is denied and must name a backend.
* ``duration`` (seconds) above any deciding rule's ``max_duration`` is denied,
  naming the cap.  The lease's cap is the smallest of them: a request that
  gives no duration is allowed, and its lease ends at that cap.
* ``persistent`` is allowed only if every deciding rule allows it.
* ``memlock``: the lease gets the smallest grant of the deciding rules, none if
  any of them grants none: a grant is a privilege, and each rule is the most
  its admin agreed to for its devices.
* ``reset_on_release`` holds if any deciding rule asks for it: it protects
  the host, so one rule's request is enough.
* The revoke terms protect the host too: the shortest ``revoke_grace`` (30 s
  where none is set), ``on_revoke = "wait"`` only if every deciding rule says
  so, and ``revoke_others`` only if every deciding rule allows it.  The
  terms are recorded with the lease when it is granted.

Mediated devices
================

A rule may name types of mediated devices (mdev) instead of PCI devices; a lease
of ``mdev:PARENT/TYPE`` then creates a new instance of that type for its lessee
(a UUID vfiod chooses), hands over its emulated IOMMU group as the vfio backend
hands over any group, and removes the instance when the lease ends.  Instances
mdevctl defines are the admin's: vfiod neither leases nor removes them::

    [[rule]]
    mdev_types = ["mtty/mtty-2", "nvidia-*/*"]   # PARENT/TYPE as `vfiod inspect` lists them;
                                                 # each side may hold the globs *, ? and [...]
    users = ["alice"]
    max_duration = "8h"

Such a rule names no PCI device (it may not have ``address``, ``group``, ``ids``,
``class``, ``driver``, ``vf_of`` or ``resource``), and a rule for PCI devices never
allows an mdev, whatever it matches.  For a request of ``mdev:PARENT/TYPE`` only the
rules with ``mdev_types`` are tried, in order; the first naming both the type and
the caller decides, and none means no.  Its grant keys are the usual ones but for
``allow_protected``, ``reset_on_release`` and ``max_vfs``, which are errors there;
``backends`` may name only ``vfio`` (an instance is used through VFIO's group
interface).  A ``[[claim]]`` cannot name an mdev target: define an instance that
outlives its users with mdevctl.

Kubernetes namespaces
=====================

vfiod-dra, the Kubernetes node driver, asks for leases as its own user on
behalf of a pod's namespace: the request carries the option ``k8s_namespace``.
vfiod accepts that option only from a user some rule names in
``k8s_delegates``; from anyone else the request is refused whatever the
namespace.  A namespaced request is decided by the Kubernetes rules alone
(those with ``k8s_namespaces``) that name both the delegate and a pattern
matching the namespace, in the usual order, and no rule means no; a request
without the option is decided by the other rules alone, so a rule for the
delegate's own user never lets a namespace in, nor the reverse.  A deny rule
with ``k8s_namespaces = ["*"]`` after the allow rules names itself in every
refusal a namespace gets.  ``vfioctl policy test --user vfiod-dra
--k8s-namespace NS TARGET`` shows the decision.  The memlock grant of such a
lease is not applied to the delegate's process: vfiod-dra passes it on to the
container (/usr/share/doc/vfiod/docs/kubernetes.md).

Protected devices
=================

Devices the host needs (shown as protected: the boot VGA, the root disk's
controller, the default route's NIC) are denied unless the deciding rule names
them explicitly, by ``address``, ``resource`` or ``pool``, and has
``allow_protected = true``; the denial quotes why the device is protected.
(``allow_protected`` is an error in a rule that names no device that way.)

Named resources
===============

Like Proxmox VE's resource mappings: the admin names a set of devices by
address and ids, rules grant it with ``resource = "NAME"``, and users lease
``name:NAME``::

    [[resource]]
    name = "fast-nic"
    comment = "the 82574L in slot 4"        # optional
    devices = [{ address = "0000:04:00.0", ids = "8086:10d3", subsystem = "8086:a01f" }]

``ids`` (vendor:device) is required, ``subsystem`` (subsystem
vendor:device) optional.  If the hardware at an address changed (a card
swapped), the resource refuses, saying what changed, and rules naming it no
longer match that device.  A resource's devices must share one IOMMU group.

Pools
=====

Like a Proxmox VE mapping with several devices: a pool is a named set of
interchangeable members, each one IOMMU group's worth of devices, pinned to
the hardware the admin saw.  Users lease ``pool:NAME`` and get the first
member, in the order listed, that the rules give them and that is neither
leased nor in use on the host; the lease says which member it took
(``vfioctl leases --json``: ``member``).  ``vfioctl check pool:NAME`` says
which member a lease would take now, or why each member would be passed
over.  Rules grant a pool with ``pool = "NAME"``: it matches the devices of
its members, like ``resource``::

    [[pool]]
    name = "nics"
    comment = "the 82574L cards"              # optional
    members = [
        "fast-nic",                            # a [[resource]] (for a group of several devices)
        { address = "0000:05:00.0", ids = "8086:10d3", subsystem = "8086:a01f" },
        { address = "0000:06:00.0", ids = "8086:10d3" },
    ]

A member is the name of a ``[[resource]]`` (any file; named ``name:RES``)
or one device inline, with the keys of a resource's device (named by its
address).  A member whose hardware changed (a card swapped: other ids or
subsystem), that is gone, or whose devices span several groups is never
leased: it is passed over, with that reason in the answer.  An empty pool, a
member listed twice, a device in two members of one pool and a member naming
an unknown resource are errors.  A device may be a member of several pools
(each lease takes its group whole, under the group's lock, so two pools never
hand out one group twice).  ``pool:`` is a target of its own, not ``name:``:
``name:RES`` always means the same hardware, ``pool:NAME`` any one of several,
and the two kinds of name never shadow each other.

Delegated administration
========================

Like usbguard's ``IPCAllowedGroups``: the members of these unix groups may do
what otherwise only root may::

    admin_groups = ["vfio-admins"]    # above the file's first table; groups must exist

They may reload the policy (``vfioctl reload``, also ``--dry-run``), revoke
and release anyone's lease, read every lease in full (``vfioctl leases``,
``explain``), and see where the policy decides (rules' file:line in ``check``
and in refusals).  They get no device the rules do not give them: they may not
open or renew another's lease, lease a device the host uses (``force``), set
an SR-IOV PF's VF count beyond a ``max_vfs`` rule, or write the policy (its
files stay root's).  Membership is judged at each call: the caller's process
must carry the group (the bus's credentials, as file permissions would see
it), and the user database must still list the user in it, read again at each
call, so a user removed from the group loses the rights at once, though their
login sessions still carry the group.  The groups of every file add up.

Claims
======

Persistent leases the daemon takes when it starts, e.g. a DPDK service's NICs;
``vfioctl policy check`` checks and lists them::

    [[claim]]
    target = "name:fast-nic"      # an address, group:N, name:RESOURCE or pool:POOL
    user = "dpdk-svc"             # must exist
    backend = "vfio"              # optional: the policy's default
    comment = "testpmd at boot"   # optional
    early = true                  # optional: bind at boot, before the host driver

The lease is still judged by the rules (as a persistent lease for that user)
when the daemon applies the claim.

``early = true`` has the claim's devices bound to vfio-pci (pci-stub with
``backend = "pci-stub"``) by udev when the kernel adds them, before their host
driver's module loads, so a claimed NIC never comes up on the host.  It needs a
``name:RESOURCE`` target: udev claims a device only if its ids read then are
the ones the resource pins, never on its address alone.  vfiod writes the
claims for udev to /var/lib/vfiod/early.d whenever a policy loads, and takes
each device over when it starts.  A device that never had a host driver in
this boot is given back to the kernel's choice when its lease ends (its
override cleared and the device probed), not to vfio-pci.  A host driver built
into the kernel or loaded earlier (from the initramfs) binds first: then vfiod
moves the device when it starts, as for any claim.
"""

from __future__ import annotations
from .engine import Policy, PolicyStore
from .values import CLAIM_KEYS, POOL_KEYS, RESOURCE_KEYS, RULE_KEYS
from .locate import Locator
from .model import (ADMIN_GROUPS_HINT, describe_caller, AdminGroup, Pool, PoolMember, BUSY_PREFIX, DEFAULT_DIR, DEFAULT_REVOKE_GRACE, KNOWN_BACKENDS, ON_REVOKE, Caller, Claim, Decision, DeviceDecision, Refusal, Resource,
                    ResourceDevice, Rule, Target, hide_sources, parse_target, revoke_terms)
from .units import MAX_LEASE_SECONDS, format_duration, format_size, parse_duration, parse_size
from .users import LayeredUserDb, StaticUserDb, UserDb, system_users

__all__ = ["ADMIN_GROUPS_HINT", "describe_caller", "AdminGroup", "Pool", "PoolMember", "POOL_KEYS", "BUSY_PREFIX", "hide_sources", "LayeredUserDb", "DEFAULT_REVOKE_GRACE", "ON_REVOKE", "revoke_terms", "CLAIM_KEYS", "MAX_LEASE_SECONDS", "DEFAULT_DIR", "KNOWN_BACKENDS", "RESOURCE_KEYS", "RULE_KEYS", "Caller", "Claim",
           "Decision", "DeviceDecision", "Locator", "Policy", "PolicyStore", "Refusal", "Resource",
           "ResourceDevice", "Rule", "StaticUserDb", "Target", "UserDb", "format_duration", "format_size",
           "parse_duration", "parse_size", "parse_target", "system_users"]
