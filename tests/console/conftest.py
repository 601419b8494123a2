"""The web console tier: vfiod's Cockpit page in headless Chromium.

Per module: a private system bus with vfiod on a simulated host (`tests.bus.conftest.BusWorld`),
``cockpit-ws --local-session=cockpit-bridge`` on a free local port for each user the test
needs (the bridge runs as the user who starts it, and Cockpit's D-Bus channels go to the
bus ``DBUS_SYSTEM_BUS_ADDRESS`` names: the private one), serving the page from this checkout
(``XDG_DATA_DIRS``), and one Chromium driven over the DevTools protocol (`tests.console.cdp`).
Nothing here uses Cockpit's systemd socket or a login: the package may enable
``cockpit.socket``, and the tests never depend on it.

Screenshots go to ``artifacts/console/`` (or ``$VFIOD_ARTIFACTS/console``)."""

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest

from tests.bus.conftest import POLICY, ROOT, TEST_USER, VENV_BIN, BusWorld, unprivileged_uid
from tests.console.cdp import Browser, find_chromium

COCKPIT_WS = "/usr/lib/cockpit/cockpit-ws"
ARTIFACTS = os.path.join(os.environ.get("VFIOD_ARTIFACTS") or os.path.join(ROOT, "artifacts"), "console")


#: The bus tier's policy, with a 4 s grace for holders of group 8 when its lease is revoked,
#: and root may hold the HD audio group (4) persistently.
CONSOLE_POLICY = POLICY.replace('max_duration = "8h"\n', 'max_duration = "8h"\nrevoke_grace = "4s"\n', 1) + """
[[rule]]
group = [4]
users = ["root"]
backends = ["vfio", "pci-stub"]
persistent = true
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Console:
    """cockpit-ws with a local session as `user` (None: root), the bridge on `world`'s bus."""

    def __init__(self, world, user=None):
        self.world = world
        self.user = user
        self.dir = tempfile.mkdtemp(prefix="vfiod-console-")
        os.chmod(self.dir, 0o755)
        pages = os.path.join(self.dir, "xdg", "cockpit")
        os.makedirs(pages)
        os.symlink(os.path.join(ROOT, "cockpit"), os.path.join(pages, "vfiod"))
        # The page runs `vfioctl policy test`, which reads the policy files: this world's,
        # over the same simulated host.
        bindir = os.path.join(self.dir, "bin")
        os.makedirs(bindir)
        with open(os.path.join(bindir, "vfioctl"), "w") as f:
            f.write("#!/bin/sh\n"
                    'if [ "$1" = policy ] && [ "$2" = test ]; then shift 2; '
                    f'exec {VENV_BIN}/vfioctl policy test --policy-dir {world.policy_dir} '
                    f'--simulate {world.topology} "$@"; fi\n'
                    f'exec {VENV_BIN}/vfioctl "$@"\n')
        os.chmod(os.path.join(bindir, "vfioctl"), 0o755)
        home = os.path.join(self.dir, "home")
        os.makedirs(home, mode=0o700)
        if user:
            pw = pwd.getpwnam(user)
            for d in (self.dir, home):
                os.chown(d, pw.pw_uid, pw.pw_gid)
        self.port = _free_port()
        env = {"PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8",
               "XDG_DATA_DIRS": f"{os.path.join(self.dir, 'xdg')}:/usr/local/share:/usr/share",
               "DBUS_SYSTEM_BUS_ADDRESS": world.address, "USER": user or "root", "LOGNAME": user or "root"}
        self.log = open(os.path.join(self.dir, "cockpit-ws.log"), "w")
        self.process = subprocess.Popen(
            [COCKPIT_WS, "--local-session=cockpit-bridge", "--port", str(self.port), "--address", "127.0.0.1"],
            env=env, user=user, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}/cockpit/@localhost/vfiod/index.html"
        deadline = time.time() + 30
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"cockpit-ws exited {self.process.returncode}:\n{self.read_log()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("cockpit-ws did not serve the page:\n" + self.read_log())
            time.sleep(0.2)

    def read_log(self):
        with open(os.path.join(self.dir, "cockpit-ws.log")) as f:
            return f.read()

    def close(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def console_prerequisites():
    """Skip, saying what is missing, where the tier cannot run (scripts/setup installs all)."""
    for what, present in (("dbus-daemon", shutil.which("dbus-daemon")), ("cockpit-ws", os.path.exists(COCKPIT_WS)),
                          ("cockpit-bridge", shutil.which("cockpit-bridge")),
                          ("Cockpit's cockpit.js", os.path.exists("/usr/share/cockpit/base1/cockpit.js")
                           or os.path.exists("/usr/share/cockpit/base1/cockpit.js.gz"))):
        if not present:
            pytest.skip(f"{what} is not installed (scripts/setup installs it)")
    binary = find_chromium()
    if not binary:
        pytest.skip("no Chromium (chromium-headless-shell or chromium; scripts/setup installs it)")
    unprivileged_uid()
    return binary


class Page:
    """The browser, and how to open the page of one console in it."""

    def __init__(self, browser):
        self.browser = browser

    def open(self, console, timeout=60):
        """Load the page and wait until it says it is interactive; ms from navigation to then."""
        self.browser.new_tab()
        self.browser.navigate(console.url)
        ready = self.browser.wait_for("document.body && document.body.dataset.ready", timeout=timeout,
                                      what="the page to be interactive")
        assert ready != "failed", self.browser.evaluate("document.getElementById('problem').textContent")
        return int(ready)

    def shot(self, name):
        os.makedirs(ARTIFACTS, exist_ok=True)
        return self.browser.screenshot(os.path.join(ARTIFACTS, name))

    def __getattr__(self, name):
        return getattr(self.browser, name)


@pytest.fixture(scope="module")
def chromium():
    binary = console_prerequisites()
    os.makedirs(ARTIFACTS, exist_ok=True)
    log = open(os.path.join(ARTIFACTS, "chromium.log"), "w")
    b = Browser(binary, log=log)
    try:
        yield b
    finally:
        b.close()
        log.close()


@contextlib.contextmanager
def served(topology="ich10", policy=None, users=(None,)):
    """vfiod on `topology` and a console for each of `users` (None: root), in
    ``world.consoles`` by user name; at the end, no traceback in vfiod's log."""
    w = BusWorld(topology=topology, policy=policy)
    w.consoles = {}
    try:
        for user in users:
            w.consoles[user or "root"] = Console(w, user=user)
        yield w
    finally:
        for c in w.consoles.values():
            c.close()
        log = w.read_log()
        w.close()
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def console_world(chromium):
    """vfiod on the ICH10 host; consoles as root and as the unprivileged test user."""
    with served(policy=CONSOLE_POLICY, users=(None, TEST_USER)) as w:
        yield w


@pytest.fixture
def page(chromium):
    return Page(chromium)
