"""`vfioctl`'s commands that talk to the daemon (all over D-Bus; none reads sysfs)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time

from .errors import InvalidArgument, VfiodError
from .pciids import PciIds
from .report import render_groups

EXIT_OK, EXIT_FAIL, EXIT_DENIED = 0, 1, 3


def parse_duration(text: str) -> int:
    """'90', '90s', '30m', '2h', '1d', '1h30m' -> seconds."""
    if re.fullmatch(r"\d{1,9}", text or ""):
        return int(text)
    parts = re.findall(r"(\d{1,9})([smhd])", text or "")
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 90s, 30m, 2h, 1d)")
    return sum(int(n) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[u] for n, u in parts)


def _run(args, coro_fn) -> int:
    from .client import Client

    async def main():
        client = await Client(args.bus, timeout=args.timeout).connect()
        try:
            return await coro_fn(client)
        finally:
            client.close()
    return asyncio.run(main())


async def _groups_json(client) -> list[dict]:
    objs = await client.managed_objects()
    names = PciIds()
    devices = {}
    for path, ifaces in objs.items():
        d = ifaces.get("org.vfiod1.Device")
        if d:
            devices[path] = d
    leases = {p: i["org.vfiod1.Lease"] for p, i in objs.items() if "org.vfiod1.Lease" in i}
    out = []
    for path, ifaces in objs.items():
        g = ifaces.get("org.vfiod1.Group")
        if not g:
            continue
        devs = []
        for addr in g["Devices"]:
            d = devices.get("/org/vfiod1/device/" + addr.replace(":", "_").replace(".", "_"), {})
            cls = d.get("Class", 0)
            devs.append({
                "address": addr, "vendor": f"{d.get('VendorId', 0):04x}", "device": f"{d.get('DeviceId', 0):04x}",
                "class": f"{cls:06x}", "class_name": names.class_name(cls), "name": d.get("Name", ""),
                "driver": d.get("Driver") or None, "original_driver": d.get("OriginalDriver") or None,
                "bridge": d.get("Bridge", False), "protected": d.get("Protected", ""),
            })
        lease = g["Lease"] if g["Lease"] != "/" else None
        out.append({
            "group": g["Number"], "viable": g["Viable"], "state": g["State"],
            "lease": lease.rsplit("/", 1)[-1] if lease else None,
            "lease_owner": leases.get(lease, {}).get("Owner") if lease else None,
            "blockers": [{"device": a, "reason": r} for a, r in g["Blockers"]],
            "isolation": g["Isolation"], "isolation_text": g.get("IsolationText", ""),
            "devices": devs,
        })
    out.sort(key=lambda g: g["group"])
    return out


def cmd_groups(args) -> int:
    async def go(client):
        groups = await _groups_json(client)
        if args.json:
            print(json.dumps(groups, indent=1))
        else:
            sys.stdout.write(render_groups(groups, explain=args.explain) or "No IOMMU groups.\n")
        return EXIT_OK
    return _run(args, go)


def _group_number(groups, target: str) -> int:
    if target.startswith("group:"):
        try:
            return int(target[6:])
        except ValueError:
            raise InvalidArgument(f"not a group: {target!r}") from None
    from .address import PciAddress
    addr = str(PciAddress.parse(target))
    for g in groups:
        if any(d["address"] == addr for d in g["devices"]):
            return g["group"]
    raise InvalidArgument(f"no device {addr} in any IOMMU group")


def cmd_show(args) -> int:
    async def go(client):
        groups = await _groups_json(client)
        n = _group_number(groups, args.target)
        sel = [g for g in groups if g["group"] == n]
        if not sel:
            raise InvalidArgument(f"no IOMMU group {n}")
        print(json.dumps(sel[0], indent=1) if args.json else render_groups(sel, explain=True), end="" if not args.json else "\n")
        return EXIT_OK
    return _run(args, go)


def cmd_explain(args) -> int:
    async def go(client):
        reply = await client.call("/org/vfiod1", "org.vfiod1.Manager", "Explain", "s", [args.target])
        print(reply.body[0])
        return EXIT_OK
    return _run(args, go)


def cmd_check(args) -> int:
    async def go(client):
        reply = await client.call("/org/vfiod1", "org.vfiod1.Manager", "CheckAccess", "ss",
                                  [args.target, args.backend or ""])
        allowed, rule, reason = reply.body[0]
        if args.json:
            print(json.dumps({"allowed": allowed, "rule": rule, "reason": reason}))
        else:
            print(f"{'allowed' if allowed else 'denied'}: {reason}" + (f" ({rule})" if rule and rule not in reason else ""))
        return EXIT_OK if allowed else EXIT_DENIED
    return _run(args, go)


def cmd_leases(args) -> int:
    async def go(client):
        manager = await client.properties("/org/vfiod1", "org.vfiod1.Manager")
        rows = []
        for path in manager.get("Leases", []):
            try:
                lease = await client.properties(path, "org.vfiod1.Lease")
            except VfiodError:          # ended between the two calls
                continue
            if lease:
                rows.append({"id": lease["Id"], "group": int(lease["Group"].rsplit("/", 1)[-1]),
                             "owner": lease["Owner"], "backend": lease["Backend"], "created": lease["Created"],
                             "expires": lease["Expires"], "persistent": lease["Persistent"]})
        if args.json:
            print(json.dumps(rows, indent=1))
        elif not rows:
            print("No leases.")
        else:
            print(f"{'LEASE':<18} {'GROUP':>5} {'UID':>6} {'BACKEND':<9} {'PERSISTENT':<10} EXPIRES")
            for r in rows:
                exp = "never" if not r["expires"] else f"in {max(0, r['expires'] - int(time.time()))} s"
                print(f"{r['id']:<18} {r['group']:>5} {r['owner']:>6} {r['backend']:<9} "
                      f"{'yes' if r['persistent'] else 'no':<10} {exp}")
        return EXIT_OK
    return _run(args, go)


def cmd_lease(args) -> int:
    command = list(args.run_command or [])

    async def go(client):
        path = await client.request_lease(args.target, args.backend or "", args.duration, args.persistent, args.force)
        lease_id = path.rsplit("/", 1)[-1]
        props = await client.properties(path, "org.vfiod1.Lease")
        group = int(props["Group"].rsplit("/", 1)[-1])
        print(f"vfioctl: lease {lease_id}: IOMMU group {group} via the {props['Backend']} backend", file=sys.stderr)
        if args.xml:
            print((await client.lease_call(path, "HostdevXml")).body[0])
        try:
            if command:
                return await _run_with_lease(client, path, props, group, command, args.pass_fd)
            if args.persistent:
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
                except Exception as e:      # the lease also ends when this connection closes
                    print(f"vfioctl: releasing {lease_id}: {e}", file=sys.stderr)
    return _run(args, go)


async def _run_with_lease(client, path, props, group, command, pass_fd=False) -> int:
    env = dict(os.environ)
    fds = []
    if props["Backend"] == "libvirt":
        env["VFIOD_HOSTDEV_XML"] = (await client.lease_call(path, "HostdevXml")).body[0]
    if props["Backend"] in ("vfio", "libvirt"):
        if pass_fd:
            # The kernel lets /dev/vfio/N be open once at a time: while CMD holds this fd,
            # opening the node by path (as DPDK's EAL and QEMU do) fails with EBUSY.
            reply = await client.lease_call(path, "OpenGroup")
            fd = reply.unix_fds[reply.body[0]] if reply.unix_fds else reply.body[0]
            fds.append(fd)
            env["VFIOD_GROUP_FD"] = str(fd)
        env["VFIOD_GROUP"] = str(group)
        env["VFIOD_GROUP_PATH"] = props.get("GroupPath") or f"/dev/vfio/{group}"
    env["VFIOD_LEASE"] = path.rsplit("/", 1)[-1]
    memlock = props.get("Memlock") or 0

    def preexec():
        """In the child: raise RLIMIT_MEMLOCK's soft limit toward the policy's grant (as far
        as the hard limit lets an unprivileged process go)."""
        if not memlock:
            return
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        want = memlock if hard == resource.RLIM_INFINITY else min(memlock, hard)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (want, hard))

    proc = await asyncio.create_subprocess_exec(*command, env=env, pass_fds=fds, preexec_fn=preexec)
    for fd in fds:
        os.close(fd)          # the child has it; the group opens once, so do not hold it here
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda s=sig: proc.send_signal(s))
    rc = await proc.wait()
    return rc if rc >= 0 else 128 - rc


def cmd_vfs(args) -> int:
    if args.count < 0:
        raise InvalidArgument(f"not a number of VFs: {args.count}")

    async def go(client):
        before = (await client.call("/org/vfiod1", "org.vfiod1.Manager", "SetVfCount", "su",
                                    [args.target, args.count], timeout=max(args.timeout, 120))).body[0]
        print(f"{args.target}: {before} -> {args.count} VFs")
        return EXIT_OK
    return _run(args, go)


def cmd_release(args) -> int:
    async def go(client):
        if not re.fullmatch(r"[0-9a-f]{1,64}", args.lease):
            raise InvalidArgument(f"not a lease id: {args.lease!r}")
        await client.lease_call(f"/org/vfiod1/lease/{args.lease}", "Release")
        print(f"released {args.lease}")
        return EXIT_OK
    return _run(args, go)


COMMANDS = {
    "groups": ("list every IOMMU group with its devices, viability and state", cmd_groups, """\
List every IOMMU group vfiod sees, with its devices and drivers, whether VFIO
can use it now, what blocks it, and whether it is leased.

examples:
  vfioctl groups
  vfioctl groups --json | jq '.[] | select(.viable) | .group'
"""),
    "show": ("show one group (by device address or group:N)", cmd_show, """\
Show the IOMMU group of a device (or group:N) with the reason its devices share it.

example:
  vfioctl show 0000:04:00.0
"""),
    "explain": ("explain in plain words why a group is what it is", cmd_explain, """\
Ask vfiod why a device's IOMMU group holds what it holds, what keeps it from
VFIO right now, and who holds it.

example:
  vfioctl explain 04:00.0
"""),
    "check": ("would I get this device? (policy, for the calling user)", cmd_check, """\
Ask whether the calling user may lease the device's group, and under which rule.
Exits 0 when allowed, 3 when denied.

example:
  vfioctl check 0000:04:00.0 --backend vfio
"""),
    "leases": ("list leases", cmd_leases, """\
List the leases vfiod holds (yours, or all of them for root).

example:
  vfioctl leases --json
"""),
    "lease": ("lease a device's whole group; optionally run a command while holding it", cmd_lease, """\
usage: vfioctl lease TARGET [options] [-- CMD ARGS...]

Lease the IOMMU group of a device (or group:N, or name:RESOURCE).  vfiod binds
every endpoint of the group to the backend's driver and hands it to you; the
lease ends (and every device goes back to its driver) when you release it,
when it expires, or when vfioctl exits — unless it is --persistent.

With a command after --, vfioctl holds the lease while the command runs, tells
it the group in VFIOD_GROUP and VFIOD_GROUP_PATH (vfio and libvirt backends:
/dev/vfio/N, owned by you, which DPDK and QEMU open by path) and, with the
libvirt backend, the hostdev XML in VFIOD_HOSTDEV_XML, applies the policy's
RLIMIT_MEMLOCK grant, releases the lease when it exits and exits with its
status.  With --pass-fd the command also gets the open group in VFIOD_GROUP_FD;
the kernel lets a group be open only once, so a command given the fd cannot
open /dev/vfio/N again.

examples:
  vfioctl lease 0000:04:00.0 -- dpdk-testpmd -a 0000:04:00.0 -- -i
  vfioctl lease 0000:04:00.0 --pass-fd -- my-vfio-tool
  vfioctl lease group:8 --duration 2h --persistent
  vfioctl lease name:gpu --backend libvirt --xml
"""),
    "vfs": ("root: set an SR-IOV PF's number of VFs (refused while it or its VFs are leased)", cmd_vfs, """\
Set how many VFs an SR-IOV physical function shows (its sriov_numvfs).  The
kernel changes a non-zero count only through 0, which removes every VF, so
vfiod refuses (exit 4, busy) while the PF or any of its VFs is leased.

example:
  vfioctl vfs 0000:01:00.0 4
"""),
    "release": ("release a lease by id", cmd_release, """\
Release a lease: every device of its group goes back to the driver it had.

example:
  vfioctl release 3f2a9c0d1e4b5a69
"""),
}


def add_bus_commands(sub, formatter) -> None:
    for name, (summary, fn, description) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=description, formatter_class=formatter)
        p.add_argument("--bus", default="system", metavar="system|session|ADDRESS",
                       help="the bus vfiod is on (default: system)")
        p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                       help="how long to wait for each answer (default 30)")
        if name in ("show", "explain", "check", "lease", "vfs"):
            p.add_argument("target", metavar="TARGET", help="0000:04:00.0, 04:00.0, group:8 or name:RESOURCE")
        if name in ("groups", "show", "check", "leases"):
            p.add_argument("--json", action="store_true", help="print JSON for scripts")
        if name == "groups":
            p.add_argument("--explain", action="store_true", help="add why each group is what it is")
        if name in ("check", "lease"):
            p.add_argument("--backend", default="", help="vfio, libvirt or pci-stub (default: the policy's)")
        if name == "lease":
            p.add_argument("--duration", type=parse_duration, metavar="D", help="e.g. 90s, 30m, 2h")
            p.add_argument("--persistent", action="store_true",
                           help="keep the lease after vfioctl exits (if the policy allows)")
            p.add_argument("--force", action="store_true",
                           help="root only: lease even if the host uses the device")
            p.add_argument("--xml", action="store_true", help="print the libvirt hostdev XML")
            p.add_argument("--pass-fd", action="store_true",
                           help="give CMD the open group fd in VFIOD_GROUP_FD (a group opens only once: "
                                "leave this off for DPDK and QEMU, which open /dev/vfio/N themselves)")
            p.set_defaults(run_command=[])
        if name == "release":
            p.add_argument("lease", metavar="ID")
        if name == "vfs":
            p.add_argument("count", type=int, metavar="COUNT")
        p.set_defaults(func=fn)
