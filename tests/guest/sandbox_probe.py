"""What a compromised vfiod could do from inside vfiod.service's sandbox, tried for real.

``sandbox_probe.py victim``: run as an unprivileged user; holds a buffer, prints
``PID ADDRESS LENGTH`` and, on SIGUSR1, the buffer's content, then exits.

``sandbox_probe.py probe PID ADDRESS LENGTH``: run by systemd as an ``ExecStartPost=``
of vfiod.service (a drop-in that adds only that line, so it runs with the unit's own
capabilities, system call filter, mount namespace and NoNewPrivileges); tries to
reach into the victim (``process_vm_writev``/``readv``, ``kcmp``, ``/proc/PID/mem``
both as the unit sees ``/proc`` and, opened only, through ``/proc/1/root``), to write kernel
tunables in ``/proc/sys`` and ``/sys``, and opens for writing the sysfs files
rebinding needs (nothing is written to those).  Prints one line,
``vfiod-sandbox-probe: JSON``: each attempt's outcome, ``"ok"`` or the errno's name.
"""

import ctypes
import errno
import json
import os
import signal
import sys

MARK = b"written by the sandbox probe"


def victim() -> None:
    buf = ctypes.create_string_buffer(b"untouched".ljust(len(MARK), b"."), len(MARK))
    print(os.getpid(), ctypes.addressof(buf), len(MARK), flush=True)
    signal.sigwait({signal.SIGUSR1})
    print("buffer", buf.raw.decode(errors="replace"), flush=True)


class Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _errname(e: int) -> str:
    return errno.errorcode.get(e, str(e))


def _vm(libc: ctypes.CDLL, name: str, pid: int, addr: int, length: int) -> str:
    local = ctypes.create_string_buffer(MARK, length)
    liov = Iovec(ctypes.cast(local, ctypes.c_void_p), length)
    riov = Iovec(addr, length)
    fn = getattr(libc, name)
    fn.restype = ctypes.c_ssize_t
    n = fn(pid, ctypes.byref(liov), 1, ctypes.byref(riov), 1, 0)
    return "ok" if n >= 0 else _errname(ctypes.get_errno())


def _open_write(path: str, data: bytes | None = None, offset: int | None = None) -> str:
    """Open `path` for writing; write `data` (at `offset`) only if asked."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        return _errname(e.errno)
    try:
        if data is not None:
            try:
                if offset is None:
                    os.write(fd, data)
                else:
                    os.pwrite(fd, data, offset)
            except OSError as e:
                return "opened, write " + _errname(e.errno)
        return "ok"
    finally:
        os.close(fd)


def _same(path: str) -> bytes:
    """The file's current content: writing it back changes nothing."""
    with open(path, "rb") as f:
        return f.read()


def probe(pid: int, addr: int, length: int, device: str) -> dict[str, str]:
    libc = ctypes.CDLL(None, use_errno=True)
    out: dict[str, str] = {}
    out["process_vm_writev"] = _vm(libc, "process_vm_writev", pid, addr, length)
    out["process_vm_readv"] = _vm(libc, "process_vm_readv", pid, addr, length)
    libc.syscall.restype = ctypes.c_long
    KCMP_FILE = 0
    r = libc.syscall(312, os.getpid(), pid, KCMP_FILE, 0, 0)       # kcmp, x86_64
    out["kcmp"] = "ok" if r >= 0 else _errname(ctypes.get_errno())
    out["proc_pid_mem"] = _open_write(f"/proc/{pid}/mem", MARK, addr)
    # (opened only: the victim's buffer then says whether any other way wrote it)
    out["proc_1_root_proc_pid_mem"] = _open_write(f"/proc/1/root/proc/{pid}/mem")
    tunable = "/proc/sys/kernel/printk_ratelimit"
    out["proc_sys"] = _open_write(tunable, _same(tunable))
    out["proc_1_root_proc_sys"] = _open_write("/proc/1/root" + tunable)
    out["sys_kernel"] = _open_write("/sys/kernel/mm/transparent_hugepage/enabled")
    out["sys_devices_system"] = _open_write("/sys/devices/system/cpu/cpu0/uevent")
    out["sys_bus_pci_rescan"] = _open_write("/sys/bus/pci/rescan")
    out["proc_1_root_sys_bus_pci_rescan"] = _open_write("/proc/1/root/sys/bus/pci/rescan")
    dev = f"/sys/bus/pci/devices/{device}"
    driver = os.path.basename(os.readlink(f"{dev}/driver"))
    for name, path in (("driver_override", f"{dev}/driver_override"), ("reset", f"{dev}/reset"),
                       ("unbind", f"/sys/bus/pci/drivers/{driver}/unbind"),
                       ("drivers_probe", "/sys/bus/pci/drivers_probe")):
        out[name] = _open_write(path)
    return out


if __name__ == "__main__":
    if sys.argv[1] == "victim":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        victim()
    else:
        pid, addr, length = map(int, sys.argv[2:5])
        print("vfiod-sandbox-probe: " + json.dumps(probe(pid, addr, length, sys.argv[5]), sort_keys=True),
              flush=True)
