"""No traceback reaches a user, from either program, on any input or environment.

Every subcommand runs against bad inputs (unknown and malformed targets,
garbage arguments, a missing command) in bad environments (no bus, a wrong
bus, no session bus, a bus without vfiod, as root and as a user), and each
answer must be one of the documented exit codes with no "Traceback" and no
"internal error" anywhere.  Before, several of these printed dbus-next's or
Python's tracebacks (`vfioctl leases --bus session`, `vfioctl groups --bus
garbage`, `vfiod --simulate --bus session`, ...)."""

import os
import shutil
import subprocess
import tempfile

import pytest

from tests.bus.conftest import TEST_USER, VENV_BIN
from vfiod.cmd.common import EXIT_CODES as COMMON_EXIT_CODES

pytestmark = pytest.mark.bus

EXIT_CODES = {code for code, _ in COMMON_EXIT_CODES} - {130}   # README "Exit codes" (130 needs a Ctrl-C)
BAD_TARGETS = ["group:99", "name:nope", "../../etc/passwd", "group:\u00b2", "", "0000:04:00.0/../x"]


def commands(target):
    return [["groups"], ["show", target], ["explain", target], ["check", target], ["leases"],
            ["lease", target, "--", "true"], ["release", target], ["release", "--all"], ["vfs", target, "1"],
            ["reload"], ["check", target, "--json"], ["explain", target, "--json"]]


def run(argv, user=None, env=None, prog="vfioctl"):
    e = {k: v for k, v in os.environ.items() if k not in ("DBUS_SESSION_BUS_ADDRESS", "DISPLAY")}
    e.update(env or {})
    return subprocess.run([os.path.join(VENV_BIN, prog), *argv], capture_output=True, text=True, timeout=60,
                          user=user, env=e, cwd="/")


def check(p, argv):
    text = p.stdout + p.stderr
    assert p.returncode in EXIT_CODES, (argv, p.returncode, text)
    assert "Traceback" not in text and "internal error" not in text, (argv, text)
    return p


@pytest.mark.parametrize("bus", ["unix:path=/nonexistent/bus", "garbage", "session", "bare"])
def test_every_command_without_a_daemon_says_what_is_wrong(bus, bare_bus):
    address = bare_bus if bus == "bare" else bus
    for argv in commands("group:99") + [["monitor"], ["monitor", "--json"]]:
        p = check(run([argv[0], "--bus", address, "--timeout", "5", *argv[1:]]), argv)
        assert p.returncode != 0 or argv[0] == "release", (argv, p.stdout, p.stderr)
        # a few lines; a malformed address is a usage error, whose usage line may wrap
        assert len(p.stderr.strip().splitlines()) <= (3 if p.returncode != 2 else 6), p.stderr


def test_every_command_with_bad_targets_against_the_daemon(make_world):
    w = make_world()
    for user in (TEST_USER, None):
        for target in BAD_TARGETS:
            for argv in commands(target):
                check(run([argv[0], "--bus", w.address, *argv[1:]], user=user), argv)
    assert "Traceback" not in w.read_log()


def test_garbage_arguments_and_missing_commands(make_world):
    w = make_world()
    for argv in (["--frobnicate"], ["groups", "--frobnicate"], ["lease"], ["lease", "group:8", "--", "/nonexistent"],
                 ["lease", "group:8", "--duration", "0", "--", "true"], ["leases", "--timeout", "-1"],
                 ["vfs", "0000:04:00.0", "many"], ["policy"], ["policy", "check", "/nonexistent"],
                 ["policy", "test", "--user", "nosuchuser", "group:8", "--simulate"],
                 ["policy", "test", "--user", "root", "group:99", "--simulate"], ["nosuchcommand"]):
        p = check(run(argv if argv[0] in ("policy", "--frobnicate", "nosuchcommand") else
                      [argv[0], "--bus", w.address, *argv[1:]], user=TEST_USER), argv)
        assert p.returncode != 0, argv
    assert w.drivers()["0000:04:00.0"] == "e1000e"      # the missing command leased nothing


@pytest.mark.parametrize("argv,user", [
    (["--simulate", "--bus", "garbage"], None),
    (["--simulate", "--bus", "unix:path=/nonexistent/bus"], None),
    (["--simulate", "--bus", "session"], None),
    (["--bus", "session"], TEST_USER),
    (["inspect", "--sysfs-root", "/nonexistent"], None),
    (["inspect", "--simulate", "nope"], None),
    (["--frobnicate"], None),
])
def test_the_daemon_program_says_what_is_wrong(argv, user, tmp_path):
    os.chmod(tmp_path, 0o777)
    p = check(run([*argv, "--state-dir", str(tmp_path)] if argv[0] != "inspect" and argv[0] != "--frobnicate"
                  else argv, user=user, prog="vfiod"), argv)
    assert p.returncode != 0


def test_a_subcommand_reads_the_host_the_main_options_name():
    p = check(run(["--simulate", "gpu", "inspect", "--json"], prog="vfiod"), ["inspect"])
    assert p.returncode == 0 and "10de" in p.stdout     # the simulated GPU, not this machine


def test_a_user_who_may_not_own_the_name_is_told_so(bare_bus):
    """`vfiod --simulate --bus ADDRESS` as a user, on a bus with vfiod's own D-Bus policy
    (root owns org.vfiod1): it said "internal error: DBusError: ... not allowed to own"."""
    state = tempfile.mkdtemp(prefix="vfiod-state-")
    os.chmod(state, 0o777)
    argv = ["--simulate", "--bus", bare_bus, "--state-dir", state]
    p = check(run(argv, user=TEST_USER, prog="vfiod"), argv)
    assert p.returncode == 3, p.stderr
    assert "does not let uid" in p.stderr and "own org.vfiod1" in p.stderr and "as root" in p.stderr
    shutil.rmtree(state, ignore_errors=True)
