"""The README's walk-through: vfiod on the simulated ICH10 host, on a private bus.

Starts a private system-type dbus-daemon that loads vfiod's own D-Bus policy
file, runs vfiod as root on the built-in simulated ICH10 host, and then, as
the unprivileged user `vfiotest`, walks through what a newcomer does: list the
groups, ask why group 8 is what it is, check access, lease it while a small
program holds its fd, and watch everything go back.  Nothing here touches this
machine's devices: the simulated host is a fake sysfs tree in a temp dir.
"""

import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from vfiod.sim.privatebus import PrivateBus  # noqa: E402
BIN = os.path.join(ROOT, ".venv", "bin")
USER = "vfiotest"

POLICY = """# The demo's policy: vfiotest may lease the two NICs of group 8 with the raw vfio backend.
[[rule]]
address = ["0000:04:00.0", "0000:05:00.0"]
users = ["{user}"]
backends = ["vfio", "pci-stub"]
max_duration = "1h"
"""

PROBE = """import os
fd = int(os.environ["VFIOD_GROUP_FD"])
st = os.fstat(fd)
print(f"  [program] got fd {fd}: {os.environ['VFIOD_GROUP_PATH']} (inode {st.st_ino}),"
      f" owned by uid {st.st_uid}, mode {oct(st.st_mode & 0o777)}")
print(f"  [program] VFIO group {os.environ['VFIOD_GROUP']}, lease {os.environ['VFIOD_LEASE']}")
"""


def say(text):
    print("\n" + "\n".join(textwrap.wrap(text, 90)), flush=True)


def run(cmd, user=USER, check=True):
    shown = " ".join(shlex.quote(c) for c in cmd)
    print(f"\n{'$' if user else '#'} {shown}", flush=True)
    p = subprocess.run([os.path.join(BIN, cmd[0]) if cmd[0] in ("vfioctl", "vfiod") else cmd[0], *cmd[1:]],
                       user=user, text=True, capture_output=True)
    out = (p.stdout + p.stderr).rstrip()
    if out:
        print(textwrap.indent(out, "  "), flush=True)
    if check and p.returncode != 0:
        raise SystemExit(f"demo: step failed with exit code {p.returncode}")
    return p


def main() -> int:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        print(f"demo: no user {USER}; run scripts/setup first", file=sys.stderr)
        return 1
    tmp = tempfile.mkdtemp(prefix="vfiod-demo-")
    os.chmod(tmp, 0o755)
    procs = []
    try:
        policy_dir = os.path.join(tmp, "policy.d")
        os.makedirs(policy_dir)
        with open(os.path.join(policy_dir, "50-demo.toml"), "w") as f:
            f.write(POLICY.format(user=USER))
        probe = os.path.join(tmp, "probe.py")
        with open(probe, "w") as f:
            f.write(PROBE)
        os.chmod(probe, 0o644)

        bus = PrivateBus(tmp, os.path.join(ROOT, "systemd/org.vfiod1.conf"))
        procs.append(bus.process)
        addr = bus.address
        say("1. A private system bus is up, with vfiod's own D-Bus policy. vfiod starts as root on the "
            "built-in simulated ICH10 host (a fake sysfs tree with the kernel's bind/unbind semantics), "
            "with this policy:")
        print(textwrap.indent(POLICY.format(user=USER), "  "))
        log = open(os.path.join(tmp, "vfiod.log"), "w")
        daemon = subprocess.Popen([os.path.join(BIN, "vfiod"), "--bus", addr, "--simulate", "ich10",
                                   "--sim-dir", os.path.join(tmp, "sim"), "--state-dir", os.path.join(tmp, "state"),
                                   "--policy-dir", policy_dir], stdout=log, stderr=subprocess.STDOUT)
        procs.append(daemon)
        for _ in range(200):
            if subprocess.run([os.path.join(BIN, "vfioctl"), "leases", "--bus", addr, "--timeout", "2"],
                              capture_output=True).returncode == 0:
                break
            if daemon.poll() is not None:
                print(open(os.path.join(tmp, "vfiod.log")).read())
                return 1
            time.sleep(0.1)

        say(f"2. As the unprivileged user {USER}: every IOMMU group, its devices and drivers, "
            "and what keeps each from VFIO.")
        run(["vfioctl", "groups", "--bus", addr])
        say("3. Group 8 holds two NICs behind the ICH10 root ports. Why can't 04:00.0 go alone?")
        run(["vfioctl", "explain", "--bus", addr, "0000:04:00.0"])
        say("4. Would I get it? The policy answers, naming the deciding rule; group 7 (the SATA "
            "controller under /) is not mine.")
        run(["vfioctl", "check", "--bus", addr, "0000:04:00.0"])
        run(["vfioctl", "check", "--bus", addr, "group:7"], check=False)
        say("5. Lease the group while a program runs: vfiod binds both NICs to vfio-pci, chowns "
            "/dev/vfio/8 to me and, with --pass-fd, passes the program the open group fd (DPDK and "
            "QEMU open /dev/vfio/8 themselves instead); when it exits, the lease "
            "ends and both NICs go back to e1000e and tg3.")
        run(["vfioctl", "lease", "--bus", addr, "0000:04:00.0", "--pass-fd", "--", sys.executable, probe])
        say("6. Everything is back where it was:")
        run(["vfioctl", "show", "--bus", addr, "group:8"])
        run(["vfioctl", "leases", "--bus", addr])
        say("Done. The daemon's log (audit records included):")
        log.flush()
        print(textwrap.indent(open(os.path.join(tmp, "vfiod.log")).read().rstrip(), "  "))
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
