"""A private system-type D-Bus for trying vfiod (and testing it) without the system bus.

`PrivateBus` starts ``dbus-daemon`` with a system-type configuration that
denies what the system bus denies and ``<include>``s vfiod's own D-Bus policy
file, so calls pass or fail exactly as on a real system bus.  The socket
lives in a directory anyone may enter, so unprivileged clients can connect.
"""

from __future__ import annotations

import os
import subprocess
from typing import AnyStr

CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>  <!-- as the system bus: vfiod's signals reach every client -->
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_requested_reply="true"/>
  </policy>
  <include>{policy}</include>
  <limit name="max_connections_per_user">1000</limit>
  <limit name="max_completed_connections">2000</limit>
  <limit name="max_incomplete_connections">500</limit>
  <limit name="max_pending_service_starts">1000</limit>
  <limit name="max_replies_per_connection">1000</limit>
</busconfig>
"""


class PrivateBus:
    """``dbus-daemon`` on ``DIRECTORY/bus`` with vfiod's policy file `policy` included."""

    def __init__(self, directory: str, policy: str):
        self.socket = os.path.join(directory, "bus")
        self.address = f"unix:path={self.socket}"
        self.config = os.path.join(directory, "bus.conf")
        with open(self.config, "w") as f:
            f.write(CONFIG.format(socket=self.socket, policy=os.path.abspath(policy)))
        self.process = subprocess.Popen(
            ["dbus-daemon", f"--config-file={self.config}", "--nofork", "--print-address"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.process.stdout is not None           # stdout=PIPE
        if not self.process.stdout.readline():
            raise RuntimeError("dbus-daemon did not start")

    def stop(self) -> None:
        stop_process(self.process, 10)


def stop_process(process: subprocess.Popen[AnyStr], timeout: float = 60) -> int:
    """SIGTERM, wait up to `timeout` seconds, then SIGKILL; the exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()
