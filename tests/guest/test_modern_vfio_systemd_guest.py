"""The shipped unit on the guest tier's own kernel (systemd as PID 1): vfiod.service as
``systemd/`` has it (sandbox, ``DevicePolicy=closed`` with its ``DeviceAllow=`` lines,
capabilities, the sysfs generator's drop-in), started from this checkout on the real
system bus.  One boot, then:

* an unprivileged user leases the e1000e with ``vfioctl lease --pass-fd --iommufd -- CMD``; the
  daemon opens the device's cdev and ``/dev/iommu`` for it (``OpenDevice``,
  ``OpenIommu``: refused by the device cgroup unless ``DeviceAllow=`` names the
  cdevs' major and ``/dev/iommu``), and CMD does the whole iommufd handshake on them;
* the same by path (``VFIOD_DEVICE_CDEVS``, ``VFIOD_IOMMU_PATH``) without fds;
* ``/dev/iommu`` is then exactly as it was (owner, mode, ACL entries) and the NIC is
  back on e1000e;
* with the unit's device list as it was before (``char-vfio`` and ``/dev/vfio/vfio``
  only), the daemon's opens of the cdev and ``/dev/iommu`` are refused.
"""

from __future__ import annotations

import json

import pytest

from tests.guest.harness import BUILT_KERNEL, Guest, guest_available

_ok, _why = guest_available(kernel=BUILT_KERNEL)
pytestmark = [pytest.mark.guest, pytest.mark.skipif(not _ok, reason=f"guest not available: {_why}")]

NIC = "0000:01:00.0"

# CMD of `vfioctl lease`: the iommufd handshake on what vfioctl told it.
HANDSHAKE = r'''
import json, os, sys
sys.path.insert(0, os.environ["VFIOD_CHECKOUT"])
from tests.guest.vfioholder import iommufd_handshake
addr, path = os.environ["VFIOD_DEVICE_CDEVS"].split()[0].split("=")
fds = dict(p.split("=") for p in os.environ.get("VFIOD_DEVICE_FDS", "").split())
found, _ = iommufd_handshake(path, os.environ["VFIOD_IOMMU_PATH"],
                             int(fds[addr]) if addr in fds else None,
                             int(os.environ["VFIOD_IOMMU_FD"]) if "VFIOD_IOMMU_FD" in os.environ else None)
found["uid"] = os.getuid()
print(json.dumps(found))
'''

SCRIPT = r"""
set -u
exec 2>&1
C=$VFIOD_CHECKOUT
fail() {
    echo "FAIL: $*"
    journalctl -b --no-pager -u vfiod > $OUT/vfiod-journal.txt 2>&1
    exit 1
}
state() { python3 -c 'import os, sys
st = os.stat(sys.argv[1])
try:
    acl = os.getxattr(sys.argv[1], "system.posix_acl_access").hex()
except OSError:
    acl = None
print(st.st_uid, st.st_gid, oct(st.st_mode & 0o7777), acl)' "$1"; }
echo "uname=$(uname -r)" > $OUT/facts.txt
state /dev/iommu > $OUT/iommu-before.txt

# The shipped unit, started from this checkout: only the program's path differs.
cp $C/systemd/org.vfiod1.conf /etc/dbus-1/system.d/ && systemctl start dbus.service && systemctl reload dbus.service || fail "bus policy"
mkdir -p /run/systemd/system-generators /etc/vfiod/policy.d
cp $C/systemd/vfiod-sysfs-generator /run/systemd/system-generators/
sed -e "s|^ExecStart=/usr/bin/vfiod|ExecStart=$C/.venv/bin/vfiod|" \
    -e "s|^ExecReload=/usr/bin/vfiod|ExecReload=$C/.venv/bin/vfiod|" \
    $C/systemd/vfiod.service > /run/systemd/system/vfiod.service
grep -E '^(DeviceAllow|DevicePolicy)=' /run/systemd/system/vfiod.service > $OUT/device-allow.txt
cat > /etc/vfiod/policy.d/50-nic.toml <<'EOF'
[[rule]]
address = "0000:01:00.0"
users = ["vfiotest"]
backends = ["vfio"]
memlock = "64M"
EOF
systemctl daemon-reload
systemctl start vfiod || fail "vfiod.service did not start: $(systemctl status --no-pager vfiod | tail -5)"
grep -E '^vfio|^ *[0-9]+ (vfio|misc)' /proc/devices > $OUT/proc-devices.txt

cat > /opt/handshake.py <<'EOF'
@HANDSHAKE@
EOF
chmod 644 /opt/handshake.py
as_user() { runuser -u vfiotest -- env VFIOD_CHECKOUT=$C "$@"; }
as_user $C/.venv/bin/vfioctl lease $NIC_ADDR --pass-fd --iommufd -- python3 /opt/handshake.py > $OUT/pass-fd.txt 2>&1
echo $? > $OUT/pass-fd.rc
as_user $C/.venv/bin/vfioctl lease $NIC_ADDR -- python3 /opt/handshake.py > $OUT/by-path.txt 2>&1
echo $? > $OUT/by-path.rc
state /dev/iommu > $OUT/iommu-after.txt
basename "$(readlink /sys/bus/pci/devices/$NIC_ADDR/driver)" > $OUT/driver-after.txt
# Without the two new DeviceAllow= lines (the unit as it was), the daemon's opens are refused.
mkdir -p /run/systemd/system/vfiod.service.d
printf '[Service]\nDeviceAllow=\nDeviceAllow=/dev/vfio/vfio rw\nDeviceAllow=char-vfio rw\n' \
    > /run/systemd/system/vfiod.service.d/90-legacy-only.conf
systemctl daemon-reload && systemctl restart vfiod || fail "restart with the legacy device list"
as_user $C/.venv/bin/vfioctl lease $NIC_ADDR --pass-fd --iommufd -- python3 /opt/handshake.py > $OUT/legacy-only.txt 2>&1
echo $? > $OUT/legacy-only.rc
journalctl -b --no-pager -u vfiod > $OUT/vfiod-journal.txt 2>&1
exit 0
"""


def test_the_shipped_unit_opens_cdevs_and_iommufd_for_a_lessee_on_the_built_kernel():
    script = (SCRIPT.replace("@HANDSHAKE@", HANDSHAKE.strip()).replace("$NIC_ADDR", NIC))
    g = Guest("rootport", init="systemd", memory=1536, modules=(), kernel=BUILT_KERNEL)
    res = g.run(script, timeout=1200)
    f = {k: v.decode() for k, v in res.files.items()}
    assert res.returncode == 0, res.output + f.get("vfiod-journal.txt", "")[-4000:] + res.console[-3000:]
    assert "DeviceAllow=char-vfio-dev rw" in f["device-allow.txt"] and "DeviceAllow=/dev/iommu rw" in f["device-allow.txt"]
    assert "vfio-dev" in f["proc-devices.txt"], f["proc-devices.txt"]
    for name in ("pass-fd", "by-path"):
        assert f[f"{name}.rc"].strip() == "0", (name, f[f"{name}.txt"], f.get("vfiod-journal.txt", "")[-3000:])
        found = json.loads(next(line for line in f[f"{name}.txt"].splitlines() if line.startswith("{")))
        assert found["ids"] == "8086:10d3" and found["uid"] != 0, found
    assert f["iommu-after.txt"] == f["iommu-before.txt"], (f["iommu-before.txt"], f["iommu-after.txt"])
    assert f["driver-after.txt"].strip() == "e1000e"
    assert f["legacy-only.rc"].strip() != "0" and "Operation not permitted" in f["legacy-only.txt"], f["legacy-only.txt"]
    print(f"\nsystemd guest on {f['facts.txt'].strip()}: boot to script {res.boot_seconds}s, "
          f"script {res.script_seconds}s, wall {res.wall_seconds:.0f}s")
