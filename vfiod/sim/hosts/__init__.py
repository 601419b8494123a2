"""Built-in simulated hosts: tables of PCI functions laid out as the kernel would.

`EXAMPLES` maps a name to a `HostSpec`; `build(name, root)` lays it out.  The
group numbers in the tables are the ones the kernel gives such hardware, so
the isolation engine's recomputation can be checked against them.
"""

from __future__ import annotations

import functools
import os
import tempfile

import attrs

from ...address import PciAddress
from ...sysfs import Roots
from .builder import Fn, HostSpec, build as build_spec

__all__ = ["BRIDGE", "DEFAULT", "EXAMPLES", "GPU", "ICH10", "SRIOV", "SWITCH", "Fn", "HostSpec",
           "SERVER_DEFAULT", "SERVER_MAX", "SERVER_MIN", "build", "build_spec", "build_temporary", "server",
           "spec", "sriov_farm", "topology_arg"]

ICH10 = HostSpec.from_table("ich10", "Intel ICH10 desktop (the RHEL guide's example): "
                            "two NICs behind the ICH10 root ports share group 8", """
# addr   parent   ids        class   kind       driver         group  flags
00:00.0  -        8086:2e10  060000  hostbridge -              0
00:01.0  -        8086:2e11  060400  rootport   pcieport       1
01:00.0  00:01.0  10de:1b80  030000  endpoint   nouveau        1      mf boot_vga subsys=10de:119e
01:00.1  00:01.0  10de:10f0  040300  endpoint   snd_hda_intel  1      mf subsys=10de:119e
00:19.0  -        8086:10bd  020000  rciep      e1000e         2      net=eno1
00:1a.0  -        8086:3a37  0c0300  pci        uhci_hcd       3      mf
00:1a.7  -        8086:3a3c  0c0320  pci        ehci-pci       3      mf
00:1b.0  -        8086:3a3e  040300  rciep      snd_hda_intel  4
00:1d.0  -        8086:3a34  0c0300  pci        uhci_hcd       5      mf
00:1d.7  -        8086:3a3a  0c0320  pci        ehci-pci       5      mf
00:1e.0  -        8086:244e  060401  pci-bridge -              6
00:1f.0  -        8086:3a18  060100  pci        lpc_ich        7      mf
00:1f.2  -        8086:3a22  010601  pci        ahci           7      mf
00:1f.3  -        8086:3a30  0c0500  pci        i801_smbus     7      mf
00:1c.0  -        8086:3a40  060400  rootport   pcieport       8      mf
00:1c.4  -        8086:3a48  060400  rootport   pcieport       8      mf
04:00.0  00:1c.0  8086:10d3  020000  endpoint   e1000e         8      net=enp4s0 subsys=8086:a01f
05:00.0  00:1c.4  14e4:167b  020000  endpoint   tg3            8      net=enp5s0 subsys=14e4:167b
""", root_disk=PciAddress.parse("00:1f.2"), route_iface="eno1")

BRIDGE = HostSpec.from_table("bridge", "A PCIe-to-PCI bridge with two conventional e1000 NICs: "
                             "the requester IDs alias, so the bridge and both NICs are one group", """
# addr   parent   ids        class   kind       driver     group  flags
00:00.0  -        8086:29c0  060000  hostbridge -          0
00:1c.0  -        8086:2940  060400  rootport   pcieport   1      acs
01:00.0  00:1c.0  12d8:e111  060400  pcie-pci   -          2
02:01.0  01:00.0  8086:100e  020000  pci        e1000      2      net=ens1 subsys=8086:001e
02:02.0  01:00.0  8086:100e  020000  pci        e1000      2      net=ens2 subsys=8086:001e
00:1f.0  -        8086:2918  060100  pci        lpc_ich    3      mf
00:1f.2  -        8086:2922  010601  pci        ahci       3      mf
00:1f.3  -        8086:2930  0c0500  pci        i801_smbus 3      mf
00:02.0  -        1af4:1041  020000  rciep      virtio-pci 4      net=enp0s2
""", root_disk=PciAddress.parse("00:1f.2"), route_iface="enp0s2")

GPU = HostSpec.from_table("gpu", "A discrete GPU and its HDMI audio function: two functions of "
                          "one device without ACS share a group", """
# addr   parent   ids        class   kind       driver         group  flags
00:00.0  -        8086:3e30  060000  hostbridge -              0
00:01.0  -        8086:1901  060400  rootport   pcieport       1      acs link=8x16
01:00.0  00:01.0  10de:1b80  030000  endpoint   nouveau        2      mf subsys=1458:3702 link=2.5x16 maxlink=8x16
01:00.1  00:01.0  10de:10f0  040300  endpoint   snd_hda_intel  2      mf subsys=1458:3702 link=2.5x16 maxlink=8x16
00:02.0  -        8086:3e92  030000  rciep      i915           3      boot_vga
00:17.0  -        8086:a352  010601  rciep      ahci           4
00:1f.6  -        8086:15bc  020000  rciep      e1000e         5      net=eno1
""", root_disk=PciAddress.parse("00:17.0"),
    route_iface="eno1")

_SRIOV_VFS = "\n".join(
    f"01:{0x10 + i // 2:02x}.{(i % 2) * 4:x}  00:01.0  8086:1520  020000  endpoint  igbvf  {3 + i}  vf-of=01:00.0 numa=0"
    for i in range(4)
)
SRIOV = HostSpec.from_table("sriov", "An SR-IOV NIC (Intel I350) with four VFs, each VF its own group", f"""
# addr   parent   ids        class   kind       driver     group  flags
00:00.0  -        8086:3e30  060000  hostbridge -          0
00:01.0  -        8086:1901  060400  rootport   pcieport   1      acs numa=0 link=5x4 maxlink=8x16
01:00.0  00:01.0  8086:1521  020000  endpoint   igb        2      sriov=7:1520 net=enp1s0f0 subsys=8086:0001 numa=0 link=5x4
{_SRIOV_VFS}
00:17.0  -        8086:a352  010601  rciep      ahci       7      numa=0
00:1f.6  -        8086:15bc  020000  rciep      e1000e     8      net=eno1 numa=0
""", root_disk=PciAddress.parse("00:17.0"), route_iface="eno1")

SWITCH = HostSpec.from_table("switch", "A PCIe switch: an NVMe drive below a downstream port with ACS "
                             "(alone) and a NIC below one without ACS (grouped with its port)", """
# addr   parent   ids        class   kind       driver     group  flags
00:00.0  -        8086:3e30  060000  hostbridge -          0
00:01.0  -        8086:1901  060400  rootport   pcieport   1      acs link=8x16
01:00.0  00:01.0  10b5:8747  060400  upstream   pcieport   2      link=8x16
02:08.0  01:00.0  10b5:8747  060400  downstream pcieport   3      acs link=8x4
02:10.0  01:00.0  10b5:8747  060400  downstream pcieport   4      acs-off link=2.5x1 maxlink=8x4
03:00.0  02:08.0  144d:a808  010802  endpoint   nvme       5      subsys=144d:a801 link=8x4
04:00.0  02:10.0  8086:10d3  020000  endpoint   e1000e     4      net=enp4s0
00:17.0  -        8086:a352  010601  rciep      ahci       6
00:1f.6  -        8086:15bc  020000  rciep      e1000e     7      net=eno1
""", root_disk=PciAddress.parse("00:17.0"), route_iface="eno1")

EXAMPLES: dict[str, HostSpec] = {h.name: h for h in (ICH10, BRIDGE, GPU, SRIOV, SWITCH)}
DEFAULT = "ich10"


def sriov_farm(root_ports: int = 16, vfs: int = 254) -> HostSpec:
    """The benchmark host: `root_ports` root ports, each with one PF and `vfs` VFs."""
    fns = []
    group = 0
    for rp in range(root_ports):
        port = PciAddress(0, 0, 1 + rp // 8, rp % 8)
        bus = 1 + rp
        fns.append(Fn.from_line(f"{port} - 8086:1901 060400 rootport pcieport {group} acs mf"))
        group += 1
        pf = PciAddress(0, bus, 0, 0)
        fns.append(Fn.from_line(f"{pf} {port} 8086:1521 020000 endpoint igb {group} sriov={vfs}:1520"))
        group += 1
        for i in range(1, vfs + 1):
            vf = PciAddress(0, bus, i // 8, i % 8)
            fns.append(Fn.from_line(f"{vf} {port} 8086:1520 020000 endpoint vfio-pci {group} vf-of={pf}"))
            group += 1
    return HostSpec(name="farm", description=f"{root_ports} root ports x (1 PF + {vfs} VFs)",
                    functions=tuple(fns))


SERVER_DEFAULT = 256
SERVER_MIN = 10
SERVER_MAX = 65_536


@functools.lru_cache(maxsize=4)
def server(functions: int = SERVER_DEFAULT) -> HostSpec:
    """A two-socket server of about `functions` PCI functions, laid out as the kernel does.

    Each socket is its own PCI domain (``0000`` and ``0001``) with a host bridge
    and root ports with ACS; below each root port one SR-IOV PF (an E810-like NIC
    on ``ice``) and its VFs (on ``iavf``), each function its own IOMMU group.  The
    first domain also holds the boot disk (NVMe, the root filesystem), the NIC of
    the default route and the BMC's VGA.  Domain N is NUMA node N; the PFs' links are
    16 GT/s x16, the boot NIC's 2.5 GT/s x1.  The VFs are spread over the root ports
    so the total is exactly `functions` (at least 10)."""
    if not SERVER_MIN <= functions <= SERVER_MAX:
        raise ValueError(f"a server host has {SERVER_MIN} to {SERVER_MAX} functions, not {functions}")
    lines = [
        "0000:00:00.0 - 8086:09a2 060000 hostbridge - 0 numa=0",
        "0001:00:00.0 - 8086:09a2 060000 hostbridge - 1 numa=1",
        "0000:00:1f.0 - 8086:1bca 060100 rciep - 2 numa=0",
        "0000:00:1f.4 - 8086:1bc9 0c0500 rciep i801_smbus 3 numa=0",
        "0000:00:02.0 - 8086:347a 060400 rootport pcieport 4 acs numa=0 link=16x4",
        "0000:01:00.0 0000:00:02.0 144d:a80a 010802 endpoint nvme 5 subsys=144d:a801 numa=0 link=16x4",
        "0000:00:03.0 - 8086:347b 060400 rootport pcieport 6 acs numa=0 link=2.5x1 maxlink=16x4",
        "0000:02:00.0 0000:00:03.0 8086:1533 020000 endpoint igb 7 net=eno1 subsys=15d9:1533 numa=0 link=2.5x1",
    ]
    group = 8
    budget = functions - len(lines)
    # Each root port brings itself and a PF; VFs fill the rest, up to 255 per PF.
    ports = max(1, -(-budget // 257))
    vfs_total = budget - 2 * ports
    for p in range(ports):
        domain, index = p % 2, p // 2
        port = PciAddress(domain, 0, 4 + index // 8, index % 8)
        bus = 0x10 + index
        pf = PciAddress(domain, bus, 0, 0)
        nvfs = vfs_total // ports + (1 if p < vfs_total % ports else 0)
        lines.append(f"{port} - 8086:347a 060400 rootport pcieport {group} acs mf numa={domain} link=16x16")
        lines.append(f"{pf} {port} 8086:159b 020000 endpoint ice {group + 1} sriov=256:1889 "
                     f"net=ens{p}f0 subsys=8086:0001 numa={domain} link=16x16")
        group += 2
        for i in range(1, nvfs + 1):
            vf = PciAddress(domain, bus, i // 8, i % 8)
            lines.append(f"{vf} {port} 8086:1889 020000 endpoint iavf {group} vf-of={pf} numa={domain}")
            group += 1
    fns = tuple(Fn.from_line(line) for line in lines)
    return HostSpec(name=f"server:{functions}",
                    description=f"a two-socket server: {len(fns)} PCI functions, {ports} SR-IOV NICs "
                                f"with {vfs_total} VFs over two PCI domains",
                    functions=fns, root_disk=PciAddress.parse("0000:01:00.0"), route_iface="eno1")


#: What ``HOST+VARIANT`` changes: the root filesystem, a USB disk, or no IOMMU (see `HostSpec`).
VARIANTS = ("btrfs", "zfs", "overlay", "usb", "noiommu")


def spec(name: str) -> HostSpec:
    """The simulated host called `name`: a built-in example, or ``server[:N]``; each may be
    followed by ``+btrfs``, ``+zfs`` or ``+overlay`` (the root disk's filesystem) and
    ``+usb`` (a disk on its first USB controller, its partition mounted) and ``+noiommu`` (the
    IOMMU off: the same devices, no IOMMU groups, no ``intel_iommu=on``)."""
    if "+" in name:
        base, *extras = name.split("+")
        s = spec(base)
        for extra in extras:
            if extra == "usb":
                usb = sorted(fn.addr for fn in s.functions if fn.class_code >> 8 == 0x0C03)
                if not usb:
                    raise ValueError(f"simulated host {base!r} has no USB controller for +usb")
                s = attrs.evolve(s, usb_disk=usb[0])
            elif extra == "noiommu":
                s = attrs.evolve(s, iommu=False, cmdline=s.cmdline.replace(" intel_iommu=on", ""))
            elif extra in VARIANTS and s.root_disk is not None:
                s = attrs.evolve(s, root_fs=extra)
            else:
                raise ValueError(f"unknown variant +{extra} of simulated host {base!r} "
                                 f"(known: {', '.join('+' + v for v in VARIANTS)}; a root filesystem needs a root disk)")
        return attrs.evolve(s, name=name)
    if name in EXAMPLES:
        return EXAMPLES[name]
    kind, _, size = name.partition(":")
    if kind == "server":
        try:
            return server(int(size) if size else SERVER_DEFAULT)
        except ValueError as e:
            raise ValueError(str(e) if size.isdigit() else f"server:N wants a number of functions, "
                             f"not {size!r}") from None
    raise ValueError(f"unknown simulated host {name!r} (known: {', '.join(sorted(EXAMPLES))}, "
                     f"server[:N])")


def topology_arg(name: str) -> str:
    """argparse type for --simulate: the name, checked."""
    import argparse

    try:
        spec(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


def build(name: str, root: str) -> Roots:
    """Lay out the named simulated host below `root`; returns its `Roots`."""
    return build_spec(spec(name), root)


def build_temporary(name: str) -> tuple[tempfile.TemporaryDirectory[str], Roots]:
    """Lay out the named host in a new temporary directory; returns (TemporaryDirectory, Roots)."""
    tmp = tempfile.TemporaryDirectory(prefix=f"vfiod-sim-{name}-")
    return tmp, build(name, os.path.join(tmp.name, "host"))
