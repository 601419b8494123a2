"""Leases of mediated devices on the guest tier's own kernel (the one with mtty:
tests/guest/kbuild.py), vfiod on a private bus (tests/guest/instack.py).

* ``vfioctl check mdev:mtty/mtty-2`` allows the user ``vfiotest`` (a rule with
  ``mdev_types``) and denies another user.
* ``vfioctl lease mdev:mtty/mtty-2 --persistent`` as ``vfiotest`` creates an instance
  (a UUID vfiod chose) in an emulated IOMMU group whose node is handed to the lessee
  (0600); ``vfioctl leases`` shows the UUID and the type.
* The lessee opens it through VFIO's legacy interface by path: the group, the
  container, VFIO_GROUP_SET_CONTAINER, VFIO_SET_IOMMU (the type the kernel takes for
  an emulated group), VFIO_GROUP_GET_DEVICE_FD by the UUID, VFIO_DEVICE_GET_INFO and a
  read of mtty's config region (its vendor:device, 4348:3253).
* The other user is refused the lease, and EACCES at the group node.
* ``vfioctl release`` removes the instance: its UUID, its group and its node are gone
  and the type has its instance back.
* ``vfioctl lease mdev:... -- CMD`` tells CMD the instance in ``VFIOD_MDEV``; it is
  gone when CMD exits.
* An admin's instance that mdevctl defines (``/etc/mdevctl.d/mtty/UUID``) is there
  before and after, untouched; malformed and unknown targets are named errors with
  no traceback, and change nothing.
"""

from __future__ import annotations


import pytest

from tests.guest.harness import BUILT_KERNEL, Guest, guest_available

_ok, _why = guest_available(kernel=BUILT_KERNEL)
pytestmark = [pytest.mark.guest, pytest.mark.skipif(not _ok, reason=f"guest not available: {_why}")]

ADMINS = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"

GUEST_PY = r'''
import json, os, sys, time
sys.path.insert(0, os.environ["VFIOD_CHECKOUT"])
from tests.guest.instack import Stack, ensure_user, findings, finish, open_errno
from tests.guest.vfioholder import _forked, legacy_handshake
res, save = findings("mdev.json")
ADMINS = %(admins)r
TYPES = "/sys/class/mdev_bus/mtty/mdev_supported_types"
def instances():
    d = "/sys/bus/mdev/devices"
    return sorted(os.listdir(d)) if os.path.isdir(d) else []
def group_of(uuid):
    return int(os.path.basename(os.readlink(f"/sys/bus/mdev/devices/{uuid}/iommu_group")))
def available():
    with open(f"{TYPES}/mtty-2/available_instances") as f:
        return int(f.read())
def node(path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)]
def run(p):
    return {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
import pwd
try:                                    # the machine's own vfiotest, seen through the overlay
    VT = pwd.getpwnam("vfiotest").pw_uid
except KeyError:
    VT = 1000
    ensure_user(VT, "vfiotest")
OTHER = 1001 if VT != 1001 else 1002
ensure_user(OTHER, "other")
res["uid"] = VT
rules = '[[rule]]\nmdev_types = ["mtty/mtty-2"]\nusers = ["vfiotest"]\npersistent = true\nmemlock = "64M"\n'
stack = Stack("/run/vfiod-mdev", {"50-mdev.toml": rules})
try:
    # An admin's instance, defined persistently by mdevctl and started.
    os.makedirs("/etc/mdevctl.d/mtty", exist_ok=True)
    with open(f"/etc/mdevctl.d/mtty/{ADMINS}", "w") as f:
        f.write('{"mdev_type": "mtty-2", "start": "auto", "attrs": []}\n')
    with open(f"{TYPES}/mtty-2/create", "w") as f:
        f.write(ADMINS)
    res["before"] = {"instances": instances(), "available": available(),
                     "admins_group": group_of(ADMINS)}
    stack.start()
    res["check"] = {w: run(stack.vfioctl(u, "check", "mdev:mtty/mtty-2", timeout=120))
                    for w, u in (("lessee", VT), ("other", OTHER))}
    res["bad"] = {t: run(stack.vfioctl(VT, "lease", t, timeout=120))
                  for t in ("mdev:../x/y", "mdev:mtty/mtty-9")}
    res["after_bad"] = {"instances": instances(), "available": available()}

    # The lease, as vfiotest.
    t = time.monotonic()
    p = stack.vfioctl(VT, "lease", "mdev:mtty/mtty-2", "--persistent", timeout=120)
    res["lease_s"] = round(time.monotonic() - t, 2)
    res["lease"] = run(p)
    if p.returncode != 0:
        raise RuntimeError(f"lease: {p.stderr}")
    lid = p.stdout.split()[-1]
    p = stack.vfioctl(VT, "leases", "--json", timeout=120)
    res["leases"] = json.loads(p.stdout) if p.returncode == 0 else p.stderr
    p = stack.vfioctl(VT, "leases", timeout=120)
    res["leases_text"] = p.stdout
    mine = [u for u in instances() if u != ADMINS]
    res["made"] = {"instances": mine, "available": available()}
    uuid = mine[0]
    group = group_of(uuid)
    res["made"].update(uuid=uuid, group=group, node=node(f"/dev/vfio/{group}"),
                       type=os.path.basename(os.readlink(f"/sys/bus/mdev/devices/{uuid}/mdev_type")))

    # The lessee's legacy handshake by path, with the device named by its UUID.
    def body(say):
        found, fds = legacy_handshake(f"/dev/vfio/{group}", uuid)
        say("ready " + json.dumps(found))
    h = _forked(VT, body)
    res["handshake"] = json.loads(h.expect("ready", 120).split(" ", 1)[1])
    h.kill()

    # The other user: refused the lease, and the node.
    res["other"] = {"lease": run(stack.vfioctl(OTHER, "lease", "mdev:mtty/mtty-2", "--persistent", timeout=120)),
                    "node": open_errno(OTHER, f"/dev/vfio/{group}"), "instances": instances()}

    # The release removes it.
    t = time.monotonic()
    res["release"] = run(stack.vfioctl(VT, "release", lid, timeout=120))
    res["release_s"] = round(time.monotonic() - t, 2)
    res["released"] = {"instances": instances(), "available": available(), "node": node(f"/dev/vfio/{group}"),
                       "group_dir": os.path.exists(f"/sys/kernel/iommu_groups/{group}")}

    # With a command: CMD is told the instance, and it is gone once CMD exits.
    p = stack.vfioctl(VT, "lease", "mdev:mtty/mtty-2", "--", "/bin/sh", "-c",
                      'echo "$VFIOD_MDEV $VFIOD_GROUP_PATH"; ls /sys/bus/mdev/devices', timeout=120)
    res["command"] = run(p)
    res["end"] = {"instances": instances(), "available": available(),
                  "admins_defined": os.path.exists(f"/etc/mdevctl.d/mtty/{ADMINS}")}
    res["complete"] = True
except Exception:
    import traceback
    res["errors"].append(traceback.format_exc())
finally:
    finish(res, save, stack, 6000)
'''


def test_an_mdev_instance_leased_opened_through_vfio_and_removed_on_the_built_kernel():
    guest = Guest("rootport", modules=(), kernel=BUILT_KERNEL)
    res, r = guest.run_story(GUEST_PY % {'admins': ADMINS}, 'mdev.json')
    before = r["before"]
    assert before["instances"] == [ADMINS], before

    # check: the rule's user yes, another user no
    assert r["check"]["lessee"]["rc"] == 0 and "allowed" in r["check"]["lessee"]["stdout"], r["check"]
    assert r["check"]["other"]["rc"] == 3 and "denied" in r["check"]["other"]["stdout"], r["check"]
    # bad input: named errors, no traceback, nothing changed
    bad = r["bad"]
    assert bad["mdev:../x/y"]["rc"] == 2 and "not an mdev target" in bad["mdev:../x/y"]["stderr"], bad
    assert bad["mdev:mtty/mtty-9"]["rc"] == 1 and "no mdev type mtty/mtty-9" in bad["mdev:mtty/mtty-9"]["stderr"], bad
    assert not any("Traceback" in b["stderr"] for b in bad.values()), bad
    assert r["after_bad"] == {"instances": before["instances"], "available": before["available"]}

    # the lease: a new instance of mtty-2 in a group of its own, the node the lessee's
    made = r["made"]
    assert len(made["instances"]) == 1 and made["type"] == "mtty-2", made
    assert made["group"] != before["admins_group"] and made["node"] == [r["uid"], 0, "0o600"], made
    assert made["available"] == before["available"] - 1, made
    assert f"(mdev mtty/mtty-2 {made['uuid']})" in r["lease"]["stderr"], r["lease"]
    (lease,) = r["leases"]["leases"]
    assert (lease["mdev"], lease["mdev_type"], lease["group"]) == (made["uuid"], "mtty/mtty-2", made["group"]), lease
    assert lease["devices"] == [] and lease["group_path"] == f"/dev/vfio/{made['group']}", lease
    assert f"mdev mtty/mtty-2 {made['uuid']}" in r["leases_text"], r["leases_text"]

    # the handshake: type1 container, the device fd by UUID, mtty's own config space
    hs = r["handshake"]
    assert hs["viable"] and hs["iommu_type"] in ("type1v2", "type1"), hs
    assert hs["flags"] & 2 and hs["regions"] >= 8 and hs["ids"] == "4348:3253", hs    # VFIO_DEVICE_FLAGS_PCI

    # the other user
    o = r["other"]
    assert o["lease"]["rc"] == 3 and "Traceback" not in o["lease"]["stderr"], o
    assert o["node"] == 13 and len(o["instances"]) == 2, o              # EACCES; no instance was made

    # the release: the instance, its group and its node are gone; the admin's stays
    assert r["release"]["rc"] == 0, r["release"]
    rel = r["released"]
    assert rel["instances"] == [ADMINS] and rel["available"] == before["available"], rel
    assert rel["node"] is None and not rel["group_dir"], rel

    # with a command: told the UUID and the node; gone when it exits
    cmd = r["command"]
    told = cmd["stdout"].splitlines()
    assert cmd["rc"] == 0 and told[0].split()[1].startswith("/dev/vfio/"), cmd
    assert told[0].split()[0] in told[1:], cmd
    assert r["end"] == {"instances": [ADMINS], "available": before["available"], "admins_defined": True}, r["end"]
    assert "Traceback" not in r["log"], r["log"]
    print(f"\nmdev on {r['uname']}: lease {r['lease_s']} s, legacy handshake {hs['ms']} ms "
          f"(IOMMU type {hs['iommu_type']}{', refused ' + str(hs['refused']) if hs['refused'] else ''}), "
          f"release {r['release_s']} s; boot {res.boot_seconds} s, script {res.script_seconds} s, "
          f"wall {res.wall_seconds:.0f} s")
