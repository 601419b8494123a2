"""vfiod-dra's parts without a bus: CDI specs, the checkpoint, the slice's devices, the
memlock hook, the command line, and the deploy/ files."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import jsonschema
import pytest
import yaml

from vfiod.dra import cdi, slices
from vfiod.dra.checkpoint import Checkpoint, ClaimRecord
from vfiod.dra.main import parser

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UID = "5f0c1a9e-7d2b-4c11-9a3e-0123456789ab"


def schema():
    with open(cdi.SCHEMA) as f:
        return json.load(f)


def test_a_spec_validates_and_carries_the_env_of_kubevirt_and_the_sriov_plugin(tmp_path):
    spec = cdi.build_spec(UID, {"nic": [cdi.GroupGrant(8, ("0000:04:00.0", "0000:05:00.0"), 1 << 30)],
                                "gpu-2": [cdi.GroupGrant(3, ("0000:01:00.0",), 1 << 20)]},
                          dev_root=str(tmp_path), hook="/usr/bin/vfiod-dra")
    jsonschema.validate(spec, schema())
    assert [d["name"] for d in spec["devices"]] == [f"{UID}-group-3", f"{UID}-group-8"]
    env = dict(e.split("=", 1) for e in spec["containerEdits"]["env"])
    assert env["PCI_RESOURCE_VFIOD_IO_NIC"] == env["PCIDEVICE_VFIOD_IO_NIC"] == "0000:04:00.0,0000:05:00.0"
    assert env["PCI_RESOURCE_VFIOD_IO_GPU_2"] == "0000:01:00.0"
    assert env["VFIOD_IOMMU_GROUPS"] == "3,8" and env["VFIOD_MEMLOCK"] == str((1 << 30) + (1 << 20))
    assert spec["containerEdits"]["hooks"][0]["args"] == ["vfiod-dra", "memlock-hook", str((1 << 30) + (1 << 20))]
    assert cdi.device_id(UID, 8) == f"vfiod.io/group={UID}-group-8"


def test_without_a_grant_for_every_group_there_is_no_memlock_edit(tmp_path):
    spec = cdi.build_spec(UID, {"nic": [cdi.GroupGrant(8, ("0000:04:00.0",), None),
                                        cdi.GroupGrant(9, ("0000:06:00.0",), 1 << 20)]},
                          dev_root=str(tmp_path), hook="/usr/bin/vfiod-dra")
    jsonschema.validate(spec, schema())
    assert "hooks" not in spec["containerEdits"]
    assert not any(e.startswith("VFIOD_MEMLOCK=") for e in spec["containerEdits"]["env"])


def test_a_node_with_vfio_cdevs_gives_each_device_its_cdev_and_the_claim_dev_iommu(tmp_path):
    legacy = cdi.build_spec(UID, {"nic": [cdi.GroupGrant(8, ("0000:04:00.0",))]}, dev_root=str(tmp_path))
    assert [n["path"] for n in legacy["containerEdits"]["deviceNodes"]] == ["/dev/vfio/vfio"]
    assert [n["path"] for n in legacy["devices"][0]["containerEdits"]["deviceNodes"]] == ["/dev/vfio/8"]
    spec = cdi.build_spec(UID, {"nic": [cdi.GroupGrant(8, ("0000:04:00.0", "0000:04:00.1"), None,
                                                       ("/dev/vfio/devices/vfio0", "/dev/vfio/devices/vfio1"))]},
                          dev_root=str(tmp_path))
    jsonschema.validate(spec, schema())
    assert [n["path"] for n in spec["containerEdits"]["deviceNodes"]] == ["/dev/vfio/vfio", "/dev/iommu"]
    nodes = spec["devices"][0]["containerEdits"]["deviceNodes"]
    assert [(n["path"], n["hostPath"]) for n in nodes] == [
        ("/dev/vfio/8", f"{tmp_path}/vfio/8"), ("/dev/vfio/devices/vfio0", f"{tmp_path}/vfio/devices/vfio0"),
        ("/dev/vfio/devices/vfio1", f"{tmp_path}/vfio/devices/vfio1")]


def test_the_schema_refuses_what_a_runtime_would(tmp_path):
    good = cdi.build_spec(UID, {"nic": [cdi.GroupGrant(8, ("0000:04:00.0",))]}, dev_root=str(tmp_path))
    for bad in (dict(good, cdiVersion="1.0"), dict(good, kind="no-slash"), dict(good, devices=[]),
                dict(good, extra=1),
                dict(good, containerEdits={"deviceNodes": [{"path": "dev/vfio/vfio"}]}),
                dict(good, containerEdits={"env": ["1X=y"]})):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema())


def test_specs_are_written_whole_and_strays_removed(tmp_path):
    d = str(tmp_path / "cdi")
    spec = cdi.build_spec(UID, {"nic": [cdi.GroupGrant(8, ("0000:04:00.0",))]}, dev_root=str(tmp_path))
    path = cdi.write_spec(d, UID, spec)
    assert os.stat(path).st_mode & 0o777 == 0o644 and cdi.read_spec(d, UID) == spec
    cdi.write_spec(d, "other", spec)
    open(os.path.join(d, "vfiod.io-half.json.tmp"), "w").close()
    open(os.path.join(d, "nvidia.com-gpu.json"), "w").close()          # another driver's
    assert cdi.remove_strays(d, [UID]) == ["other"]
    assert sorted(os.listdir(d)) == ["nvidia.com-gpu.json", f"vfiod.io-{UID}.json"]
    assert cdi.remove_spec(d, UID) and not cdi.remove_spec(d, UID)


def _has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return bool(eff & (1 << 24))                # CAP_SYS_RESOURCE


def test_a_bad_oci_state_is_said_in_one_line():
    for bad in ("", "[]", '{"pid": "1"}', "{}"):
        p = subprocess.run([os.path.join(ROOT, ".venv/bin/vfiod-dra"), "memlock-hook", "1"], input=bad,
                           capture_output=True, text=True)
        assert p.returncode == 1 and "vfiod-dra memlock-hook:" in p.stderr and "Traceback" not in p.stderr


def test_the_memlock_hook_raises_the_limit_of_the_process_the_state_names():
    # (the guest tier runs the hook for real, as a runtime would)
    if not _has_cap_sys_resource():
        pytest.skip("raising another process's hard limit needs CAP_SYS_RESOURCE, which this process lacks")
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, 1 << 20)))
    try:
        p = subprocess.run([os.path.join(ROOT, ".venv/bin/vfiod-dra"), "memlock-hook", str(64 << 20)],
                           input=json.dumps({"pid": child.pid, "status": "created"}), capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert resource.prlimit(child.pid, resource.RLIMIT_MEMLOCK) == (64 << 20, 64 << 20)
        # never lowered
        cdi.memlock_hook(1 << 20, {"pid": child.pid})
        assert resource.prlimit(child.pid, resource.RLIMIT_MEMLOCK) == (64 << 20, 64 << 20)
    finally:
        child.communicate(b"")


def test_the_checkpoint_round_trips_and_a_damaged_one_is_set_aside(tmp_path):
    cp = Checkpoint(str(tmp_path))
    cp.put(UID, ClaimRecord("ml-a", "nics", "preparing", {"8": "/org/vfiod1/lease/ab"}))
    again = Checkpoint(str(tmp_path)).load()
    assert again.claims == {UID: ClaimRecord("ml-a", "nics", "preparing", {"8": "/org/vfiod1/lease/ab"})}
    assert os.stat(cp.path).st_mode & 0o777 == 0o600
    for text in ("{", '{"version": 2, "claims": {}}', '{"version": 1, "claims": {"x": {"state": "odd"}}}'):
        with open(cp.path, "w") as f:
            f.write(text)
        broken = Checkpoint(str(tmp_path)).load()
        assert broken.claims == {} and broken.damaged and os.path.exists(cp.path + ".damaged")


def test_the_slice_device_of_a_group():
    group = {"group": 8, "devices": [
        {"address": "0000:00:1c.0", "bridge": True, "protected": None},
        {"address": "0000:04:00.0", "bridge": False, "protected": None, "vendor": "8086", "device": "10d3",
         "class": "020000"},
        {"address": "0000:05:00.0", "bridge": False, "protected": None, "vendor": "14e4", "device": "167b",
         "class": "020000"}]}
    dev = slices.group_device(group, ["ml-*"], ["fast-nic"])
    assert dev["name"] == "group-8"
    a = dev["attributes"]
    assert a["resource.kubernetes.io/pciBusID"] == {"string": "0000:04:00.0"}
    assert a["members"] == {"string": "0000:04:00.0,0000:05:00.0"} and a["endpoints"] == {"int": 2}
    assert a["kubernetes"] == {"bool": True} and a["resources"] == {"string": "fast-nic"}
    assert all(len(k.rsplit("/", 1)[-1]) <= 32 for k in a)       # attribute names' length limit
    protected = dict(group, devices=[dict(group["devices"][1], protected={"code": "root-disk"})])
    assert slices.group_device(protected, [], []) is None
    assert slices.group_device(dict(group, devices=group["devices"][:1]), [], []) is None
    assert slices.slice_name("Node_A") == "node-a-vfiod.io"


def test_bad_startup_is_one_line_not_a_traceback(tmp_path):
    p = subprocess.run([os.path.join(ROOT, ".venv/bin/vfiod-dra"), "--bus", f"unix:path={tmp_path}/none",
                        "--kube", "http://127.0.0.1:1", "--state-dir", str(tmp_path / "s")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "cannot start" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = subprocess.run([os.path.join(ROOT, ".venv/bin/vfiod-dra"), "--kube", str(tmp_path / "no-kubeconfig"),
                        "--bus", "session"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, DBUS_SESSION_BUS_ADDRESS=f"unix:path={tmp_path}/none"))
    assert p.returncode == 1 and "cannot start: no API server configuration from" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    p = subprocess.run([os.path.join(ROOT, ".venv/bin/vfiod-dra"), "--kube", "in-cluster"],
                       capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")})
    assert p.returncode == 1 and "cannot start: no API server configuration from 'in-cluster'" in p.stderr, p.stderr


def test_the_deploy_files_use_the_commands_options():
    with open(os.path.join(ROOT, "deploy/vfiod-dra-daemonset.yaml")) as f:
        docs = list(yaml.safe_load_all(f))
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    containers = {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}
    assert set(containers) == {"vfiod-dra", "cdi-writer"}
    for c in containers.values():
        parser().parse_args(c["command"][1:])
    rules = next(d for d in docs if d["kind"] == "ClusterRole")["rules"]
    assert {r["resources"][0]: set(r["verbs"]) for r in rules} == {
        "resourceclaims": {"get"}, "resourceslices": {"get", "create", "update"}}
    for name in ("vfiod-dra.service", "vfiod-dra-cdi-writer.service"):
        with open(os.path.join(ROOT, "deploy", name)) as f:
            exec_start = next(line for line in f if line.startswith("ExecStart="))
        parser().parse_args(exec_start.split()[1:])
    with open(os.path.join(ROOT, "deploy/example-claim.yaml")) as f:
        kinds = [d["kind"] for d in yaml.safe_load_all(f)]
    assert kinds == ["DeviceClass", "ResourceClaimTemplate", "Pod"]


def _mounts(container, volumes):
    """mountPath → (host path, read-only) of a container's hostPath mounts."""
    return {m["mountPath"]: (volumes[m["name"]]["hostPath"]["path"], bool(m.get("readOnly")))
            for m in container.get("volumeMounts", [])}


def test_the_driver_writes_neither_the_cdi_directory_nor_the_shared_plugin_registry():
    """The driver's user gets no write access to /var/run/cdi (specs' hooks run as root)
    nor to the kubelet's registry (the other plugins' sockets), in either deployment: only
    to directories of its own; its specs are the root-owned writer's."""
    with open(os.path.join(ROOT, "deploy/vfiod-dra-daemonset.yaml")) as f:
        docs = list(yaml.safe_load_all(f))
    ds = next(d for d in docs if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in ds["volumes"]}
    text = open(os.path.join(ROOT, "deploy/vfiod-dra-daemonset.yaml")).read()
    assert "setfacl" not in text
    for c in ds["initContainers"] + ds["containers"]:
        for path, (host, read_only) in _mounts(c, volumes).items():
            assert host != "/var/lib/kubelet/plugins_registry", (c["name"], path)
            if host == "/var/run/cdi" and not read_only:
                assert c["name"] == "cdi-writer", c["name"]
    writer = next(c for c in ds["containers"] if c["name"] == "cdi-writer")
    assert writer["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    unit = open(os.path.join(ROOT, "deploy/vfiod-dra.service")).read()
    assert "setfacl" not in unit and "/var/run/cdi" not in unit and "/run/cdi" not in unit.replace(
        "/run/vfiod-dra/cdi-requests", "")
    rw = [line.split("=", 1)[1].split() for line in unit.splitlines() if line.startswith("ReadWritePaths=")]
    assert "/var/lib/kubelet/plugins_registry" not in sum(rw, [])
    args = parser().parse_args(next(line for line in unit.splitlines() if line.startswith("ExecStart="))
                               .split()[1:])
    assert args.registry_dir == "/var/lib/kubelet/plugins_registry/vfiod.io"
    assert parser().parse_args([]).registry_dir == "/var/lib/kubelet/plugins_registry/vfiod.io"


def test_the_admission_policy_holds_the_drivers_slice_writes_to_its_node_and_driver():
    """RBAC cannot name a field; the ValidatingAdmissionPolicy binds every slice write of
    the driver's service account to the node in its token and to driver vfiod.io.  (Its
    CEL is checked by the API server, not here: this checks that it applies to the
    service account the DaemonSet runs as, to every write, and compares those fields.)"""
    with open(os.path.join(ROOT, "deploy/vfiod-dra-daemonset.yaml")) as f:
        docs = list(yaml.safe_load_all(f))
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == sa["name"]
    vap = next(d for d in docs if d["kind"] == "ValidatingAdmissionPolicy")
    binding = next(d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == vap["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert vap["spec"]["failurePolicy"] == "Fail"
    (rule,) = vap["spec"]["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["resourceslices"] and set(rule["operations"]) == {"CREATE", "UPDATE", "DELETE"}
    (cond,) = vap["spec"]["matchConditions"]
    assert f'"system:serviceaccount:{sa["namespace"]}:{sa["name"]}"' in cond["expression"]
    variables = {v["name"]: v["expression"] for v in vap["spec"]["variables"]}
    assert "authentication.kubernetes.io/node-name" in variables["node"]
    assert "oldObject" in variables["slice"]
    checks = " ".join(v["expression"] for v in vap["spec"]["validations"])
    assert "spec.?nodeName" in checks and "variables.node" in checks and "spec.driver == 'vfiod.io'" in checks


def test_the_example_policy_loads():
    from vfiod.policy import Policy, StaticUserDb

    with open(os.path.join(ROOT, "deploy/policy-kubernetes.toml"), "rb") as f:
        pol = Policy.from_sources([("60-kubernetes.toml", f.read())], users=StaticUserDb(users={"vfiod-dra": 990}))
    assert [r.k8s_namespaces for r in pol.rules] == [("ml-*",), ("*",)]
    assert all(r.delegate_uids == {990} for r in pol.rules)


def test_the_slice_is_read_again_only_for_what_it_shows():
    from vfiod.dra.slices import Publisher

    publisher = Publisher(None, None, "node-1")
    for member in ("LeaseGranted", "LeaseEnded", "LeaseRevoking", "PropertiesChanged"):
        publisher.poke(member)
        assert not publisher.dirty.is_set(), member
    for member in ("InterfacesAdded", "InterfacesRemoved", "PolicyReloaded", "NameOwnerChanged"):
        publisher.dirty.clear()
        publisher.poke(member)
        assert publisher.dirty.is_set(), member


@pytest.mark.parametrize("lease, owner, state, why", [
    ("l1", 1000, "granted", None),
    ("l1", 1000, "revoking", None),
    ("l1", 1000, "granting", "not leased by uid 1000"),      # may still be rolled back
    ("l1", 1000, "releasing", "not leased by uid 1000"),
    ("l1", 0, "granted", "not leased by uid 1000"),          # another uid's lease
    (None, None, None, "not leased by uid 1000"),
])
def test_the_spec_writer_writes_a_spec_only_for_a_group_the_delegate_holds_now(tmp_path, lease, owner, state, why):
    """The writer's one call to vfiod (GroupsJson) is its whole word on a group: the lease,
    its owner and its state; a lease still being granted is not yet the delegate's."""
    from vfiod.dra.cdiwriter import SpecWriter

    writer = SpecWriter(object(), 1000, str(tmp_path / "requests"), str(tmp_path / "cdi"))
    uid = "0c4f6d3a-0000-4000-8000-0000000000ee"
    group = {"group": 8, "lease": lease, "lease_owner": owner, "lease_state": state, "lease_memlock": 1 << 28,
             "devices": [{"address": "0000:05:00.0", "bridge": False, "cdev": None},
                         {"address": "0000:04:00.0", "bridge": True, "cdev": None}]}
    spec = writer._spec(cdi.SpecRequest(uid, {"nic": (8,)}), {8: group})
    if why is None:
        env = dict(e.split("=", 1) for e in spec["containerEdits"]["env"])
        assert env["VFIOD_MEMLOCK"] == str(1 << 28) and env["VFIOD_IOMMU_GROUPS"] == "8"
        assert uid not in writer.refused
    else:
        assert spec is None and why in writer.refused[uid]
    assert writer._spec(cdi.SpecRequest(uid, {"nic": (9,)}), {8: group}) is None
    assert "IOMMU group 9 is gone from this node" in writer.refused[uid]
