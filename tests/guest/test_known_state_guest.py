"""Every guest starts from the same state whatever this machine has installed: on a
root where the vfiod package is installed and enabled, with a host policy and journal
(the ``host_with_vfiod`` layer), the guest has no vfiod package, no vfiod files, no
policy and no journal when its script starts."""

import subprocess

import pytest

from .harness import Guest, guest_available

pytestmark = pytest.mark.guest

SCRIPT = r"""
exec > $OUT/state.txt 2>&1
echo "status=$(dpkg-query -W -f='${db:Status-Status}' vfiod 2>/dev/null)"
for p in /usr/bin/vfioctl /lib/systemd/system/vfiod.service /usr/share/dbus-1/system.d/org.vfiod1.conf \
         /etc/systemd/system/multi-user.target.wants/vfiod.service /etc/vfiod /var/lib/vfiod \
         /usr/lib/python3/dist-packages/vfiod; do
    [ -e $p ] || [ -L $p ] && echo "present=$p"
done
echo "purged=$(cat /run/vfiod-guest/purged-host-vfiod 2>/dev/null)"
# vfiod from the checkout starts on it as on a clean machine
$VFIOD_CHECKOUT/.venv/bin/vfiod inspect --json > $OUT/inspect.json 2>$OUT/inspect.err
echo "inspect=$?"
"""


@pytest.fixture(scope="module")
def run(host_with_vfiod):
    ok, why = guest_available()
    if not ok:
        pytest.skip(why)
    return Guest("none", root_layers=[host_with_vfiod]).run(SCRIPT, timeout=600)


def test_the_layer_is_a_root_on_which_dpkg_finds_vfiod_installed(host_with_vfiod):
    p = subprocess.run(["dpkg-query", f"--admindir={host_with_vfiod}/var/lib/dpkg", "-W",
                        "-f=${db:Status-Status} ${Version}", "vfiod"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("installed "), p.stderr
    assert (host_with_vfiod / "usr/bin/vfioctl").exists()


def test_a_guest_over_a_host_with_vfiod_installed_starts_without_it(run):
    state = dict(line.split("=", 1) for line in run.files["state.txt"].decode().splitlines() if "=" in line)
    assert run.returncode == 0, run.output + run.console[-3000:]
    assert state["status"] in ("", "not-installed", "config-files") and state["status"] != "installed", state
    assert not [k for k in state if k == "present"], run.files["state.txt"].decode()
    assert state["purged"] == "0.1.0", state
    assert state["inspect"] == "0", run.files["inspect.err"].decode()
    assert b"Traceback" not in run.files["inspect.err"]
