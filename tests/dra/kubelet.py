"""A fake kubelet: finds a plugin in its registry directory, registers it as the kubelet
does (GetInfo, then NotifyRegistrationStatus), and calls its DRA service, with stubs
built from the same .proto files the driver serves."""

from __future__ import annotations

import os
import time

# The tests start processes (vfioctl, a "container") from the process this kubelet lives
# in; gRPC's fork handlers abort such a child now and then (ev_epoll1 "Check failed").
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import grpc  # noqa: E402  (after the variable above)

from vfiod.dra import rpc

RpcError = grpc.RpcError


class FakeKubelet:
    def __init__(self, registry_dir: str):
        self.registry_dir = registry_dir
        self.info = None
        self.channels: list[grpc.Channel] = []

    def _channel(self, path: str) -> grpc.Channel:
        # A channel of its own: gRPC otherwise shares connections between channels to the
        # same socket, and one to a plugin that has gone waits out its reconnect backoff.
        ch = grpc.insecure_channel(f"unix://{path}", options=[("grpc.use_local_subchannel_pool", 1)])
        grpc.channel_ready_future(ch).result(timeout=60)
        self.channels.append(ch)
        return ch

    def wait_for_plugin(self, timeout: float = 60.0) -> str:
        """The first socket that appears in the registry directory."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            socks = sorted(n for n in os.listdir(self.registry_dir) if n.endswith(".sock"))
            if socks:
                return os.path.join(self.registry_dir, socks[0])
            time.sleep(0.05)
        raise AssertionError(f"no plugin socket in {self.registry_dir} within {timeout} s")

    def register(self, timeout: float = 60.0):
        """GetInfo of the plugin found, and tell it it is registered; returns the PluginInfo."""
        messages, services = rpc.registration()
        reg = services.RegistrationStub(self._channel(self.wait_for_plugin(timeout)))
        self.info = reg.GetInfo(messages.InfoRequest(), timeout=10)
        reg.NotifyRegistrationStatus(messages.RegistrationStatus(plugin_registered=True), timeout=10)
        messages, services = rpc.dra()
        self.dra = services.DRAPluginStub(self._channel(self.info.endpoint))
        return self.info

    def _claims(self, messages, claims):
        return [messages.Claim(namespace=ns, uid=uid, name=name) for ns, uid, name in claims]

    def prepare(self, *claims, timeout: float = 120.0) -> dict:
        """``{uid: (error, [(device_name, pool, [cdi ids], [request names])])}`` for (ns, uid, name) claims."""
        messages, _ = rpc.dra()
        reply = self.dra.NodePrepareResources(
            messages.NodePrepareResourcesRequest(claims=self._claims(messages, claims)), timeout=timeout)
        return {uid: (r.error, [(d.device_name, d.pool_name, list(d.cdi_device_ids), list(d.request_names))
                                for d in r.devices]) for uid, r in reply.claims.items()}

    def unprepare(self, *claims, timeout: float = 120.0) -> dict:
        """``{uid: error}``."""
        messages, _ = rpc.dra()
        reply = self.dra.NodeUnprepareResources(
            messages.NodeUnprepareResourcesRequest(claims=self._claims(messages, claims)), timeout=timeout)
        return {uid: r.error for uid, r in reply.claims.items()}

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        self.channels = []
