"""A small Chrome DevTools protocol client: headless Chromium over
``--remote-debugging-pipe`` (the browser reads commands on its fd 3 and writes replies
and events on its fd 4, each message JSON ending in a NUL byte), so no websocket
library and no port are needed.

`Browser` starts Chromium and attaches to one page; `call` sends a command and waits
for its reply; `evaluate` runs JavaScript in the page and returns its value; `wait_for`
evaluates an expression until it is true; `screenshot` writes a PNG."""

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

CANDIDATES = ("chromium-headless-shell", "chromium", "chromium-browser")


def find_chromium():
    """The first Chromium on PATH (Debian's chromium-headless-shell, else chromium), or None."""
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class CdpError(Exception):
    pass


class Browser:
    def __init__(self, binary, width=1280, height=900, log=None):
        self.profile = tempfile.mkdtemp(prefix="vfiod-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def fds():          # the browser's fd 3 reads commands, fd 4 writes answers
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        args = [binary, "--headless", "--remote-debugging-pipe", "--no-first-run", "--no-default-browser-check",
                "--disable-gpu", "--disable-dev-shm-usage", "--disable-extensions", "--disable-background-networking",
                "--disable-sync", "--mute-audio", "--hide-scrollbars", "--force-device-scale-factor=1",
                f"--window-size={width},{height}", f"--user-data-dir={self.profile}", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")      # Chromium's sandbox refuses root; the page is local
        self.process = subprocess.Popen(args, preexec_fn=fds, stdout=log or subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                                        close_fds=True, pass_fds=(3, 4))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf = b""
        self._next_id = 0
        self.events = []
        self.session = None
        self.context = None
        self.size = (width, height)
        self.new_tab()

    def new_tab(self):
        """A fresh tab in a fresh browser context (its own cookies and connections), the old
        one closed: each page load starts as a new visitor's would."""
        old = self.context
        self.session = None
        self.context = self.call("Target.createBrowserContext", browser=True)["browserContextId"]
        target = self.call("Target.createTarget", url="about:blank", browserContextId=self.context,
                           browser=True)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True,
                                 browser=True)["sessionId"]
        if old:
            self.call("Target.disposeBrowserContext", browserContextId=old, browser=True)
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=self.size[0], height=self.size[1],
                  deviceScaleFactor=1, mobile=False)

    # ------------------------------------------------------------ the pipe

    def _read_message(self, deadline):
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                seen = [e.get("method") for e in self.events[-10:]]
                raise CdpError(f"Chromium did not answer in time (its last events: {seen})")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise CdpError(f"Chromium closed its pipe (exit status {self.process.poll()})")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method, browser=False, timeout=30, **params):
        """Send `method` (to the page, or to the browser with `browser`) and return its result."""
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if self.session and not browser:
            msg["sessionId"] = self.session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._to_browser, data):]
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise CdpError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)
                del self.events[:-500]

    # ------------------------------------------------------------ the page

    def navigate(self, url):
        self.call("Page.navigate", url=url)

    def evaluate(self, expression, timeout=30):
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True,
                      timeout=timeout)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise CdpError(f"{expression!r} threw: {d.get('exception', {}).get('description') or d.get('text')}")
        return r["result"].get("value")

    def wait_for(self, expression, timeout=30, what=None):
        """Evaluate `expression` until it is true as JavaScript sees it (an element, ``{}`` and
        ``[]`` are); its value."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.evaluate(expression)
            except CdpError as e:
                last = e
            if not isinstance(last, CdpError) and last not in (None, False, 0, ""):   # JavaScript's truth
                return last
            time.sleep(0.1)
        raise CdpError(f"timed out waiting for {what or expression!r} (last: {last!r})")

    def click(self, selector):
        """Click the element `selector` names, as a user would (mouse events at its centre)."""
        box = self.wait_for(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                            " if (!e) return null; e.scrollIntoView({block: 'center'});"
                            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()",
                            what=selector)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type_into(self, selector, text):
        self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.focus();"
                      " e.value = ''; })()")
        self.call("Input.insertText", text=text)

    def screenshot(self, path, full_page=True):
        params = {"format": "png", "captureBeyondViewport": full_page}
        if full_page:
            w, h = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params["clip"] = {"x": 0, "y": 0, "width": w, "height": min(h, 6000), "scale": 1}
        data = self.call("Page.captureScreenshot", **params)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path

    def close(self):
        try:
            self.call("Browser.close", browser=True, timeout=5)
        except (CdpError, OSError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)
