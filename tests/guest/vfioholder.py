"""Guest-side VFIO holders for the revoke tests: processes that open a group the
way VFIO users do (group, container, IOMMU, device fd) and then behave as told.
Runs *inside* the QEMU guest; forked from the test's root process (a python
start costs seconds under TCG, a fork nothing).

Modes:
  ``coop``      registers the device's request eventfd (VFIO_DEVICE_SET_IRQS on
                VFIO_PCI_REQ_IRQ_INDEX), and when the kernel fires it closes every
                fd and lives on (QEMU's and DPDK's way);
  ``stubborn``  holds everything and sleeps (SIGTERM ends it);
  ``deaf``      the same, ignoring SIGTERM (only SIGKILL ends it);
  ``pass``      hands the device fd to a child over SCM_RIGHTS, closes its own
                fds and lives on; the child holds the bare ``[vfio-device]`` fd.
  ``fly-group`` opens only the group, sends the fd to itself over a socketpair
                without receiving it and closes its own: the file is in flight,
                in no process's fd table; SIGUSR1 makes it receive and close it;
  ``fly-device`` the same with the device fd (group and container closed).
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import socket
import struct
import time


def _io(n: int) -> int:
    return (ord(";") << 8) | (100 + n)          # _IO(VFIO_TYPE, VFIO_BASE + n)


CHECK_EXTENSION, SET_IOMMU, GROUP_GET_STATUS = _io(1), _io(2), _io(3)
GROUP_SET_CONTAINER, GROUP_GET_DEVICE_FD, DEVICE_SET_IRQS = _io(4), _io(6), _io(10)
TYPE1, TYPE1V2 = 1, 3
REQ_IRQ_INDEX = 4                                 # VFIO_PCI_REQ_IRQ_INDEX
IRQ_SET_DATA_EVENTFD, IRQ_SET_ACTION_TRIGGER = 1 << 2, 1 << 5


class Holder:
    def __init__(self, pid: int, pipe: int):
        self.pid = pid
        self.pipe = pipe
        self.lines: list[str] = []
        self.status: int | None = None

    def expect(self, word: str, timeout: float = 60.0) -> str:
        """Wait for a line starting with `word` from the holder; return it."""
        deadline = time.monotonic() + timeout
        buf = b""
        while True:
            for line in self.lines:
                if line.startswith(word):
                    return line
                if line.startswith("error"):
                    raise RuntimeError(f"holder {self.pid}: {line}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"holder {self.pid} did not say {word!r} (said {self.lines})")
            ready, _, _ = select.select([self.pipe], [], [], left)
            if ready:
                chunk = os.read(self.pipe, 4096)
                if not chunk:
                    raise RuntimeError(f"holder {self.pid} went away (said {self.lines})")
                buf += chunk
                *done, rest = buf.split(b"\n")
                buf = rest
                self.lines.extend(x.decode() for x in done)

    def poll(self) -> int | None:
        """None while it runs; else how it ended (negative: the signal)."""
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return self.status

    def wait(self, timeout: float = 30.0) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.status

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.wait()


def _forked(uid: int, body) -> Holder:
    """A child process of `uid` (0: stays root) running ``body(say)``, then sleeping;
    what it says comes back line by line (`Holder.expect`), an exception as ``error``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        return Holder(pid, r)
    os.close(r)

    def say(text: str) -> None:
        os.write(w, (text + "\n").encode())
    try:
        if uid:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        body(say)
        while True:
            time.sleep(1)
    except BaseException as e:
        say(f"error {e!r}")
    finally:
        os._exit(0)


def hold(group: int, device: str, mode: str, uid: int = 1000) -> Holder:
    return _forked(uid, lambda say: _legacy(group, device, mode, say))


def _legacy(group: int, device: str, mode: str, say) -> None:
    g = os.open(f"/dev/vfio/{group}", os.O_RDWR)
    if mode == "fly-group":
        _fly(g, say, device)
    c = os.open("/dev/vfio/vfio", os.O_RDWR)
    fcntl.ioctl(g, GROUP_SET_CONTAINER, struct.pack("i", c))
    fcntl.ioctl(c, SET_IOMMU, TYPE1V2)
    d = fcntl.ioctl(g, GROUP_GET_DEVICE_FD, bytearray(device.encode() + b"\0"))
    if mode == "fly-device":
        os.close(g)
        os.close(c)
        _fly(d, say)
    if mode == "deaf":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "coop":
        efd = os.eventfd(0)
        fcntl.ioctl(d, DEVICE_SET_IRQS, struct.pack("IIIIIi", 24, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                                                    REQ_IRQ_INDEX, 0, 1, efd))
        say("ready")
        os.eventfd_read(efd)
        say("request")
        for fd in (d, g, c):
            os.close(fd)
        say("closed")
    elif mode == "pass":
        a, b = socket.socketpair()
        child = os.fork()
        if child == 0:
            a.close()
            for fd in (d, g, c):
                os.close(fd)
            socket.recv_fds(b, 1, 1)
            say(f"child {os.getpid()}")
            while True:
                time.sleep(1)
        socket.send_fds(a, [b"x"], [d])
        for fd in (d, g, c):
            os.close(fd)
        say("ready")
    else:
        say("ready")


# The iommufd interface (kernels with CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV):
# include/uapi/linux/vfio.h and iommufd.h.
DEVICE_GET_INFO, DEVICE_GET_REGION_INFO = _io(7), _io(8)
DEVICE_BIND_IOMMUFD, DEVICE_ATTACH_IOMMUFD_PT = _io(18), _io(19)
IOMMU_IOAS_ALLOC, IOMMU_IOAS_MAP = (ord(";") << 8) | 0x81, (ord(";") << 8) | 0x85
MAP_FIXED_IOVA, MAP_WRITEABLE, MAP_READABLE = 1, 2, 4
PCI_CONFIG_REGION_INDEX = 7                       # VFIO_PCI_CONFIG_REGION_INDEX


def iommufd_handshake(cdev: str, iommu: str = "/dev/iommu", cdev_fd: int | None = None,
                      iommu_fd: int | None = None) -> tuple[dict, list[int]]:
    """The whole iommufd handshake on a device cdev: bind it to an iommufd, allocate an
    IO address space, attach the device to it, map a buffer there, and read the device's
    info and its PCI vendor:device through the config region.  Returns what it found
    (with the milliseconds each step took) and the fds it holds."""
    import ctypes
    import mmap
    t0 = time.monotonic()
    ms = {}

    def lap(name: str) -> None:
        ms[name] = round((time.monotonic() - t0) * 1000, 1)
    ifd = os.open(iommu, os.O_RDWR) if iommu_fd is None else iommu_fd
    dfd = os.open(cdev, os.O_RDWR) if cdev_fd is None else cdev_fd
    lap("open")
    bind = bytearray(struct.pack("IIiI", 16, 0, ifd, 0))
    fcntl.ioctl(dfd, DEVICE_BIND_IOMMUFD, bind, True)
    devid = struct.unpack_from("I", bind, 12)[0]
    lap("bind")
    alloc = bytearray(struct.pack("III", 12, 0, 0))
    fcntl.ioctl(ifd, IOMMU_IOAS_ALLOC, alloc, True)
    ioas = struct.unpack_from("I", alloc, 8)[0]
    lap("ioas_alloc")
    fcntl.ioctl(dfd, DEVICE_ATTACH_IOMMUFD_PT, bytearray(struct.pack("III", 12, 0, ioas)), True)
    lap("attach")
    buf = mmap.mmap(-1, 1 << 16)
    va = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    iova = 1 << 32
    fcntl.ioctl(ifd, IOMMU_IOAS_MAP, bytearray(struct.pack(
        "IIIIQQQ", 40, MAP_FIXED_IOVA | MAP_WRITEABLE | MAP_READABLE, ioas, 0, va, len(buf), iova)), True)
    lap("map")
    found = {"devid": devid, "ioas": ioas, "iova": iova, **device_info(dfd), "ms": ms}
    lap("info")
    _KEEP.append(buf)
    return found, [dfd, ifd]


def device_info(dfd: int) -> dict:
    """VFIO_DEVICE_GET_INFO of a device fd, and its PCI vendor:device read through its
    config region (VFIO_DEVICE_GET_REGION_INFO, then a read at the region's offset)."""
    info = bytearray(struct.pack("IIIIII", 24, 0, 0, 0, 0, 0))
    fcntl.ioctl(dfd, DEVICE_GET_INFO, info, True)
    flags, regions, irqs = struct.unpack_from("III", info, 4)
    region = bytearray(struct.pack("IIIIQQ", 32, 0, PCI_CONFIG_REGION_INDEX, 0, 0, 0))
    fcntl.ioctl(dfd, DEVICE_GET_REGION_INFO, region, True)
    size, offset = struct.unpack_from("QQ", region, 16)
    vendor, device = struct.unpack("<HH", os.pread(dfd, 4, offset))
    return {"flags": flags, "regions": regions, "irqs": irqs, "config_size": size,
            "ids": f"{vendor:04x}:{device:04x}"}


def legacy_handshake(group_path: str, device: str) -> tuple[dict, list[int]]:
    """The legacy handshake by path, as QEMU and DPDK do it for a group of any kind (an
    mdev's emulated one too): open the group and the container, VFIO_GROUP_SET_CONTAINER,
    VFIO_SET_IOMMU (type1v2, else type1), VFIO_GROUP_GET_DEVICE_FD by the device's name
    (a PCI address, or an mdev's UUID), then `device_info`.  Returns what it found (with
    the milliseconds each step took, and the IOMMU type the kernel took) and its fds."""
    t0 = time.monotonic()
    ms = {}

    def lap(name: str) -> None:
        ms[name] = round((time.monotonic() - t0) * 1000, 1)
    g = os.open(group_path, os.O_RDWR)
    c = os.open("/dev/vfio/vfio", os.O_RDWR)
    lap("open")
    status = bytearray(struct.pack("II", 8, 0))
    fcntl.ioctl(g, GROUP_GET_STATUS, status, True)
    fcntl.ioctl(g, GROUP_SET_CONTAINER, struct.pack("i", c))
    lap("set_container")
    types = {TYPE1V2: "type1v2", TYPE1: "type1"}
    kinds = [t for t in types if fcntl.ioctl(c, CHECK_EXTENSION, t)]
    refused = {}
    for t in kinds:
        try:
            fcntl.ioctl(c, SET_IOMMU, t)
            break
        except OSError as e:
            refused[types[t]] = e.errno
    else:
        raise OSError(f"no IOMMU type taken (offered {kinds}, refused {refused})")
    lap("set_iommu")
    d = fcntl.ioctl(g, GROUP_GET_DEVICE_FD, bytearray(device.encode() + b"\0"))
    lap("device_fd")
    found = {"viable": bool(struct.unpack_from("I", status, 4)[0] & 1), "iommu_type": types[t],
             "refused": refused, **device_info(d)}
    lap("info")
    return {**found, "ms": ms}, [d, g, c]


_KEEP: list[object] = []        # the mapped buffers stay as long as the process


def hold_cdev(cdev: str, mode: str, uid: int = 1000) -> Holder:
    """A process of `uid` doing the iommufd handshake on `cdev`, then ``stubborn``
    (holds and sleeps) or ``coop`` (closes its fds when the kernel fires the device's
    request eventfd).  Says ``ready JSON`` (what `iommufd_handshake` found)."""
    import json

    def body(say) -> None:
        found, fds = iommufd_handshake(cdev)
        if mode == "coop":
            efd = os.eventfd(0)
            fcntl.ioctl(fds[0], DEVICE_SET_IRQS, struct.pack("IIIIIi", 24, IRQ_SET_DATA_EVENTFD
                                                             | IRQ_SET_ACTION_TRIGGER, REQ_IRQ_INDEX, 0, 1, efd))
            say("ready " + json.dumps(found))
            os.eventfd_read(efd)
            for fd in fds:
                os.close(fd)
            say("closed")
        else:
            say("ready " + json.dumps(found))
    return _forked(uid, body)


def _fly(fd: int, say, device: str | None = None) -> None:
    """Send `fd` over a socketpair to this process without receiving it, close our copy, and
    wait; on SIGUSR1 receive it (a group fd: try to get `device` through it, as a stale fd
    would reach a later lessee's device), close it and say so (then sleep on)."""
    a, b = socket.socketpair()
    socket.send_fds(a, [b"x"], [fd])
    os.close(fd)
    got = []
    signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
    say("ready")
    while not got:
        time.sleep(0.05)
    _, fds, _, _ = socket.recv_fds(b, 1, 1)
    reached = "-"
    if device is not None:
        try:
            os.close(fcntl.ioctl(fds[0], GROUP_GET_DEVICE_FD, bytearray(device.encode() + b"\0")))
            reached = "reached"
        except OSError as e:
            reached = f"refused:{e.errno}"
    for f in fds:
        os.close(f)
    say(f"landed {reached}")
    while True:
        time.sleep(1)


def device_fd_holders() -> list[int]:
    """Every process holding an ``anon_inode:[vfio-device]`` fd."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[vfio-device]":
                    out.append(int(pid))
                    break
        except OSError:
            continue
    return out


def gone(pid: int) -> bool:
    """Ended (or a zombie nobody reaped yet: it holds nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
