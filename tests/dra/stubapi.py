"""A stub Kubernetes API server: the few ``resource.k8s.io/v1`` endpoints vfiod-dra uses,
enough for the `kubernetes` client.  Claims are put in by the test (`put_claim`);
slices are written by the driver and kept with the time of every write."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BASE = "/apis/resource.k8s.io/v1"
_CLAIM = re.compile(rf"{BASE}/namespaces/([a-z0-9-]+)/resourceclaims/([a-z0-9.-]+)")
_SLICES = re.compile(rf"{BASE}/resourceslices(?:/([a-z0-9.-]+))?")


class StubApiServer:
    def __init__(self) -> None:
        self.claims: dict[tuple[str, str], dict] = {}
        self.slices: dict[str, dict] = {}
        self.history: list[tuple[float, dict]] = []      # (when, slice) of every write
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._version = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):      # quiet
                pass

            def _send(self, code, doc):
                body = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self):
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"{}")

            def _route(self, method):
                path = self.path.split("?")[0]
                with stub.lock:
                    stub.requests.append((method, path))
                    code, doc = stub.handle(method, path, self._body() if method in ("POST", "PUT") else None)
                self._send(code, doc)

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_PUT(self):
                self._route("PUT")

            def do_DELETE(self):
                self._route("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- what tests do

    def put_claim(self, namespace: str, name: str, results: list[dict], uid: str | None = None) -> str:
        """A claim allocated `results` (``{"request", "driver", "pool", "device"}`` each); its uid."""
        uid = uid or str(uuid.uuid4())
        with self.lock:
            self.claims[(namespace, name)] = {
                "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                "metadata": {"namespace": namespace, "name": name, "uid": uid},
                "spec": {"devices": {"requests": [{"name": r["request"]} for r in results]}},
                "status": {"allocation": {"devices": {"results": results}}}}
        return uid

    def slice(self, name: str) -> dict | None:
        with self.lock:
            return self.slices.get(name)

    # -- the API

    def _next(self) -> str:
        self._version += 1
        return str(self._version)

    @staticmethod
    def _status(code: int, reason: str, message: str):
        return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                      "message": message, "code": code}

    def handle(self, method: str, path: str, body):
        m = _CLAIM.fullmatch(path)
        if m and method == "GET":
            claim = self.claims.get((m[1], m[2]))
            if claim is None:
                return self._status(404, "NotFound", f"resourceclaims \"{m[2]}\" not found")
            return 200, claim
        m = _SLICES.fullmatch(path)
        if not m:
            return self._status(404, "NotFound", f"no such path {path}")
        name = m[1]
        if method == "GET" and name:
            if name not in self.slices:
                return self._status(404, "NotFound", f"resourceslices \"{name}\" not found")
            return 200, self.slices[name]
        if method == "POST" and not name:
            name = body["metadata"]["name"]
            if name in self.slices:
                return self._status(409, "AlreadyExists", f"resourceslices \"{name}\" already exists")
            return self._store(name, body, 201)
        if method == "PUT" and name:
            old = self.slices.get(name)
            if old is None:
                return self._status(404, "NotFound", f"resourceslices \"{name}\" not found")
            if body["metadata"].get("resourceVersion") != old["metadata"]["resourceVersion"]:
                return self._status(409, "Conflict", "the object has been modified")
            return self._store(name, body, 200)
        if method == "DELETE" and name:
            if self.slices.pop(name, None) is None:
                return self._status(404, "NotFound", f"resourceslices \"{name}\" not found")
            return 200, {"kind": "Status", "status": "Success"}
        return self._status(405, "MethodNotAllowed", f"{method} {path}")

    def _store(self, name, body, code):
        body = json.loads(json.dumps(body))
        body["metadata"]["resourceVersion"] = self._next()
        self.slices[name] = body
        self.history.append((time.monotonic(), body))
        return code, body
