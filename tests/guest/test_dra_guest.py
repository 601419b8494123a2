"""vfiod-dra on the real kernel: the e1000e of the ``rootport`` topology (0000:01:00.0,
alone in its group) handed to a "container" through a DRA claim.

One boot.  Inside the guest, one root python3 process runs a private bus and vfiod
(tests/guest/instack.py), a stub API server (tests/dra/stubapi.py), vfiod-dra as
the ``vfiotest`` user, the delegate the policy names, and its spec writer
(``vfiod-dra cdi-writer``) as root, the only one who writes the CDI directory; a fake kubelet
(tests/dra/kubelet.py) registers it and calls it.  In order:

1. a bare vfiod lease and release of the group by uid 1000 (its own user rule),
   ROUNDS times, and ROUNDS prepare + unprepare of a claim of namespace ml-train:
   the latency figures;
2. prepare: the NIC on vfio-pci, the CDI spec valid against the schema; prepare again:
   the same answer; a process started the way a runtime applies the spec
   (tests/dra/runtime.py: its device nodes, env and memlock hook, as uid 1000) does
   the whole VFIO handshake (tests/dra/handshake.py);
3. unprepare: e1000e back, the spec gone;
4. a claim of namespace ``web``: its own error naming the deny rule, nothing bound;
5. vfiod-dra killed between the lease and the CDI write, restarted: reconciled, e1000e
   back, nothing leased;
6. the NIC removed (sysfs ``remove``): the ResourceSlice drops its group; how long it took.
"""

from __future__ import annotations

import json
import statistics

import pytest

from tests.guest.harness import Guest, guest_available

_ok, _why = guest_available()
pytestmark = [pytest.mark.guest, pytest.mark.skipif(not _ok, reason=f"guest not available: {_why}")]

NIC = "0000:01:00.0"
ROUNDS = 3
CONTAINER_UID = 1000

GUEST_PY = r'''
import json, os, pwd, subprocess, sys, time, traceback
sys.path.insert(0, os.environ["VFIOD_CHECKOUT"])
CHECKOUT = os.environ["VFIOD_CHECKOUT"]
from tests.guest.instack import Stack, as_user, driver, ensure_user, group_of, node, record
from tests.dra.stubapi import StubApiServer
from tests.dra.kubelet import FakeKubelet
from vfiod.dra import cdi
OUT = os.environ["OUT"]
NIC, ROUNDS, CUID = %(nic)r, %(rounds)d, %(cuid)d
NODE = "guest"
res = {"errors": []}
GROUP = group_of(NIC)
res["group"] = GROUP
ensure_user(CUID, "pod-user")
dra_user = pwd.getpwnam("vfiotest")
policy = {"50-k8s.toml":
    f'[[rule]]\ncomment = "ML namespaces"\ngroup = [{GROUP}]\nk8s_namespaces = ["ml-*"]\n'
    f'k8s_delegates = ["vfiotest"]\npersistent = true\nmemlock = "256M"\n\n'
    f'[[rule]]\naction = "deny"\ncomment = "no other namespace"\ngroup = [{GROUP}]\nk8s_namespaces = ["*"]\n'
    f'k8s_delegates = ["vfiotest"]\n\n'
    f'[[rule]]\ngroup = [{GROUP}]\nuids = [{CUID}]\n'}
stack = Stack("/run/vfiod-dra-test", policy)
api = StubApiServer()
DIR = "/run/dra"
for sub in ("registry", "plugin", "state", "requests"):
    os.makedirs(f"{DIR}/{sub}", exist_ok=True)
    os.chown(f"{DIR}/{sub}", dra_user.pw_uid, dra_user.pw_gid)
CDI = f"{DIR}/cdi"                 # root's, as /var/run/cdi: the spec writer's
os.makedirs(CDI, mode=0o755, exist_ok=True)
REQUESTS = f"{DIR}/requests"
procs = []

def start_writer():
    log = open(f"{DIR}/writer.log", "a")
    p = subprocess.Popen(["vfiod-dra", "--bus", stack.address, "--cdi-dir", CDI, "--cdi-requests", REQUESTS,
                          "cdi-writer", "--delegate", "vfiotest"],
                         stdout=log, stderr=subprocess.STDOUT, cwd="/tmp")
    procs.append(p)
    return p

def specs(settle=10.0):
    """The spec files, once the writer has caught up with the requests (or after `settle` s)."""
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        want = sorted(n for n in os.listdir(REQUESTS) if n.endswith(".json"))
        if sorted(os.listdir(CDI)) == want:
            break
        time.sleep(0.05)
    return sorted(os.listdir(CDI))

def start_dra(**env):
    log = open(f"{DIR}/dra.log", "a")
    p = subprocess.Popen(["vfiod-dra", "--node", NODE, "--bus", stack.address, "--kube", api.url,
                          "--registry-dir", f"{DIR}/registry", "--plugin-dir", f"{DIR}/plugin",
                          "--state-dir", f"{DIR}/state", "--cdi-dir", CDI, "--cdi-requests", REQUESTS],
                         stdout=log, stderr=subprocess.STDOUT, user=dra_user.pw_uid, group=dra_user.pw_gid,
                         extra_groups=[], env=dict(os.environ, **env), cwd="/tmp")
    procs.append(p)
    k = FakeKubelet(f"{DIR}/registry")
    info = k.register()
    return p, k, info

def claim(ns, name):
    return ns, api.put_claim(ns, name, [{"request": "nic", "driver": "vfiod.io", "pool": NODE,
                                         "device": f"group-{GROUP}"}]), name

def slice_groups():
    s = api.slice(f"{NODE}-vfiod.io")
    return None if s is None else sorted(d["name"] for d in s["spec"]["devices"])

BARE = r"""
import asyncio, json, sys, time
sys.path.insert(0, %%r)
from vfiod.client import Client
async def main():
    c = await Client(%%r, timeout=120).connect()
    out = []
    for _ in range(%%d):
        t0 = time.monotonic()
        path = await c.request_lease("group:%%d", "vfio")
        t1 = time.monotonic()
        await c.lease_call(path, "Release")
        out.append([t1 - t0, time.monotonic() - t1])
    c.close()
    print(json.dumps(out))
asyncio.run(main())
"""
try:
    res["before"] = driver(NIC)
    stack.start()
    start_writer()
    dra, kubelet, info = start_dra()
    res["info"] = {"type": info.type, "name": info.name, "versions": list(info.supported_versions),
                   "endpoint": info.endpoint}
    deadline = time.monotonic() + 60
    while slice_groups() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    res["slice_before"] = api.slice(f"{NODE}-vfiod.io")

    # 1. figures
    p = as_user(CUID, ["python3", "-c", BARE %% (CHECKOUT, stack.address, ROUNDS, GROUP)], timeout=600)
    res["bare"] = json.loads(p.stdout) if p.returncode == 0 else record(p)
    timing = claim("ml-train", "timing")
    res["dra"] = []
    for _ in range(ROUNDS):
        t0 = time.monotonic()
        got = kubelet.prepare(timing)
        t1 = time.monotonic()
        un = kubelet.unprepare(timing)
        res["dra"].append([t1 - t0, time.monotonic() - t1, got[timing[1]][0], un[timing[1]]])
    res["after_timing"] = driver(NIC)

    # 2. prepare, twice, and the container
    c = claim("ml-train", "nics")
    res["prepare"] = kubelet.prepare(c)[c[1]]
    res["prepared"] = {"driver": driver(NIC), "node": node(GROUP)}
    res["spec"] = cdi.read_spec(CDI, c[1])
    res["spec_files"] = sorted(os.listdir(CDI))
    res["prepare_again"] = kubelet.prepare(c)[c[1]]
    ids = [i for d in res["prepare"][1] for i in d[2]]
    p = subprocess.run(["python3", "-m", "tests.dra.runtime", cdi.spec_path(CDI, c[1]), *ids,
                        "--uid", str(CUID), "--", "python3", f"{CHECKOUT}/tests/dra/handshake.py"],
                       capture_output=True, text=True, timeout=300, cwd=CHECKOUT)
    res["container"] = record(p)
    res["leases_held"] = record(stack.vfioctl(0, "leases", "--json", timeout=120))

    # 3. unprepare
    res["unprepare"] = kubelet.unprepare(c)[c[1]]
    res["unprepared"] = {"driver": driver(NIC), "node": node(GROUP), "specs": specs()}

    # 4. a namespace the policy refuses
    w = claim("web", "nics")
    res["denied"] = kubelet.prepare(w)[w[1]]
    res["after_denied"] = {"driver": driver(NIC), "specs": specs(),
                           "leases": record(stack.vfioctl(0, "leases", "--json", timeout=120))}

    # 5. killed between the lease and the CDI spec, restarted
    kubelet.close()
    dra.terminate(); dra.wait(30)
    dra, kubelet, _ = start_dra(VFIOD_DRA_CRASH_AT="after-lease")
    k = claim("ml-crash", "nics")
    try:
        kubelet.prepare(k, timeout=120)
        res["crash_prepare"] = "answered"
    except Exception as e:
        res["crash_prepare"] = type(e).__name__
    res["crash_rc"] = dra.wait(60)
    res["crashed"] = {"driver": driver(NIC), "specs": specs(),
                      "leases": record(stack.vfioctl(0, "leases", "--json", timeout=120))}
    kubelet.close()
    dra, kubelet, _ = start_dra()
    res["reconciled"] = {"driver": driver(NIC), "specs": specs(),
                         "leases": record(stack.vfioctl(0, "leases", "--json", timeout=120))}

    # 6. hotplug removal
    res["slice_before_removal"] = slice_groups()
    t0 = time.monotonic()
    with open(f"/sys/bus/pci/devices/{NIC}/remove", "w") as f:
        f.write("1")
    seen = None
    while time.monotonic() - t0 < 30:
        g = slice_groups()
        if g is not None and f"group-{GROUP}" not in g:
            seen = time.monotonic() - t0
            break
        time.sleep(0.02)
    res["removal_seconds"] = seen
    res["slice_after_removal"] = slice_groups()
    kubelet.close()
    dra.terminate()
    res["dra_rc"] = dra.wait(30)
except Exception:
    res["errors"].append(traceback.format_exc())
finally:
    for p in procs:
        if p.poll() is None:
            p.kill()
    stack.close()
    api.close()
    res["vfiod_log"] = stack.read_log()
    for name in ("dra", "writer"):
        try:
            res[f"{name}_log"] = open(f"{DIR}/{name}.log").read()
        except OSError:
            res[f"{name}_log"] = ""
    with open(os.path.join(OUT, "dra.json"), "w") as f:
        json.dump(res, f)
'''


def run_guest(rounds: int = ROUNDS, timeout: float = 1500) -> dict:
    """Boot, run the script, return its results (also bench/dra.py's figures)."""
    script = GUEST_PY % {"nic": NIC, "rounds": rounds, "cuid": CONTAINER_UID}
    res = Guest(topology="rootport").run("python3 - <<'EOF'\n" + script + "\nEOF\n", timeout=timeout)
    assert res.returncode == 0 and "dra.json" in res.files, res.output[-4000:]
    r = json.loads(res.files["dra.json"])
    r["_wall_seconds"] = res.wall_seconds
    return r


@pytest.fixture(scope="module")
def run():
    r = run_guest()
    assert not r["errors"], "\n".join(r["errors"]) + r.get("dra_log", "")[-4000:] + r.get("vfiod_log", "")[-4000:]
    return r


def _leases(p: dict) -> list:
    assert p["rc"] == 0, p
    return json.loads(p["stdout"])["leases"]


def test_the_kubelet_registers_the_plugin(run):
    assert run["info"]["type"] == "DRAPlugin" and run["info"]["name"] == "vfiod.io"
    assert run["info"]["versions"] == ["v1.DRAPlugin"]
    devices = {d["name"]: d["attributes"] for d in run["slice_before"]["spec"]["devices"]}
    nic = devices[f"group-{run['group']}"]
    assert nic["resource.kubernetes.io/pciBusID"] == {"string": NIC} and nic["kubernetes"] == {"bool": True}


def test_prepare_binds_vfio_pci_and_writes_a_valid_cdi_spec(run):
    import jsonschema

    from vfiod.dra import cdi

    error, devices = run["prepare"]
    assert error == "", run["dra_log"][-3000:]
    g = run["group"]
    assert run["prepared"] == {"driver": "vfio-pci", "node": [_uid("vfiotest"), "0o600"]}
    with open(cdi.SCHEMA) as f:
        jsonschema.validate(run["spec"], json.load(f))
    nodes = [n["path"] for n in run["spec"]["containerEdits"]["deviceNodes"]] + \
        [n["path"] for d in run["spec"]["devices"] for n in d["containerEdits"]["deviceNodes"]]
    assert nodes == ["/dev/vfio/vfio", f"/dev/vfio/{g}"]
    assert all(n.get("type") == "c" and "major" in n for d in run["spec"]["devices"]
               for n in d["containerEdits"]["deviceNodes"])
    assert devices[0][2] == [f"vfiod.io/group={devices[0][0] and run['spec']['devices'][0]['name']}"]
    assert run["prepare_again"] == run["prepare"]
    (lease,) = _leases(run["leases_held"])
    assert lease["persistent"] and lease["memlock"] == 256 << 20


def test_a_process_given_the_spec_as_a_runtime_would_does_the_vfio_handshake(run):
    p = run["container"]
    out = p["stdout"] + p["stderr"]
    assert p["rc"] == 0, out
    assert f"uid {CONTAINER_UID} memlock {256 << 20}" in out, out      # the spec's hook raised it
    assert "viable 1" in out and "type1v2 1" in out and "mapped 1048576" in out, out
    assert f"device {NIC} regions" in out, out


def test_unprepare_gives_the_nic_back_and_removes_the_spec(run):
    assert run["unprepare"] == ""
    assert run["unprepared"] == {"driver": "e1000e", "node": None, "specs": []}
    assert run["after_timing"] == "e1000e"


def test_a_denied_namespace_gets_its_error_and_nothing_is_bound(run):
    error, devices = run["denied"]
    assert devices == [] and "denied by rule" in error and "50-k8s.toml:" in error \
        and "no other namespace" in error, error
    assert run["after_denied"]["driver"] == "e1000e" and run["after_denied"]["specs"] == []
    assert _leases(run["after_denied"]["leases"]) == []


def test_a_crash_between_lease_and_cdi_spec_is_reconciled(run):
    assert run["crash_rc"] == 70 and run["crash_prepare"] != "answered"
    assert run["crashed"]["driver"] == "vfio-pci" and run["crashed"]["specs"] == []
    assert len(_leases(run["crashed"]["leases"])) == 1
    assert run["reconciled"]["driver"] == "e1000e" and run["reconciled"]["specs"] == []
    assert _leases(run["reconciled"]["leases"]) == []
    assert "was half prepared: undone" in run["dra_log"]


def test_the_slice_follows_a_hotplug_removal_within_2_s(run):
    g = f"group-{run['group']}"
    assert g in run["slice_before_removal"] and g not in run["slice_after_removal"]
    assert run["removal_seconds"] is not None and run["removal_seconds"] < 2.0, run["removal_seconds"]
    assert run["dra_rc"] == 0
    assert "Traceback" not in run["dra_log"] and "Traceback" not in run["vfiod_log"]
    assert "Traceback" not in run["writer_log"] and "spec written" in run["writer_log"], run["writer_log"]


def test_latency_figures_are_recorded(run):
    """The figures bench/dra.py prints; each round a real bind and return."""
    assert isinstance(run["bare"], list), run["bare"]           # else what the client said
    assert len(run["bare"]) == len(run["dra"]) == ROUNDS, run["bare"]
    assert all(r[2] == "" and r[3] == "" for r in run["dra"]), run["dra"]
    print("bare lease/release median", statistics.median(r[0] for r in run["bare"]),
          statistics.median(r[1] for r in run["bare"]))
    print("prepare/unprepare median", statistics.median(r[0] for r in run["dra"]),
          statistics.median(r[1] for r in run["dra"]))
    print("slice without the removed NIC after", run["removal_seconds"])


def _uid(name: str) -> int:
    import pwd
    return pwd.getpwnam(name).pw_uid
