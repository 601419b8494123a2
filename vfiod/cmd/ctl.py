"""`vfioctl`'s commands that talk to the daemon (all over D-Bus; none reads sysfs)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

from .. import __version__
from ..address import PciAddress
from ..errors import InvalidAddress, InvalidArgument, NotFound, VfiodError
from ..wire import group_number, lease_id_of
from ..wire.names import bus_arg
from ..report import Json, prune_tree, render_groups, render_tree
from .common import (EXIT_BUSY, EXIT_DENIED, EXIT_FAIL, EXIT_OK, EXIT_USAGE, JSON_HELP, Formatter,
                     duration_arg, print_json, run)
from .helptext import HELP
from .reload import cmd_reload
from .talk import run_client as _run
from .withlease import run_with_lease, seconds_left as _seconds_left
from .policy import add_policy_commands
from .status import add_status_command
from .overrides import add_overrides_command


if TYPE_CHECKING:
    from ..client import Client


def cmd_groups(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        groups = await client.groups_json()
        if args.json:
            print_json("groups", groups=groups)
        else:
            sys.stdout.write(render_groups(groups, explain=args.explain) or await _no_groups(client))
        return EXIT_OK
    return _run(args, go)


async def _no_groups(client: Client) -> str:
    """What `groups` says when there are none: with the IOMMU off, how to turn it on."""
    from ..topology import ENABLE_IOMMU

    manager = await client.properties("/org/vfiod1", "org.vfiod1.Manager")
    if manager.get("IommuEnabled", True):
        return "No IOMMU groups.\n"
    return f"No IOMMU groups: the IOMMU is missing or off, so VFIO cannot isolate any device. {ENABLE_IOMMU}\n"


async def _each(targets: Sequence[str], one: Callable[[str, bool], Awaitable[int]]) -> int:
    """Run `one(target, several)` for each target (as dpdk-devbind takes several devices): a
    target that fails is said and the next one tried; the exit status is the first failure's."""
    rc = EXIT_OK
    several = len(targets) > 1
    for target in targets:
        try:
            code = await one(target, several)
        except VfiodError as e:
            if not several:
                raise
            print(f"vfioctl: {target}: {e}", file=sys.stderr)
            code = e.exit_code
        rc = rc or code
    return rc


def cmd_show(args: argparse.Namespace) -> int:
    if not args.targets and not args.tree:
        raise InvalidArgument("show: name a TARGET (0000:04:00.0, group:8, name:RESOURCE, an interface), "
                              "or --tree for the whole PCI tree")

    async def go(client: Client) -> int:
        if args.tree:
            return await _show_tree(client, args.targets, args.json)

        async def one(target: str, several: bool) -> int:
            group = (await client.groups_json([target]))[0]
            if args.json:
                print_json("group", one_line=several, target=target, group=group)
            else:
                print(render_groups([group], explain=True), end="")
            return EXIT_OK
        return await _each(args.targets, one)
    return _run(args, go)


async def _show_tree(client: Client, targets: Sequence[str], as_json: bool) -> int:
    """The PCI tree as vfiod last scanned it; with targets, only the branches leading to
    them (an address: that function; any other target: its group's functions)."""
    reply = await client.call("/org/vfiod1", "org.vfiod1.Manager", "TreeJson")
    buses: list[Json] = json.loads(reply.body[0])
    if targets:
        keep: set[str] = set()
        for target in targets:
            try:
                keep.add(str(PciAddress.parse(target)))
            except InvalidAddress:
                keep.update(d["address"] for g in await client.groups_json([target]) for d in g["devices"])
        buses = prune_tree(buses, keep)
        if not buses:
            raise NotFound(f"no PCI function {', '.join(targets)} in the tree vfiod sees")
    if as_json:
        print_json("tree", buses=buses)
    else:
        sys.stdout.write(render_tree(buses) or "No PCI devices.\n")
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        async def one(target: str, several: bool) -> int:
            reply = await client.call("/org/vfiod1", "org.vfiod1.Manager", "Explain", "s", [target])
            if args.json:
                groups = await client.groups_json([target]) if reply.body[0].startswith("IOMMU group") else []
                print_json("explain", one_line=several, target=target, text=reply.body[0],
                           group=groups[0] if groups else None)
            else:
                print(reply.body[0] + ("\n" if several else ""))
            return EXIT_OK
        return await _each(args.targets, one)
    return _run(args, go)


def cmd_check(args: argparse.Namespace) -> int:
    from ..policy import BUSY_PREFIX

    async def go(client: Client) -> int:
        async def one(target: str, several: bool) -> int:
            reply = await client.call("/org/vfiod1", "org.vfiod1.Manager", "CheckAccess", "ss",
                                      [target, args.backend or ""])
            allowed, rule, reason = reply.body[0]
            busy = not allowed and reason.startswith(BUSY_PREFIX)
            if args.json:
                print_json("check", one_line=several, target=target, backend=args.backend or None,
                           allowed=allowed, busy=busy, rule=rule or None, reason=reason)
            else:
                word = "busy" if busy else "allowed" if allowed else "denied"
                text = reason.removeprefix(BUSY_PREFIX)
                print(f"{target + ': ' if several else ''}{word}: {text}"
                      + (f" ({rule})" if rule and rule not in text else ""))
            return EXIT_OK if allowed else EXIT_BUSY if busy else EXIT_DENIED
        return await _each(args.targets, one)
    return _run(args, go)


def _time_left(expires: int) -> str:
    if not expires:
        return "no limit"
    from ..policy import format_duration
    left = int(expires - time.time())
    return "due" if left <= 0 else format_duration(left)


async def _lease_objects(client: Client, paths: list[str]) -> list[Json]:
    """The lease objects (docs/json.md) of these lease paths; leases that ended meanwhile are left out."""
    from ..client import lease_json

    found = []
    for path in paths:
        try:
            found.append(await client.properties(path, "org.vfiod1.Lease"))
        except VfiodError:          # ended between the two calls
            continue
    if not found:
        return []
    # An mdev lease's group holds its instance alone, no PCI device: there is no group object to ask.
    targets = [f"group:{int(p['Group'].rsplit('/', 1)[-1])}" for p in found if not p.get("Mdev")]
    groups = {g["group"]: g for g in await client.groups_json(targets)} if targets else {}
    out = []
    for props in found:
        g = groups.get(group_number(props["Group"]))
        out.append(lease_json(props, [d["address"] for d in g["devices"] if not d["bridge"]] if g else []))
    return out


def cmd_leases(args: argparse.Namespace) -> int:
    """Your leases (root and the policy's admin_groups: everyone's)."""
    async def go(client: Client) -> int:
        manager = await client.properties("/org/vfiod1", "org.vfiod1.Manager")
        mine = os.getuid()
        everyone = mine == 0 or (await client.caller_rights())[0]
        rows = [r for r in await _lease_objects(client, manager.get("Leases", []))
                if everyone or r["owner"] == mine]
        if args.json:
            print_json("leases", leases=rows)
        elif not rows:
            print("No leases.")
        else:
            print(f"{'LEASE':<17} {'GROUP':>5} {'USER':<12} {'BACKEND':<8} {'PERSISTENT':<10} "
                  f"{'TIME LEFT':<10} {'STATE':<22} DEVICES")
            for r in rows:
                print(f"{r['id']:<17} {r['group']:>5} {r['user'][:12]:<12} {r['backend']:<8} "
                      f"{'yes' if r['persistent'] else 'no':<10} {_time_left(r['expires']):<10} "
                      f"{_state_words(r):<22} {' '.join(r['devices']) or _mdev_words(r)}")
                if r.get("revoke_waiting"):
                    print(f"{'':<17} waits for: {r['revoke_waiting']}")
        return EXIT_OK
    return _run(args, go)


def _mdev_words(lease: Json) -> str:
    """What an mdev lease holds, for people: ``mdev mtty/mtty-2 UUID``."""
    return f"mdev {lease['mdev_type']} {lease['mdev']}" if lease.get("mdev") else ""


def _state_words(lease: Json) -> str:
    """``granted``, or ``revoking (12s left)`` / ``revoking (grace over)``."""
    if lease["state"] != "revoking":
        return str(lease["state"])
    left = _seconds_left(lease["revoke_deadline"] or 0)
    return f"revoking ({left}s left)" if left > 0 else "revoking (grace over)"


def cmd_monitor(args: argparse.Namespace) -> int:
    from .monitor import monitor

    return _run(args, lambda client: monitor(client, args.json))


def cmd_lease(args: argparse.Namespace) -> int:
    command = list(args.run_command or [])
    if args.xml:             # the hostdev XML is the libvirt backend's: ask for it, or refuse before granting
        if args.backend and args.backend != "libvirt":
            raise InvalidArgument(f"--xml is the libvirt backend's hostdev XML; the {args.backend} backend "
                                  "has none (leave out --backend, or --backend libvirt)")
        args.backend = "libvirt"
    if command and not shutil.which(command[0]):
        # Say so before a whole group is rebound for a command that cannot start.
        raise NotFound(f"no such command: {command[0]!r} (not found or not executable)")

    async def go(client: Client) -> int:
        # With a command: where systemd runs, vfiod puts this process (and so CMD) in a scope of its own;
        # this process's pidfd tells vfiod which process that is (a pid alone could be another's).
        from ..client import own_pidfd
        pidfd = own_pidfd()
        try:
            path = await client.request_lease(args.target, args.backend or "", args.duration, args.persistent,
                                              args.force, scope=bool(command), pidfd=pidfd)
        finally:
            if pidfd is not None:
                os.close(pidfd)
        lease_id = lease_id_of(path)
        props = await client.properties(path, "org.vfiod1.Lease")
        group = group_number(props["Group"])
        took = f" (pool member {props['Member']})" if props.get("Member") else ""
        if props.get("Mdev"):
            took += f" (mdev {props['MdevType']} {props['Mdev']})"
        print(f"vfioctl: lease {lease_id}: IOMMU group {group}{took} via the {props['Backend']} backend",
              file=sys.stderr)
        warnings = props.get("Warnings") or []
        for w in warnings:
            print(f"vfioctl: warning: {w}", file=sys.stderr)
        if command and warnings and not args.ignore_memlock:
            # A program that pins memory would fail later, and less clearly (DPDK: "DMA remapping failed").
            await client.lease_call(path, "Release")
            print(f"vfioctl: lease {lease_id} released; not starting {command[0]} "
                  "(--ignore-memlock starts it anyway)", file=sys.stderr)
            return EXIT_FAIL
        if args.json:
            print_json("lease", lease=(await _lease_objects(client, [path]))[0])
        if args.xml:
            print((await client.lease_call(path, "HostdevXml")).body[0])
        try:
            if command:
                return await run_with_lease(client, path, props, group, command, args.pass_fd, args.iommufd)
            if args.persistent:
                if not args.json:
                    print(lease_id)
                return EXIT_OK
            print("vfioctl: holding the lease; Ctrl-C (or SIGTERM) releases it", file=sys.stderr)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            return EXIT_OK
        finally:
            if command or not args.persistent:
                try:
                    await client.lease_call(path, "Release")
                    print(f"vfioctl: lease {lease_id} released", file=sys.stderr)
                except NotFound:            # vfiod ended it first (revoked, expired, removed)
                    print(f"vfioctl: lease {lease_id} had already ended", file=sys.stderr)
                except Exception as e:      # the lease also ends when this connection closes
                    print(f"vfioctl: releasing {lease_id}: {e}", file=sys.stderr)
    return _run(args, go)


def cmd_vfs(args: argparse.Namespace) -> int:
    if args.count < 0:
        raise InvalidArgument(f"not a number of VFs: {args.count}")

    async def go(client: Client) -> int:
        before = (await client.call("/org/vfiod1", "org.vfiod1.Manager", "SetVfCount", "su",
                                    [args.target, args.count], timeout=max(args.timeout, 120))).body[0]
        if args.json:
            print_json("vfs", pf=args.target, before=before, after=args.count)
        else:
            print(f"{args.target}: {before} -> {args.count} VFs")
        return EXIT_OK
    return _run(args, go)


_LEASE_ID = re.compile(r"[0-9a-f]{16}")


async def _leases_to_release(client: Client, args: argparse.Namespace) -> list[str]:
    """The lease ids `vfioctl release` means: an id, the lease of a target's group, or --all."""
    if args.all:
        manager = await client.properties("/org/vfiod1", "org.vfiod1.Manager")
        return [lease_id_of(path) for path in manager.get("Leases", [])]
    if not args.lease:
        raise InvalidArgument("name a lease id, a target (address, group:N, name:RESOURCE) or --all")
    if _LEASE_ID.fullmatch(args.lease):
        return [args.lease]
    group = (await client.groups_json([args.lease]))[0]
    if not group["lease"]:
        raise NotFound(f"IOMMU group {group['group']} ({args.lease}) is not leased")
    return [group["lease"]]


def cmd_release(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        ids = await _leases_to_release(client, args)
        if not ids and not args.json:
            print("No leases.")
        for lease_id in ids:
            path = f"/org/vfiod1/lease/{lease_id}"
            try:
                await client.lease_call(path, "Release")
            except NotFound:
                raise NotFound(f"no lease {lease_id} (it ended, or never was)") from None
            try:
                after = await client.properties(path, "org.vfiod1.Lease")
            except VfiodError:
                after = {}                    # ended: the usual case
            if after.get("State") == "revoking" and not args.json:
                left = _seconds_left(after.get("RevokeDeadline", 0))
                print(f"lease {lease_id}: processes still hold its group; vfiod is revoking it (they have "
                      f"{left} s to let go, then the policy says what happens: `vfioctl leases` shows it)",
                      file=sys.stderr)
            elif not args.json:
                print(f"released {lease_id}")
        if args.json:
            print_json("release", released=ids)
        return EXIT_OK
    return _run(args, go)


def cmd_revoke(args: argparse.Namespace) -> int:
    """Root: take a lease back through the revoke ladder; wait for its end unless --wait 0."""
    async def go(client: Client) -> int:
        args.all = False
        (lease_id,) = await _leases_to_release(client, args)
        path = f"/org/vfiod1/lease/{lease_id}"
        told = await client.lease_signals(path)
        start = time.monotonic()
        try:
            await client.call("/org/vfiod1", "org.vfiod1.Manager", "Revoke", "os", [path, args.reason])
        except NotFound:
            raise NotFound(f"no lease {lease_id} (it ended, or never was)") from None
        ended = await _wait_for_end(client, path, told, args, lease_id) if args.wait else False
        seconds = round(time.monotonic() - start, 2)
        if args.json:
            print_json("revoke", lease=lease_id, reason=args.reason, ended=ended, seconds=seconds)
        elif ended:
            print(f"revoked {lease_id} in {seconds:g} s: its devices are back on their drivers")
        elif args.wait:
            waits = ""
            try:
                waits = (await client.properties(path, "org.vfiod1.Lease")).get("RevokeWaiting") or ""
            except VfiodError:
                pass
            print(f"vfioctl: lease {lease_id} is still being revoked after {seconds:g} s "
                  f"(`vfioctl leases` shows it){'; it waits for: ' + waits if waits else ''}", file=sys.stderr)
        return EXIT_OK if ended or not args.wait else EXIT_FAIL
    return _run(args, go)


async def _wait_for_end(client: Client, path: str, told: asyncio.Queue[tuple[str, list[Any]]],
                        args: argparse.Namespace, lease_id: str) -> bool:
    """Until the lease ends (True) or --wait seconds pass (False), saying what vfiod says."""
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        try:
            member, body = await asyncio.wait_for(told.get(), min(1.0, max(0.01, deadline - time.monotonic())))
        except asyncio.TimeoutError:
            try:                                 # a signal missed: ask the object itself
                await client.properties(path, "org.vfiod1.Lease")
            except NotFound:
                return True
            continue
        if member == "LeaseEnded":
            return True
        if not args.json:
            left = _seconds_left(body[2])
            print(f"vfioctl: revoking {lease_id} ({body[1]}): its holders have {left} s to let go",
                  file=sys.stderr, flush=True)
    return False


def _wait_seconds(text: str) -> float:
    """--wait: 0 (do not wait) or a number of seconds up to a day."""
    return 0.0 if text.strip() in ("0", "0.0") else _positive_seconds(text)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"not a number of seconds between 0 and 86400: {text!r}")
    return value


_FUNCTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "groups": cmd_groups,
    "show": cmd_show,
    "explain": cmd_explain,
    "check": cmd_check,
    "leases": cmd_leases,
    "lease": cmd_lease,
    "vfs": cmd_vfs,
    "reload": cmd_reload,
    "monitor": cmd_monitor,
    "release": cmd_release,
    "revoke": cmd_revoke,
}
COMMANDS = {name: (summary, _FUNCTIONS[name], description) for name, (summary, description) in HELP.items()}


def add_bus_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                     formatter: type[argparse.HelpFormatter]) -> None:
    for name, (summary, fn, description) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=description, formatter_class=formatter)
        p.add_argument("--bus", default=os.environ.get("VFIOD_BUS") or "system", type=bus_arg,
                       metavar="system|session|ADDRESS",
                       help="the bus vfiod is on (default: $VFIOD_BUS, else system)")
        p.add_argument("--timeout", type=_positive_seconds, default=30.0, metavar="SECONDS",
                       help="how long to wait for each answer (default 30)")
        mdev = ", mdev:PARENT/TYPE (a new mediated device instance)" if name in ("check", "lease") else ""
        if name in ("show", "explain", "check"):
            p.add_argument("targets", nargs="*" if name == "show" else "+", metavar="TARGET",
                           help="0000:04:00.0, 04:00.0, group:8, name:RESOURCE or a network interface (enp4s0)"
                                f"{mdev}; several are taken one by one")
        if name in ("lease", "vfs"):
            p.add_argument("target", metavar="TARGET",
                           help=f"0000:04:00.0, 04:00.0, group:8, name:RESOURCE or a network interface (enp4s0){mdev}")
        if name in ("groups", "show", "explain", "check", "leases", "lease", "reload", "release", "vfs",
                    "monitor", "revoke"):
            p.add_argument("--json", action="store_true", help=JSON_HELP)
        if name == "groups":
            p.add_argument("--explain", action="store_true", help="add why each group is what it is")
        if name == "show":
            p.add_argument("--tree", action="store_true",
                           help="the PCI tree (root buses, bridges and ports, functions) with each function's "
                                "IOMMU group, driver, PCIe link and NUMA node, like lspci -tv; with targets, "
                                "only the branches leading to them")
        if name in ("check", "lease"):
            p.add_argument("--backend", default="", help="vfio, libvirt or pci-stub (default: the policy's)")
        if name == "lease":
            p.add_argument("--duration", type=duration_arg, metavar="D", help="e.g. 90s, 30m, 2h")
            p.add_argument("--persistent", action="store_true",
                           help="keep the lease after vfioctl exits (if the policy allows)")
            p.add_argument("--force", action="store_true",
                           help="root only: lease even if the host uses the device")
            p.add_argument("--xml", action="store_true",
                           help="print the libvirt hostdev XML (implies --backend libvirt)")
            p.add_argument("--ignore-memlock", action="store_true",
                           help="start CMD even if the policy's memlock grant could not be applied")
            p.add_argument("--pass-fd", action="store_true",
                           help="give CMD the open group fd in VFIOD_GROUP_FD (a group opens only once: "
                                "leave this off for DPDK and QEMU, which open /dev/vfio/N themselves)")
            p.add_argument("--iommufd", action="store_true",
                           help="with --pass-fd: give CMD each device's cdev fd in VFIOD_DEVICE_FDS and an "
                                "iommufd in VFIOD_IOMMU_FD instead of the group fd (kernels with VFIO device "
                                "cdevs; a device binds to an iommufd only while its group is not open)")
            p.set_defaults(run_command=[])
        if name == "release":
            p.add_argument("lease", metavar="ID|TARGET", nargs="?")
            p.add_argument("--all", action="store_true", help="every lease you may release (root: all)")
        if name == "vfs":
            p.add_argument("count", type=int, metavar="COUNT")
        if name == "reload":
            p.add_argument("--dry-run", action="store_true",
                           help="say whether the policy loads and which leases it would revoke; change nothing")
        if name == "revoke":
            p.add_argument("lease", metavar="ID|TARGET")
            p.add_argument("--reason", default="revoked", help="why (LeaseRevoking and the audit record say it)")
            p.add_argument("--wait", type=_wait_seconds, default=600.0, metavar="SECONDS",
                           help="how long to wait for the lease to end (default 600; 0: return once the "
                                "revoke has begun)")
        p.set_defaults(func=fn)


def vfioctl_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfioctl", formatter_class=Formatter,
        description="vfioctl: ask vfiod for IOMMU groups, explanations and leases; check policy files.",
    )
    p.add_argument("--version", action="version", version=f"vfioctl {__version__}")
    p.set_defaults(func=None, run_command=None)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    add_bus_commands(sub, Formatter)
    add_status_command(sub, Formatter)
    add_overrides_command(sub, Formatter)
    add_policy_commands(sub, Formatter)
    return p



def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:                      # vfioctl lease T [options] -- CMD ARGS...
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    parser = vfioctl_parser()
    if not command and "lease" in argv:
        _command_without_dashes(parser, argv)
    return run(parser, argv, command)


def _command_without_dashes(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """`vfioctl lease 04:00.0 sleep 1`: a usage error that shows where the command goes."""
    args, extra = parser.parse_known_args(argv)
    if args.command == "lease" and extra and not extra[0].startswith("-"):
        parser.exit(EXIT_USAGE, f"vfioctl lease: unrecognized arguments: {' '.join(extra)}\n"
                                f"  to run a command while holding the lease, put it after --: "
                                f"vfioctl lease {args.target} -- {' '.join(extra)}\n")
