"""`vfioctl policy`: check policy files and ask "would this user get that device?" offline.

No daemon and no bus: the commands read the policy directory and (for
``test``) this host's sysfs, or a simulated host.  Failures are `VfiodError`s;
`vfiod.cmd.common.run` prints them and maps them to exit codes (2 for a broken
policy, 3 for a denial).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import TYPE_CHECKING, TextIO

from .. import policy
from ..errors import InvalidArgument, PermissionDenied, PolicyError
from ..policy import DEFAULT_DIR
from ..sysfs.device import VFIO_DRIVERS
from .common import EXIT_DENIED, EXIT_OK, EXIT_USAGE, JSON_HELP, add_root_options, duration_arg, host_roots, print_json

if TYPE_CHECKING:
    from ..address import PciAddress
    from ..sysfs import Roots
    from ..topology import Device, Host

POLICY_HELP = """\
Work with vfiod's policy offline: check the files, and test what a user would
get.  The daemon reads every *.toml file of its policy directory
(/etc/vfiod/policy.d) in name order; deny by default.  The file format is
described in `pydoc vfiod.policy` and by the examples in the source's policy/.

A file holds [[rule]] tables (which devices, who, which backends, how long),
[[resource]] tables (named devices, leased as name:NAME) and [[claim]] tables
(persistent leases taken at boot).  For each device the first rule that
matches both the device and the caller decides; a group is allowed only if
every endpoint in it is.

commands:
  check     validate the files and list rules, resources and claims
  test      would a user get a device or group?  (exit 0 yes, 3 no)
  generate  write a [[resource]] and [[rule]] for devices of this host

examples:
  vfioctl policy check
  vfioctl policy test --user alice 0000:04:00.0
"""

CHECK_HELP = """\
Read every *.toml file of DIR (default /etc/vfiod/policy.d) exactly as the
daemon does, and list what it found: each rule with the file and line it comes
from, the devices it matches, who it names and what it grants, then the named
resources and the boot claims.  Users and groups are looked up on this system.

A broken file refuses the whole policy: the message names the file, the line
and the key (for instance "10-nics.toml:7: key 'backnds': unknown key").  Check
after every edit, before `systemctl reload vfiod`: the daemon keeps the last
good policy when the new one is broken.

exit status:
  0  the policy is valid
  2  it is not (the message says where and why)

examples:
  vfioctl policy check
  vfioctl policy check ./policy.d
"""

TEST_HELP = """\
Answer "would USER get TARGET?" with the policy in --policy-dir and the devices
of this host (or of a simulated one), device by device, naming the rule that
decided each (file:line) or "no rule matched (deny by default)".  VFIO leases
whole IOMMU groups: the answer is yes only if every endpoint of the target's
group is allowed (bridges and ports are exempt).

TARGET is a PCI address (0000:04:00.0 or 04:00.0), group:N or name:RESOURCE.
USER is a user name or a numeric uid; their groups come from this system.
Give --backend, --duration and --persistent to test the terms of a request
too; without --backend the answer names the backend the rules default to.
Nothing is leased and the daemon is not asked.

exit status:
  0  allowed
  3  denied
  1  the target is not on this host, or a named resource's hardware changed
  2  usage error or broken policy

examples:
  vfioctl policy test --user alice 0000:01:00.0
  vfioctl policy test --user dpdk-svc --persistent name:fast-nic
  vfioctl policy test --user 1000 --policy-dir ./policy.d --simulate ich10 group:8
"""


def add_policy_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
                        formatter_class: type[argparse.HelpFormatter]) -> None:
    """Add ``policy check`` and ``policy test`` to vfioctl's sub-commands."""

    p = subparsers.add_parser("policy", help="check policy files; test what a user would get (offline)",
                              description=POLICY_HELP, formatter_class=formatter_class)
    p.set_defaults(func=lambda args: _usage(p))
    sub = p.add_subparsers(dest="policy_command", metavar="COMMAND")

    check = sub.add_parser("check", help="validate the policy files and list their rules",
                           description=CHECK_HELP, formatter_class=formatter_class)
    check.add_argument("directory", nargs="?", default=None, metavar="DIR",
                       help=f"the policy directory (default: {DEFAULT_DIR})")
    check.add_argument("--policy-dir", default=None, metavar="DIR", help="the same, as `policy test` takes it")
    check.add_argument("--simulate", nargs="?", const="ich10", default=None, metavar="TOPOLOGY",
                       help="also know the simulated hosts' users and groups (alice, bob, dpdk-svc, dpdk, ...)")
    check.add_argument("--json", action="store_true",
                       help=JSON_HELP + ", errors included")
    check.set_defaults(func=cmd_check)

    test = sub.add_parser("test", help="would USER get TARGET? (exit 0 yes, 3 no)",
                          description=TEST_HELP, formatter_class=formatter_class)
    test.add_argument("target", metavar="TARGET", help="0000:04:00.0, 04:00.0, group:N or name:RESOURCE")
    test.add_argument("--user", required=True, metavar="USER", help="a user name or a numeric uid")
    test.add_argument("--backend", default="", metavar="NAME",
                      help="vfio, libvirt, pci-stub, … (default: the one the rules default to)")
    test.add_argument("--policy-dir", default=DEFAULT_DIR, metavar="DIR",
                      help=f"the policy directory (default: {DEFAULT_DIR})")
    test.add_argument("--duration", type=duration_arg, default=0, metavar="D",
                      help="ask for a lease this long: 90s, 30m, 8h, 2d, 1h30m (default: none)")
    test.add_argument("--persistent", action="store_true", help="ask for a persistent lease")
    test.add_argument("--k8s-namespace", default=None, metavar="NS",
                      help="ask as a delegate (USER) speaking for this Kubernetes namespace, as vfiod-dra does")
    test.add_argument("--json", action="store_true", help=JSON_HELP)
    add_root_options(test)
    test.set_defaults(func=cmd_test)

    gen = sub.add_parser("generate", help="write a [[resource]] and a [[rule]] for devices of this host",
                         description=GENERATE_HELP, formatter_class=formatter_class)
    gen.add_argument("targets", nargs="*", metavar="TARGET", help="0000:04:00.0, 04:00.0 or group:N")
    gen.add_argument("--from-host", action="store_true",
                     help="instead of targets: early claims for what driverctl and vfio-pci.ids bind now")
    gen.add_argument("--etc-root", default="/etc", metavar="DIR",
                     help="with --from-host: where driverctl.d and modprobe.d are (default: /etc)")
    who = gen.add_mutually_exclusive_group()
    who.add_argument("--user", metavar="USER", help="the user who may lease them")
    who.add_argument("--unix-group", metavar="GROUP", help="the unix group whose members may lease them")
    gen.add_argument("--backend", default="vfio", metavar="NAME", help="vfio (default), libvirt or pci-stub")
    gen.add_argument("--name", metavar="NAME", help="the resource's name (default: from the first target)")
    gen.add_argument("--allow-protected", action="store_true",
                     help="also for devices the host needs (boot VGA, root disk, default-route NIC)")
    add_root_options(gen)
    gen.set_defaults(func=cmd_generate)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _backends() -> tuple[str, ...]:
    """The backend names the daemon would know: the built-in ones and those plugins register."""
    KNOWN_BACKENDS = policy.KNOWN_BACKENDS

    try:
        from ..backends import load_backends

        return tuple(dict.fromkeys((*KNOWN_BACKENDS, *load_backends())))
    except Exception as e:      # a broken plugin must not stop a policy check
        print(f"vfioctl: warning: cannot load backend plugins ({e}); "
              f"knowing only {', '.join(KNOWN_BACKENDS)}", file=sys.stderr)
        return KNOWN_BACKENDS


def _users(args: argparse.Namespace) -> policy.UserDb:
    """This system's users; with --simulate, the simulated hosts' people too."""
    from ..sim.users import users_for

    return users_for(getattr(args, "simulate", None))


def _load(directory: str, users: policy.UserDb | None = None) -> policy.Policy:
    # Offline, a user may check a draft of their own; the daemon trusts root's files only.
    owners = tuple(dict.fromkeys((0, os.getuid())))
    return policy.Policy.load(directory, backends=_backends(), users=users or policy.system_users(), owners=owners)


# ---------------------------------------------------------------- check

def cmd_check(args: argparse.Namespace) -> int:
    directory = _check_directory(args)
    if args.json:
        return _check_json(directory, _users(args))
    pol = _load(directory, _users(args))
    out = sys.stdout
    print(f"Policy {directory}: {_count(len(pol.files), 'file')}, {_count(len(pol.rules), 'rule')}, "
          f"{_count(len(pol.resources), 'resource')}, {_count(len(pol.claims), 'claim')}.", file=out)
    if pol.rules:
        print("\nRules, in the order they are tried:", file=out)
    for rule in pol.rules:
        title = f"  {rule.source}: {rule.action}"
        print(title + (f" — {rule.comment}" if rule.comment else ""), file=out)
        print(f"      devices: {rule.describe_devices()}", file=out)
        print(f"      who:     {rule.describe_who()}", file=out)
        if rule.allows:
            print(f"      grants:  {rule.describe_grant()}", file=out)
    if pol.resources:
        print("\nResources (lease them as name:NAME):", file=out)
    for res in pol.resources.values():
        _print_named(res, [d.describe() for d in res.devices], out)
    if pol.pools:
        print("\nPools (lease them as pool:NAME: the first free member you may have):", file=out)
    for pool in pol.pools.values():
        _print_named(pool, [f"{m.target}: {', '.join(d.describe() for d in m.resource.devices)}"
                            for m in pool.members], out)
    if pol.admin_groups:
        print("\nAdmin groups (may reload the policy, revoke and see every lease; no more devices):", file=out)
    for g in pol.admin_groups:
        print(f"  {g.name} (gid {g.gid}, {g.source})", file=out)
    if pol.claims:
        print("\nClaims (persistent leases taken when vfiod starts):", file=out)
    for c in pol.claims:
        backend = c.backend or "the default backend"
        early = f", bound early to {c.early_driver} by udev" if c.early else ""
        print(f"  {c.source}: {c.target} for {c.user} (uid {c.uid}) with {backend}{early}"
              + (f" — {c.comment}" if c.comment else ""), file=out)
    if not pol.rules:
        print("\nNo rules: every request is denied.", file=out)
    print("\nThe policy is valid.", file=out)
    return EXIT_OK


def _print_named(named: policy.Resource | policy.Pool, lines: list[str], out: TextIO) -> None:
    """A resource or pool of `policy check`: its name, where, its comment, then `lines`."""
    print(f"  {named.name} ({named.source})" + (f" — {named.comment}" if named.comment else ""), file=out)
    for line in lines:
        print(f"      {line}", file=out)


_ERROR_AT = re.compile(r"(?P<file>[^:\n]+?)(?::(?P<line>\d+))?:\s")


def _check_directory(args: argparse.Namespace) -> str:
    """DIR of `policy check [DIR]` or `--policy-dir DIR` (as `policy test` takes it), not both."""
    if args.directory is not None and args.policy_dir is not None and args.directory != args.policy_dir:
        raise InvalidArgument(f"two policy directories: {args.directory} and --policy-dir {args.policy_dir}")
    return str(args.directory or args.policy_dir or DEFAULT_DIR)


def _check_json(directory: str, users: policy.UserDb) -> int:
    """`policy check --json`: the policy as found, or every error (each with its file and line)."""
    try:
        pol = _load(directory, users)
    except PolicyError as e:
        errors = []
        for text in e.message.splitlines():
            m = _ERROR_AT.match(text)
            errors.append({"file": m["file"] if m else None,
                           "line": int(m["line"]) if m and m["line"] else None, "text": text})
        print_json("policy-check", directory=directory, valid=False, errors=errors, files=[], rules=[],
                   resources=[], claims=[])
        return EXIT_USAGE
    rules = [{"source": r.source, "action": r.action, "comment": r.comment or None,
              "devices": r.describe_devices(), "who": r.describe_who(),
              "grants": r.describe_grant() if r.allows else None} for r in pol.rules]
    resources = [{"name": res.name, "source": res.source, "comment": res.comment or None,
                  "devices": [d.describe() for d in res.devices]} for res in pol.resources.values()]
    claims = [{"source": c.source, "target": c.target, "user": c.user, "uid": c.uid, "backend": c.backend or None,
               "early": c.early}
              for c in pol.claims]
    print_json("policy-check", directory=directory, valid=True, errors=[], files=list(pol.files), rules=rules,
               resources=resources, claims=claims)
    return EXIT_OK


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ---------------------------------------------------------------- test

def cmd_test(args: argparse.Namespace) -> int:
    from ..sysfs import SysfsReader
    from ..topology import Host

    users = _users(args)
    uid, name = _user(args.user, users)
    caller = policy.Caller(uid=uid, gids=users.groups_of(uid))
    pol = _load(args.policy_dir, users)
    with host_roots(args) as roots:
        host = Host.scan(SysfsReader(roots))
    options: dict[str, object] = {"duration": args.duration, "persistent": args.persistent}
    if args.k8s_namespace is not None:
        options["k8s_namespace"] = args.k8s_namespace
    parsed = policy.parse_target(args.target)
    if parsed[0] == "mdev":          # a new instance of a type: no group to judge yet
        target, decision = None, pol.decide_mdev(caller, parsed[1], args.backend, options)
    else:
        target, decision = pol.decide_target(host, caller, args.target, args.backend, options)

    if args.json:
        return _test_json(args, host, uid, name, caller, users, target, decision)
    groups = ", ".join(users.group_name(g) or str(g) for g in sorted(caller.gids)) or "none"
    print(f"User {name or '(no such user)'} (uid {uid}; groups: {groups})")
    terms = [f"backend {args.backend or '(the default)'}"]
    if args.duration:
        terms.append(f"for {policy.format_duration(args.duration)}")
    if args.persistent:
        terms.append("persistent")
    if args.k8s_namespace is not None:
        terms.append(f"for Kubernetes namespace {args.k8s_namespace}")
    if target is None:
        print(f"Target {args.target}: a new instance of mdev type {args.target[5:]}; asking for {', '.join(terms)}")
    else:
        members = host.groups[target.group].members
        print(f"Target {args.target}: IOMMU group {target.group} ({_count(len(members), 'device')}); "
              f"asking for {', '.join(terms)}")
    print()
    for d in decision.devices:
        dev = host.devices[d.address]
        if dev.is_bridge:
            verdict, why = "exempt", "bridge or port"
        elif d.allowed:
            verdict, why = "allowed", f"rule {d.rule}"
        else:
            verdict, why = "denied", d.reason
        ids = f"{_hex(dev.raw.vendor)}:{_hex(dev.raw.device)}"
        print(f"  {d.address}  {ids}  {dev.driver or '(no driver)':<14} {verdict:<8} {why}")
    print()
    if not decision.allowed:
        print(f"DENIED: {decision.reason}")
        return EXIT_DENIED
    grant = [f"backend {decision.backend}"]
    grant.append(f"at most {policy.format_duration(decision.max_duration)}" if decision.max_duration
                 else "no duration cap")
    grant.append("persistent leases allowed" if decision.persistent else "no persistent leases")
    grant.append(f"RLIMIT_MEMLOCK {policy.format_size(decision.memlock)}" if decision.memlock
                 else "no RLIMIT_MEMLOCK grant")
    grant.append(policy.revoke_terms(decision.revoke_grace, decision.on_revoke, decision.revoke_others))
    print(f"ALLOWED by rule {decision.rule}: {'; '.join(grant)}")
    return EXIT_OK


def _test_json(args: argparse.Namespace, host: Host, uid: int, name: str | None, caller: policy.Caller,
               users: policy.UserDb, target: policy.Target | None, decision: policy.Decision) -> int:
    devices = []
    for d in decision.devices:
        dev = host.devices[d.address]
        verdict = "exempt" if dev.is_bridge else ("allowed" if d.allowed else "denied")
        devices.append({"address": str(d.address), "ids": f"{_hex(dev.raw.vendor)}:{_hex(dev.raw.device)}",
                        "driver": dev.driver, "verdict": verdict, "rule": d.rule or None,
                        "reason": "bridge or port" if dev.is_bridge else d.reason})
    grant = None
    if decision.allowed:
        grant = {"backend": decision.backend, "max_duration": decision.max_duration or None,
                 "persistent": bool(decision.persistent), "memlock": decision.memlock or None,
                 "revoke_grace": decision.revoke_grace, "on_revoke": decision.on_revoke,
                 "revoke_others": decision.revoke_others}
    print_json("policy-test",
               user={"name": name, "uid": uid,
                     "groups": [users.group_name(g) or str(g) for g in sorted(caller.gids)]},
               target=args.target, group=target.group if target else None,
               request={"backend": args.backend or None, "duration": args.duration or None,
                        "persistent": args.persistent, "k8s_namespace": args.k8s_namespace},
               allowed=decision.allowed, rule=decision.rule or None, reason=decision.reason,
               devices=devices, grant=grant)
    return EXIT_OK if decision.allowed else EXIT_DENIED


GENERATE_HELP = """\
Write policy for devices of this host, like `usbguard generate-policy`: a
[[resource]] that pins the devices of each target's IOMMU group (address,
vendor:device and subsystem ids, read from the device now) and a [[rule]] that
lets USER (or the members of GROUP) lease it with BACKEND.  A lease takes a
whole group, so every endpoint of a target's group is named; bridges and ports
are not.  The output passes `vfioctl policy check`; review it, then save it in
/etc/vfiod/policy.d/.

With --from-host (no targets), move from driverctl or vfio-pci.ids to vfiod:
read driverctl's saved overrides (/etc/driverctl.d/pci-ADDRESS naming vfio-pci
or pci-stub) and vfio-pci.ids= (the kernel command line, and "options vfio-pci
ids=" in /etc/modprobe.d/*.conf), and write an early [[claim]] for USER
(default root) for each IOMMU group they bind, its [[resource]] pinned to the
ids sysfs shows now, and one [[rule]] allowing USER to hold them.  Comments
say where each claim came from and what was skipped.  Then remove the old
configuration: vfiod's claims replace it.

examples:
  vfioctl policy generate 0000:04:00.0 --user alice > /etc/vfiod/policy.d/50-alice.toml
  vfioctl policy generate group:8 --unix-group dpdk --backend vfio --name fast-nics
  vfioctl policy generate --from-host > /etc/vfiod/policy.d/20-from-driverctl.toml
"""


def cmd_generate(args: argparse.Namespace) -> int:
    from ..sysfs import SysfsReader
    from ..topology import Host

    if args.from_host and args.targets:
        raise InvalidArgument("give targets or --from-host, not both")
    if not args.from_host and not args.targets:
        raise InvalidArgument("name the devices to generate policy for (TARGET ...), or pass --from-host")
    if args.from_host:
        args.user = args.user or "root"
    elif args.user is None and args.unix_group is None:
        raise InvalidArgument("say who may lease them: --user USER or --unix-group GROUP")
    users = _users(args)
    if args.user is not None and users.uid(args.user) is None and not args.user.isdigit():
        raise InvalidArgument(f"no user named {args.user!r} on this system")
    if args.unix_group is not None and users.gid(args.unix_group) is None:
        raise InvalidArgument(f"no unix group named {args.unix_group!r} on this system")
    if args.backend not in _backends():
        raise InvalidArgument(f"unknown backend {args.backend!r} (known: {', '.join(_backends())})")
    if args.from_host:
        with host_roots(args) as roots:
            return _generate_from_host(args, Host.scan(SysfsReader(roots)), roots)
    name = args.name or _resource_name(args.targets[0])
    if not policy.model._NAME.fullmatch(name):
        raise InvalidArgument(f"not a resource name: {name!r} (letters, digits, '.', '_', '-')")
    with host_roots(args) as roots:
        host = Host.scan(SysfsReader(roots))
    empty = policy.Policy.empty()
    devices: list[Device] = []
    for target in args.targets:
        if target.startswith("name:"):
            raise InvalidArgument(f"{target}: generate names devices of this host (an address or group:N)")
        group = host.groups[empty.resolve(host, target).group]
        for addr in group.members:
            dev = host.devices[addr]
            if dev.is_bridge or any(d is dev for d in devices):
                continue
            if dev.protected and not args.allow_protected:
                raise PermissionDenied(f"{addr} is protected ({dev.protected}); pass --allow-protected if "
                                       "the host can really do without it")
            if dev.raw.vendor is None or dev.raw.device is None:
                raise InvalidArgument(f"cannot read the ids of {addr}")
            devices.append(dev)
    if not devices:
        raise InvalidArgument("the targets' groups hold no endpoint to lease (only bridges and ports)")
    who = f'users = ["{args.user}"]' if args.user is not None else f'groups = ["{args.unix_group}"]'
    lines = [f"# Generated by vfioctl policy generate {' '.join(args.targets)}", "[[resource]]",
             f'name = "{name}"', "devices = ["]
    lines += [_device_line(dev) for dev in devices]
    lines += ["]", "", "[[rule]]", f'resource = "{name}"', who, f'backends = ["{args.backend}"]']
    if any(dev.protected for dev in devices):
        lines.append("allow_protected = true           # " + "; ".join(d.protected for d in devices if d.protected))
    print("\n".join(lines))
    return EXIT_OK


def _device_line(dev: Device) -> str:
    """One device of a generated [[resource]], pinned to the ids it shows now."""
    r = dev.raw
    sub = (f', subsystem = "{r.subsystem_vendor:04x}:{r.subsystem_device:04x}"'
           if r.subsystem_vendor is not None and r.subsystem_device is not None else "")
    return (f'    {{ address = "{dev.addr}", ids = "{r.vendor:04x}:{r.device:04x}"{sub} }},'
            f'   # group {dev.group}, now on {dev.driver or "no driver"}')


def _generate_from_host(args: argparse.Namespace, host: Host, roots: Roots) -> int:
    """`policy generate --from-host`: an early [[claim]] (with its [[resource]]) for each IOMMU
    group that driverctl's saved overrides or vfio-pci.ids bind to a VFIO driver, and one
    [[rule]] that lets the claims' user hold them; comments say where each came from."""
    from ..sysfs.hostconfig import driverctl_overrides, vfio_pci_ids

    why: dict[PciAddress, list[str]] = {}
    stub: set[PciAddress] = set()
    notes: list[str] = []
    for addr, driver in driverctl_overrides(args.etc_root).items():
        origin = f"/etc/driverctl.d/pci-{addr} (driverctl: {driver})"
        if addr not in host.devices:
            notes.append(f"# {origin}: no such device on this host now; skipped")
        elif driver not in VFIO_DRIVERS:
            notes.append(f"# {origin}: not a VFIO driver, which vfiod does not set; keep driverctl for it")
        else:
            why.setdefault(addr, []).append(origin)
            if driver == "pci-stub":
                stub.add(addr)
    for entry in vfio_pci_ids(roots, args.etc_root):
        origin = f"vfio-pci.ids={entry.text} ({entry.origin})"
        found = [d.addr for d in host.devices.values()
                 if entry.matches(d.raw.vendor, d.raw.device, (d.raw.subsystem_vendor, d.raw.subsystem_device))]
        if not found:
            notes.append(f"# {origin}: matches no device of this host now; skipped")
        for addr in found:
            why.setdefault(addr, []).append(origin)
    claims: dict[int, list[PciAddress]] = {}
    for addr in sorted(why):
        dev = host.devices[addr]
        if dev.group is None:
            notes.append(f"# {addr} ({'; '.join(why[addr])}): in no IOMMU group, so VFIO cannot take it; skipped")
        elif dev.protected and not args.allow_protected:
            notes.append(f"# {addr} ({'; '.join(why[addr])}): protected ({dev.protected}); skipped "
                         "(--allow-protected if the host can really do without it)")
        else:
            claims.setdefault(dev.group, []).append(addr)
    lines = [f"# Generated by vfioctl policy generate --from-host: what driverctl and vfio-pci.ids bind now,",
             f"# as early claims for {args.user}, each device pinned to the ids it shows now.", *notes]
    names, backends = [], set()
    for group, named in sorted(claims.items()):
        members = [host.devices[a] for a in host.groups[group].members if not host.devices[a].is_bridge]
        if any(d.raw.vendor is None or d.raw.device is None for d in members):
            lines.append(f"# IOMMU group {group}: the ids of a member cannot be read; skipped")
            continue
        name = _resource_name(f"group:{group}")
        backend = "pci-stub" if set(named) <= stub else "vfio"
        names.append(name)
        backends.add(backend)
        lines += ["", *(f"# {a}: {o}" for a in named for o in why[a])]
        lines += [f"# a lease takes IOMMU group {group} whole: {', '.join(str(d.addr) for d in members)}"
                  ] if len(members) > 1 else []
        lines += ["[[resource]]", f'name = "{name}"', "devices = [", *map(_device_line, members), "]",
                  "", "[[claim]]", f'target = "name:{name}"', f'user = "{args.user}"', f'backend = "{backend}"',
                  "early = true"]
    if not names:
        lines.append("# Nothing to claim: no driverctl override or vfio-pci.ids entry binds a device of "
                     "this host to a VFIO driver.")
    else:
        lines += ["", "[[rule]]", f"resource = {json.dumps(names)}", f'users = ["{args.user}"]',
                  f"backends = {json.dumps(sorted(backends))}", "persistent = true"]
        if args.allow_protected and any(host.devices[a].protected for g in claims.values() for a in g):
            lines.append("allow_protected = true")
    print("\n".join(lines))
    return EXIT_OK


def _resource_name(target: str) -> str:
    """dev-0000-04-00.0 or group-8: a resource name from a target."""
    if target.startswith("group:"):
        return "group-" + target[6:]
    from ..address import PciAddress
    return "dev-" + str(PciAddress.parse(target)).replace(":", "-")


def _user(text: str, users: policy.UserDb) -> tuple[int, str | None]:
    """(uid, name) of a user name or numeric uid; `InvalidArgument` for an unknown name."""
    if text.isdigit():
        uid = int(text)
        if uid > 0xFFFFFFFE:
            raise InvalidArgument(f"not a uid: {text}")
        return uid, users.user_name(uid)
    known = users.uid(text)
    if known is None:
        raise InvalidArgument(f"no user named {text!r} on this system")
    return known, text


def _hex(v: int | None) -> str:
    return "????" if v is None else f"{v:04x}"
