"""``vfiod-dra``: the kubelet plugin; ``vfiod-dra cdi-writer``: its CDI specs, written as
root; ``vfiod-dra memlock-hook BYTES``: the CDI hook."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

from ..client import VfiodError
from ..wire.names import bus_arg
from . import cdi
from .plugin import PLUGIN_DIR, REGISTRY_DIR, registration_socket, plugin_socket

if TYPE_CHECKING:
    from .link import Vfiod

log = logging.getLogger("vfiod-dra")

DESCRIPTION = """\
The node side of vfiod's Kubernetes DRA driver (vfiod.io): registers with the
kubelet, publishes this node's IOMMU groups as a ResourceSlice, and prepares
claims by leasing their groups from vfiod (under vfiod's policy, for the claim's
namespace) and asking for CDI specs.  Runs as the user the policy names in
k8s_delegates.

`vfiod-dra cdi-writer --delegate USER` runs as root beside it and writes those
specs (the runtime's spec directory stays root's): only for groups vfiod says USER
leases, with content taken from vfiod.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vfiod-dra", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--node", default=os.environ.get("NODE_NAME") or socket.gethostname(),
                   help="this node's name in the cluster (default: $NODE_NAME, else the host name)")
    p.add_argument("--bus", default="system", type=bus_arg, metavar="BUS", help="vfiod's bus: system (default), session or an address")
    p.add_argument("--kube", default="in-cluster", metavar="WHERE",
                   help="the API server: in-cluster (default), a kubeconfig file, or a URL")
    p.add_argument("--registry-dir", default=REGISTRY_DIR, metavar="DIR",
                   help="the registration socket's directory: the driver's own, in the kubelet's plugin "
                        f"registry (default: {REGISTRY_DIR})")
    p.add_argument("--plugin-dir", default=PLUGIN_DIR, metavar="DIR", help="where the DRA socket goes")
    p.add_argument("--state-dir", default="/var/lib/vfiod-dra", metavar="DIR", help="where the checkpoint is kept")
    p.add_argument("--cdi-dir", default=cdi.DEFAULT_DIR, metavar="DIR",
                   help=f"the runtime's CDI spec directory (default: {cdi.DEFAULT_DIR})")
    p.add_argument("--cdi-requests", default=cdi.DEFAULT_REQUESTS_DIR, metavar="DIR",
                   help=f"where vfiod-dra asks the spec writer for specs (default: {cdi.DEFAULT_REQUESTS_DIR})")
    p.add_argument("--dev-root", default="/dev", metavar="DIR", help="the host's /dev (VFIO nodes)")
    p.add_argument("--hook", default=os.path.abspath(sys.argv[0]), metavar="PATH",
                   help="cdi-writer: the program CDI specs run as their memlock hook (default: this one)")
    p.add_argument("--no-slices", action="store_true", help="do not publish a ResourceSlice")
    sub = p.add_subparsers(dest="command")
    writer = sub.add_parser("cdi-writer", help="write the CDI specs vfiod-dra asks for (as root)")
    writer.add_argument("--delegate", required=True, metavar="USER",
                        help="vfiod-dra's user (the policy's k8s_delegates): specs only for its leases")
    hook = sub.add_parser("memlock-hook", help="the CDI createRuntime hook: raise the container's RLIMIT_MEMLOCK")
    hook.add_argument("bytes", type=int, help="the limit, in bytes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="vfiod-dra: %(message)s")
    if args.command == "memlock-hook":
        return memlock_hook(args.bytes)
    try:
        if args.command == "cdi-writer":
            return asyncio.run(run_writer(args))
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 0


def memlock_hook(limit: int) -> int:
    try:
        state = json.load(sys.stdin)
        soft, hard = cdi.memlock_hook(limit, state if isinstance(state, dict) else {})
    except (ValueError, OSError) as e:
        print(f"vfiod-dra memlock-hook: {e}", file=sys.stderr)
        return 1
    print(f"vfiod-dra memlock-hook: RLIMIT_MEMLOCK of pid {state['pid']} is {soft}/{hard}", file=sys.stderr)
    return 0


def _uid(user: str) -> int:
    import pwd

    if user.isascii() and user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ValueError(f"no such user: {user!r}") from None


def _stop_or_gone(vfiod: "Vfiod") -> tuple[asyncio.Event, "asyncio.Future[Any]"]:
    """An event SIGINT and SIGTERM set, and a future done when vfiod's bus goes away."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop, asyncio.ensure_future(vfiod.client.connected().wait_for_disconnect())


async def run_writer(args: argparse.Namespace) -> int:
    from .cdiwriter import SpecWriter
    from .link import Vfiod

    try:
        delegate = _uid(args.delegate)
        if delegate == os.getuid():
            raise ValueError(f"the spec writer runs as the delegate ({args.delegate}) itself: run it as the "
                             f"owner of {args.cdi_dir} (root)")
        vfiod = await Vfiod(args.bus).connect()
        writer = SpecWriter(vfiod, delegate, args.cdi_requests, args.cdi_dir, args.dev_root, args.hook)
        for line in await writer.sync():
            print(f"vfiod-dra cdi-writer: {line}", flush=True)
    except (VfiodError, ValueError, OSError) as e:
        log.error("cdi-writer cannot start: %s", e)
        return 1
    stop, gone = _stop_or_gone(vfiod)
    task = asyncio.create_task(writer.run())
    print(f"vfiod-dra cdi-writer: ready, {args.cdi_requests} -> {args.cdi_dir}", flush=True)
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, gone, task], return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if gone.done():
        log.error("cdi-writer lost the bus connection to vfiod; stopping (written specs stay)")
        status = 1
    elif task.done() and task.exception() is not None:
        log.error("cdi-writer stopped: %s", task.exception())
        status = 1
    for t in (task, waiter):
        t.cancel()
    vfiod.close()
    return status


async def run(args: argparse.Namespace) -> int:
    from .driver import Driver
    from .kube import Kube, KubeError
    from .link import Vfiod
    from .plugin import serve
    from .slices import Publisher

    try:
        kube = Kube(args.kube)
        vfiod = await Vfiod(args.bus).connect()
        driver = Driver(vfiod, kube, args.node, args.state_dir, args.cdi_dir, args.cdi_requests)
        for line in await driver.reconcile():
            print(f"vfiod-dra: reconciled: {line}", flush=True)
    except (VfiodError, KubeError, OSError) as e:
        log.error("cannot start: %s", e)
        return 1
    stop, gone = _stop_or_gone(vfiod)
    tasks = []
    publisher = None
    if not args.no_slices:
        publisher = Publisher(vfiod, kube, args.node)
        await vfiod.watch(publisher.poke)
        tasks.append(asyncio.create_task(publisher.run()))
    dra_server, reg_server, _ = await serve(driver, args.registry_dir, args.plugin_dir)
    print(f"vfiod-dra: ready on {registration_socket(args.registry_dir)}", flush=True)
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, gone], return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if gone.done():
        log.error("lost the bus connection to vfiod; stopping (prepared claims stay leased)")
        status = 1
    for t in tasks + [waiter]:
        t.cancel()
    await reg_server.stop(1)
    await dra_server.stop(5)
    for path in (registration_socket(args.registry_dir), plugin_socket(args.plugin_dir)):
        if os.path.exists(path):
            os.unlink(path)
    vfiod.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
