"""The kubelet's gRPC interfaces, compiled from the .proto files next to this module
when first imported (grpcio-tools' runtime compiler), so no generated code is kept.

The message and service modules are built at run time and carry no type
information: this module hands them out as `Any` and the callers keep to the
fields the .proto files name."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

PROTO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "protos")
DRA_PROTO = "dra_v1.proto"
REGISTRATION_PROTO = "pluginregistration.proto"

#: what GetInfo answers: the kubelet's plugin type and the DRA API versions served
PLUGIN_TYPE = "DRAPlugin"
SUPPORTED_VERSIONS = ("v1.DRAPlugin",)

_lock = threading.Lock()
_loaded: dict[str, tuple[Any, Any]] = {}


def _load(name: str) -> tuple[Any, Any]:
    with _lock:
        if name not in _loaded:
            import grpc

            # The runtime compiler resolves .proto files through sys.path.
            sys.path.insert(0, PROTO_DIR)
            try:
                _loaded[name] = grpc.protos_and_services(name)
            finally:
                sys.path.remove(PROTO_DIR)
        return _loaded[name]


def dra() -> tuple[Any, Any]:
    """(messages, services) of the DRA v1 plugin API."""
    return _load(DRA_PROTO)


def registration() -> tuple[Any, Any]:
    """(messages, services) of the plugin registration API."""
    return _load(REGISTRATION_PROTO)
