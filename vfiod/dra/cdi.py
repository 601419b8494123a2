"""CDI specs: how a container runtime learns what to put in a container for a claim.

One spec file per prepared claim, ``CDI_DIR/vfiod.io-CLAIMUID.json``, of kind
``vfiod.io/group`` with one device per leased IOMMU group (``CLAIMUID-group-N``,
its node ``/dev/vfio/N``, and on nodes whose kernel has VFIO device cdevs each
endpoint's ``/dev/vfio/devices/vfioX`` too).  What every device of the claim shares
goes in the spec's own ``containerEdits``: the container node ``/dev/vfio/vfio``
(and ``/dev/iommu`` where the devices have cdevs), the
environment KubeVirt and the SR-IOV device plugin set (``PCI_RESOURCE_…``,
``PCIDEVICE_…``: the endpoints' addresses by request), and the memlock grant
(``VFIOD_MEMLOCK`` and a ``createRuntime`` hook that raises the container
process's RLIMIT_MEMLOCK; see `memlock_hook`).  ``cdi-spec.schema.json`` is the
JSON Schema of what is written here.

Specs are written to a temporary name and renamed, so a runtime never reads half
a spec, and a crash leaves at most a temporary file that `remove_strays` clears.

Who writes them: a CDI spec is root's word to the runtime (its hooks run as root,
its device nodes and mounts go into the container), so the spec directories
(``/etc/cdi``, ``/var/run/cdi``; runtimes read the files directly in them, not
in subdirectories) stay root's.  vfiod-dra, unprivileged, writes a *request* per
claim in its own directory (``vfiod.io-CLAIMUID.json``: the claim and, by request
name, its groups); the spec writer (``vfiod-dra cdi-writer``, root, `cdiwriter`)
builds each spec from vfiod's own answers, for groups vfiod says vfiod-dra's user
leases, and nothing else."""

from __future__ import annotations

import json
import os
import re
import stat
from typing import Any, Iterable, Mapping, Sequence

import attrs

from . import DRIVER_NAME

CDI_VERSION = "0.6.0"
KIND = f"{DRIVER_NAME}/group"
DEFAULT_DIR = "/var/run/cdi"
#: where vfiod-dra puts its requests for the spec writer
DEFAULT_REQUESTS_DIR = "/run/vfiod-dra/cdi-requests"
SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cdi-spec.schema.json")
#: the container's view of a VFIO node: its own copy, readable by whatever uid the pod runs as
CONTAINER_MODE = 0o666
_PREFIX = f"{DRIVER_NAME}-"


@attrs.frozen
class GroupGrant:
    """One leased group as a container gets it: its number, endpoint addresses, memlock grant."""

    group: int
    endpoints: tuple[str, ...]
    memlock: int | None = None
    cdevs: tuple[str, ...] = ()          # the endpoints' VFIO device cdevs, where the kernel has them


def spec_path(cdi_dir: str, claim_uid: str) -> str:
    return os.path.join(cdi_dir, f"{_PREFIX}{claim_uid}.json")


def device_name(claim_uid: str, group: int) -> str:
    return f"{claim_uid}-group-{group}"


def device_id(claim_uid: str, group: int) -> str:
    """The fully qualified CDI device id the kubelet hands to the runtime."""
    return f"{KIND}={device_name(claim_uid, group)}"


def env_name(prefix: str, request: str) -> str:
    """``PREFIX_VFIOD_IO_REQUEST``: the resource name in the spelling KubeVirt and the SR-IOV
    device plugin use (upper case, anything but letters and digits as ``_``)."""
    return prefix + re.sub(r"[^A-Z0-9]", "_", f"{DRIVER_NAME}/{request}".upper())


def build_spec(claim_uid: str, by_request: Mapping[str, Sequence[GroupGrant]], dev_root: str = "/dev",
               hook: str | None = None) -> dict[str, Any]:
    """The spec for a claim whose requests got these groups (`dev_root`: where the host's
    VFIO nodes are, to copy their device numbers; `hook`: the program the memlock hook runs)."""
    grants = {g.group: g for gs in by_request.values() for g in gs}
    devices = [{"name": device_name(claim_uid, n),
                "containerEdits": {"deviceNodes": [_node(p, dev_root)
                                                   for p in (f"/dev/vfio/{n}", *grants[n].cdevs)]}}
               for n in sorted(grants)]
    env = []
    for request in sorted(by_request):
        addresses = ",".join(a for g in by_request[request] for a in g.endpoints)
        env += [f"{env_name('PCI_RESOURCE_', request)}={addresses}",
                f"{env_name('PCIDEVICE_', request)}={addresses}"]
    env.append("VFIOD_IOMMU_GROUPS=" + ",".join(map(str, sorted(grants))))
    edits: dict[str, Any] = {"deviceNodes": [_node("/dev/vfio/vfio", dev_root)]}
    if any(g.cdevs for g in grants.values()):
        edits["deviceNodes"].append(_node("/dev/iommu", dev_root))
    memlocks = [g.memlock for g in grants.values()]
    if memlocks and all(memlocks):
        # Each lease's grant was the policy's for its group; the container gets the sum.
        total = sum(m for m in memlocks if m)
        env.append(f"VFIOD_MEMLOCK={total}")
        if hook:
            edits["hooks"] = [{"hookName": "createRuntime", "path": hook,
                               "args": [os.path.basename(hook), "memlock-hook", str(total)]}]
    edits["env"] = env
    return {"cdiVersion": CDI_VERSION, "kind": KIND,
            "annotations": {f"{DRIVER_NAME}/claim": claim_uid},
            "devices": devices, "containerEdits": edits}


def _node(path: str, dev_root: str) -> dict[str, Any]:
    host = os.path.join(dev_root, path[len("/dev/"):])
    node: dict[str, Any] = {"path": path, "hostPath": host, "permissions": "rw", "fileMode": CONTAINER_MODE}
    try:
        st = os.stat(host)
    except OSError:
        return node                      # the runtime reads the numbers from hostPath
    if stat.S_ISCHR(st.st_mode):
        node.update(type="c", major=os.major(st.st_rdev), minor=os.minor(st.st_rdev))
    return node


def write_spec(cdi_dir: str, claim_uid: str, spec: Mapping[str, Any]) -> str:
    """Write the spec atomically (0644: runtimes read it); returns its path."""
    os.makedirs(cdi_dir, mode=0o755, exist_ok=True)
    path = spec_path(cdi_dir, claim_uid)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_spec(cdi_dir: str, claim_uid: str) -> dict[str, Any] | None:
    try:
        with open(spec_path(cdi_dir, claim_uid)) as f:
            spec: dict[str, Any] = json.load(f)
            return spec
    except (OSError, ValueError):
        return None


def remove_spec(cdi_dir: str, claim_uid: str) -> bool:
    """Delete the claim's spec; False if there was none."""
    try:
        os.unlink(spec_path(cdi_dir, claim_uid))
        return True
    except FileNotFoundError:
        return False


def spec_claims(cdi_dir: str) -> list[str]:
    """The claim uids of the specs this driver wrote in `cdi_dir`."""
    try:
        names = os.listdir(cdi_dir)
    except FileNotFoundError:
        return []
    return sorted(n[len(_PREFIX):-5] for n in names if n.startswith(_PREFIX) and n.endswith(".json"))


def remove_strays(cdi_dir: str, keep: Iterable[str]) -> list[str]:
    """Delete this driver's specs (and half-written ones) of claims not in `keep`; their uids."""
    keep = set(keep)
    gone = []
    for uid in spec_claims(cdi_dir):
        if uid not in keep:
            remove_spec(cdi_dir, uid)
            gone.append(uid)
    try:
        for name in os.listdir(cdi_dir):
            if name.startswith(_PREFIX) and name.endswith(".json.tmp"):
                os.unlink(os.path.join(cdi_dir, name))
    except FileNotFoundError:
        pass
    return gone


def memlock_hook(limit: int, state: Mapping[str, Any]) -> tuple[int, int]:
    """The ``createRuntime`` hook: raise RLIMIT_MEMLOCK of the container's first process
    (`state` is the OCI state the runtime passes on stdin; ``pid`` names the process) to
    `limit`, never lowering either limit.  Needs CAP_SYS_RESOURCE, as runtimes' hooks have.
    Returns the limits now in force."""
    import resource

    pid = state.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise ValueError("the OCI state names no container process (no 'pid')")
    soft, hard = resource.prlimit(pid, resource.RLIMIT_MEMLOCK)
    inf = resource.RLIM_INFINITY
    new_hard = hard if hard == inf or hard >= limit else limit
    new_soft = soft if soft == inf or soft >= limit else limit
    resource.prlimit(pid, resource.RLIMIT_MEMLOCK, (new_soft, new_hard))
    return new_soft, new_hard


# ------------------------------------------------------------ requests for the spec writer


class RequestError(ValueError):
    """A request file that is not one vfiod-dra writes; the message says what is wrong."""


#: a claim's uid as Kubernetes makes them (a UUID; anything of these characters is taken)
_CLAIM_UID = re.compile(r"[0-9a-z][0-9a-z-]{0,62}")
#: a request name of a ResourceClaim: a DNS label
_REQUEST_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
#: at most this many groups in one claim
MAX_GROUPS = 64


@attrs.frozen
class SpecRequest:
    """What vfiod-dra asks the spec writer for: claim `claim`'s groups, by request name."""

    claim: str
    requests: Mapping[str, tuple[int, ...]]

    @property
    def groups(self) -> list[int]:
        return sorted({n for ns in self.requests.values() for n in ns})


def request_path(requests_dir: str, claim_uid: str) -> str:
    return os.path.join(requests_dir, f"{_PREFIX}{claim_uid}.json")


def write_request(requests_dir: str, claim_uid: str, by_request: Mapping[str, Sequence[int]]) -> str:
    """Write the request atomically (0644: the spec writer reads it); returns its path."""
    req = check_request({"claim": claim_uid, "requests": {r: list(ns) for r, ns in by_request.items()}})
    path = request_path(requests_dir, claim_uid)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump({"claim": req.claim, "requests": {r: list(ns) for r, ns in req.requests.items()}}, f,
                  sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def check_request(doc: Any, claim_uid: str | None = None) -> SpecRequest:
    """`doc` as a `SpecRequest`, if it is exactly what vfiod-dra writes (and names
    `claim_uid`, where given); `RequestError` otherwise."""
    if not isinstance(doc, dict) or set(doc) != {"claim", "requests"}:
        raise RequestError("not a spec request (an object of 'claim' and 'requests')")
    claim, requests = doc["claim"], doc["requests"]
    if not isinstance(claim, str) or not _CLAIM_UID.fullmatch(claim):
        raise RequestError(f"not a claim uid: {claim!r}")
    if claim_uid is not None and claim != claim_uid:
        raise RequestError(f"the request names claim {claim}, its file name claim {claim_uid}")
    if not isinstance(requests, dict) or not requests:
        raise RequestError("'requests' names no request")
    out: dict[str, tuple[int, ...]] = {}
    for name, groups in requests.items():
        if not _REQUEST_NAME.fullmatch(name):
            raise RequestError(f"not a request name: {name!r}")
        if (not isinstance(groups, list) or not groups
                or not all(type(n) is int and 0 <= n < 1_000_000 for n in groups)):
            raise RequestError(f"request {name}: not a list of IOMMU group numbers: {groups!r}")
        out[name] = tuple(groups)
    if len({n for ns in out.values() for n in ns}) > MAX_GROUPS:
        raise RequestError(f"more than {MAX_GROUPS} groups")
    return SpecRequest(claim, out)


def read_request(requests_dir: str, claim_uid: str) -> SpecRequest:
    """The request for `claim_uid`: `RequestError` if it is unreadable or not one vfiod-dra
    writes, `FileNotFoundError` if there is none."""
    path = request_path(requests_dir, claim_uid)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise RequestError(f"cannot read {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise RequestError(f"{path} is not a regular file")
        data = f.read(64 * 1024 + 1)
    if len(data) > 64 * 1024:
        raise RequestError(f"{path} is larger than 64 KiB")
    try:
        doc = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(f"{path} is not JSON: {e}") from None
    return check_request(doc, claim_uid)


def remove_request(requests_dir: str, claim_uid: str) -> bool:
    try:
        os.unlink(request_path(requests_dir, claim_uid))
        return True
    except FileNotFoundError:
        return False


def listing(directory: str) -> tuple[tuple[str, int, int], ...]:
    """What is in `directory` (name, modification time, inode of each entry): it differs
    whenever a request is written, replaced or withdrawn."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return ()
    out = []
    for name in names:
        try:
            st = os.lstat(os.path.join(directory, name))
        except FileNotFoundError:
            continue
        out.append((name, st.st_mtime_ns, st.st_ino))
    return tuple(out)
