"""The words of `vfioctl --help` and of each command's help (and so of vfioctl(1))."""

#: Each vfioctl command that talks to vfiod: (one-line summary, description with examples).
HELP = {
    "groups": ("list every IOMMU group with its devices, viability and state", """\
List every IOMMU group vfiod sees, with its devices and drivers, whether VFIO
can use it now, what blocks it, and whether it is leased.

examples:
  vfioctl groups
  vfioctl groups --json | jq '.groups[] | select(.viable) | .group'
"""),
    "show": ("show one group (by device address or group:N), or the PCI tree", """\
Show the IOMMU group of a device (or group:N) with the reason its devices share it.

With --tree, the PCI tree as `lspci -tv` or `virsh nodedev-list --tree` draw it:
each root bus, the bridges and ports on it and the functions below them, each
with its IOMMU group, driver, PCIe link (speed and width, and the maximum where
the link runs below it: "downgraded") and NUMA node.  With targets, only the
branches that lead to them.

examples:
  vfioctl show 0000:04:00.0
  vfioctl show --tree
  vfioctl show --tree enp4s0 --json
"""),
    "explain": ("explain in plain words why a group is what it is", """\
Ask vfiod why a device's IOMMU group holds what it holds, what keeps it from
VFIO right now, and who holds it.

example:
  vfioctl explain 04:00.0
"""),
    "check": ("would I get this device? (policy, for the calling user)", """\
Ask whether the calling user may lease the device's group, and under which rule.
For pool:NAME, which member a lease would take now, or why each member would be
passed over.  For mdev:PARENT/TYPE: whether the user may lease a new instance of
that type.  Exits 0 when allowed, 3 when denied, 4 when busy now.

examples:
  vfioctl check 0000:04:00.0 --backend vfio
  vfioctl check pool:nics
  vfioctl check mdev:mtty/mtty-2
"""),
    "leases": ("list leases", """\
List the leases vfiod holds (yours; all of them for root and for members of
the policy's admin_groups).

example:
  vfioctl leases --json
"""),
    "lease": ("lease a device's whole group; optionally run a command while holding it", """\
usage: vfioctl lease TARGET [options] [-- CMD ARGS...]

Lease the IOMMU group of a device (or group:N, name:RESOURCE, or pool:NAME: the
pool's first member you may have that nobody holds; vfioctl says which).  vfiod binds
every endpoint of the group to the backend's driver and hands it to you; the
lease ends (and every device goes back to its driver) when you release it,
when it expires, or when vfioctl exits — unless it is --persistent.

With a command after --, vfioctl holds the lease while the command runs, tells
it the group in VFIOD_GROUP and VFIOD_GROUP_PATH (vfio and libvirt backends:
/dev/vfio/N, owned by you, which DPDK and QEMU open by path) and, with the
libvirt backend, the hostdev XML in VFIOD_HOSTDEV_XML, applies the policy's
RLIMIT_MEMLOCK grant, releases the lease when it exits and exits with its
status.  With --pass-fd the command also gets the open group in VFIOD_GROUP_FD;
the kernel lets a group be open only once, so a command given the fd cannot
open /dev/vfio/N again.  Where the kernel has VFIO device cdevs, the command is
also told each device's cdev in VFIOD_DEVICE_CDEVS ("ADDRESS=/dev/vfio/devices/vfioX
...", owned by you) and iommufd in VFIOD_IOMMU_PATH (/dev/iommu, on which you get
an ACL entry); with --pass-fd --iommufd, open fds of them in VFIOD_DEVICE_FDS
("ADDRESS=FD ...") and VFIOD_IOMMU_FD instead of the group fd (the kernel binds
no device of a group to an iommufd while the group is open).

mdev:PARENT/TYPE (as `vfiod inspect` lists them) leases a new mediated device
instance: vfiod creates it (a UUID it chooses), hands over its emulated group
as above, and removes it when the lease ends.  The command is also told the
instance's UUID in VFIOD_MDEV: the device's name for VFIO_GROUP_GET_DEVICE_FD.
An mdev is used through the group and the container (the legacy interface).

examples:
  vfioctl lease 0000:04:00.0 -- dpdk-testpmd -a 0000:04:00.0 -- -i
  vfioctl lease 0000:04:00.0 --pass-fd -- my-vfio-tool
  vfioctl lease 0000:04:00.0 --pass-fd --iommufd -- my-iommufd-tool
  vfioctl lease group:8 --duration 2h --persistent
  vfioctl lease name:gpu --backend libvirt --xml
  vfioctl lease mdev:mtty/mtty-2 --pass-fd -- my-vfio-tool
"""),
    "vfs": ("root: set an SR-IOV PF's number of VFs (refused while it or its VFs are leased)", """\
Set how many VFs an SR-IOV physical function shows (its sriov_numvfs).  The
kernel changes a non-zero count only through 0, which removes every VF, so
vfiod refuses (exit 4, busy) while the PF or any of its VFs is leased.

example:
  vfioctl vfs 0000:01:00.0 4
"""),
    "reload": ("admin: reload the policy; say whether it was taken, with every error", """\
Ask vfiod (as root, or as a member of the policy's admin_groups) to read its policy directory again, as `systemctl reload
vfiod` does, and say whether it took the new policy.  A broken policy is
refused whole: every error of every file is printed (file:line: key: what),
vfiod keeps the policy it had, and vfioctl exits 2.  Others get "permission
denied" (exit 3).  `vfioctl policy check DIR` finds the same errors offline.
The leases the new policy no longer allows are revoked, and listed.  With
--dry-run nothing changes: vfioctl says whether the policy loads and which
leases it would revoke.

exit status:
  0  the new policy is in force (--dry-run: it loads)
  2  it was refused (the errors follow); the old one stays
  3  neither root nor a member of the policy's admin_groups

examples:
  sudo vfioctl reload --dry-run
  sudo vfioctl reload
  sudo vfioctl reload --json
"""),
    "monitor": ("print lease, hotplug and tamper events as they happen", """\
Print vfiod's events as they happen, one line each: leases granted and ended
(with the reason: released, expired, disconnected, removed, tampered, ...),
groups and devices that change (state, driver, viability), and devices and
groups that appear or go (hotplug, SR-IOV VFs).  Each line has the time, the
event, the object and what happened; with --json each event is one JSON
document on its own line (/usr/share/doc/vfiod/docs/json.md, kind "event").

It runs until Ctrl-C or SIGTERM (exit 0); if vfiod or the bus goes away it
says so and exits 1.

examples:
  vfioctl monitor
  vfioctl monitor --json | jq -c 'select(.event == "lease-ended")'
"""),
    "release": ("release a lease (by id, by target, or --all)", """\
Release a lease: every device of its group goes back to the driver it had.
Name the lease by its id, or by a target of its group (an address, group:N or
name:RESOURCE); --all releases every lease you may release (root and the
policy's admin_groups: everyone's).

examples:
  vfioctl release 3f2a9c0d1e4b5a69
  vfioctl release 0000:04:00.0
  vfioctl release --all

A lease whose group is still held open (a process kept a group or device fd)
is not left half-released: vfiod revokes it instead (see `vfioctl revoke`).
"""),
    "revoke": ("admin: take a lease back, whether or not its holders let go", """Revoke a lease (root, or a member
of the policy's admin_groups): vfiod signals LeaseRevoking (vfioctl lease -- CMD
passes it on to CMD as SIGTERM), takes /dev/vfio/N back and begins unbinding
each device, which makes the kernel ask the holders (the device's request
eventfd: QEMU unplugs it from its guest, DPDK runs its removal handling).
Holders that have not let go when the policy's revoke_grace ends are ended
(on_revoke = "kill": SIGTERM, SIGKILL 3 s later; only the lessee's processes
unless revoke_others = true) or waited for (on_revoke = "wait"); then every
device goes back to its driver and the lease ends as "revoked".  vfioctl
waits for that (at most --wait seconds; --wait 0 returns once the revoke has
begun); exit 1 if the lease had not ended by then.  Name the lease by its id or by a target of its group.

examples:
  vfioctl revoke 3f2a9c0d1e4b5a69 --reason "maintenance at 14:00"
  vfioctl revoke 0000:04:00.0
  vfioctl revoke name:gpu --wait 0 --json
"""),
}
