"""The VFIO handshake a container's program does with what its CDI spec gave it: every
/dev/vfio/N in its /dev, the container, type1v2, a DMA map, a device fd per endpoint
named in PCI_RESOURCE_*; prints each step, and its RLIMIT_MEMLOCK."""

import ctypes
import fcntl
import mmap
import os
import resource
import struct


def _io(n):
    return (ord(";") << 8) | (100 + n)          # _IO(VFIO_TYPE, VFIO_BASE + n)


GET_API_VERSION, CHECK_EXTENSION, SET_IOMMU, GROUP_GET_STATUS = _io(0), _io(1), _io(2), _io(3)
GROUP_SET_CONTAINER, GROUP_GET_DEVICE_FD, DEVICE_GET_INFO, IOMMU_MAP_DMA = _io(4), _io(6), _io(7), _io(13)
TYPE1V2 = 3

print("uid", os.getuid(), "memlock", resource.getrlimit(resource.RLIMIT_MEMLOCK)[0])
print("nodes", sorted(os.listdir("/dev/vfio")))
container = os.open("/dev/vfio/vfio", os.O_RDWR)
print("api", fcntl.ioctl(container, GET_API_VERSION), "type1v2", fcntl.ioctl(container, CHECK_EXTENSION, TYPE1V2))
groups = [os.open(f"/dev/vfio/{n}", os.O_RDWR) for n in sorted(os.listdir("/dev/vfio")) if n != "vfio"]
for g in groups:
    _, flags = struct.unpack("II", fcntl.ioctl(g, GROUP_GET_STATUS, struct.pack("II", 8, 0)))
    print("viable", flags & 1)
    fcntl.ioctl(g, GROUP_SET_CONTAINER, struct.pack("i", container))
fcntl.ioctl(container, SET_IOMMU, TYPE1V2)
buf = mmap.mmap(-1, 1 << 20)
vaddr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
fcntl.ioctl(container, IOMMU_MAP_DMA, bytearray(struct.pack("IIQQQ", 32, 3, vaddr, 0x100000, 1 << 20)))
print("mapped", 1 << 20)
addresses = [a for k, v in sorted(os.environ.items()) if k.startswith("PCI_RESOURCE_") for a in v.split(",")]
for addr in addresses:
    for g in groups:
        try:
            fd = fcntl.ioctl(g, GROUP_GET_DEVICE_FD, bytearray(addr.encode() + b"\0"))
        except OSError:
            continue
        info = struct.unpack("IIII", fcntl.ioctl(fd, DEVICE_GET_INFO, struct.pack("IIII", 16, 0, 0, 0)))
        print("device", addr, "regions", info[2], "irqs", info[3])
