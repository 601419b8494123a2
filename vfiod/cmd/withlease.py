"""`vfioctl lease TARGET -- CMD`: CMD run holding the lease, with what it needs to use
the devices in its environment (and open fds with ``--pass-fd``), told when vfiod
begins to revoke the lease."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import InvalidArgument
from ..report import Json
from ..wire import lease_id_of

if TYPE_CHECKING:
    from ..client import Client


def seconds_left(deadline: float) -> int:
    """Whole seconds until `deadline`, rounded up: a 3 s grace just begun is "3 s", not "2 s"."""
    return max(0, math.ceil(deadline - time.time() - 0.05))


async def run_with_lease(client: Client, path: str, props: Json, group: int, command: Sequence[str],
                          pass_fd: bool = False, iommufd: bool = False) -> int:
    env = dict(os.environ)
    fds: list[int] = []
    if props["Backend"] == "libvirt":
        env["VFIOD_HOSTDEV_XML"] = (await client.lease_call(path, "HostdevXml")).body[0]
    if props["Backend"] in ("vfio", "libvirt"):
        if pass_fd and not iommufd:
            # The kernel lets /dev/vfio/N be open once at a time: while CMD holds this fd,
            # opening the node by path (as DPDK's EAL and QEMU do) fails with EBUSY.
            reply = await client.lease_call(path, "OpenGroup")
            fd = reply.unix_fds[reply.body[0]] if reply.unix_fds else reply.body[0]
            fds.append(fd)
            env["VFIOD_GROUP_FD"] = str(fd)
        env["VFIOD_GROUP"] = str(group)
        env["VFIOD_GROUP_PATH"] = props.get("GroupPath") or f"/dev/vfio/{group}"
        if props.get("Mdev"):            # the device's name for VFIO_GROUP_GET_DEVICE_FD
            env["VFIOD_MDEV"] = props["Mdev"]
        # Kernels with VFIO device cdevs: each endpoint's cdev and iommufd, for the iommufd
        # interface (QEMU's -object iommufd with -device vfio-pci,fd=...).
        # The kernel keeps the two interfaces apart: while the group is open, no device of
        # it binds to an iommufd (EBUSY), so --iommufd passes the cdevs and iommufd instead.
        cdevs = dict(props.get("DeviceCdevs") or {})
        if iommufd and not cdevs:
            raise InvalidArgument("--iommufd: this kernel has no VFIO device cdevs for the lease's devices "
                                  "(CONFIG_VFIO_DEVICE_CDEV); leave it off to use the group")
        if cdevs and props.get("IommuPath"):
            env["VFIOD_IOMMU_PATH"] = props["IommuPath"]
            env["VFIOD_DEVICE_CDEVS"] = " ".join(f"{a}={p}" for a, p in sorted(cdevs.items()))
            if pass_fd and iommufd:
                opened = []
                for addr in sorted(cdevs):
                    reply = await client.lease_call(path, "OpenDevice", "s", [addr])
                    fd = reply.unix_fds[reply.body[0]] if reply.unix_fds else reply.body[0]
                    fds.append(fd)
                    opened.append(f"{addr}={fd}")
                reply = await client.lease_call(path, "OpenIommu")
                fd = reply.unix_fds[reply.body[0]] if reply.unix_fds else reply.body[0]
                fds.append(fd)
                env["VFIOD_IOMMU_FD"] = str(fd)
                env["VFIOD_DEVICE_FDS"] = " ".join(opened)
    env["VFIOD_LEASE"] = lease_id_of(path)
    memlock = props.get("Memlock") or 0

    def preexec() -> None:
        """In the child: raise RLIMIT_MEMLOCK's soft limit toward the policy's grant (as far
        as the hard limit lets an unprivileged process go)."""
        if not memlock:
            return
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        want = memlock if hard == resource.RLIM_INFINITY else min(memlock, hard)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (want, hard))

    told = await client.lease_signals(path)
    proc = await asyncio.create_subprocess_exec(*command, env=env, pass_fds=fds, preexec_fn=preexec)
    for fd in fds:
        os.close(fd)          # the child has it; the group opens once, so do not hold it here
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, proc.send_signal, sig)
    watcher = asyncio.ensure_future(_tell_command_of_revoke(told, proc, command[0]))
    try:
        rc = await proc.wait()
    finally:
        watcher.cancel()
    return rc if rc >= 0 else 128 - rc


async def _tell_command_of_revoke(told: asyncio.Queue[tuple[str, list[Any]]], proc: asyncio.subprocess.Process,
                                  name: str) -> None:
    """When vfiod begins revoking the lease, say so and send CMD SIGTERM: the first rung
    of the ladder is CMD's own chance to let go in order."""
    while True:
        member, body = await told.get()
        if member != "LeaseRevoking":
            continue
        left = seconds_left(body[2])
        print(f"vfioctl: vfiod is revoking the lease ({body[1]}); sending SIGTERM to {name} (pid {proc.pid}): "
              f"it has {left} s to let go of the devices", file=sys.stderr, flush=True)
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        return
