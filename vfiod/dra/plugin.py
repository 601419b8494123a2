"""The kubelet's two gRPC services on unix sockets: registration and the DRA plugin.

The kubelet watches its plugin registry directory; a new socket there is a
plugin, whose ``GetInfo`` says its type (``DRAPlugin``), name (``vfiod.io``), the
socket of its DRA service and the API versions it serves (``v1.DRAPlugin``).
The kubelet then calls ``NodePrepareResources``/``NodeUnprepareResources`` there,
for several claims at a time; each claim gets its own answer."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from . import DRIVER_NAME, rpc
from .driver import ClaimRef, Driver

log = logging.getLogger("vfiod-dra")

#: the registration socket's directory: the driver's own, in the kubelet's registry (the
#: kubelet watches the registry's subdirectories too), so that the driver needs no write
#: access to the registry, where the other plugins' sockets are
REGISTRY_DIR = f"/var/lib/kubelet/plugins_registry/{DRIVER_NAME}"
PLUGIN_DIR = f"/var/lib/kubelet/plugins/{DRIVER_NAME}"


def registration_socket(registry_dir: str) -> str:
    return os.path.join(registry_dir, f"{DRIVER_NAME}.sock")


def plugin_socket(plugin_dir: str) -> str:
    return os.path.join(plugin_dir, "dra.sock")


class Registration:
    """``pluginregistration.Registration``."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.registered = asyncio.Event()
        self.error = ""

    async def GetInfo(self, request: Any, context: Any) -> Any:
        messages, _ = rpc.registration()
        return messages.PluginInfo(type=rpc.PLUGIN_TYPE, name=DRIVER_NAME, endpoint=self.endpoint,
                                   supported_versions=list(rpc.SUPPORTED_VERSIONS))

    async def NotifyRegistrationStatus(self, request: Any, context: Any) -> Any:
        messages, _ = rpc.registration()
        if request.plugin_registered:
            log.info("the kubelet registered %s", DRIVER_NAME)
            self.registered.set()
        else:
            self.error = request.error
            log.error("the kubelet refused %s: %s", DRIVER_NAME, request.error or "(no reason given)")
        return messages.RegistrationStatusResponse()


class DraPlugin:
    """``k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin``: each claim of a call on its own."""

    def __init__(self, driver: Driver):
        self.driver = driver

    async def NodePrepareResources(self, request: Any, context: Any) -> Any:
        messages, _ = rpc.dra()
        answers = await asyncio.gather(*(self.driver.prepare(_ref(c)) for c in request.claims))
        out = messages.NodePrepareResourcesResponse()
        for c, a in zip(request.claims, answers):
            entry = out.claims[c.uid]
            entry.error = a.error
            for d in a.devices:
                entry.devices.add(request_names=d["request_names"], pool_name=d["pool_name"],
                                  device_name=d["device_name"], cdi_device_ids=d["cdi_device_ids"])
        return out

    async def NodeUnprepareResources(self, request: Any, context: Any) -> Any:
        messages, _ = rpc.dra()
        answers = await asyncio.gather(*(self.driver.unprepare(_ref(c)) for c in request.claims))
        out = messages.NodeUnprepareResourcesResponse()
        for c, a in zip(request.claims, answers):
            out.claims[c.uid].error = a.error
        return out


def _ref(c: Any) -> ClaimRef:
    return ClaimRef(namespace=c.namespace, uid=c.uid, name=c.name)


async def serve(driver: Driver, registry_dir: str, plugin_dir: str) -> tuple[Any, Any, Registration]:
    """Start the DRA service, then the registration service (the kubelet may call the
    first as soon as it sees the second); returns both servers and the registration."""
    import grpc

    _, dra_services = rpc.dra()
    _, reg_services = rpc.registration()
    endpoint = plugin_socket(plugin_dir)
    reg_path = registration_socket(registry_dir)
    for d in (plugin_dir, registry_dir):
        os.makedirs(d, mode=0o750, exist_ok=True)
    servers = []
    registration = Registration(endpoint)
    for path, add, servicer in ((endpoint, dra_services.add_DRAPluginServicer_to_server, DraPlugin(driver)),
                                (reg_path, reg_services.add_RegistrationServicer_to_server, registration)):
        if os.path.exists(path):
            os.unlink(path)                # a socket left by a process that is gone
        server = grpc.aio.server()
        add(servicer, server)
        server.add_insecure_port(f"unix://{path}")
        await server.start()
        servers.append(server)
    log.info("serving %s on %s (registered through %s)", DRIVER_NAME, endpoint, reg_path)
    return servers[0], servers[1], registration
