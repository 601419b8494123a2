"""Guest-side helpers: runs *inside* the QEMU guest, imported by the scripts
that guest tests hand to ``Guest.run`` (the project's checkout is on the guest's
``sys.path``).  One private system-type bus with vfiod's own bus policy, vfiod as
root on the guest's real sysfs, and clients run as unprivileged uids.

Nothing here is imported on the host side.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from typing import Callable

CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def driver(addr: str) -> str | None:
    link = f"/sys/bus/pci/devices/{addr}/driver"
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def group_of(addr: str) -> int:
    return int(os.path.basename(os.readlink(f"/sys/bus/pci/devices/{addr}/iommu_group")))


def node(group: int):
    """``[uid, mode]`` of /dev/vfio/GROUP, or None when the node does not exist."""
    path = f"/dev/vfio/{group}"
    if not os.path.exists(path):
        return None
    st = os.stat(path)
    return [st.st_uid, oct(st.st_mode & 0o777)]


def managed_objects(address: str = "system") -> dict:
    """vfiod's whole object tree over the bus: path -> interface -> properties."""
    import asyncio
    from vfiod.client import Client

    async def view():
        c = await Client(address, timeout=30).connect()
        try:
            return await c.managed_objects()
        finally:
            c.close()
    return asyncio.run(view())


def device_path(addr: str) -> str:
    return "/org/vfiod1/device/" + addr.replace(":", "_").replace(".", "_")


def ensure_user(uid: int, name: str) -> str:
    """A passwd entry for `uid` (dbus-daemon refuses a uid without one).  The
    guest's root is an overlay over this machine's, so this changes the guest only."""
    import pwd
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        pass
    with open("/etc/passwd", "a") as f:
        f.write(f"{name}:x:{uid}:{uid}::/tmp:/usr/sbin/nologin\n")
    with open("/etc/group", "a") as f:
        f.write(f"{name}:x:{uid}:\n")
    return name


def user_env(uid: int) -> dict:
    """A login-like environment: its own XDG_RUNTIME_DIR (DPDK keeps its runtime files there)."""
    run = f"/run/user/{uid}"
    os.makedirs(run, mode=0o700, exist_ok=True)
    os.chown(run, uid, uid)
    return {"PATH": os.environ["PATH"], "HOME": "/tmp", "LANG": "C.UTF-8", "XDG_RUNTIME_DIR": run}


def as_user(uid: int, cmd, timeout=300, **kw) -> subprocess.CompletedProcess:
    """Run `cmd` as `uid` (its own gid, no supplementary groups), output captured."""
    if "input" not in kw:
        kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(cmd, user=uid, group=uid, extra_groups=[], env=user_env(uid), cwd="/tmp",
                          capture_output=True, text=True, timeout=timeout, **kw)


def converse(cmd, ask: str, until: str, finish: str, *, give_up=(), timeout=300, every=1.0, **kw) -> dict:
    """Run an interactive `cmd`, writing `ask` every `every` seconds until `until`
    (or one of `give_up`) shows in its output, or `timeout`; then `finish`.
    Returns its status and output."""
    import threading
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, **kw)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(p.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while (p.poll() is None and time.monotonic() < deadline
               and not any(w in "".join(out) for w in (until, *give_up))):
            p.stdin.write(ask)
            p.stdin.flush()
            time.sleep(every)
        if p.poll() is None:
            p.stdin.write(finish)
            p.stdin.close()
        rc = p.wait(max(1.0, deadline - time.monotonic()))
    except (BrokenPipeError, subprocess.TimeoutExpired):
        p.kill()
        rc = p.wait()
    reader.join(10)
    return {"rc": rc, "stdout": "".join(out), "stderr": ""}


def until(pred, timeout: float = 60) -> bool:
    """Poll `pred` every 0.1 s until it holds or `timeout` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.1)
    return pred()


def record(p: subprocess.CompletedProcess) -> dict:
    return {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}


def open_errno(uid: int, path: str) -> int:
    """0 if `uid` (with no supplementary groups) can open `path` read-write, else the errno."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.close(os.open(path, os.O_RDWR))
        except OSError as e:
            code = e.errno or 1
        os._exit(code)
    return os.waitpid(pid, 0)[1] >> 8


def findings(name: str) -> tuple[dict, Callable[[], None]]:
    """What a guest script found (``errors``, ``complete``, the kernel's release), and a
    function that saves it as $OUT/`name` (the host reads it: `Guest.run_story`)."""
    res: dict = {"errors": [], "complete": False, "uname": os.uname().release}

    def save() -> None:
        with open(os.path.join(os.environ["OUT"], name), "w") as f:
            json.dump(res, f)
    return res, save


def finish(res: dict, save, stack: "Stack", keep: int = 4000) -> None:
    """The end of a guest script: save what it found, stop the stack, add the daemon's log."""
    save()
    stack.close()
    res["log"] = stack.read_log()[-keep:]
    save()


class Stack:
    """A private bus and one vfiod on it, with the given policy files."""

    def __init__(self, workdir: str, policy: dict[str, str]):
        self.dir = workdir
        self.address = f"unix:path={workdir}/bus"
        os.makedirs(f"{workdir}/policy", exist_ok=True)
        os.makedirs(f"{workdir}/state", exist_ok=True)
        os.chmod(workdir, 0o755)
        self.set_policy(policy)
        from vfiod.sim.privatebus import PrivateBus
        self.bus = PrivateBus(workdir, os.path.join(CHECKOUT, "systemd/org.vfiod1.conf"))
        self.daemon = None
        self.log = None
        self.ready_at = None

    def set_policy(self, policy: dict[str, str]) -> None:
        for name in os.listdir(f"{self.dir}/policy"):
            os.unlink(f"{self.dir}/policy/{name}")
        for name, text in policy.items():
            with open(f"{self.dir}/policy/{name}", "w") as f:
                f.write(text)

    def start(self, on_ready=None, timeout=180) -> None:
        """Start vfiod and wait for its READY=1 on a notify socket of our own, as
        systemd would; `on_ready()` runs the moment READY arrives, before
        anything else can happen (no client has been started yet)."""
        sock_path = f"{self.dir}/notify"
        if os.path.exists(sock_path):
            os.unlink(sock_path)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(sock_path)
        notify.settimeout(1.0)
        self.log = open(f"{self.dir}/vfiod.log", "a")
        env = dict(os.environ, NOTIFY_SOCKET=sock_path)
        self.daemon = subprocess.Popen(
            ["vfiod", "--bus", self.address, "--policy-dir", f"{self.dir}/policy", "--state-dir", f"{self.dir}/state"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        result = None
        try:
            while True:
                try:
                    msg = notify.recv(4096).decode()
                except socket.timeout:
                    msg = ""
                if "READY=1" in msg.split("\n"):
                    if on_ready:
                        result = on_ready()
                    break
                if self.daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"vfiod did not report ready (rc {self.daemon.poll()}):\n{self.read_log()}")
        finally:
            notify.close()
        self.ready_at = time.monotonic()
        return result

    def stop(self) -> int | None:
        if self.daemon is None:
            return None
        from vfiod.sim.privatebus import stop_process
        rc, self.daemon = stop_process(self.daemon, 60), None
        self.log.close()
        return rc

    def vfioctl(self, uid: int, *args, timeout=300, **kw) -> subprocess.CompletedProcess:
        cut = args.index("--") if "--" in args else len(args)
        cmd = ["vfioctl", *args[:1], "--bus", self.address, *args[1:cut], *args[cut:]]
        return as_user(uid, cmd, timeout=timeout, **kw)

    def read_log(self) -> str:
        try:
            with open(f"{self.dir}/vfiod.log") as f:
                return f.read()
        except OSError:
            return ""

    def close(self) -> None:
        self.stop()
        self.bus.stop()
