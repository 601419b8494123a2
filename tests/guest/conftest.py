import os
import shutil
import subprocess

import pytest

from .hostpkg import installed_layer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

#: What a host that runs vfiod has beside the package: a policy that denies the
#: guests' NICs and an old journal.  None of it may reach a guest.
HOST_POLICY = '[[rule]]\naction = "deny"\nclass = "02"\nusers = ["vfiotest"]\n'


@pytest.fixture(scope="session")
def vfiod_deb(tmp_path_factory):
    """The package, built once per run by `make deb`."""
    if not shutil.which("dpkg-buildpackage", path=SYSTEM_PATH):
        pytest.skip("dpkg-buildpackage is not installed (scripts/setup installs the build tools)")
    out = tmp_path_factory.mktemp("deb")
    p = subprocess.run(["make", "-s", "deb", f"DEBDIR={out}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return next(out.glob("vfiod_*_all.deb"))


@pytest.fixture(scope="session")
def host_with_vfiod(vfiod_deb, tmp_path_factory):
    """A root layer on which vfiod is installed, enabled, with a policy and a journal
    (hostpkg.installed_layer): a guest booted over it sees such a host."""
    layer = tmp_path_factory.mktemp("host-with-vfiod")
    installed_layer(vfiod_deb, layer)
    (layer / "etc/vfiod/policy.d").mkdir(parents=True, exist_ok=True)
    (layer / "etc/vfiod/policy.d/00-host.toml").write_text(HOST_POLICY)
    (layer / "var/lib/vfiod").mkdir(parents=True, exist_ok=True)
    (layer / "var/lib/vfiod/state.db").write_bytes(b"not a journal of this run\n")
    os.chmod(layer, 0o755)
    return layer
