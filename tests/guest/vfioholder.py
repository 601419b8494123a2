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


SET_IOMMU, GROUP_SET_CONTAINER, GROUP_GET_DEVICE_FD, DEVICE_SET_IRQS = _io(2), _io(4), _io(6), _io(10)
TYPE1V2 = 3
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


def hold(group: int, device: str, mode: str, uid: int = 1000) -> Holder:
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
        while True:
            time.sleep(1)
    except BaseException as e:
        say(f"error {e!r}")
    finally:
        os._exit(0)


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
