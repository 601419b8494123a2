r"""Real-kernel test harness: boot a QEMU q35 guest (TCG, emulated Intel IOMMU)
and run a shell script inside it as root.

Usage from tests::

    from tests.guest.harness import Guest, guest_available
    ok, why = guest_available()          # (False, reason) -> pytest.skip(why)
    g = Guest(topology="bridge")
    res = g.run('''
        cd $VFIOD_CHECKOUT && .venv/bin/vfiod inspect --json > $OUT/inspect.json
        ls /sys/kernel/iommu_groups
    ''', timeout=300)
    res.returncode          # exit status of the script (int)
    res.output              # the script's stdout+stderr (str)
    res.files["inspect.json"]   # bytes of every file the script wrote below $OUT
    res.console             # the guest's serial console log (str, for debugging)
    res.boot_seconds        # guest uptime when the script started
    res.wall_seconds        # host wall-clock time of the whole run (incl. build)

People::

    python3 -m tests.guest.harness --topology all -c 'lspci -nn; ls -l /sys/kernel/iommu_groups/*/devices'
    python3 -m tests.guest.harness --topology bridge --console --script myscript.sh

How it works
------------
* Kernel: Debian's ``linux-image-<kver>`` package (``apt-get download`` +
  ``dpkg-deb -x`` + ``depmod``), cached in ``$VFIOD_GUEST_CACHE``
  (default ``/var/cache/vfiod-guest``, falling back to ``~/.cache/vfiod-guest``
  when that is not writable) under ``kernels/<kver>/``.  Once a kernel is
  cached it is reused (no apt access); ``VFIOD_GUEST_KVER`` pins a version.
* Other kernels: ``Guest(kernel="6.12")`` boots the newest Debian kernel of
  that series the apt sources offer (``linux-image-amd64`` of that version's
  dependency: bookworm-backports' on Debian 12), cached under
  ``kernels-6.12/<kver>/`` so that it never becomes the default kernel.  Its
  compressed modules (``.ko.xz``) are unpacked into the initrd.
* The built kernel: ``Guest(kernel=BUILT_KERNEL)`` ("built") boots the guest tier's
  own kernel, built once from Debian's ``linux-source-6.12`` with the checked-in
  fragment ``tests/guest/kernel/guest.config`` (tests/guest/kbuild.py: tinyconfig plus
  iommufd, the vfio device cdevs and mtty, everything built in) and cached in
  ``kernels-built/<source version>-<fragment hash>/``: built once per machine (tens
  of minutes on 2 busy cores), nothing after.  It boots to the script in about 3 s.
  Its initrd carries no modules (pass ``modules=()``).
* QEMU: this machine's, unless ``Guest(qemu=(8, 0))`` needs a newer one (the
  ``sriov`` topology's igb): then Debian's newer build from the apt sources
  (bookworm-backports' QEMU 10 on Debian 12) with its SeaBIOS, fetched with
  ``apt-get download`` into ``qemu/<version>/`` and run from there with ``-L``;
  nothing is installed.  ``guest_available(kernel=..., qemu=...)`` says whether
  either can be had.
* Initrd: built in pure Python (newc cpio, uncompressed) from static busybox
  and the modules needed to mount the root (virtio_pci, 9pnet_virtio, 9p,
  overlay) plus the device/VFIO modules (e1000, e1000e, nvme, vfio-pci,
  vfio_iommu_type1, pci-stub), cached as ``initrd-<kver>-<hash>.cpio`` keyed by
  the init scripts, the module list and busybox.
* Root: this machine's ``/`` over virtio-9p, read-only, with a tmpfs overlay so
  the guest can write anywhere (nothing reaches the host).  The guest's
  ``/lib/modules/<kver>`` is a bind mount of the full cached module tree, so
  ``modprobe`` of any module works inside.  ``/proc``, ``/sys``, ``/dev``
  (devtmpfs), ``/dev/pts``, ``/dev/shm``, ``/tmp``, ``/run`` and
  ``/sys/fs/cgroup`` are the guest's own.  Nothing touches the host's /sys.
* Known state: whatever this machine has installed, each guest starts without
  vfiod: stage 1 purges a ``vfiod`` package of the root in the guest's overlay
  (``dpkg --purge``, before any init runs; the version purged is in
  ``/run/vfiod-guest/purged-host-vfiod``) and removes ``/etc/vfiod`` and
  ``/var/lib/vfiod``.  ``Guest(root_layers=[DIR, ...])`` lays directories of
  this machine read-only over the root (9p shares at 00:16.0 and up, the last
  on top): tests use it to give the guest a root on which vfiod is installed.
* Output: a second, read-write 9p share mounted at ``/out`` (``$OUT``).  The
  script is ``/out/script.sh`` run by ``/bin/sh`` with ``HOME=/root``,
  ``PATH=CHECKOUT/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin``
  and ``VFIOD_CHECKOUT`` (this checkout's path, the same in the guest),
  stdin ``/dev/null``; stdout+stderr go to ``/out/output.txt`` and the exit
  status to ``/out/rc`` (these three names are not reported in ``files``).
  The guest then powers off (``sync; echo o > /proc/sysrq-trigger``); a guest
  that has reported its status but not powered off 30 s later is stopped.
* ``init="systemd"`` (``--init systemd``): stage 1 writes a target and a
  oneshot service to ``/run/systemd/system`` and execs the root's
  ``/lib/systemd/systemd systemd.unit=vfiod-guest.target``; the script
  runs as that service once basic.target is up (journald, udevd, the dbus
  socket), so it can install packages and start units on the real system bus.
  The root's timers are masked.  Boot to script: about two minutes under TCG.
* Modules loaded before the script runs: ``Guest(modules=...)``, default
  ``DEFAULT_MODULES`` (e1000 e1000e nvme vfio-pci vfio_iommu_type1 pci-stub),
  so ``/dev/vfio/vfio`` exists.  Pass ``modules=("e1000", "e1000e", "nvme")``
  to start with VFIO unloaded.

Guest(topology="rootport", *, memory=1024, smp=2, modules=DEFAULT_MODULES,
extra_qemu_args=(), extra_cmdline="", quiet=True, echo_console=False,
keep=False, init="busybox", root_layers=(), kernel=None, qemu=None).run(script, timeout=300,
inputs=None) -> GuestResult.  Each run()
boots a fresh VM (nothing persists between runs); ``timeout`` excludes the
one-time kernel/initrd build; GuestTimeout / GuestError (with the console tail)
are raised when the guest hangs or dies before writing ``/out/rc``.
``prepare()`` builds the cache without booting (``--prepare`` on the CLI).

Environment: ``VFIOD_GUEST=0`` makes guest_available() say no;
``VFIOD_GUEST_CACHE`` cache dir; ``VFIOD_GUEST_KVER`` kernel version to use
(default: newest cached, else what ``linux-image-amd64`` depends on);
``VFIOD_GUEST_PVH=0`` boot the compressed bzImage instead of vmlinux.

Machine: ``qemu-system-x86_64 -machine q35,kernel-irqchip=split -accel tcg
-cpu max -m 1024 -smp 2 -nodefaults -device intel-iommu,intremap=on,caching-mode=on
-global ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off -nic none -no-reboot``
(no VGA, no NIC; native pciehp/shpchp hotplug like real hardware), serial
console to a file, kernel command line ``console=ttyS0 panic=-1 intel_iommu=on
rdinit=/init no_timer_check quiet vfiod.modules=...``.  The kernel is booted as an
uncompressed ELF ``vmlinux`` through PVH (extracted once from the bzImage with
``lzma``), which saves ~6 s of SeaBIOS + xz decompression under TCG
(``VFIOD_GUEST_PVH=0`` boots the bzImage instead).  The two virtio-9p devices
sit at 00:1a.0 (hostroot) and 00:1b.0 (out); the root ports use explicit
chassis/slot/addr (PCIe slot numbers 101..106); NICs have ``romfile=``.

Topologies (measured: kernel 6.1.0-56-amd64, QEMU 7.2.22)
----------------------------------------------------------
Always present (topology ``none`` has only these)::

    0000:00:00.0  8086:29c0  q35 host bridge      alone          (no driver)
    0000:00:1a.0  1af4:1009  virtio-9p hostroot   alone          virtio-pci
    0000:00:1b.0  1af4:1009  virtio-9p out        alone          virtio-pci
    0000:00:1f.0  8086:2918  ICH9 LPC             \
    0000:00:1f.2  8086:2922  ICH9 AHCI             } one group   (no drivers)
    0000:00:1f.3  8086:2930  ICH9 SMBus           /

Group numbers follow probe order (root-bus devices by slot, then the buses
behind bridges), so they shift with the topology: tests should compare
memberships, not numbers.  Measured (address, vendor:device, group, driver)::

  none:           00:00.0 g0 | 00:1a.0 g1 | 00:1b.0 g2 | 00:1f.0/.2/.3 g3

  rootport:       (00:00.0 g0, 00:1a.0 g2, 00:1b.0 g3, 00:1f.* g4)
    0000:00:02.0  1b36:000c  pcie-root-port rp1     group 1   pcieport
    0000:01:00.0  8086:10d3  e1000e                 group 5   e1000e    (alone)

  bridge:         (00:1a.0 g2, 00:1b.0 g3, 00:1f.* g4)
    0000:00:03.0  1b36:000c  pcie-root-port rp2     group 1   pcieport
    0000:01:00.0  1b36:000e  pcie-pci-bridge        group 5   shpchp    \
    0000:02:01.0  8086:100e  e1000                  group 5   e1000      } one group
    0000:02:02.0  8086:100e  e1000                  group 5   e1000     /

  multifunction:  (00:1a.0 g2, 00:1b.0 g3, 00:1f.* g4)
    0000:00:04.0  1b36:000c  pcie-root-port rp3     group 1   pcieport
    0000:01:00.0  8086:10d3  e1000e function 0      group 5   e1000e    \ one group
    0000:01:00.1  8086:10d3  e1000e function 1      group 5   e1000e    /

  switch:         (00:1a.0 g2, 00:1b.0 g3, 00:1f.* g4)
    0000:00:05.0  1b36:000c  pcie-root-port rp4     group 1   pcieport
    0000:01:00.0  104c:8232  x3130-upstream         group 5   pcieport  (alone)
    0000:02:00.0  104c:8233  xio3130-downstream 1   group 6   pcieport  \ one group
    0000:03:00.0  1b36:0010  nvme                   group 6   nvme      /
    0000:02:01.0  104c:8233  xio3130-downstream 2   group 7   pcieport  \ one group
    0000:04:00.0  8086:10d3  e1000e                 group 7   e1000e    /

  all:            (00:00.0 g0, 00:1a.0 g5, 00:1b.0 g6, 00:1f.* g7)
    0000:00:02.0  root port (rootport)              group 1   pcieport
    0000:00:03.0  root port (bridge)                group 2   pcieport
    0000:00:04.0  root port (multifunction)         group 3   pcieport
    0000:00:05.0  root port (switch)                group 4   pcieport
    0000:01:00.0  e1000e                            group 8   e1000e    (alone)
    0000:02:00.0  pcie-pci-bridge                   group 9   shpchp    \
    0000:03:01.0  e1000                             group 9   e1000      } one group
    0000:03:02.0  e1000                             group 9   e1000     /
    0000:04:00.0  e1000e function 0                 group 10  e1000e    \ one group
    0000:04:00.1  e1000e function 1                 group 10  e1000e    /
    0000:05:00.0  x3130-upstream                    group 11  pcieport  (alone)
    0000:06:00.0  xio3130-downstream 1              group 12  pcieport  \ one group
    0000:07:00.0  nvme                              group 12  nvme      /
    0000:06:01.0  xio3130-downstream 2              group 13  pcieport  \ one group
    0000:08:00.0  e1000e                            group 13  e1000e    /

  sriov (QEMU >= 8 only; not part of ``all``):
    0000:00:06.0  1b36:000c  pcie-root-port rp5     alone     pcieport
    0000:01:00.0  8086:10c9  igb (82576 PF)         alone     igb       (VFs 8086:10ca at
                  01:10.0, 01:10.2, ... once sriov_numvfs is written; see test_sriov_guest)

Why: QEMU 7.2's pcie-root-port has ACS, so every root port is alone and
isolates its subtree.  Its xio3130-downstream ports have no ACS, so each
downstream port shares a group with the device below it; the x3130 upstream
port is alone (Linux does not require ACS on upstream ports), which also keeps
the two downstream ports apart.  Conventional PCI devices behind the
pcie-pci-bridge alias to the bridge's requester ID, so bridge + both e1000
form one group.  The two e1000e functions have no ACS, so they share a group.
The e1000e of ``rootport`` is 0000:01:00.0 in both ``rootport`` and ``all``
(its root port has the lowest slot, 00:02.0).  Each part keeps its pcie.0 slot
(00:02.0 .. 00:05.0) in every topology; the bus numbers behind it depend on
which parts are present.

Speed (2 host cores, TCG, no KVM; noisy, +-30%): QEMU start to kernel ~1.2 s,
kernel to /init ~4.5 s, /init to script start ~3 s (e1000e/nvme probing),
i.e. 6-10 s boot-to-script; power-off and QEMU exit < 0.5 s.  Each exec of a
dynamically linked program in the guest costs 0.05-0.4 s and a ``python3``
start-up 1-2.5 s, so keep guest scripts to few processes (one python3 that
does everything is much cheaper than a shell loop).  Cold first run (70 MB
kernel download, extract, depmod, vmlinux, initrd): ~12 s more.

Only the Python standard library is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

__all__ = [
    "Guest",
    "GuestResult",
    "GuestError",
    "GuestTimeout",
    "guest_available",
    "prepare",
    "TOPOLOGIES",
    "DEFAULT_MODULES",
    "BUILT_KERNEL",
]

HARNESS_VERSION = "2"
#: Guest(kernel=BUILT_KERNEL): the kernel built from Debian's source (tests/guest/kbuild.py).
BUILT_KERNEL = "built"
QEMU = "qemu-system-x86_64"
KERNEL_META_PACKAGE = "linux-image-amd64"

#: Modules needed to reach the root file system (loaded by the initrd).
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
#: Modules put in the initrd besides BOOT_MODULES (a module built into the
#: kernel is skipped).
INITRD_MODULES = ("e1000", "e1000e", "nvme", "vfio-pci", "vfio_iommu_type1", "pci-stub")
#: Modules loaded before the script runs unless Guest(modules=...) says otherwise.
DEFAULT_MODULES = ("e1000", "e1000e", "nvme", "vfio-pci", "vfio_iommu_type1", "pci-stub")

#: This checkout: the guest sees this machine's root, so the same path works there.
CHECKOUT = str(Path(__file__).resolve().parents[2])
GUEST_PATH = f"{CHECKOUT}/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Names the harness itself uses in the out share; not reported in files.
_SCRIPT, _OUTPUT, _RC = "script.sh", "output.txt", "rc"


class GuestError(RuntimeError):
    """The guest could not be built or booted, or died before reporting."""

    def __init__(self, message: str, console: str = ""):
        if console:
            tail = "\n".join(console.splitlines()[-40:])
            message = f"{message}\n--- last console lines ---\n{tail}"
        super().__init__(message)
        self.console = console


class GuestTimeout(GuestError):
    """The guest did not power off within the timeout."""


@dataclasses.dataclass
class GuestResult:
    returncode: int
    output: str
    files: dict[str, bytes]
    console: str
    boot_seconds: float | None  # guest uptime when the script started
    script_seconds: float | None  # guest uptime spent in the script
    wall_seconds: float  # host time for the whole run()
    command: list[str]  # the QEMU command line
    rundir: str | None = None  # kept run directory (Guest(keep=True))

    def check(self) -> "GuestResult":
        """Raise GuestError unless the script exited 0."""
        if self.returncode != 0:
            raise GuestError(
                f"guest script exited {self.returncode}\n--- output ---\n{self.output}"
            )
        return self


# --------------------------------------------------------------------------
# Topologies
# --------------------------------------------------------------------------

def _rootport(ctx):
    return [
        "-device", "pcie-root-port,id=rp1,chassis=1,slot=101,bus=pcie.0,addr=0x2",
        "-device", "e1000e,id=rp1_nic,bus=rp1,addr=0x0,romfile=,mac=52:54:00:00:01:00",
    ]


def _bridge(ctx):
    return [
        "-device", "pcie-root-port,id=rp2,chassis=1,slot=102,bus=pcie.0,addr=0x3",
        "-device", "pcie-pci-bridge,id=pbr1,bus=rp2,addr=0x0",
        "-device", "e1000,id=pbr1_nic1,bus=pbr1,addr=0x1,romfile=,mac=52:54:00:00:02:01",
        "-device", "e1000,id=pbr1_nic2,bus=pbr1,addr=0x2,romfile=,mac=52:54:00:00:02:02",
    ]


def _multifunction(ctx):
    return [
        "-device", "pcie-root-port,id=rp3,chassis=1,slot=103,bus=pcie.0,addr=0x4",
        "-device", "e1000e,id=mf_nic0,bus=rp3,addr=0x0.0,multifunction=on,romfile=,mac=52:54:00:00:03:00",
        "-device", "e1000e,id=mf_nic1,bus=rp3,addr=0x0.1,romfile=,mac=52:54:00:00:03:01",
    ]


def _switch(ctx):
    disk = Path(ctx["rundir"]) / "nvme0.raw"
    with open(disk, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    return [
        "-device", "pcie-root-port,id=rp4,chassis=1,slot=104,bus=pcie.0,addr=0x5",
        "-device", "x3130-upstream,id=sw_up,bus=rp4,addr=0x0",
        "-device", "xio3130-downstream,id=sw_dp1,bus=sw_up,chassis=1,slot=105,addr=0x0",
        "-device", "xio3130-downstream,id=sw_dp2,bus=sw_up,chassis=1,slot=106,addr=0x1",
        "-drive", f"if=none,file={disk},format=raw,id=nvd1",
        "-device", "nvme,id=sw_nvme,serial=vfiod-nvme0,drive=nvd1,bus=sw_dp1,addr=0x0",
        "-device", "e1000e,id=sw_nic,bus=sw_dp2,addr=0x0,romfile=,mac=52:54:00:00:04:00",
    ]


def _sriov(ctx):
    # QEMU >= 8's emulated Intel 82576 (8086:10c9, up to 7 VFs 8086:10ca): Guest(qemu=(8, 0))
    return [
        "-device", "pcie-root-port,id=rp5,chassis=1,slot=107,bus=pcie.0,addr=0x6",
        "-device", "igb,id=rp5_nic,bus=rp5,addr=0x0,romfile=,mac=52:54:00:00:05:00",
    ]


_PARTS = {
    "rootport": _rootport,
    "bridge": _bridge,
    "multifunction": _multifunction,
    "switch": _switch,
    "sriov": _sriov,
}

#: topology name -> list of parts (see module docstring for addresses).
TOPOLOGIES: dict[str, tuple[str, ...]] = {
    "none": (),
    "rootport": ("rootport",),
    "bridge": ("bridge",),
    "multifunction": ("multifunction",),
    "switch": ("switch",),
    "all": ("rootport", "bridge", "multifunction", "switch"),
    # needs QEMU >= 8 (Guest(qemu=(8, 0)) takes bookworm-backports' on Debian 12)
    "sriov": ("sriov",),
}


def topology_args(topology: str, rundir: str | os.PathLike) -> list[str]:
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {topology!r}; known: {', '.join(TOPOLOGIES)}")
    ctx = {"rundir": str(rundir)}
    args: list[str] = []
    for part in TOPOLOGIES[topology]:
        args += _PARTS[part](ctx)
    return args


# --------------------------------------------------------------------------
# Guest init scripts (baked into the initrd; part of its cache key)
# --------------------------------------------------------------------------

_STAGE1 = r"""#!/bin/busybox sh
# vfiod guest init, stage 1 (initramfs, busybox)
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /newroot /mnt/lower /mnt/rw
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
KVER=@KVER@
KTREE=@KTREE@
log() { echo "vfiod-guest: $* uptime=$(cut -d' ' -f1 /proc/uptime)"; }
fail() {
    log "FATAL: $*"
    sync
    echo o > /proc/sysrq-trigger
    sleep 60
}
log "stage1"
for m in @BOOT_MODULES@; do
    modprobe "$m" || fail "modprobe $m"
done
log "boot modules loaded"
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot /mnt/lower || fail "mount hostroot"
mount -t tmpfs -o mode=0755 rw /mnt/rw || fail "mount tmpfs"
mkdir -p /mnt/rw/upper /mnt/rw/work
# Guest(root_layers=...): read-only directories of the host laid over its root, the last on top.
LOWER=/mnt/lower
NLAYERS=$(sed -n 's/.*vfiod\.layers=\([0-9]*\).*/\1/p' /proc/cmdline)
i=0
while [ "$i" -lt "${NLAYERS:-0}" ]; do
    mkdir -p /mnt/layer$i
    mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose layer$i /mnt/layer$i \
        || fail "mount layer$i"
    LOWER=/mnt/layer$i:$LOWER
    i=$((i + 1))
done
mount -t overlay -o lowerdir=$LOWER,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay /newroot \
    || fail "mount overlay"
R=/newroot
mkdir -p $R/out $R/proc $R/sys $R/dev $R/tmp $R/run $R/root
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out $R/out || fail "mount out"
mount -t tmpfs -o mode=1777 tmp $R/tmp
mount -t tmpfs -o mode=0755 run $R/run
mkdir -p $R/run/vfiod-guest $R/run/lock
# A checkout under /tmp or /run (a CI clone, say) is hidden by those tmpfs: show it again.
C="@CHECKOUT@"
case "$C" in
    /tmp/*|/run/*) mkdir -p "$R$C" && mount --bind "/mnt/lower$C" "$R$C" || fail "bind $C" ;;
esac
mkdir -p $R/lib/modules/$KVER
if [ -d "$R$KTREE/kernel" ]; then
    mount --bind "$R$KTREE" $R/lib/modules/$KVER || fail "bind modules"
else
    log "warning: $KTREE not visible; only the initrd's modules are available"
    cp -a /lib/modules/$KVER/. $R/lib/modules/$KVER/
fi
log "root mounted"
# Device modules requested on the kernel command line (vfiod.modules=a,b,c).
MODS=$(sed -n 's/.*vfiod\.modules=\([^ ]*\).*/\1/p' /proc/cmdline | tr ',' ' ')
for m in $MODS; do
    modprobe "$m" 2>/dev/null || echo "$m" >> $R/run/vfiod-guest/retry-modules
done
log "device modules loaded"
cp /stage2.sh $R/run/vfiod-guest/stage2.sh
mount --move /proc $R/proc
mount --move /sys $R/sys
mount --move /dev $R/dev
# Done here with busybox: every dynamically linked exec after switch_root
# costs 0.1-0.4 s under TCG.
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup 2>/dev/null
[ -e $R/dev/fd ] || ln -s /proc/self/fd $R/dev/fd
[ -e $R/dev/stdin ] || ln -s /proc/self/fd/0 $R/dev/stdin
[ -e $R/dev/stdout ] || ln -s /proc/self/fd/1 $R/dev/stdout
[ -e $R/dev/stderr ] || ln -s /proc/self/fd/2 $R/dev/stderr
hostname vfiod-guest
ip link set lo up 2>/dev/null
# Every guest starts from the same state whatever this machine has installed: a vfiod
# package of the root is purged in the guest's copy (its maintainer scripts run, with no
# init up yet), and vfiod's policy and journal directories go too.  The host is untouched.
if [ -e $R/var/lib/dpkg/info/vfiod.list ]; then
    V=$(sed -n '/^Package: vfiod$/,/^$/s/^Version: //p' $R/var/lib/dpkg/status)
    if chroot $R /usr/bin/dpkg --purge --no-triggers vfiod > $R/run/vfiod-guest/purge.log 2>&1; then
        echo "$V" > $R/run/vfiod-guest/purged-host-vfiod
        echo "vfiod-guest: purged the root's vfiod $V"
    else
        echo "vfiod-guest: FATAL: dpkg --purge vfiod: $(tail -3 $R/run/vfiod-guest/purge.log)"
        sync
        echo o > $R/proc/sysrq-trigger
        sleep 60
    fi
fi
rm -rf $R/etc/vfiod $R/var/lib/vfiod
# (/proc has moved to $R/proc by now)
if grep -q 'vfiod\.init=systemd' $R/proc/cmdline; then
    # systemd as PID 1: stage 2 runs as a oneshot service of vfiod-guest.target, once
    # basic.target (journald, udevd, the dbus socket) is up.
    U=$R/run/systemd/system
    mkdir -p $U
    cat > $U/vfiod-guest.target <<'UNIT'
[Unit]
Description=vfiod guest test run
Requires=basic.target vfiod-guest.service
After=basic.target vfiod-guest.service
AllowIsolate=yes
UNIT
    cat > $U/vfiod-guest.service <<'UNIT'
[Unit]
Description=vfiod guest test script
Wants=dbus.socket systemd-udevd.service
After=basic.target dbus.socket systemd-udevd.service systemd-udev-trigger.service
[Service]
Type=oneshot
ExecStart=/bin/sh /run/vfiod-guest/stage2.sh
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity
UNIT
    # the root's daily timers (apt, dpkg backups) must not run into the test's apt
    ln -s /dev/null $U/timers.target
    echo "vfiod-guest: exec systemd uptime=$(cut -d' ' -f1 $R/proc/uptime)"
    # the unit as an argument: systemd 252 here does not take systemd.unit= from /proc/cmdline
    exec switch_root $R /lib/systemd/systemd systemd.unit=vfiod-guest.target
fi
exec switch_root $R /bin/sh /run/vfiod-guest/stage2.sh
fail "switch_root"
"""

_STAGE2 = r"""# vfiod guest init, stage 2 (host root over 9p + overlay; run by /bin/sh)
export HOME=/root
export PATH=@PATH@
export VFIOD_CHECKOUT=@CHECKOUT@
export OUT=/out
export LANG=C.UTF-8
export TERM=dumb
umask 022
if [ -f /run/vfiod-guest/retry-modules ]; then
    for m in $(cat /run/vfiod-guest/retry-modules); do
        modprobe "$m" || echo "vfiod-guest: warning: modprobe $m failed"
    done
fi
read up _ < /proc/uptime
echo "vfiod-guest: script-start uptime=$up"
cd /
/bin/sh /out/script.sh > /out/output.txt 2>&1 < /dev/null
rc=$?
echo $rc > /out/rc
read up _ < /proc/uptime
echo "vfiod-guest: script-end rc=$rc uptime=$up"
sync
echo o > /proc/sysrq-trigger
while :; do sleep 60 2>/dev/null; done
"""


# --------------------------------------------------------------------------
# Cache: kernel + initrd
# --------------------------------------------------------------------------

def cache_dir() -> Path:
    env = os.environ.get("VFIOD_GUEST_CACHE")
    if env:
        return Path(env)
    default = Path("/var/cache/vfiod-guest")
    try:
        default.mkdir(parents=True, exist_ok=True)
        if os.access(default, os.W_OK):
            return default
    except OSError:
        pass
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "vfiod-guest"


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("text", True)
    try:
        return subprocess.run(cmd, **kw)
    except subprocess.CalledProcessError as e:
        raise GuestError(
            f"command failed ({e.returncode}): {' '.join(map(str, cmd))}\n{e.stdout or ''}{e.stderr or ''}"
        ) from None
    except FileNotFoundError:
        raise GuestError(f"command not found: {cmd[0]}") from None


def _version_key(v: str):
    return [int(x) if x.isdigit() else x for x in re.split(r"[.-]", v)]


def _kernels_dir(cache: Path, series: str | None = None) -> Path:
    """Where kernels live: the default kernel in kernels/, a kernel asked for by its
    series (Guest(kernel="6.12")) in kernels-SERIES/, so it never becomes the default."""
    return cache / (f"kernels-{series}" if series else "kernels")


def _cached_kvers(cache: Path, series: str | None = None) -> list[str]:
    kdir = _kernels_dir(cache, series)
    if not kdir.is_dir():
        return []
    vers = [p.name for p in kdir.iterdir() if (p / ".complete").exists()]
    return sorted(vers, key=_version_key)


def _apt_kver(series: str | None = None) -> str:
    """Kernel version linux-image-amd64 depends on, from the local apt lists: the
    candidate's, or with series ("6.12") the newest linux-image-amd64 of that series
    any source offers (bookworm-backports for 6.12 on Debian 12)."""
    spec = KERNEL_META_PACKAGE
    if series:
        vers = [line.split("|")[1].strip() for line in
                _run(["apt-cache", "madison", KERNEL_META_PACKAGE]).stdout.splitlines() if "|" in line]
        vers = [v for v in vers if v.startswith(series + ".")]
        if not vers:
            raise GuestError(f"no {KERNEL_META_PACKAGE} of Linux {series} in the apt sources "
                             "(Debian 12: scripts/setup adds bookworm-backports)")
        spec = f"{KERNEL_META_PACKAGE}={vers[0]}"         # madison lists the newest first
    out = _run(["apt-cache", "depends", spec]).stdout
    m = re.search(r"Depends:\s*linux-image-(\S+-amd64)\b", out)
    if not m:
        raise GuestError(f"cannot find the kernel of {KERNEL_META_PACKAGE} in:\n{out}")
    return m.group(1)


def _choose_kver(cache: Path, series: str | None = None) -> str:
    if series:
        cached = _cached_kvers(cache, series)
        return cached[-1] if cached else _apt_kver(series)
    pinned = os.environ.get("VFIOD_GUEST_KVER")
    if pinned:
        return pinned
    cached = _cached_kvers(cache)
    if cached:
        return cached[-1]
    return _apt_kver()


class _Lock:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "w")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _ensure_kernel(cache: Path, kver: str, log, series: str | None = None) -> Path:
    """Download + extract linux-image-<kver>; return its dir (vmlinuz, root/)."""
    kdir = _kernels_dir(cache, series) / kver
    if (kdir / ".complete").exists():
        return kdir
    with _Lock(cache / ".lock"):
        if (kdir / ".complete").exists():
            return kdir
        log(f"vfiod-guest: fetching kernel linux-image-{kver} into {kdir}")
        tmp = Path(tempfile.mkdtemp(prefix=f".kernel-{kver}-", dir=cache))
        try:
            _run(["apt-get", "download", f"linux-image-{kver}"], cwd=tmp)
            debs = list(tmp.glob("linux-image-*.deb"))
            if len(debs) != 1:
                raise GuestError(f"apt-get download produced {debs}")
            _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "root")])
            debs[0].unlink()
            # Debian 12's kernel package ships /lib/modules; be ready for /usr/lib too.
            mods = tmp / "root/lib/modules" / kver
            if not mods.is_dir():
                alt = tmp / "root/usr/lib/modules" / kver
                if not alt.is_dir():
                    raise GuestError(f"no modules for {kver} in the package")
                (tmp / "root/lib/modules").mkdir(parents=True, exist_ok=True)
                os.symlink(f"../../usr/lib/modules/{kver}", mods)
            _run(["depmod", "-b", str(tmp / "root"), kver])
            vmlinuz = tmp / "root/boot" / f"vmlinuz-{kver}"
            shutil.copy2(vmlinuz, tmp / "vmlinuz")
            (tmp / ".complete").write_text(kver + "\n")
            os.chmod(tmp, 0o755)
            if kdir.exists():
                shutil.rmtree(kdir)
            kdir.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, kdir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return kdir


def _ensure_vmlinux(cache: Path, kdir: Path, kver: str) -> Path | None:
    """Uncompressed ELF vmlinux for PVH boot, or None if not possible.

    QEMU boots an ELF vmlinux with a PVH note directly: this skips SeaBIOS's
    linuxboot and the in-guest xz decompression, about 6 s under TCG.
    """
    if os.environ.get("VFIOD_GUEST_PVH", "1").lower() in ("0", "no", "off", "false"):
        return None
    out = kdir / "vmlinux"
    if out.exists():
        return out
    config = kdir / "root/boot" / f"config-{kver}"
    try:
        if "\nCONFIG_PVH=y\n" not in config.read_text():
            return None
    except OSError:
        return None
    with _Lock(cache / ".lock"):
        if out.exists():
            return out
        try:
            import lzma  # optional in self-built Pythons
        except ImportError:
            return None
        data = (kdir / "vmlinuz").read_bytes()
        i = data.find(b"\xfd7zXZ\x00")
        if i < 0:
            return None  # not xz-compressed: fall back to the bzImage
        try:
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[i:])
        except lzma.LZMAError:
            return None
        if elf[:4] != b"\x7fELF":
            return None
        tmp = out.with_name(".vmlinux.tmp")
        tmp.write_bytes(elf)
        os.replace(tmp, out)
    return out


def _qemu_version(binary: str) -> tuple[int, int]:
    m = re.search(r"version (\d+)\.(\d+)", _run([binary, "--version"]).stdout)
    if not m:
        raise GuestError(f"cannot tell the version of {binary}")
    return int(m.group(1)), int(m.group(2))


def _upstream(version: str) -> tuple[int, int]:
    """(major, minor) of a Debian version such as 1:10.0.2+ds-2~bpo12+1."""
    m = re.match(r"(?:\d+:)?(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _qemu_dir(cache: Path, version: str) -> Path:
    return cache / "qemu" / re.sub(r"[^A-Za-z0-9.+~-]", "_", version)


def _qemu_source(need: tuple[int, int]) -> str | None:
    """None when this machine's QEMU is at least `need`; else the Debian version of
    qemu-system-x86 to take from the apt sources (a cached copy first)."""
    if shutil.which(QEMU) and _qemu_version(QEMU) >= need:
        return None
    qdir = cache_dir() / "qemu"
    if qdir.is_dir():
        for d in sorted(qdir.iterdir(), key=lambda p: _version_key(p.name), reverse=True):
            if (d / ".complete").exists() and _upstream((d / ".complete").read_text().strip()) >= need:
                return (d / ".complete").read_text().strip()
    if shutil.which("apt-cache"):
        for line in _run(["apt-cache", "madison", "qemu-system-x86"]).stdout.splitlines():
            version = line.split("|")[1].strip() if "|" in line else ""
            if _upstream(version) >= need:
                return version
    raise GuestError(f"QEMU {need[0]}.{need[1]} or newer is needed and neither this machine nor its apt "
                     "sources have it (Debian 12: scripts/setup adds bookworm-backports, which has QEMU 10)")


def qemu_binary(need: tuple[int, int] | None = None, log=None) -> tuple[str, list[str], dict[str, str]]:
    """(binary, extra arguments, extra environment) of a QEMU of at least `need`.

    This machine's QEMU when it is new enough.  Otherwise Debian's newer build from
    the apt sources (bookworm-backports' 10.0 on Debian 12), fetched with
    ``apt-get download`` and unpacked into the cache (``qemu/VERSION/``) with the
    SeaBIOS it needs, never installed: the system keeps its own QEMU."""
    if need is None:
        return QEMU, [], {}
    version = _qemu_source(need)
    if version is None:
        return QEMU, [], {}
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    cache = cache_dir()
    qdir = _qemu_dir(cache, version)
    if not (qdir / ".complete").exists():
        with _Lock(cache / ".lock"):
            if not (qdir / ".complete").exists():
                log(f"vfiod-guest: fetching QEMU {version} into {qdir}")
                tmp = Path(tempfile.mkdtemp(prefix=".qemu-", dir=cache))
                try:
                    seabios = _run(["apt-cache", "madison", "seabios"]).stdout.split("|")[1].strip()
                    pkgs = [f"qemu-system-x86={version}", f"qemu-system-data={version}",
                            f"qemu-system-common={version}", f"seabios={seabios}"]
                    os.chmod(tmp, 0o755)
                    _run(["apt-get", "download", *pkgs], cwd=tmp)
                    for deb in sorted(tmp.glob("*.deb")):
                        _run(["dpkg-deb", "-x", str(deb), str(tmp / "root")])
                        deb.unlink()
                    if _qemu_version(str(tmp / "root/usr/bin/qemu-system-x86_64")) < need:
                        raise GuestError(f"QEMU {version} from apt is older than {need}")
                    (tmp / ".complete").write_text(version + "\n")
                    if qdir.exists():
                        shutil.rmtree(qdir)
                    qdir.parent.mkdir(parents=True, exist_ok=True)
                    os.rename(tmp, qdir)
                finally:
                    if tmp.exists():
                        shutil.rmtree(tmp, ignore_errors=True)
    root = qdir / "root"
    return (str(root / "usr/bin/qemu-system-x86_64"),
            ["-L", str(root / "usr/share/qemu"), "-L", str(root / "usr/share/seabios")],
            {"QEMU_MODULE_DIR": str(root / "usr/lib/x86_64-linux-gnu/qemu")})


def _find_busybox() -> Path:
    for c in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if c and Path(c).is_file() and _is_static_elf(Path(c)):
            return Path(c).resolve()
    raise GuestError("no statically linked busybox found (apt-get install busybox-static)")


def _is_static_elf(path: Path) -> bool:
    """True for an ELF64 little-endian file without a PT_INTERP segment."""
    try:
        with open(path, "rb") as f:
            hdr = f.read(64)
            if hdr[:4] != b"\x7fELF" or hdr[4] != 2 or hdr[5] != 1:
                return False
            phoff, = struct.unpack_from("<Q", hdr, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", hdr, 0x36)
            f.seek(phoff)
            ph = f.read(phentsize * phnum)
        for i in range(phnum):
            p_type, = struct.unpack_from("<I", ph, i * phentsize)
            if p_type == 3:  # PT_INTERP
                return False
        return True
    except OSError:
        return False


def _module_files(kroot: Path, kver: str, names) -> list[str]:
    """Relative paths (lib/modules/...) of names and their deps, deps first."""
    rel: list[str] = []
    for name in names:
        r = subprocess.run(
            ["modprobe", "-d", str(kroot), "-S", kver, "--show-depends", name],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        if r.returncode != 0:
            raise GuestError(f"modprobe --show-depends {name} failed: {r.stderr}")
        for line in r.stdout.splitlines():
            parts = line.split()
            if not parts or parts[0] == "builtin":
                continue  # built into the kernel: nothing to copy
            if parts[0] == "insmod":
                p = Path(parts[1]).relative_to(kroot)
                if str(p) not in rel:
                    rel.append(str(p))
    return rel


class _Cpio:
    """Minimal newc ("070701") cpio writer."""

    def __init__(self, f):
        self.f = f
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev=(0, 0), nlink=1):
        nameb = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0]
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.f.write(hdr + nameb)
        self.f.write(b"\0" * ((4 - (len(hdr) + len(nameb)) % 4) % 4))
        self.f.write(data)
        self.f.write(b"\0" * ((4 - len(data) % 4) % 4))

    def dir(self, name, perm=0o755):
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name, data: bytes, perm=0o644):
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name, target: str):
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name, major, minor, perm=0o600):
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def tree(self, src: Path, dst: str):
        """Add the contents of directory src below dst (which must exist)."""
        for root, dirs, files in os.walk(src):
            dirs.sort()
            rel = os.path.relpath(root, src)
            base = dst if rel == "." else f"{dst}/{rel}"
            for d in dirs:
                self.dir(f"{base}/{d}")
            for fn in sorted(files):
                p = Path(root) / fn
                if p.is_symlink():
                    self.symlink(f"{base}/{fn}", os.readlink(p))
                else:
                    self.file(f"{base}/{fn}", p.read_bytes(), p.stat().st_mode & 0o777)

    def close(self):
        self._entry("TRAILER!!!", 0, nlink=1)
        pad = self.f.tell() % 512
        if pad:
            self.f.write(b"\0" * (512 - pad))


def _ensure_initrd(cache: Path, kver: str, kdir: Path, log, boot_modules=BOOT_MODULES,
                   initrd_modules=INITRD_MODULES) -> Path:
    busybox = _find_busybox()
    ktree = str(kdir.resolve() / "root/lib/modules" / kver)
    stage1 = (
        _STAGE1.replace("@KVER@", kver)
        .replace("@KTREE@", ktree)
        .replace("@BOOT_MODULES@", " ".join(boot_modules))
        .replace("@CHECKOUT@", CHECKOUT)
    )
    stage2 = _STAGE2.replace("@PATH@", GUEST_PATH).replace("@CHECKOUT@", CHECKOUT)
    h = hashlib.sha256()
    for part in (HARNESS_VERSION, kver, stage1, stage2, " ".join(tuple(boot_modules) + tuple(initrd_modules))):
        h.update(part.encode() + b"\0")
    h.update(hashlib.sha256(busybox.read_bytes()).digest())
    out = cache / f"initrd-{kver}-{h.hexdigest()[:16]}.cpio"
    if out.exists():
        return out
    with _Lock(cache / ".lock"):
        if out.exists():
            return out
        log(f"vfiod-guest: building {out}")
        kroot = kdir / "root"
        mods = _module_files(kroot, kver, tuple(boot_modules) + tuple(initrd_modules))
        with tempfile.TemporaryDirectory(dir=cache, prefix=".initrd-") as tmp:
            stage = Path(tmp) / "root"
            mdir = stage / "lib/modules" / kver
            mdir.mkdir(parents=True)
            for rel in mods:
                dst = stage / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if rel.endswith(".ko.xz"):
                    # Debian's 6.12 compresses its modules; busybox's insmod hands
                    # them to the kernel as they are, which wants an ELF file.
                    import lzma
                    dst.with_suffix("").write_bytes(lzma.decompress((kroot / rel).read_bytes()))
                else:
                    shutil.copy2(kroot / rel, dst)
            for meta in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
                src = kroot / "lib/modules" / kver / meta
                if src.exists():
                    shutil.copy2(src, mdir / meta)
            _run(["depmod", "-b", str(stage), kver])
            tmpout = Path(tmp) / "initrd.cpio"
            with open(tmpout, "wb") as f:
                c = _Cpio(f)
                for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys",
                          "dev", "tmp", "run", "root", "newroot", "mnt", "mnt/lower", "mnt/rw"):
                    c.dir(d)
                c.chardev("dev/console", 5, 1)
                c.chardev("dev/null", 1, 3, 0o666)
                c.file("bin/busybox", busybox.read_bytes(), 0o755)
                c.symlink("bin/sh", "busybox")
                c.file("init", stage1.encode(), 0o755)
                c.file("stage2.sh", stage2.encode(), 0o644)
                c.dir("lib")
                c.dir("lib/modules")
                c.dir(f"lib/modules/{kver}")
                c.tree(mdir, f"lib/modules/{kver}")
                c.close()
            os.replace(tmpout, out)
    return out


def prepare(log=None, kernel: str | None = None) -> tuple[Path, Path, str]:
    """Make sure kernel and initrd are cached; return (kernel, initrd, kver).

    kernel is the uncompressed PVH-bootable vmlinux when possible, else vmlinuz.
    The kernel argument names a series ("6.12") instead of the default kernel.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    if kernel == BUILT_KERNEL:
        from tests.guest import kbuild
        try:
            kdir, kver = kbuild.ensure(cache, log)
        except kbuild.BuildError as e:
            raise GuestError(f"cannot build the guest kernel: {e}") from None
        # everything is built in: the initrd loads nothing
        initrd = _ensure_initrd(cache, kver, kdir, log, boot_modules=(), initrd_modules=())
        return kdir / "vmlinux", initrd, kver
    kver = _choose_kver(cache, kernel)
    kdir = _ensure_kernel(cache, kver, log, kernel)
    initrd = _ensure_initrd(cache, kver, kdir, log)
    kernel = _ensure_vmlinux(cache, kdir, kver) or kdir / "vmlinuz"
    return kernel, initrd, kver


def guest_available(kernel: str | None = None, qemu: tuple[int, int] | None = None) -> tuple[bool, str]:
    """(True, "") if a guest can be booted here, else (False, reason).

    kernel: a kernel series ("6.12") the guest needs; qemu: the QEMU version it
    needs at least, e.g. (8, 0) for the igb NIC (see qemu_binary)."""
    if os.environ.get("VFIOD_GUEST", "").lower() in ("0", "no", "off", "false"):
        return False, "guest tests disabled by VFIOD_GUEST=0"
    if not shutil.which(QEMU):
        return False, f"{QEMU} not found (apt-get install qemu-system-x86)"
    if kernel == BUILT_KERNEL:
        ok, why = guest_available(qemu=qemu)
        if not ok:
            return ok, why
        from tests.guest import kbuild
        return kbuild.available(cache_dir())
    if kernel or qemu:
        ok, why = guest_available()
        if not ok:
            return ok, why
        if kernel and not _cached_kvers(cache_dir(), kernel):
            try:
                _apt_kver(kernel)
            except GuestError as e:
                return False, f"no Linux {kernel} for the guest: {e}"
        if qemu:
            try:
                _qemu_source(qemu)
            except GuestError as e:
                return False, str(e)
        return True, ""
    try:
        _find_busybox()
    except GuestError as e:
        return False, str(e)
    if not shutil.which("depmod") and not Path("/sbin/depmod").exists():
        return False, "depmod/modprobe not found (apt-get install kmod)"
    cache = cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return False, f"cache dir {cache} not usable: {e}"
    if not os.access(cache, os.W_OK):
        return False, f"cache dir {cache} not writable"
    pinned = os.environ.get("VFIOD_GUEST_KVER")
    cached = _cached_kvers(cache)
    if (pinned and pinned in cached) or (not pinned and cached):
        return True, ""
    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        if not shutil.which(tool):
            return False, f"no cached guest kernel in {cache} and {tool} not found"
    if not pinned:
        try:
            _apt_kver()
        except GuestError as e:
            return False, f"no cached guest kernel and apt cannot name one: {e}"
    return True, ""


# --------------------------------------------------------------------------
# Running a guest
# --------------------------------------------------------------------------

class Guest:
    """A guest definition; each run() boots a fresh VM."""

    def __init__(
        self,
        topology: str = "rootport",
        *,
        memory: int = 1024,
        smp: int = 2,
        modules=DEFAULT_MODULES,
        extra_qemu_args=(),
        extra_cmdline: str = "",
        quiet: bool = True,
        echo_console: bool = False,
        keep: bool = False,
        init: str = "busybox",
        root_layers=(),
        kernel: str | None = None,
        qemu: tuple[int, int] | None = None,
    ):
        if topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {topology!r}; known: {', '.join(TOPOLOGIES)}")
        self.topology = topology
        self.memory = memory
        self.smp = smp
        self.modules = tuple(modules)
        self.extra_qemu_args = list(extra_qemu_args)
        self.extra_cmdline = extra_cmdline
        self.quiet = quiet
        self.echo_console = echo_console
        self.keep = keep  # keep the run directory (path in result.rundir)
        if init not in ("busybox", "systemd"):
            raise ValueError(f"init is busybox or systemd, not {init!r}")
        self.init = init  # systemd: the root's systemd is PID 1, the script a oneshot service
        self.kernel = kernel  # a kernel series ("6.12"); None: the default kernel
        self.qemu = qemu  # the QEMU version needed at least ((8, 0) for igb); None: this machine's
        # directories of this machine laid read-only over the guest's root, the last on top
        self.root_layers = [str(Path(d).resolve()) for d in root_layers]
        if len(self.root_layers) > 4:
            raise ValueError("at most 4 root layers")

    def command(self, vmlinuz, initrd, rundir: Path, outdir: Path, qemu=(QEMU, [])) -> list[str]:
        # no_timer_check: under TCG on a busy host the IO-APIC timer test at boot can fail and
        # panic ("timer doesn't work through Interrupt-remapped IO-APIC"); the guest needs no such check.
        cmdline = ["console=ttyS0", "panic=-1", "intel_iommu=on", "rdinit=/init", "no_timer_check"]
        if self.quiet:
            cmdline.append("quiet")
        if self.modules:
            cmdline.append("vfiod.modules=" + ",".join(self.modules))
        if self.init == "systemd":
            cmdline.append("vfiod.init=systemd")
        if self.root_layers:
            cmdline.append(f"vfiod.layers={len(self.root_layers)}")
        if self.extra_cmdline:
            cmdline.append(self.extra_cmdline)
        layers = []
        for i, d in enumerate(self.root_layers):
            layers += ["-fsdev", f"local,id=fslayer{i},path={d},security_model=none,readonly=on,multidevs=remap",
                       "-device", f"virtio-9p-pci,fsdev=fslayer{i},mount_tag=layer{i},bus=pcie.0,addr={0x16 + i:#x}"]
        return [
            qemu[0], *qemu[1],
            "-machine", "q35,kernel-irqchip=split",
            "-accel", "tcg",
            "-cpu", "max",
            "-m", str(self.memory),
            "-smp", str(self.smp),
            "-nodefaults", "-no-user-config",
            "-display", "none",
            "-no-reboot",
            "-monitor", "none",
            "-serial", f"file:{rundir / 'console.log'}",
            "-nic", "none",
            "-device", "intel-iommu,intremap=on,caching-mode=on",
            # native PCIe/SHPC hotplug like real hardware (QEMU 7.2's q35
            # default is ACPI hotplug, whose slots clash with shpchp's)
            "-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
            "-fsdev", "local,id=fsroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=fsroot,mount_tag=hostroot,bus=pcie.0,addr=0x1a",
            "-fsdev", f"local,id=fsout,path={outdir},security_model=none",
            "-device", "virtio-9p-pci,fsdev=fsout,mount_tag=out,bus=pcie.0,addr=0x1b",
            *layers,
            "-kernel", str(vmlinuz),
            "-initrd", str(initrd),
            "-append", " ".join(cmdline),
            *topology_args(self.topology, rundir),
            *self.extra_qemu_args,
        ]

    def run_story(self, script: str, name: str, timeout: float = 600) -> tuple[GuestResult, dict]:
        """Run a Python guest script (from the checkout) that saves its findings as OUT/`name`
        (JSON with ``errors`` and ``complete``); the result, and the findings checked whole."""
        import json
        res = self.run(f"cd $VFIOD_CHECKOUT && python3 - <<'EOF'\n{script}\nEOF\n", timeout=timeout)
        assert name in res.files, res.output + res.console[-3000:]
        found = json.loads(res.files[name])
        assert not found["errors"] and found["complete"], (found["errors"], found.get("log"), res.output[-3000:])
        return res, found

    def run(self, script: str, timeout: float = 300, inputs: dict[str, bytes] | None = None) -> GuestResult:
        """Boot, run script with /bin/sh as root, power off; return the result.

        inputs: extra files (name -> bytes) placed in $OUT before boot; they are
        reported back in files (as the guest left them).
        Raises GuestTimeout if the guest is still running after timeout seconds
        (build time excluded), GuestError if it died without an exit status.
        """
        t0 = time.monotonic()
        vmlinuz, initrd, _ = prepare(kernel=self.kernel)
        binary, qemu_args, qemu_env = qemu_binary(self.qemu)
        rundir = Path(tempfile.mkdtemp(prefix="vfiod-guest-"))
        outdir = rundir / "out"
        outdir.mkdir()
        try:
            (outdir / _SCRIPT).write_text(script)
            for name, data in (inputs or {}).items():
                p = outdir / name
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
            cmd = self.command(vmlinuz, initrd, rundir, outdir, (binary, qemu_args))
            console_path = rundir / "console.log"
            stop = threading.Event()
            tailer = None
            if self.echo_console:
                tailer = threading.Thread(target=_tail, args=(console_path, stop), daemon=True)
                tailer.start()
            qemu_log = rundir / "qemu.log"
            try:
                with open(qemu_log, "wb") as log_f:
                    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_f,
                                            stderr=subprocess.STDOUT, env={**os.environ, **qemu_env})
                    timed_out = _wait_for_guest(proc, outdir / _RC, time.monotonic() + timeout)
                qemu_out = _read_text(qemu_log)
            finally:
                stop.set()
                if tailer:
                    tailer.join()
            console = _read_text(console_path)
            if qemu_out.strip():
                console += "\n--- qemu ---\n" + qemu_out
            if timed_out:
                raise GuestTimeout(f"guest did not finish within {timeout}s (rundir {rundir})", console)
            rc_file = outdir / _RC
            if not rc_file.exists():
                raise GuestError(
                    f"guest exited (qemu status {proc.returncode}) without running the script to the end",
                    console,
                )
            returncode = int(rc_file.read_text().strip())
            output = _read_text(outdir / _OUTPUT)
            files = {}
            for p in sorted(outdir.rglob("*")):
                rel = str(p.relative_to(outdir))
                if p.is_file() and not p.is_symlink() and rel not in (_SCRIPT, _OUTPUT, _RC):
                    files[rel] = p.read_bytes()
            start = re.search(r"vfiod-guest: script-start uptime=([\d.]+)", console)
            end = re.search(r"vfiod-guest: script-end rc=\d+ uptime=([\d.]+)", console)
            boot = float(start.group(1)) if start else None
            spent = float(end.group(1)) - boot if (start and end) else None
            res = GuestResult(
                returncode=returncode, output=output, files=files, console=console,
                boot_seconds=boot, script_seconds=spent,
                wall_seconds=time.monotonic() - t0, command=cmd,
                rundir=str(rundir) if self.keep else None,
            )
            return res
        finally:
            if not self.keep:
                shutil.rmtree(rundir, ignore_errors=True)


#: Seconds a guest may take to power off once its script has reported its status.
POWEROFF_GRACE = 30.0


def _wait_for_guest(proc: subprocess.Popen, rc_file: Path, deadline: float) -> bool:
    """Wait for QEMU to exit; True if the deadline passed first (QEMU is then killed).

    A guest whose script has written its status but that does not power off (Debian's
    6.12 can block in a device's shutdown after sysrq-o) is stopped after
    POWEROFF_GRACE seconds: its results are all in the out share by then."""
    done_at = None
    while proc.poll() is None:
        now = time.monotonic()
        if done_at is None and rc_file.exists():
            done_at = now
        if now > deadline or (done_at is not None and now - done_at > POWEROFF_GRACE):
            proc.kill()
            proc.wait()
            return done_at is None
        time.sleep(0.25)
    return False


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _tail(path: Path, stop: threading.Event):
    pos = 0
    while True:
        done = stop.is_set()
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                data = f.read()
                pos += len(data)
            if data:
                sys.stderr.write(data.decode(errors="replace"))
                sys.stderr.flush()
        except FileNotFoundError:
            pass
        if done:
            return
        time.sleep(0.2)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python3 -m tests.guest.harness",
        description="Boot a QEMU q35 guest with an emulated Intel IOMMU and run a script as root.",
    )
    ap.add_argument("--topology", "-t", default="rootport", choices=sorted(TOPOLOGIES))
    src = ap.add_mutually_exclusive_group()
    src.add_argument("-c", dest="command", help="shell commands to run in the guest")
    src.add_argument("--script", "-s", help="shell script file to run (default: stdin if -c not given)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--modules", help="comma list of modules to load before the script "
                    f"(default {','.join(DEFAULT_MODULES)}; '' for none)")
    ap.add_argument("--console", action="store_true", help="echo the guest console to stderr live")
    ap.add_argument("--verbose", action="store_true", help="boot without 'quiet'")
    ap.add_argument("--out", help="copy the files the script wrote to $OUT into this directory")
    ap.add_argument("--prepare", action="store_true", help="only fetch the kernel and build the initrd")
    ap.add_argument("--kernel", help=f"a kernel series (6.12), or {BUILT_KERNEL!r}: the kernel built from "
                    "Debian's source with tests/guest/kernel/guest.config (default: Debian's default kernel)")
    ap.add_argument("--init", choices=("busybox", "systemd"), default="busybox",
                    help="systemd: boot the root's systemd as PID 1 and run the script as a service (~2 min)")
    args = ap.parse_args(argv)

    ok, why = guest_available(kernel=args.kernel)
    if not ok:
        print(f"guest not available: {why}", file=sys.stderr)
        return 77
    if args.prepare:
        t = time.monotonic()
        try:
            vmlinuz, initrd, kver = prepare(kernel=args.kernel)
        except GuestError as e:
            print(f"vfiod-guest: {e}", file=sys.stderr)
            return 125
        print(f"kernel {kver}: {vmlinuz}\ninitrd: {initrd}\n({time.monotonic() - t:.1f}s)")
        return 0
    if args.command is not None:
        script = args.command
    elif args.script:
        script = Path(args.script).read_text()
    else:
        script = sys.stdin.read()
    if args.modules is not None:
        modules = tuple(m for m in args.modules.split(",") if m)
    else:
        modules = () if args.kernel == BUILT_KERNEL else DEFAULT_MODULES
    g = Guest(args.topology, modules=modules, echo_console=args.console, quiet=not args.verbose, init=args.init,
              kernel=args.kernel)
    try:
        res = g.run(script, timeout=args.timeout)
    except GuestError as e:
        print(f"vfiod-guest: {e}", file=sys.stderr)
        return 125
    sys.stdout.write(res.output)
    sys.stdout.flush()
    if args.out:
        for name, data in res.files.items():
            p = Path(args.out) / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    boot = f"{res.boot_seconds:.1f}s" if res.boot_seconds is not None else "?"
    spent = f"{res.script_seconds:.1f}s" if res.script_seconds is not None else "?"
    print(f"vfiod-guest: rc={res.returncode} boot-to-script={boot} script={spent} "
          f"total={res.wall_seconds:.1f}s", file=sys.stderr)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
