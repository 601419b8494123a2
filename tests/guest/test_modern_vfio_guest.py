"""Modern VFIO on the guest tier's own kernel (tests/guest/kbuild.py: Debian's
linux-source-6.12, tinyconfig plus tests/guest/kernel/guest.config): one boot of the
``rootport`` topology, vfiod on a private bus (tests/guest/instack.py).

* The kernel has what Debian's lack: ``/dev/iommu`` (iommufd), a VFIO device cdev
  next to the group node once the e1000e is on vfio-pci, and mtty's mdev types;
  ``vfiod inspect`` lists those types and an instance an admin made (with its
  emulated IOMMU group), the daemon serves with that group on the host, and the
  instance is still there at the end: vfiod removes no mdev it did not make.
* A lease as an unprivileged user hands over the group node, the device's cdev and
  an ACL entry on ``/dev/iommu``; the user does the whole iommufd handshake
  (``VFIO_DEVICE_BIND_IOMMUFD``, ``IOMMU_IOAS_ALLOC``, ``VFIO_DEVICE_ATTACH_IOMMUFD_PT``,
  ``IOMMU_IOAS_MAP`` of a buffer, ``VFIO_DEVICE_GET_INFO``, the config region read).
* A second user is refused at every door: the group node, the cdev, ``/dev/iommu``,
  a lease of the group, and the lease's ``OpenDevice``/``OpenIommu`` over the bus.
* A revoke ends the cdev holder after the grace and gives the NIC back; ``/dev/iommu``
  is then exactly as it was (owner, mode, ACL entries).
* The legacy handshake (group, container, type1, device fd) still works on the same
  kernel, and ``vfioctl lease --pass-fd -- CMD`` gives CMD the cdev and iommufd.
"""

from __future__ import annotations

import json

import pytest

from tests.guest.harness import BUILT_KERNEL, Guest, guest_available

_ok, _why = guest_available(kernel=BUILT_KERNEL)
pytestmark = [pytest.mark.guest, pytest.mark.skipif(not _ok, reason=f"guest not available: {_why}")]

NIC, GRACE = "0000:01:00.0", 3

GUEST_PY = r'''
import errno, glob, json, os, stat, sys, time
sys.path.insert(0, os.environ["VFIOD_CHECKOUT"])
from tests.guest.instack import Stack, finish, open_errno, as_user, driver, ensure_user, group_of
from tests.guest.vfioholder import hold, hold_cdev
OUT = os.environ["OUT"]
NIC, GRACE = %(nic)r, %(grace)d
res = {"errors": [], "complete": False, "uname": os.uname().release}
def save():
    with open(os.path.join(OUT, "modern.json"), "w") as f:
        json.dump(res, f)
def node_state(path):
    """owner, group, mode and the ACL xattr (hex) of a node, or None if it is not there."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    try:
        acl = os.getxattr(path, "system.posix_acl_access").hex()
    except OSError:
        acl = None
    return [st.st_uid, st.st_gid, oct(st.st_mode & 0o7777), acl]
def acl_users(path):
    from vfiod.sysfs import acl
    return sorted(i for tag, perm, i in (acl._read(path) or []) if tag == acl.USER)
UUID = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
def group_of_mdev(uuid):
    return int(os.path.basename(os.readlink(f"/sys/bus/mdev/devices/{uuid}/iommu_group")))
def cdev_of(addr):
    names = glob.glob(f"/sys/bus/pci/devices/{addr}/vfio-dev/vfio*")
    return "/dev/vfio/devices/" + os.path.basename(names[0]) if names else None
ensure_user(1000, "lessee")
ensure_user(1001, "other")
G = group_of(NIC)
rules = (f'[[rule]]\naddress = ["{NIC}"]\nuids = [1000]\nbackends = ["vfio"]\npersistent = true\n'
         f'revoke_grace = "{GRACE}s"\nmemlock = "64M"\n')
stack = Stack("/run/vfiod-modern", {"50-modern.toml": rules})
try:
    # 1. What this kernel has.
    res["kernel"] = {"iommu": node_state("/dev/iommu"),
                     "iommu_chr": stat.S_ISCHR(os.stat("/dev/iommu").st_mode),
                     "mdev_types": sorted(os.listdir("/sys/class/mdev_bus/mtty/mdev_supported_types"))
                     if os.path.isdir("/sys/class/mdev_bus/mtty") else None,
                     "driver": driver(NIC)}
    iommu_before = node_state("/dev/iommu")
    # An admin's mtty instance (as mdevctl would make it): inspect lists it, and an IOMMU
    # group whose member is no PCI device troubles neither the scan nor the daemon.
    import subprocess
    with open("/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2/create", "w") as f:
        f.write(UUID)
    p = subprocess.run(["vfiod", "inspect", "--json"], capture_output=True, text=True, timeout=120)
    res["inspect"] = {"rc": p.returncode, "stderr": p.stderr,
                      "mdev": json.loads(p.stdout)["mdev"] if p.returncode == 0 else None,
                      "groups": [g["group"] for g in json.loads(p.stdout)["groups"]] if p.returncode == 0 else None,
                      "mdev_group": group_of_mdev(UUID)}
    stack.start()
    p = stack.vfioctl(1000, "groups", "--json")
    res["daemon_groups_rc"] = [p.returncode, p.stderr[-500:]]

    # 2. A lease as uid 1000: the group node, the cdev and /dev/iommu are the lessee's.
    t = time.monotonic()
    p = stack.vfioctl(1000, "lease", NIC, "--persistent", timeout=120)
    res["lease_s"] = round(time.monotonic() - t, 2)
    if p.returncode != 0:
        raise RuntimeError(f"lease: {p.stderr}")
    lid = p.stdout.split()[-1]
    cdev = cdev_of(NIC)
    res["handed"] = {"group": node_state(f"/dev/vfio/{G}"), "cdev": cdev, "cdev_node": node_state(cdev),
                     "iommu_acl_users": acl_users("/dev/iommu"), "driver": driver(NIC)}
    p = stack.vfioctl(1000, "show", NIC, "--json")
    res["show"] = json.loads(p.stdout) if p.returncode == 0 else p.stderr
    p = stack.vfioctl(1000, "leases", "--json")
    res["leases"] = json.loads(p.stdout) if p.returncode == 0 else p.stderr

    # 3. The iommufd handshake as the lessee, and the holder kept.
    h = hold_cdev(cdev, "stubborn", 1000)
    res["iommufd"] = json.loads(h.expect("ready", 120).split(" ", 1)[1])

    # 4. Another user, at every door.
    doors = {"group": open_errno(1001, f"/dev/vfio/{G}"), "cdev": open_errno(1001, cdev),
             "iommu": open_errno(1001, "/dev/iommu")}
    p = stack.vfioctl(1001, "lease", NIC, "--persistent", timeout=120)
    doors["lease"] = [p.returncode, p.stderr.strip()]
    probe = ("import asyncio, sys\n"
             "from vfiod.client import Client\n"
             "async def go():\n"
             "    c = await Client(sys.argv[1], timeout=30).connect()\n"
             "    out = []\n"
             "    for member, sig, body in (('OpenDevice', 's', [sys.argv[3]]), ('OpenIommu', '', [])):\n"
             "        try:\n"
             "            await c.lease_call(sys.argv[2], member, sig, body)\n"
             "            out.append(member + ': opened')\n"
             "        except Exception as e:\n"
             "            out.append(member + ': ' + type(e).__name__)\n"
             "    print(' | '.join(out))\n"
             "asyncio.run(go())\n")
    p = as_user(1001, [sys.executable, "-c", probe, stack.address, "/org/vfiod1/lease/" + lid, NIC], timeout=120)
    doors["bus"] = (p.stdout + p.stderr).strip()
    res["doors"] = doors
    save()

    # 5. Revoke: the cdev holder is ended after the grace, the NIC goes back.
    t = time.monotonic()
    p = stack.vfioctl(0, "revoke", lid, "--json", "--wait", "60", "--reason", "modern", timeout=120)
    res["revoke"] = {"rc": p.returncode, "doc": json.loads(p.stdout) if p.stdout.strip() else None,
                     "stderr": p.stderr, "status": h.wait(10), "driver": driver(NIC),
                     "seconds": round(time.monotonic() - t, 2)}
    h.kill()
    res["after_revoke"] = {"iommu": node_state("/dev/iommu"), "iommu_before": iommu_before,
                           "cdev_left": cdev_of(NIC)}

    # 6. The legacy handshake on the same kernel, then a release.
    p = stack.vfioctl(1000, "lease", NIC, "--persistent", timeout=120)
    lid2 = p.stdout.split()[-1] if p.returncode == 0 else None
    t = time.monotonic()
    h2 = hold(G, NIC, "stubborn", 1000)
    res["legacy"] = {"lease_rc": p.returncode, "said": h2.expect("ready", 60),
                     "ms": round((time.monotonic() - t) * 1000, 1)}
    h2.kill()
    p = stack.vfioctl(1000, "release", lid2, timeout=120)
    res["legacy"]["release_rc"] = p.returncode

    # 7. vfioctl lease --pass-fd --iommufd -- CMD: CMD is told the cdev and iommufd, and holds both.
    p = stack.vfioctl(1000, "lease", NIC, "--pass-fd", "--iommufd", "--", "/bin/sh", "-c",
                      'echo "$VFIOD_DEVICE_CDEVS|$VFIOD_IOMMU_PATH"; '
                      'for f in ${VFIOD_DEVICE_FDS#*=} $VFIOD_IOMMU_FD; do readlink /proc/$$/fd/$f; done', timeout=120)
    res["pass_fd"] = {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
    res["end"] = {"iommu": node_state("/dev/iommu"), "driver": driver(NIC), "group": node_state(f"/dev/vfio/{G}"),
                  "mdev_kept": os.path.exists(f"/sys/bus/mdev/devices/{UUID}")}
    with open(f"/sys/bus/mdev/devices/{UUID}/remove", "w") as f:
        f.write("1")
    res["complete"] = True
except Exception as e:
    import traceback
    res["errors"].append(traceback.format_exc())
finally:
    finish(res, save, stack)
'''


def test_cdev_leases_and_iommufd_on_the_built_kernel():
    guest = Guest("rootport", modules=(), kernel=BUILT_KERNEL)
    res, r = guest.run_story(GUEST_PY % {'nic': NIC, 'grace': GRACE}, 'modern.json')
    assert r["uname"].endswith("-vfiod-guest")

    # 1. the kernel: iommufd, mtty's types; the NIC starts on e1000e
    k = r["kernel"]
    assert k["iommu_chr"] and k["iommu"][:3] == [0, 0, "0o660"], k
    assert k["mdev_types"] and all(t.startswith("mtty-") for t in k["mdev_types"]), k
    assert k["driver"] == "e1000e"
    # ... and vfiod inspect lists mtty's types and the admin's instance, with its group
    ins = r["inspect"]
    assert ins["rc"] == 0, ins
    two = next(t for t in ins["mdev"] if t["target"] == "mdev:mtty/mtty-2")
    assert two["device_api"] == "vfio-pci" and isinstance(two["available"], int), two
    assert two["instances"] == [{"uuid": "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001", "iommu_group": ins["mdev_group"],
                                 "mdevctl": False}], two
    assert r["daemon_groups_rc"][0] == 0, r["daemon_groups_rc"]
    assert r["end"]["mdev_kept"]                   # vfiod leaves an mdev it did not make alone

    # 2. handed over: the group node and the cdev to uid 1000 (0600), an ACL entry on /dev/iommu
    h = r["handed"]
    assert h["driver"] == "vfio-pci" and h["group"][:3] == [1000, 0, "0o600"], h
    assert h["cdev"] and h["cdev"].startswith("/dev/vfio/devices/vfio") and h["cdev_node"][:3] == [1000, 0, "0o600"], h
    assert h["iommu_acl_users"] == [1000], h
    dev = next(d for d in r["show"]["group"]["devices"] if d["address"] == NIC)
    assert dev["cdev"] == h["cdev"], dev
    lease = r["leases"]["leases"][0] if isinstance(r["leases"], dict) else r["leases"]
    assert lease["cdevs"] == {NIC: h["cdev"]} and lease["iommu_path"] == "/dev/iommu", lease

    # 3. the iommufd handshake as the lessee: the device answers with its own ids
    fd = r["iommufd"]
    assert fd["ids"] == "8086:10d3" and fd["regions"] >= 7 and fd["flags"] & 2, fd   # VFIO_DEVICE_FLAGS_PCI

    # 4. the other user: EACCES at each node, refused a lease and the lease's fds
    d = r["doors"]
    assert d["group"] == d["cdev"] == d["iommu"] == 13, d
    assert d["lease"][0] in (3, 4), d
    assert d["bus"] == "OpenDevice: PermissionDenied | OpenIommu: PermissionDenied", d

    # 5. the revoke ended the stubborn cdev holder (SIGTERM) and gave the NIC back
    rv = r["revoke"]
    assert rv["rc"] == 0 and rv["status"] is not None and rv["driver"] == "e1000e", (json.dumps(rv), r["log"])
    assert r["after_revoke"]["iommu"] == r["after_revoke"]["iommu_before"], r["after_revoke"]
    assert r["after_revoke"]["cdev_left"] is None

    # 6. the legacy handshake still works on this kernel
    lg = r["legacy"]
    assert lg["lease_rc"] == 0 and lg["said"] == "ready" and lg["release_rc"] == 0, lg

    # 7. --pass-fd --iommufd: CMD is told the cdev and /dev/iommu and holds an fd of each
    pf = r["pass_fd"]
    lines = pf["stdout"].splitlines()
    assert pf["rc"] == 0 and lines[0] == f"{NIC}={h['cdev']}|/dev/iommu", pf
    assert lines[1].startswith("/dev/vfio/devices/vfio") and lines[2] == "/dev/iommu", pf
    assert r["end"]["iommu"] == k["iommu"] and r["end"]["driver"] == "e1000e", r["end"]
    print(f"\nmodern VFIO on {r['uname']}: lease {r['lease_s']} s, iommufd handshake ms {fd['ms']}, "
          f"legacy handshake {lg['ms']} ms, revoke {rv['seconds']} s; boot {res.boot_seconds} s, "
          f"script {res.script_seconds} s, wall {res.wall_seconds:.0f} s")
