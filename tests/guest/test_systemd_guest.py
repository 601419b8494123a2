"""Tier 4 with systemd as PID 1: the Debian package installed as an admin would, the
shipped unit under real systemd, on the real system bus with udevd, and an
unprivileged user asking over that bus.  One boot (about two minutes under TCG),
then one script checks, in order:

* ``apt-get install ./vfiod_*.deb`` starts vfiod.service, which becomes active and
  shows a STATUS= line;
* from inside the unit: the daemon's network namespace is the host's, and it sees
  the default route (``/proc/MAINPID/net/route``);
* the NIC carrying the default route is refused as protected to a user the policy
  gives it to; without the route the same user leases it (``vfioctl lease -- CMD``,
  group node owned by the user) and it goes back to e1000e;
* ``journalctl -u vfiod VFIOD_OUTCOME=granted`` finds the grant with its fields
  (``denied`` the refusal);
* ``systemctl reload vfiod`` with a broken policy file fails while the service
  stays active and the last good policy still decides; fixed, the reload works;
* ``vfioctl revoke`` of a lease whose holder keeps its group, container and device
  fd ends the holder after the grace and brings the NIC home (the sandbox lets
  vfiod see and signal it);
* a persistent lease survives ``systemctl restart vfiod``, and removing its device
  (sysfs ``remove``) ends it with reason ``removed``: udev's events reach the unit;
* an upgrade keeps a boot claim's lease; ``apt-get remove`` ends it (no device is
  left on vfio-pci) and ``apt-get purge`` leaves nothing under ``/var/lib/vfiod``.
"""

import json
import os
import re

import pytest

from .harness import Guest, guest_available

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.guest


SCRIPT = r"""
set -u
exec 2>&1
up() { cut -d' ' -f1 /proc/uptime; }
note() { echo "$*" >> $OUT/facts.txt; }
fail() {
    echo "FAIL: $*"
    journalctl -b --no-pager -u vfiod > $OUT/vfiod-journal.txt 2>&1
    systemctl status --no-pager vfiod > $OUT/vfiod-status.txt 2>&1
    exit 1
}
VFIOCTL=/usr/bin/vfioctl           # the package's, not the checkout's (first on PATH here)
as_user() { runuser -u vfiotest -- "$@"; }
NIC_ADDR=0000:01:00.0

note "boot_uptime=$(up)"
note "purged_host_vfiod=$(cat /run/vfiod-guest/purged-host-vfiod 2>/dev/null)"
note "vfiod_before_install=$(dpkg-query -W -f='${db:Status-Status}' vfiod 2>/dev/null)"
for u in dbus.socket systemd-udevd.service systemd-journald.service; do
    systemctl is-active --quiet $u || fail "$u is not active"
done
[ "$(readlink /proc/1/exe)" = /usr/lib/systemd/systemd ] || [ "$(readlink /proc/1/exe)" = /lib/systemd/systemd ] \
    || fail "PID 1 is $(readlink /proc/1/exe)"

# The NIC with the default route.
NIC=$(ls /sys/bus/pci/devices/$NIC_ADDR/net)
ip link set "$NIC" up && ip addr add 192.0.2.2/24 dev "$NIC" && ip route add default via 192.0.2.1 dev "$NIC" onlink \
    || fail "default route on $NIC"
note "nic=$NIC"

# The policy gives that NIC to vfiotest: only the protection stands in the way.
mkdir -p /etc/vfiod/policy.d
cat > /etc/vfiod/policy.d/50-nic.toml <<'EOF'
[[rule]]
address = "0000:01:00.0"
users = ["vfiotest"]
backends = ["vfio"]
persistent = true
revoke_grace = "2s"
EOF

# Install as an admin would.  The root this guest boots forbids starting services
# (policy-rc.d, for containers); the guest's copy-on-write overlay drops it.
rm -f /usr/sbin/policy-rc.d
# man-db's trigger re-indexes every man page of the root: many minutes under TCG
rm -f /var/lib/man-db/auto-update
t0=$(up)
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 \
    /out/vfiod.deb > $OUT/apt.log 2>&1 || fail "apt-get install: $(tail -5 $OUT/apt.log)"
note "apt_seconds=$(echo "$(up) $t0" | awk '{print $1 - $2}')"
systemctl is-active --quiet vfiod || fail "vfiod.service is not active after apt-get install"
systemctl is-enabled --quiet vfiod || fail "vfiod.service is not enabled"
systemctl show -p StatusText --value vfiod > $OUT/status-start.txt
systemctl show -p NRestarts --value vfiod > $OUT/restarts.txt

# From inside the unit: the daemon's view of the network.
PID=$(systemctl show -p MainPID --value vfiod)
[ "$PID" -gt 1 ] || fail "no MainPID"
[ "$(readlink /proc/$PID/ns/net)" = "$(readlink /proc/1/ns/net)" ] || fail "vfiod is in another network namespace"
cat /proc/$PID/net/route > $OUT/daemon-route.txt
awk -v nic="$NIC" '$1 == nic && $2 == "00000000" {found=1} END {exit !found}' /proc/$PID/net/route \
    || fail "vfiod does not see the default route"
ls /proc/$PID/root/sys/class/net > $OUT/daemon-class-net.txt

# The sandbox of the running daemon: its seccomp mode, capabilities and mounts, and the
# drop-in the package's generator wrote (this host's PCI root buses).
grep -E '^(Seccomp|NoNewPrivs|CapBnd|CapEff|CapPrm):' /proc/$PID/status > $OUT/daemon-status.txt
cat /proc/$PID/mountinfo > $OUT/daemon-mountinfo.txt
cat /run/systemd/generator/vfiod.service.d/50-pci-sysfs.conf > $OUT/generator-dropin.txt 2>&1
# ... and tried: a victim process of another user, and a probe that systemd runs from
# this unit (a drop-in adding only ExecStartPost=, so the probe gets the unit's own
# capabilities, system call filter, mounts and NoNewPrivileges).
PROBE=$VFIOD_CHECKOUT/tests/guest/sandbox_probe.py
as_user python3 $PROBE victim > $OUT/victim.txt 2>&1 &
for i in $(seq 60); do [ -s $OUT/victim.txt ] && break; sleep 0.5; done
read VPID VADDR VLEN < $OUT/victim.txt || fail "the victim did not start: $(cat $OUT/victim.txt)"
mkdir -p /run/systemd/system/vfiod.service.d
printf '[Service]\nExecStartPost=-/usr/bin/python3 %s probe %s %s %s %s\n' $PROBE $VPID $VADDR $VLEN $NIC_ADDR \
    > /run/systemd/system/vfiod.service.d/90-probe.conf
systemctl daemon-reload
systemctl restart vfiod || fail "restart with the probe"
# (a loaded machine has taken more than 15 s to start the probe's python3 under TCG)
for i in $(seq 240); do
    journalctl --no-pager -u vfiod -o cat | sed -n 's/^vfiod-sandbox-probe: //p' | tail -1 > $OUT/probe.json
    [ -s $OUT/probe.json ] && break
    sleep 0.5
done
[ -s $OUT/probe.json ] || journalctl --no-pager -u vfiod -o cat | tail -20 > $OUT/probe-missing.txt
kill -USR1 $VPID
wait
rm /run/systemd/system/vfiod.service.d/90-probe.conf
systemctl daemon-reload
systemctl restart vfiod || fail "restart after the probe"
PID=$(systemctl show -p MainPID --value vfiod)

# The default-route NIC is protected, to an unprivileged user on the system bus.
as_user $VFIOCTL check $NIC_ADDR > $OUT/check-protected.txt 2>&1
echo $? > $OUT/check-protected.rc
as_user $VFIOCTL lease $NIC_ADDR -- true > $OUT/lease-protected.txt 2>&1
echo $? > $OUT/lease-protected.rc

# Without the route (and the link down), the same user leases it.
ip route del default && ip addr flush dev "$NIC" && ip link set "$NIC" down || fail "route removal"
as_user $VFIOCTL check $NIC_ADDR > $OUT/check-free.txt 2>&1 || fail "check after the route went: $(cat $OUT/check-free.txt)"
as_user $VFIOCTL lease $NIC_ADDR -- sh -c \
    'test -O "$VFIOD_GROUP_PATH" && echo "held group $VFIOD_GROUP at $VFIOD_GROUP_PATH"; \
     basename "$(readlink /sys/bus/pci/devices/0000:01:00.0/driver)"' > $OUT/lease.txt 2>&1 \
    || fail "lease: $(cat $OUT/lease.txt)"
basename "$(readlink /sys/bus/pci/devices/$NIC_ADDR/driver)" > $OUT/driver-after.txt

# The whole VFIO handshake as the user, in the command vfioctl lease starts.
cat > /tmp/handshake.py <<'PYEOF'
import ctypes, fcntl, mmap, os, struct
IO = lambda n: (ord(";") << 8) | (100 + n)        # _IO(VFIO_TYPE, VFIO_BASE + n)
GET_API_VERSION, CHECK_EXTENSION, SET_IOMMU, GROUP_GET_STATUS = IO(0), IO(1), IO(2), IO(3)
GROUP_SET_CONTAINER, GROUP_GET_DEVICE_FD, DEVICE_GET_INFO, IOMMU_MAP_DMA = IO(4), IO(6), IO(7), IO(13)
TYPE1v2 = 3
group = os.open(os.environ["VFIOD_GROUP_PATH"], os.O_RDWR)
argsz, flags = struct.unpack("II", fcntl.ioctl(group, GROUP_GET_STATUS, struct.pack("II", 8, 0)))
print("viable", flags & 1)
container = os.open("/dev/vfio/vfio", os.O_RDWR)
print("api", fcntl.ioctl(container, GET_API_VERSION), "type1v2", fcntl.ioctl(container, CHECK_EXTENSION, TYPE1v2))
fcntl.ioctl(group, GROUP_SET_CONTAINER, struct.pack("i", container))
fcntl.ioctl(container, SET_IOMMU, TYPE1v2)
buf = mmap.mmap(-1, 1 << 20)
vaddr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
fcntl.ioctl(container, IOMMU_MAP_DMA, bytearray(struct.pack("IIQQQ", 32, 3, vaddr, 0x100000, 1 << 20)))
print("mapped", 1 << 20)
for dev in sorted(os.listdir(f"/sys/kernel/iommu_groups/{os.environ['VFIOD_GROUP']}/devices")):
    fd = fcntl.ioctl(group, GROUP_GET_DEVICE_FD, bytearray(dev.encode() + b"\0"))
    info = struct.unpack("IIII", fcntl.ioctl(fd, DEVICE_GET_INFO, struct.pack("IIII", 16, 0, 0, 0)))
    print("device", dev, "fd", fd > 2, "regions", info[2], "irqs", info[3])
PYEOF
chmod 644 /tmp/handshake.py
as_user $VFIOCTL lease $NIC_ADDR -- python3 /tmp/handshake.py > $OUT/handshake.txt 2>&1 \
    || fail "handshake: $(cat $OUT/handshake.txt)"

# A revoke under the shipped unit: its sandbox must let vfiod read another user's
# /proc/PID/fd, signal that process and run the unbind in a child of its own.
sed -e 's|^for dev in .*|dev = os.listdir(f"/sys/kernel/iommu_groups/{os.environ[\x27VFIOD_GROUP\x27]}/devices")[0]|' \
    -e 's|^    fd = fcntl|fd = fcntl|' -e '/^    info = /,$d' /tmp/handshake.py > /tmp/holdfast.py
printf 'print("holding", flush=True)\nimport time\ntime.sleep(300)\n' >> /tmp/holdfast.py
chmod 644 /tmp/holdfast.py
as_user $VFIOCTL lease $NIC_ADDR --persistent > $OUT/revoke-lease.txt 2>&1 || fail "lease to revoke: $(cat $OUT/revoke-lease.txt)"
GROUP=$(basename "$(readlink /sys/bus/pci/devices/$NIC_ADDR/iommu_group)")
VFIOD_GROUP=$GROUP VFIOD_GROUP_PATH=/dev/vfio/$GROUP as_user env VFIOD_GROUP=$GROUP VFIOD_GROUP_PATH=/dev/vfio/$GROUP \
    python3 /tmp/holdfast.py > $OUT/holdfast.txt 2>&1 &
HOLDER=$!
for i in $(seq 120); do grep -q holding $OUT/holdfast.txt && break; sleep 0.5; done
grep -q holding $OUT/holdfast.txt || fail "the holder did not start: $(cat $OUT/holdfast.txt)"
$VFIOCTL revoke $NIC_ADDR --reason "under the unit" --json > $OUT/revoke.json 2> $OUT/revoke.err
echo $? > $OUT/revoke.rc
wait $HOLDER
echo $? > $OUT/holder.rc
basename "$(readlink /sys/bus/pci/devices/$NIC_ADDR/driver)" > $OUT/driver-after-revoke.txt
journalctl --no-pager -u vfiod VFIOD_EVENT=revoke -o json > $OUT/revoke-journal.json

# `vfioctl lease -- CMD` runs in a transient scope: the revoke ends CMD's whole tree,
# the `sleep` that holds nothing included.
as_user $VFIOCTL lease $NIC_ADDR -- sh -c 'python3 /tmp/holdfast.py & exec sleep 301' > $OUT/scope-lease.txt 2>&1 &
for i in $(seq 120); do grep -q holding $OUT/scope-lease.txt && break; sleep 0.5; done
systemctl list-units --all --no-legend 'vfiod-lease-*' > $OUT/scope-units.txt
$VFIOCTL revoke $NIC_ADDR --reason "scope" --json > $OUT/revoke-scope.json 2> $OUT/revoke-scope.err
echo $? > $OUT/revoke-scope.rc
wait
sleep 1
pgrep -f "sleep 301" > $OUT/scope-left.txt
journalctl --no-pager -u vfiod VFIOD_EVENT=revoke -o cat > $OUT/revoke-scope-journal.txt

# A driver change behind vfiod's back ends the lease (tampered); the NIC goes home.
as_user $VFIOCTL lease $NIC_ADDR -- sleep 20 > $OUT/lease-tampered.txt 2>&1 &
for i in $(seq 60); do
    [ "$(basename "$(readlink /sys/bus/pci/devices/$NIC_ADDR/driver)")" = vfio-pci ] && break
    sleep 0.5
done
sleep 1
echo $NIC_ADDR > /sys/bus/pci/drivers/vfio-pci/unbind
echo "" > /sys/bus/pci/devices/$NIC_ADDR/driver_override
echo $NIC_ADDR > /sys/bus/pci/drivers/e1000e/bind
for i in $(seq 60); do
    [ -n "$(journalctl -u vfiod VFIOD_OUTCOME=tampered -o cat)" ] && break
    sleep 1
done
journalctl --no-pager -u vfiod VFIOD_OUTCOME=tampered -o json > $OUT/tampered.json
wait
basename "$(readlink /sys/bus/pci/devices/$NIC_ADDR/driver)" > $OUT/driver-after-tamper.txt

# The audit records, as structured journal fields.
sleep 1
journalctl --no-pager -u vfiod VFIOD_OUTCOME=granted -o json > $OUT/granted.json
journalctl --no-pager -u vfiod VFIOD_OUTCOME=denied -o json > $OUT/denied.json

# A broken policy: the reload fails, the service stays, the last good policy decides.
printf '[[rule]]\nusres = ["x"]\n' > /etc/vfiod/policy.d/60-broken.toml
systemctl reload vfiod > $OUT/reload-broken.txt 2>&1
echo $? > $OUT/reload-broken.rc
sleep 1
systemctl is-active vfiod > $OUT/active-after-broken.txt
systemctl show -p StatusText --value vfiod > $OUT/status-broken.txt
as_user $VFIOCTL check $NIC_ADDR > $OUT/check-after-broken.txt 2>&1
echo $? > $OUT/check-after-broken.rc
journalctl --no-pager -u vfiod -o short-monotonic > $OUT/vfiod-journal.txt
rm /etc/vfiod/policy.d/60-broken.toml
systemctl reload vfiod > $OUT/reload-fixed.txt 2>&1
echo $? > $OUT/reload-fixed.rc
systemctl is-active vfiod > $OUT/active-end.txt

# A persistent lease survives `systemctl restart`; removing its device then ends it
# (the uevent feed reaches the daemon inside the unit).
as_user $VFIOCTL lease $NIC_ADDR --persistent > $OUT/lease-persistent.txt 2>$OUT/lease-persistent.err \
    || fail "persistent lease: $(cat $OUT/lease-persistent.err)"
systemctl restart vfiod || fail "restart"
as_user $VFIOCTL leases --json > $OUT/leases-after-restart.json 2>&1
systemctl show -p StatusText --value vfiod > $OUT/status-restart.txt
echo 1 > /sys/bus/pci/devices/$NIC_ADDR/remove
for i in $(seq 60); do
    [ -n "$(journalctl -u vfiod VFIOD_OUTCOME=removed -o cat)" ] && break
    sleep 1
done
journalctl --no-pager -u vfiod VFIOD_OUTCOME=removed -o json > $OUT/removed.json
as_user $VFIOCTL leases --json > $OUT/leases-after-remove.json 2>&1
echo 1 > /sys/bus/pci/rescan
for i in $(seq 30); do [ -e /sys/bus/pci/devices/$NIC_ADDR/driver ] && break; sleep 0.5; done

# systemctl stop: a persistent lease stays recorded (and its devices stay on vfio-pci).
as_user $VFIOCTL lease $NIC_ADDR --persistent > $OUT/lease-kept.txt 2>&1 || fail "lease before stop"
systemctl stop vfiod || fail "stop"
basename "$(readlink /sys/bus/pci/devices/$NIC_ADDR/driver)" > $OUT/driver-stopped.txt
systemctl start vfiod || fail "start after stop"
as_user $VFIOCTL leases --json > $OUT/leases-after-stop.json 2>&1
as_user $VFIOCTL release --all > /dev/null 2>&1 || fail "release after stop"

# A boot claim is in place when `systemctl start` returns (Type=notify: ready after claims).
printf '[[claim]]\ntarget = "0000:01:00.0"\nuser = "vfiotest"\nbackend = "vfio"\n' \
    > /etc/vfiod/policy.d/40-claim.toml
systemctl stop vfiod || fail "stop before the claim"
systemctl start vfiod || fail "start with the claim"
basename "$(readlink /sys/bus/pci/devices/$NIC_ADDR/driver)" > $OUT/driver-claimed.txt
as_user $VFIOCTL leases --json > $OUT/leases-claimed.json 2>&1

# An upgrade (the same version again) keeps the leases: the claim's NIC stays on vfio-pci.
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --reinstall --no-install-recommends \
    -o DPkg::Lock::Timeout=300 /out/vfiod.deb > $OUT/apt-reinstall.log 2>&1 \
    || fail "apt-get install --reinstall: $(tail -5 $OUT/apt-reinstall.log)"
basename "$(readlink /sys/bus/pci/devices/$NIC_ADDR/driver)" > $OUT/driver-after-upgrade.txt
as_user $VFIOCTL leases --json > $OUT/leases-after-upgrade.json 2>&1
# Removing the package ends every lease, the claim's persistent one too: no device on vfio-pci.
DEBIAN_FRONTEND=noninteractive apt-get remove -y -q -o DPkg::Lock::Timeout=300 vfiod > $OUT/apt-remove.log 2>&1 \
    || fail "apt-get remove: $(tail -5 $OUT/apt-remove.log)"
basename "$(readlink /sys/bus/pci/devices/$NIC_ADDR/driver)" > $OUT/driver-after-remove.txt
ls /sys/bus/pci/drivers/vfio-pci | grep -c '^0000:' > $OUT/vfio-after-remove.txt
DEBIAN_FRONTEND=noninteractive apt-get purge -y -q -o DPkg::Lock::Timeout=300 vfiod > $OUT/apt-purge.log 2>&1 \
    || fail "apt-get purge: $(tail -5 $OUT/apt-purge.log)"
find /var/lib/vfiod > $OUT/varlib-after-purge.txt 2>&1
find /usr/lib/python3/dist-packages/vfiod > $OUT/pylib-after-remove.txt 2>&1
ls /sys/bus/pci/drivers/vfio-pci | grep -c '^0000:' > $OUT/vfio-after-purge.txt
note "script_end_uptime=$(up)"
exit 0
"""


@pytest.fixture(scope="module")
def run(vfiod_deb, host_with_vfiod):
    ok, why = guest_available()
    if not ok:
        pytest.skip(why)
    deb = vfiod_deb
    # Booted over a root on which vfiod is already installed, enabled, with a policy and a
    # journal (conftest.host_with_vfiod): the guest must start without them all the same.
    g = Guest("rootport", init="systemd", memory=1536, root_layers=[host_with_vfiod])
    res = g.run(SCRIPT, timeout=1200, inputs={"vfiod.deb": deb.read_bytes()})
    facts = dict(line.split("=", 1) for line in res.files.get("facts.txt", b"").decode().splitlines()
                 if "=" in line)
    print(f"\nsystemd guest: boot to script {res.boot_seconds}s, apt-get install {facts.get('apt_seconds')}s, "
          f"script {res.script_seconds}s, wall {res.wall_seconds:.0f}s")
    assert res.returncode == 0, res.output + "\n" + res.files.get("vfiod-journal.txt", b"").decode()[-4000:]
    return res


def text(res, name):
    return res.files[name].decode()


def leases(res, name):
    """The leases of a `vfioctl leases --json` document (docs/json.md)."""
    doc = json.loads(text(res, name))
    assert doc["version"] == 1 and doc["kind"] == "leases", doc
    return doc["leases"]


def test_the_host_s_installed_vfiod_is_not_in_the_guest_before_the_install(run):
    facts = dict(line.split("=", 1) for line in text(run, "facts.txt").splitlines())
    assert facts["purged_host_vfiod"] == "0.1.0", facts
    assert facts["vfiod_before_install"] != "installed", facts


def test_the_package_starts_the_unit_with_a_status_line(run):
    assert "Setting up vfiod" in text(run, "apt.log")
    status = text(run, "status-start.txt").strip()
    assert status.endswith("0 leases (0 persistent), policy: 1 file"), status
    assert text(run, "restarts.txt").strip() == "0", text(run, "vfiod-journal.txt")


def test_the_daemon_sees_the_host_network_and_protects_the_default_route_nic(run):
    nic = dict(line.split("=", 1) for line in text(run, "facts.txt").splitlines())["nic"]
    assert nic in text(run, "daemon-class-net.txt").split()
    assert text(run, "check-protected.rc").strip() == "3"
    said = text(run, "check-protected.txt")
    assert "protected" in said.lower() and "default route" in said.lower(), said
    assert text(run, "lease-protected.rc").strip() == "3", text(run, "lease-protected.txt")


CAPS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_KILL": 5, "CAP_SYS_MODULE": 16,
        "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24}


def _unit_caps():
    text = open(os.path.join(ROOT, "systemd/vfiod.service")).read()
    names = re.search(r"^CapabilityBoundingSet=(.*)$", text, flags=re.M).group(1).split()
    return sum(1 << CAPS[n] for n in names)


def _mounts(res):
    """Mount point → its per-mount options, from the daemon's /proc/PID/mountinfo."""
    out = {}
    for line in text(res, "daemon-mountinfo.txt").splitlines():
        fields = line.split()
        out[fields[4]] = fields[5].split(",")
    return out


def test_the_running_daemon_has_the_units_filter_capabilities_and_read_only_proc_and_sys(run):
    """Read from the running daemon (/proc/MAINPID/status and mountinfo): the seccomp
    filter is on, it cannot gain privileges, it holds exactly the unit's bounding set,
    /proc and /sys are read-only mounts in its namespace and only the sysfs paths
    rebinding writes (the drivers, drivers_probe, the PCI root bus the generator
    found) are read-write."""
    status = dict(line.split(":", 1) for line in text(run, "daemon-status.txt").splitlines())
    assert status["Seccomp"].strip() == "2" and status["NoNewPrivs"].strip() == "1", status
    assert int(status["CapBnd"], 16) == _unit_caps() == int(status["CapEff"], 16), status
    assert "ReadWritePaths=-/sys/devices/pci0000:00" in text(run, "generator-dropin.txt").splitlines()
    mounts = _mounts(run)
    for ro in ("/proc", "/proc/sys", "/sys"):
        assert "ro" in mounts[ro], (ro, mounts.get(ro))
    for rw in ("/sys/bus/pci/drivers", "/sys/bus/pci/drivers_probe", "/sys/devices/pci0000:00"):
        assert "rw" in mounts[rw], (rw, mounts.get(rw))


def test_a_probe_in_the_units_sandbox_cannot_reach_another_process_or_the_kernels_tunables(run):
    """Run by systemd from the unit itself (a drop-in adds only ExecStartPost=), so it
    has exactly the daemon's capabilities (CAP_SYS_PTRACE among them), filter and mounts:
    process_vm_writev/readv and kcmp on another user's process are refused by the filter
    (EPERM), its /proc/PID/mem and /proc/sys cannot be opened for writing (EROFS), nor
    can /sys outside the PCI paths; the files rebinding writes still open for writing.
    The victim's buffer is unchanged afterwards."""
    assert text(run, "probe.json").strip(), text(run, "probe-missing.txt")
    probe = json.loads(text(run, "probe.json"))
    assert probe["process_vm_writev"] == "EPERM" and probe["process_vm_readv"] == "EPERM", probe
    assert probe["kcmp"] == "EPERM", probe
    assert probe["proc_pid_mem"] == "EROFS", probe
    assert probe["proc_sys"] == "EROFS", probe
    for key in ("sys_kernel", "sys_devices_system", "sys_bus_pci_rescan"):
        assert probe[key] == "EROFS", (key, probe)
    for key in ("driver_override", "reset", "unbind", "drivers_probe"):
        assert probe[key] == "ok", (key, probe)
    victim = text(run, "victim.txt").splitlines()
    assert victim[-1].startswith("buffer untouched"), victim


@pytest.mark.xfail(strict=True, reason="known hole: with CAP_SYS_PTRACE, /proc/PID/root of a host process "
                   "leads into the host's mount namespace, where /proc and /sys are writable; the unit's "
                   "read-only mounts do not reach there (a fix needs Landlock or no CAP_SYS_PTRACE)")
def test_the_unit_cannot_write_through_another_namespaces_root(run):
    """/proc/1/root leads into PID 1's mount namespace, where /proc and /sys are
    writable: the unit's read-only mounts must hold there too.  They do not yet (the
    probe wrote the victim's memory through /proc/1/root/proc/PID/mem): strict, so this
    fails as soon as the hole is closed and the marker must go."""
    probe = json.loads(text(run, "probe.json"))
    for key in ("proc_1_root_proc_pid_mem", "proc_1_root_proc_sys", "proc_1_root_sys_bus_pci_rescan"):
        assert probe[key] != "ok" and not probe[key].startswith("opened"), (key, probe)


def test_an_unprivileged_user_leases_the_nic_over_the_system_bus(run):
    lease = text(run, "lease.txt")
    assert "held group" in lease and "\nvfio-pci\n" in lease and "released" in lease, lease
    assert text(run, "driver-after.txt").strip() == "e1000e"


def test_the_journal_has_the_grant_and_the_refusal_as_fields(run):
    granted = [json.loads(line) for line in text(run, "granted.json").splitlines()]
    assert len(granted) == 5, granted            # the lease, the handshake's, two revoked, the tampered one
    g = granted[0]
    assert g["VFIOD_EVENT"] == "grant" and g["VFIOD_TARGET"] == "0000:01:00.0"
    assert g["VFIOD_UID"] == str(__import__("pwd").getpwnam("vfiotest").pw_uid)
    assert g["VFIOD_LEASE"] and g["VFIOD_GROUP"].isdigit() and g["_SYSTEMD_UNIT"] == "vfiod.service"
    denied = [json.loads(line) for line in text(run, "denied.json").splitlines()]
    assert any(d["VFIOD_EVENT"] == "request" and "protected" in d.get("VFIOD_DETAIL", "").lower() for d in denied)


def test_a_refused_reload_fails_and_the_service_keeps_the_last_good_policy(run):
    assert text(run, "reload-broken.rc").strip() != "0"
    assert text(run, "active-after-broken.txt").strip() == "active"
    assert "last reload was refused" in text(run, "status-broken.txt")
    assert text(run, "check-after-broken.rc").strip() == "0"        # the rule of the last good policy
    journal = text(run, "vfiod-journal.txt")
    assert "60-broken.toml:2" in journal and "usres" in journal
    assert text(run, "reload-fixed.rc").strip() == "0"
    assert text(run, "active-end.txt").strip() == "active"


def test_a_persistent_lease_survives_a_restart_and_a_removed_device_ends_it(run):
    lease_id = text(run, "lease-persistent.txt").strip()
    assert re.fullmatch(r"[0-9a-f]{16}", lease_id), text(run, "lease-persistent.err")
    assert [r["id"] for r in leases(run, "leases-after-restart.json")] == [lease_id]
    assert "1 lease (1 persistent)" in text(run, "status-restart.txt")
    removed = [json.loads(line) for line in text(run, "removed.json").splitlines()]
    assert [(r["VFIOD_LEASE"], r["VFIOD_EVENT"]) for r in removed] == [(lease_id, "release")], removed
    assert leases(run, "leases-after-remove.json") == []


def test_the_lease_command_does_the_whole_vfio_handshake(run):
    said = text(run, "handshake.txt")
    assert "viable 1" in said and "type1v2 1" in said and "mapped 1048576" in said, said
    assert "device 0000:01:00.0 fd True" in said, said


def test_a_revoke_under_the_shipped_unit_ends_the_holder_and_brings_the_nic_home(run):
    assert text(run, "revoke.rc").strip() == "0", text(run, "revoke.err")
    doc = json.loads(text(run, "revoke.json"))
    assert doc["ended"] and doc["reason"] == "under the unit", doc
    assert 2 <= doc["seconds"] < 2 + 10, doc                # the grace, then SIGTERM
    assert text(run, "holder.rc").strip() == "143", text(run, "holdfast.txt")
    assert text(run, "driver-after-revoke.txt").strip() == "e1000e"
    records = [json.loads(line) for line in text(run, "revoke-journal.json").splitlines()]
    assert [r["VFIOD_OUTCOME"] for r in records] == ["revoking", "ended"], records
    assert "SIGTERM to pid" in records[1]["VFIOD_DETAIL"]


def test_the_command_of_vfioctl_lease_runs_in_a_scope_that_the_revoke_ends_whole(run):
    assert "vfiod-lease-" in text(run, "scope-units.txt"), text(run, "scope-lease.txt")
    assert text(run, "revoke-scope.rc").strip() == "0", text(run, "revoke-scope.err")
    assert json.loads(text(run, "revoke-scope.json"))["ended"]
    assert "sending SIGTERM to sh" in text(run, "scope-lease.txt")
    assert text(run, "scope-left.txt").strip() == ""        # the sleep, holding nothing, went too
    assert "SIGTERM to every process of vfiod-lease-" in text(run, "revoke-scope-journal.txt")


def test_a_driver_change_behind_vfiods_back_ends_the_lease_as_tampered(run):
    tampered = [json.loads(line) for line in text(run, "tampered.json").splitlines()]
    assert tampered and tampered[0]["VFIOD_EVENT"] == "release", tampered
    assert text(run, "driver-after-tamper.txt").strip() == "e1000e"


def test_stop_keeps_a_persistent_lease_and_a_boot_claim_is_in_place_when_start_returns(run):
    kept = text(run, "lease-kept.txt").strip().splitlines()[-1]      # stdout: the id; stderr said more
    assert text(run, "driver-stopped.txt").strip() == "vfio-pci"      # persistent: not given back on stop
    assert [r["id"] for r in leases(run, "leases-after-stop.json")] == [kept]
    assert text(run, "driver-claimed.txt").strip() == "vfio-pci"
    claimed = leases(run, "leases-claimed.json")
    assert len(claimed) == 1 and claimed[0]["persistent"], claimed


def test_an_upgrade_keeps_leases_removal_ends_them_and_purge_leaves_nothing(run):
    claimed = leases(run, "leases-claimed.json")
    assert text(run, "driver-after-upgrade.txt").strip() == "vfio-pci", text(run, "apt-reinstall.log")
    assert [r["id"] for r in leases(run, "leases-after-upgrade.json")] == [claimed[0]["id"]]
    assert "lease(s) ended" in text(run, "apt-remove.log"), text(run, "apt-remove.log")
    assert text(run, "driver-after-remove.txt").strip() == "e1000e", text(run, "apt-remove.log")
    assert text(run, "vfio-after-remove.txt").strip() == "0"
    assert text(run, "vfio-after-purge.txt").strip() == "0"
    assert "No such file or directory" in text(run, "varlib-after-purge.txt"), text(run, "varlib-after-purge.txt")
    # the removal's own end-leases run leaves no bytecode behind the package
    assert "No such file or directory" in text(run, "pylib-after-remove.txt"), text(run, "pylib-after-remove.txt")
