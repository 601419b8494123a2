"""`make deb` builds a Debian package that holds everything an admin needs, with the
dependencies Debian ships, and the Cockpit page's package next to it; `make install-data`
puts the unit where it runs the programs."""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"



def _systemd_dir() -> str:
    """Where the package puts systemd's files on this release (debian/rules): under /usr
    where debhelper is 13.11.6 or later (Debian 13), else /lib (Debian 12)."""
    try:
        version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "debhelper"], capture_output=True,
                                 text=True, timeout=30).stdout
        newer = subprocess.run(["dpkg", "--compare-versions", version, "ge", "13.11.6~"], timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        newer = False
    return "usr/lib/systemd" if newer else "lib/systemd"


SYSTEMD = _systemd_dir()
EXPECTED = [
    "./usr/bin/vfiod", "./usr/bin/vfioctl",
    f"./{SYSTEMD}/system/vfiod.service", f"./{SYSTEMD}/system-generators/vfiod-sysfs-generator",
    "./usr/share/dbus-1/system.d/org.vfiod1.conf",
    "./usr/share/dbus-1/system-services/org.vfiod1.service",
    "./usr/lib/tmpfiles.d/vfiod.conf", "./usr/lib/modules-load.d/vfiod.conf",
    "./usr/lib/udev/rules.d/70-vfiod-early.rules", "./usr/lib/udev/vfiod-early-bind",
    "./usr/share/man/man8/vfiod.8.gz", "./usr/share/man/man1/vfioctl.1.gz",
    "./usr/share/man/man5/vfiod.policy.5.gz",
    "./usr/share/bash-completion/completions/vfiod", "./usr/share/bash-completion/completions/vfioctl",
    "./usr/share/doc/vfiod/examples/10-dpdk-nics.toml", "./usr/share/doc/vfiod/examples/40-dpdk-claim.toml",
    "./usr/share/doc/vfiod/copyright", "./usr/share/doc/vfiod/README.md",
    "./usr/share/doc/vfiod/docs/json.md", "./usr/share/doc/vfiod/docs/cockpit.png",
    "./etc/vfiod/policy.d/",
    "./usr/lib/python3/dist-packages/vfiod/daemon/__init__.py",
    "./usr/lib/python3/dist-packages/vfiod_plugins/vfio.py",
    "./usr/lib/python3/dist-packages/vfiod-0.1.0.dist-info/entry_points.txt",
]


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    missing = [t for t in ("dpkg-buildpackage", "dh", "pybuild") if not shutil.which(t, path=SYSTEM_PATH)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian: debhelper dh-python pybuild-plugin-pyproject; "
                    "scripts/setup installs them)")
    out = tmp_path_factory.mktemp("deb")
    p = subprocess.run(["make", "-s", "deb", f"DEBDIR={out}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    debs = list(out.glob("vfiod_*_all.deb"))
    assert len(debs) == 1, debs
    return debs[0]


def test_the_package_holds_the_programs_unit_bus_files_docs_and_completion(deb):
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    paths = {line.split()[5] for line in listing.splitlines()}
    assert not [p for p in EXPECTED if p not in paths], listing
    assert not [p for p in paths if "/tests/" in p or "__pycache__" in p or p.startswith("./usr/local")]


def test_the_package_depends_on_what_debian_ships(deb):
    info = subprocess.run(["dpkg-deb", "-I", str(deb)], capture_output=True, text=True, check=True).stdout
    depends = re.search(r"^ Depends: (.*)$", info, flags=re.M).group(1)
    for pkg in ("python3-attr", "python3-pluggy", "python3-pyudev", "python3-dbus-next", "dbus", "pci.ids"):
        assert re.search(rf"(^|, ){re.escape(pkg)}\b", depends), (pkg, depends)
    assert "Architecture: all" in info


def test_apt_resolves_the_packages_on_this_release(deb):
    """apt (simulating: nothing is installed) finds every Depends of both packages in this
    release's archive; the CI runs this on Debian 12 and in a Debian 13 chroot."""
    if not shutil.which("apt-get", path=SYSTEM_PATH):
        pytest.skip("no apt-get here")
    p = subprocess.run(["apt-get", "install", "--simulate", "--reinstall", "--no-install-recommends",
                        "-o", "Debug::NoLocking=1", str(deb), *map(str, deb.parent.glob("cockpit-vfiod_*.deb"))],
                       capture_output=True, text=True, timeout=300,
                       env={"PATH": SYSTEM_PATH, "LANG": "C"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for package in ("vfiod", "cockpit-vfiod"):
        assert re.search(rf"^Inst {package}\b", p.stdout, flags=re.M), p.stdout[-2000:]
    assert "Broken" not in p.stdout and "unmet dependencies" not in p.stdout + p.stderr


def test_the_cockpit_page_is_its_own_package_next_to_vfiod(deb, tmp_path):
    """cockpit-vfiod, from the same source: the page's files as they are in cockpit/, in
    Cockpit's package directory, depending on Cockpit's bridge and this very vfiod."""
    page = next(deb.parent.glob("cockpit-vfiod_*_all.deb"))
    info = subprocess.run(["dpkg-deb", "-I", str(page)], capture_output=True, text=True, check=True).stdout
    depends = re.search(r"^ Depends: (.*)$", info, flags=re.M).group(1)
    version = re.search(r"^ Version: (.*)$", info, flags=re.M).group(1)
    assert re.search(r"(^|, )cockpit-bridge\b", depends) and f"vfiod (= {version})" in depends, depends
    subprocess.run(["dpkg-deb", "-x", str(page), str(tmp_path)], check=True)
    installed = tmp_path / "usr/share/cockpit/vfiod"
    source = os.path.join(ROOT, "cockpit")
    assert sorted(os.listdir(installed)) == sorted(os.listdir(source))
    for name in os.listdir(source):
        with open(os.path.join(source, name), "rb") as f:
            assert (installed / name).read_bytes() == f.read(), name


def test_the_installed_programs_and_backends_work(deb, tmp_path):
    """Unpacked (not installed): the programs run on Debian's Python and find the
    built-in backends through their entry points."""
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    unit = (tmp_path / SYSTEMD / "system/vfiod.service").read_text()
    assert "ExecStart=/usr/bin/vfiod --bus system" in unit and "ExecReload=/usr/bin/vfiod reload" in unit
    # dh-python writes "#!/usr/bin/python3" on Debian 12, "#! /usr/bin/python3" on Debian 13
    assert re.match(r"#! ?/usr/bin/python3\n", (tmp_path / "usr/bin/vfiod").read_text())
    env = {"PATH": SYSTEM_PATH, "PYTHONPATH": str(tmp_path / "usr/lib/python3/dist-packages")}
    probe = subprocess.run(["/usr/bin/python3", "-c", "import attrs, pluggy, pyudev, dbus_next"], env=env,
                           capture_output=True)
    if probe.returncode:
        pytest.skip("Debian's python3-attr, -pluggy, -pyudev, -dbus-next are not installed here")
    p = subprocess.run(["/usr/bin/python3", "-c",
                        "import vfiod; from vfiod.backends import load_backends; "
                        "print(vfiod.__file__); print(sorted(load_backends()))"],
                       env=env, capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [str(tmp_path / "usr/lib/python3/dist-packages/vfiod/__init__.py"),
                                     "['libvirt', 'pci-stub', 'vfio']"]
    for prog, args in (("vfiod", ["inspect", "--simulate", "--json"]), ("vfioctl", ["policy", "check", "--help"])):
        p = subprocess.run(["/usr/bin/python3", str(tmp_path / "usr/bin" / prog), *args], env=env,
                           capture_output=True, text=True, cwd=tmp_path)
        assert p.returncode == 0 and p.stdout, (prog, p.stderr)
        assert "Warning" not in p.stderr, (prog, p.stderr)


def test_the_shipped_docs_keep_their_relative_links(deb, tmp_path):
    """README.md links docs/*.md and docs/cockpit.png, and the docs link one another: in
    /usr/share/doc/vfiod every such link reaches a file the package ships."""
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    doc = tmp_path / "usr/share/doc/vfiod"
    pages = [doc / "README.md", *sorted((doc / "docs").glob("*.md"))]
    assert len(pages) == 1 + len([n for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md")])
    links = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue                      # https:, mailto:
            links += 1
            assert (page.parent / target).exists(), f"{page.relative_to(tmp_path)} links {target}, not shipped"
    assert links > 20


def test_lintian_finds_nothing_in_either_package(deb):
    """lintian, pedantic, with info and experimental tags, on both packages: no tag, and
    every override the packages carry says why on the line above it."""
    if not shutil.which("lintian", path=SYSTEM_PATH):
        pytest.skip("lintian not installed (scripts/setup installs it)")
    debs = [str(deb), *map(str, deb.parent.glob("cockpit-vfiod_*_all.deb"))]
    p = subprocess.run(["lintian", "--pedantic", "--display-info", "--display-experimental", "--fail-on", "none",
                        *debs], capture_output=True, text=True, timeout=600,
                       env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": str(deb.parent)})
    tags = [line for line in p.stdout.splitlines() if re.match(r"[EWIPX]: ", line)]
    assert p.returncode == 0 and not tags, p.stdout[-3000:] + p.stderr[-3000:]
    for name in os.listdir(os.path.join(ROOT, "debian")):
        if name.endswith("lintian-overrides"):
            lines = open(os.path.join(ROOT, "debian", name)).read().splitlines()
            for i, line in enumerate(lines):
                if line and not line.startswith("#"):
                    assert i and lines[i - 1].startswith("# "), (name, line)


def test_install_data_puts_the_unit_on_the_programs_path(tmp_path):
    p = subprocess.run(["make", "-s", "install-data", f"DESTDIR={tmp_path}", "PREFIX=/opt/v",
                        f"PYTHON={sys.executable}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    unit = (tmp_path / "lib/systemd/system/vfiod.service").read_text()
    assert "ExecStart=/opt/v/bin/vfiod --bus system" in unit and "ExecReload=/opt/v/bin/vfiod reload" in unit
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    # `make install` links the programs into $(PREFIX)/bin, and installs with the dependencies
    assert "$(DESTDIR)$(PREFIX)/bin/vfiod" in makefile and "--no-deps" not in makefile
    assert (tmp_path / "opt/v/share/man/man5/vfiod.policy.5").exists()


# dbus-next calls typing.no_type_check_decorator for every D-Bus member a class
# declares: deprecated (warning at each call) from Python 3.13, gone in 3.15.
DBUS_CLASS = """
import typing
from dbus_next.service import ServiceInterface, dbus_property, method, signal
class Iface(ServiceInterface):
    @method()
    def Ping(self, what: "s") -> "s":
        return what
    @dbus_property()
    def Name(self) -> "s":
        return "x"
    @Name.setter
    def Name(self, value: "s"):
        pass
    @signal()
    def Changed(self) -> "s":
        return "y"
iface = Iface("org.example.I")
assert [m.name for m in ServiceInterface._get_methods(iface)] == ["Ping"]
assert typing.no_type_check_decorator.__module__ == "vfiod.pycompat", typing.no_type_check_decorator
print("ok")
"""


def _python(code, *flags):
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


def test_dbus_next_still_imports_where_typing_lost_no_type_check_decorator():
    """Python 3.15: typing has no no_type_check_decorator; importing vfiod first puts one back."""
    p = _python("import typing\ndel typing.no_type_check_decorator\nimport vfiod\n" + DBUS_CLASS, "-W", "error")
    assert (p.returncode, p.stdout, p.stderr) == (0, "ok\n", "")
    bare = _python("import typing\ndel typing.no_type_check_decorator\nimport dbus_next.service")
    assert bare.returncode == 1 and "ImportError" in bare.stderr  # what vfiod would hit without it


def test_dbus_next_does_not_warn_where_typing_deprecates_it():
    """Python 3.13 and 3.14: typing's own warns at every call; vfiod's replaces it, and its members
    still get no_type_check's mark."""
    p = _python("import typing, warnings\n"
                "from vfiod import pycompat\n"
                "def deprecated(d):\n"
                "    warnings.warn('no_type_check_decorator is deprecated', DeprecationWarning, 2)\n"
                "    return d\n"
                "typing.no_type_check_decorator = deprecated\n"
                "assert pycompat.install(version=(3, 13))\n" + DBUS_CLASS +
                "assert Iface.Ping.__no_type_check__ is True\n", "-W", "error")
    assert (p.returncode, p.stdout, p.stderr) == (0, "ok\n", "")


def test_this_python_runs_vfiod_and_dbus_next_without_a_warning():
    p = _python("import vfiod, vfiod.daemon.interfaces\n" + DBUS_CLASS.replace("assert typing.no_type_check_decorator", "#"),
                "-W", "error")
    assert (p.returncode, p.stdout, p.stderr) == (0, "ok\n", "")
    if sys.version_info < (3, 13):
        from vfiod import pycompat
        assert pycompat.install() is False  # older Pythons keep typing's own


def test_make_deb_puts_the_package_where_the_install_command_finds_it():
    """`make deb && apt install ./vfiod_*.deb`, run in the checkout, installs what was
    built: the package lands in the checkout (it went to ../, where ./vfiod_*.deb is not)."""
    p = subprocess.run(["make", "-s", "-n", "deb"], cwd=ROOT, capture_output=True, text=True, check=True)
    moves = [line for line in p.stdout.splitlines() if "mv build/deb/vfiod_*.deb" in line]
    assert moves, p.stdout
    dest = moves[-1].rsplit(" ", 1)[-1]
    assert os.path.realpath(os.path.join(ROOT, dest)) == os.path.realpath(ROOT), moves
    with open(os.path.join(ROOT, "README.md")) as f:
        assert "apt install ./vfiod_*.deb" in f.read()
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert "/vfiod_*.deb" in f.read().split()
