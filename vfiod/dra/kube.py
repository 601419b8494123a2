"""The API server, through the `kubernetes` client: ResourceClaims read, ResourceSlices written.

Only ``resource.k8s.io/v1`` objects are used, through the client's generic
custom-objects calls (plain JSON, the same for every client version)."""

from __future__ import annotations

import asyncio
from typing import Any

GROUP = "resource.k8s.io"
VERSION = "v1"


class KubeError(Exception):
    """The API server refused or could not be reached; the message says which and why."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Kube:
    """A connection to the API server: ``in-cluster``, a kubeconfig file, or a URL (tests)."""

    def __init__(self, where: str = "in-cluster", timeout: float = 10.0):
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        try:
            if where == "in-cluster":
                config.load_incluster_config()
                api = client.ApiClient()
            elif where.startswith(("http://", "https://")):
                conf = client.Configuration()
                conf.host = where
                api = client.ApiClient(conf)
            else:
                api = config.new_client_from_config(config_file=where)
        except (ConfigException, OSError, ValueError, TypeError) as e:
            raise KubeError(f"no API server configuration from {where!r} (in-cluster, a kubeconfig file "
                            f"or a URL): {e}") from None
        self.objects = client.CustomObjectsApi(api)
        self.timeout = timeout

    async def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return await asyncio.to_thread(fn, *args, _request_timeout=self.timeout, **kw)
        except ApiException as e:
            reason = (e.reason or "").strip() or "error"
            raise KubeError(f"the API server refused {what}: {e.status} {reason}", e.status) from None
        except Exception as e:   # connection refused, timeouts, TLS: urllib3's many kinds
            raise KubeError(f"cannot reach the API server for {what}: {type(e).__name__}: {e}") from None

    async def get_claim(self, namespace: str, name: str) -> dict[str, Any]:
        doc: dict[str, Any] = await self._call(
            f"reading ResourceClaim {namespace}/{name}", self.objects.get_namespaced_custom_object,
            GROUP, VERSION, namespace, "resourceclaims", name)
        return doc

    async def get_slice(self, name: str) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = await self._call(f"reading ResourceSlice {name}",
                                                   self.objects.get_cluster_custom_object,
                                                   GROUP, VERSION, "resourceslices", name)
            return doc
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    async def put_slice(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create the slice, or replace it (`body` carries the resourceVersion it replaces)."""
        name = body["metadata"]["name"]
        if body["metadata"].get("resourceVersion"):
            doc: dict[str, Any] = await self._call(f"replacing ResourceSlice {name}",
                                                   self.objects.replace_cluster_custom_object,
                                                   GROUP, VERSION, "resourceslices", name, body)
        else:
            doc = await self._call(f"creating ResourceSlice {name}", self.objects.create_cluster_custom_object,
                                   GROUP, VERSION, "resourceslices", body)
        return doc
