"""vfiod-dra driven as the kubelet drives it: a fake kubelet registers it through the
registry socket and calls prepare/unprepare; a stub API server holds claims and slices;
vfiod runs on a simulated host on a private system bus; vfiod-dra runs as the
unprivileged delegate the policy names."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import jsonschema
import pytest

from tests.bus.conftest import TEST_USER, VENV_BIN, unprivileged_uid
from vfiod.dra import cdi

from .kubelet import FakeKubelet, RpcError
from .stubapi import StubApiServer

pytestmark = pytest.mark.bus

NODE = "node-a"
GROUP8 = ["0000:04:00.0", "0000:05:00.0"]

POLICY = """
[[rule]]
comment = "ML namespaces get the NIC pair"
group = [8]
k8s_namespaces = ["ml-*"]
k8s_delegates = ["{user}"]
persistent = true
memlock = "256M"

[[rule]]
action = "deny"
comment = "no other namespace"
group = [8]
k8s_namespaces = ["*"]
k8s_delegates = ["{user}"]
"""


def allocated(*groups, request="nic"):
    return [{"request": request, "driver": "vfiod.io", "pool": NODE, "device": f"group-{n}"} for n in groups]


class Dra:
    """vfiod-dra as a process of the delegate user, with its own directories, and its
    spec writer (``vfiod-dra cdi-writer``) as root beside it."""

    def __init__(self, world, api, **env):
        self.world, self.api = world, api
        self.dir = os.path.join(world.dir, "dra")
        for sub in ("registry", "plugin", "state", "requests"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        uid = unprivileged_uid()
        for dirpath, dirnames, _ in os.walk(self.dir):
            os.chown(dirpath, uid, uid)
        self.cdi_dir = os.path.join(self.dir, "cdi")          # root's, as /var/run/cdi is
        os.makedirs(self.cdi_dir, mode=0o755, exist_ok=True)
        self.requests_dir = os.path.join(self.dir, "requests")
        self.proc = self.writer = None
        self.start(**env)

    def start(self, **env):
        self.log = open(os.path.join(self.dir, "dra.log"), "a")
        d = self.dir
        dirs = ["--bus", self.world.address, "--cdi-dir", self.cdi_dir, "--cdi-requests", self.requests_dir]
        self.wlog = open(os.path.join(self.dir, "writer.log"), "a")
        self.writer = subprocess.Popen(
            [os.path.join(VENV_BIN, "vfiod-dra"), *dirs, "--dev-root", self.world.tree().dev,
             "cdi-writer", "--delegate", TEST_USER], stdout=self.wlog, stderr=subprocess.STDOUT, cwd=d)
        self.proc = subprocess.Popen(
            [os.path.join(VENV_BIN, "vfiod-dra"), "--node", NODE, *dirs,
             "--kube", self.api.url, "--registry-dir", f"{d}/registry", "--plugin-dir", f"{d}/plugin",
             "--state-dir", f"{d}/state"],
            stdout=self.log, stderr=subprocess.STDOUT, user=TEST_USER, cwd=d, env=dict(os.environ, **env))
        self.kubelet = FakeKubelet(f"{d}/registry")

    def read_log(self):
        with open(os.path.join(self.dir, "dra.log")) as f:
            return f.read()

    def writer_log(self):
        with open(os.path.join(self.dir, "writer.log")) as f:
            return f.read()

    def checkpoint(self):
        """The checkpoint's claims ({} before the first claim is recorded)."""
        try:
            with open(os.path.join(self.dir, "state", "checkpoint.json")) as f:
                return json.load(f)["claims"]
        except FileNotFoundError:
            return {}

    def stop(self):
        self.kubelet.close()
        for p in (self.proc, self.writer):
            if p.poll() is None:
                p.terminate()
                p.wait(30)
        self.log.close()
        self.wlog.close()


@pytest.fixture
def api():
    s = StubApiServer()
    yield s
    s.close()


@pytest.fixture
def stack(make_world, api):
    world = make_world(policy=POLICY)
    dra = Dra(world, api)
    try:
        yield world, dra
    finally:
        dra.stop()
        assert "Traceback" not in dra.read_log(), dra.read_log()
        assert "Traceback" not in dra.writer_log(), dra.writer_log()


def schema():
    with open(cdi.SCHEMA) as f:
        return json.load(f)


def spec_gone(dra, uid, timeout=10):
    """The writer deletes a withdrawn claim's spec: True once it is gone."""
    deadline = time.monotonic() + timeout
    while cdi.read_spec(dra.cdi_dir, uid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    return cdi.read_spec(dra.cdi_dir, uid) is None


def leases_of(world):
    return json.loads(world.ctl("leases", "--json", user=None).stdout)["leases"]


def test_register_prepare_twice_unprepare(stack, api):
    world, dra = stack
    before = world.drivers()
    info = dra.kubelet.register()
    assert (info.type, info.name, list(info.supported_versions)) == ("DRAPlugin", "vfiod.io", ["v1.DRAPlugin"])
    assert info.endpoint == os.path.join(dra.dir, "plugin", "dra.sock")

    uid = api.put_claim("ml-train", "nics", allocated(8))
    first = dra.kubelet.prepare(("ml-train", uid, "nics"))
    assert first == {uid: ("", [("group-8", NODE, [f"vfiod.io/group={uid}-group-8"], ["nic"])])}
    assert [world.drivers()[a] for a in GROUP8] == ["vfio-pci", "vfio-pci"]
    (lease,) = leases_of(world)
    assert (lease["group"], lease["owner"], lease["persistent"]) == (8, unprivileged_uid(), True)

    spec = cdi.read_spec(dra.cdi_dir, uid)
    jsonschema.validate(spec, schema())
    assert spec["kind"] == "vfiod.io/group"
    assert [d["name"] for d in spec["devices"]] == [f"{uid}-group-8"]
    assert spec["devices"][0]["containerEdits"]["deviceNodes"][0]["path"] == "/dev/vfio/8"
    env = dict(e.split("=", 1) for e in spec["containerEdits"]["env"])
    assert env["PCI_RESOURCE_VFIOD_IO_NIC"] == env["PCIDEVICE_VFIOD_IO_NIC"] == ",".join(GROUP8)
    assert env["VFIOD_MEMLOCK"] == str(256 << 20) and env["VFIOD_IOMMU_GROUPS"] == "8"
    (hook,) = spec["containerEdits"]["hooks"]
    assert hook["hookName"] == "createRuntime" and hook["args"][1:] == ["memlock-hook", str(256 << 20)]

    # the same claim again: the same answer, nothing new taken
    assert dra.kubelet.prepare(("ml-train", uid, "nics")) == first
    assert [x["id"] for x in leases_of(world)] == [lease["id"]]

    assert dra.kubelet.unprepare(("ml-train", uid, "nics")) == {uid: ""}
    assert world.drivers() == before and leases_of(world) == []
    assert spec_gone(dra, uid) and dra.checkpoint() == {}
    # unpreparing what is not prepared is no error
    assert dra.kubelet.unprepare(("ml-train", uid, "nics")) == {uid: ""}


def test_a_denied_namespace_gets_its_own_error_naming_the_rule(stack, api):
    world, dra = stack
    before = world.drivers()
    dra.kubelet.register()
    bad = api.put_claim("web", "nics", allocated(8))
    missing = "0c4f6d3a-0000-4000-8000-000000000001"
    got = dra.kubelet.prepare(("web", bad, "nics"), ("ml-x", missing, "gone"))
    error, devices = got[bad]
    assert devices == [] and "denied by rule" in error and "50-test.toml:10" in error \
        and "no other namespace" in error, error
    assert "ResourceClaim ml-x/gone" in got[missing][0] and "404" in got[missing][0]
    assert world.drivers() == before and leases_of(world) == []
    assert cdi.spec_claims(dra.cdi_dir) == [] and dra.checkpoint() == {}
    # an allocation for another driver or node is not this driver's to prepare
    other = api.put_claim("ml-x", "other", [{"request": "gpu", "driver": "gpu.example.com", "pool": NODE,
                                             "device": "gpu-0"}])
    error, _ = dra.kubelet.prepare(("ml-x", other, "other"))[other]
    assert "has no allocation for vfiod.io on node node-a" in error


@pytest.mark.parametrize("device", ["group-\u00b2", "group-\u0668"])
def test_a_device_name_with_digits_other_than_ascii_is_refused_and_nothing_is_leased(stack, api, device):
    """``group-²`` (which str.isdigit takes and int refuses) and ``group-٨`` (Arabic-Indic
    eight, which int reads as 8): neither is a name this driver publishes, so the claim
    gets a plain error naming the device and no group is leased."""
    world, dra = stack
    before = world.drivers()
    dra.kubelet.register()
    uid = api.put_claim("ml-train", "nics", [{"request": "nic", "driver": "vfiod.io", "pool": NODE,
                                              "device": device}])
    error, devices = dra.kubelet.prepare(("ml-train", uid, "nics"))[uid]
    assert devices == [] and f"has no device {device!r}" in error and "ASCII digits" in error, error
    assert world.drivers() == before and leases_of(world) == [] and dra.checkpoint() == {}
    assert cdi.spec_claims(dra.cdi_dir) == []


@pytest.mark.parametrize("point, reconciled", [
    ("after-grant", "(group 8) named by no claim: ended"),      # granted, not yet recorded
    ("after-lease", "was half prepared: undone"),              # recorded, no spec yet
])
def test_a_crash_between_lease_and_cdi_spec_is_reconciled(make_world, api, point, reconciled):
    world = make_world(policy=POLICY)
    before = world.drivers()
    dra = Dra(world, api, VFIOD_DRA_CRASH_AT=point)
    try:
        dra.kubelet.register()
        uid = api.put_claim("ml-train", "nics", allocated(8))
        with pytest.raises(RpcError):           # the driver died mid-call
            dra.kubelet.prepare(("ml-train", uid, "nics"), timeout=60)
        assert dra.proc.wait(30) == 70
        # the crash left a lease held and no spec
        assert [x["group"] for x in leases_of(world)] == [8]
        assert cdi.spec_claims(dra.cdi_dir) == []
        dra.stop()
        dra.start()
        dra.kubelet.register()
        log = dra.read_log()
        assert "reconciled: " in log and reconciled in log, log
        assert leases_of(world) == [] and world.drivers() == before and dra.checkpoint() == {}
        # and the claim prepares cleanly afterwards
        error, devices = dra.kubelet.prepare(("ml-train", uid, "nics"))[uid]
        assert error == "" and devices[0][0] == "group-8"
        assert dra.kubelet.unprepare(("ml-train", uid, "nics")) == {uid: ""}
        assert world.drivers() == before
    finally:
        dra.stop()
    assert "Traceback" not in dra.read_log()


def test_the_slice_lists_leasable_groups_and_the_policy(stack, api):
    world, dra = stack
    dra.kubelet.register()
    name = f"{NODE}-vfiod.io"
    deadline = time.monotonic() + 30
    while api.slice(name) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    s = api.slice(name)
    assert s is not None, dra.read_log()
    assert (s["spec"]["driver"], s["spec"]["nodeName"], s["spec"]["pool"]["name"]) == ("vfiod.io", NODE, NODE)
    devices = {d["name"]: d["attributes"] for d in s["spec"]["devices"]}
    g8 = devices["group-8"]
    assert g8["resource.kubernetes.io/pciBusID"] == {"string": "0000:04:00.0"}
    assert (g8["vendorID"], g8["deviceID"], g8["class"]) == ({"string": "8086"}, {"string": "10d3"},
                                                              {"string": "020000"})
    assert g8["iommuGroup"] == {"int": 8} and g8["members"] == {"string": ",".join(GROUP8)}
    assert g8["kubernetes"] == {"bool": True} and g8["namespaces"] == {"string": "ml-*"}
    # other groups are listed, not for Kubernetes; protected ones (the root disk's, the
    # default route's NIC) are not listed at all
    assert all(a["kubernetes"] == {"bool": False} for n, a in devices.items() if n != "group-8")
    groups = json.loads(world.ctl("groups", "--json").stdout)["groups"]
    protected = {f"group-{g['group']}" for g in groups if any(d["protected"] for d in g["devices"])}
    assert protected and not protected & set(devices)


def _wait_for_slice(api, name, pred, timeout):
    """The first slice written that satisfies `pred`, and when (monotonic); None if none in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with api.lock:
            hit = next(((t, s) for t, s in api.history if pred(s)), None)
        if hit:
            return hit
        time.sleep(0.02)
    return None


def test_the_slice_follows_a_vf_count_change_and_a_policy_reload_within_2_s(make_world, api):
    world = make_world(topology="sriov", policy=POLICY + """
[[rule]]
vf_of = "0000:01:00.0"
k8s_namespaces = ["vm-*"]
k8s_delegates = ["{user}"]
""")
    dra = Dra(world, api)
    name = f"{NODE}-vfiod.io"

    def vfs(s):
        return sorted(d["attributes"]["resource.kubernetes.io/pciBusID"]["string"] for d in s["spec"]["devices"]
                      if d["attributes"].get("physfn"))
    try:
        dra.kubelet.register()
        first = _wait_for_slice(api, name, lambda s: vfs(s), 30)
        assert first, dra.read_log()
        n = len(vfs(first[1]))
        assert n > 2 and all(d["attributes"]["namespaces"] == {"string": "vm-*"}
                             for d in first[1]["spec"]["devices"] if d["attributes"].get("physfn"))
        seen = len(api.history)
        t0 = time.monotonic()
        world.ctl("vfs", "0000:01:00.0", "2", user=None)
        hit = _wait_for_slice(api, name, lambda s: len(vfs(s)) == 2, 10)
        assert hit, dra.read_log()
        assert hit[0] - t0 < 2.0, f"the slice took {hit[0] - t0:.2f} s"
        assert hit[1]["spec"]["pool"]["generation"] > first[1]["spec"]["pool"]["generation"]
        assert len(api.history) > seen

        # a reload that takes the VFs away from Kubernetes is in the slice too
        with open(os.path.join(world.policy_dir, "50-test.toml"), "w") as f:
            f.write(POLICY.format(user=TEST_USER))
        t0 = time.monotonic()
        world.ctl("reload", user=None)
        hit = _wait_for_slice(api, name, lambda s: any(
            d["attributes"].get("physfn") and d["attributes"]["kubernetes"] == {"bool": False}
            for d in s["spec"]["devices"]), 10)
        assert hit, dra.read_log()
        assert hit[0] - t0 < 2.0, f"the slice took {hit[0] - t0:.2f} s"
    finally:
        dra.stop()
    assert "Traceback" not in dra.read_log()


def test_without_vfiod_a_claim_gets_a_plain_error_and_the_driver_keeps_serving(stack, api):
    world, dra = stack
    dra.kubelet.register()
    uid = api.put_claim("ml-train", "nics", allocated(8))
    world.stop_daemon()
    try:
        error, devices = dra.kubelet.prepare(("ml-train", uid, "nics"))[uid]
        assert devices == [] and "vfiod is not running" in error, error
        assert dra.kubelet.unprepare(("ml-train", uid, "nics")) == {uid: ""}
        assert dra.proc.poll() is None and dra.checkpoint() == {}
    finally:
        world.start_daemon()
    error, devices = dra.kubelet.prepare(("ml-train", uid, "nics"))[uid]
    assert error == "" and devices[0][0] == "group-8"
    assert dra.kubelet.unprepare(("ml-train", uid, "nics")) == {uid: ""}


def test_the_slice_is_rebuilt_when_vfiod_comes_back(stack, api):
    world, dra = stack
    dra.kubelet.register()
    name = f"{NODE}-vfiod.io"
    assert _wait_for_slice(api, name, lambda s: True, 30), dra.read_log()
    world.stop_daemon()
    with open(os.path.join(world.policy_dir, "50-test.toml"), "w") as f:
        f.write(POLICY.format(user=TEST_USER).replace('"ml-*"', '"team-*"'))
    world.start_daemon()
    hit = _wait_for_slice(api, name, lambda s: any(
        d["attributes"]["namespaces"] == {"string": "team-*"} for d in s["spec"]["devices"]), 20)
    assert hit, dra.read_log()


def test_a_policy_reload_judges_a_claims_lease_for_its_namespace(stack, api):
    """vfiod keeps the namespace with the lease: a reload that still allows the namespace
    keeps the lease; one that no longer does revokes it, and the devices go home."""
    world, dra = stack
    before = world.drivers()
    dra.kubelet.register()
    uid = api.put_claim("ml-train", "nics", allocated(8))
    assert dra.kubelet.prepare(("ml-train", uid, "nics"))[uid][0] == ""
    (lease,) = leases_of(world)
    world.ctl("reload", user=None)
    time.sleep(1.0)
    assert [x["id"] for x in leases_of(world)] == [lease["id"]]
    with open(os.path.join(world.policy_dir, "50-test.toml"), "w") as f:
        f.write(POLICY.format(user=TEST_USER).replace('"ml-*"', '"team-*"'))
    world.ctl("reload", user=None)
    deadline = time.monotonic() + 30
    while leases_of(world) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leases_of(world) == [] and world.drivers() == before
    # the writer deletes the spec of a lease that ended: no container started from now
    # on gets a copy of a node the delegate no longer leases
    assert spec_gone(dra, uid), dra.writer_log()
    # the kubelet's unprepare then finds nothing left to end
    assert dra.kubelet.unprepare(("ml-train", uid, "nics")) == {uid: ""}


def _forge(dra, uid, doc):
    """A request written in the delegate's directory, as a compromised vfiod-dra could."""
    path = cdi.request_path(dra.requests_dir, uid)
    with open(path, "w") as f:
        f.write(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _wait_log(dra, text, timeout=10):
    deadline = time.monotonic() + timeout
    while text not in dra.writer_log() and time.monotonic() < deadline:
        time.sleep(0.05)
    return text in dra.writer_log()


def test_the_spec_writer_writes_no_spec_for_a_group_the_delegate_does_not_lease(make_world, api):
    """A container's copy of /dev/vfio/N is open to the pod's user: a request for a group
    vfiod-dra's user does not lease (here: nobody does; then root does) gets no spec."""
    world = make_world(policy=POLICY + '[[rule]]\ngroup = [8]\nusers = ["root"]\npersistent = true\n')
    dra = Dra(world, api)
    try:
        uid = "0c4f6d3a-0000-4000-8000-0000000000aa"
        _forge(dra, uid, {"claim": uid, "requests": {"nic": [8]}})
        assert _wait_log(dra, f"no CDI spec for claim {uid}: IOMMU group 8 is not leased by uid"), \
            dra.writer_log()
        world.ctl("lease", "group:8", "--persistent", user=None)          # root's lease, not the delegate's
        assert [x["owner"] for x in leases_of(world)] == [0]
        time.sleep(1.0)
        assert cdi.spec_claims(dra.cdi_dir) == [], dra.writer_log()
        assert dra.writer.poll() is None
    finally:
        dra.stop()
    assert "Traceback" not in dra.writer_log()


def test_a_request_naming_a_group_gone_from_the_node_costs_no_other_claim_its_spec(stack, api):
    """The writer asks vfiod about every request's groups in one call; a request naming a
    group the node does not have is refused by name, and a real claim beside it still gets
    its spec (with the lease's memlock grant, from the same call)."""
    world, dra = stack
    gone = "0c4f6d3a-0000-4000-8000-0000000000dd"
    _forge(dra, gone, {"claim": gone, "requests": {"nic": [8, 4095]}})
    assert _wait_log(dra, f"no CDI spec for claim {gone}: IOMMU group 4095 is gone from this node"), \
        dra.writer_log()
    dra.kubelet.register()
    uid = api.put_claim("ml-train", "nics", allocated(8))
    assert dra.kubelet.prepare(("ml-train", uid, "nics"))[uid][0] == ""
    spec = cdi.read_spec(dra.cdi_dir, uid)
    env = dict(e.split("=", 1) for e in spec["containerEdits"]["env"])
    assert env["VFIOD_MEMLOCK"] == str(256 << 20) and env["VFIOD_IOMMU_GROUPS"] == "8"
    assert cdi.spec_claims(dra.cdi_dir) == [uid] and dra.writer.poll() is None
    assert dra.kubelet.unprepare(("ml-train", uid, "nics")) == {uid: ""}


@pytest.mark.parametrize("doc, why", [
    ("{not json", "is not JSON"),
    ({"claim": "UID", "requests": {"nic": [8]}, "hooks": [{"path": "/bin/sh"}]}, "not a spec request"),
    ({"claim": "0c4f6d3a-0000-4000-8000-0000000000bb", "requests": {"nic": [8]}}, "its file name claim"),
    ({"claim": "UID", "requests": {"nic": ["8"]}}, "not a list of IOMMU group numbers"),
    ({"claim": "UID", "requests": {"NIC/../x": [8]}}, "not a request name"),
])
def test_the_spec_writer_refuses_a_request_it_did_not_ask_for_by_name(stack, api, doc, why):
    """Anything but exactly what vfiod-dra writes is refused with the reason, logged once,
    and writes nothing; the writer keeps serving (the fixture checks its log for tracebacks)."""
    world, dra = stack
    uid = "0c4f6d3a-0000-4000-8000-0000000000cc"
    if isinstance(doc, dict):
        doc = json.loads(json.dumps(doc).replace('"UID"', json.dumps(uid)))
    _forge(dra, uid, doc)
    assert _wait_log(dra, f"no CDI spec for claim {uid}: "), dra.writer_log()
    assert why in dra.writer_log(), dra.writer_log()
    time.sleep(0.5)
    assert dra.writer_log().count(f"no CDI spec for claim {uid}: ") == 1, dra.writer_log()
    assert cdi.spec_claims(dra.cdi_dir) == [] and dra.writer.poll() is None
