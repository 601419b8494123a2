"""The guest tier's own kernel, built from Debian's source package.

Debian's kernels (6.1; 6.12 in bookworm's security and backports suites and in
trixie) have neither ``CONFIG_IOMMUFD`` nor the vfio-mdev samples, so the stories of
vfio device cdevs (``/dev/vfio/devices/vfioN`` with ``/dev/iommu``) and of mediated
devices (``mtty``) need a kernel built for them.  This module builds one:

* the source is ``/usr/src/linux-source-6.12.tar.xz`` of the installed
  ``linux-source-6.12`` package (scripts/setup installs it with flex, bison, bc,
  libelf-dev and libssl-dev);
* ``make tinyconfig``, then the fragment ``tests/guest/kernel/guest.config`` merged in
  the kernel's own way (``make guest.config`` from ``kernel/configs``), then a check
  that every option of the fragment came out as written (Kconfig drops an option
  whose dependencies are missing without a word);
* ``nice -n 19 make -j2 bzImage``: everything built in, no modules;
* cached in ``CACHE/kernels-built/<source version>-<fragment hash>/`` (``vmlinux``,
  booted through PVH; ``bzImage``; ``config``; ``root/lib/modules/<release>/`` with
  ``modules.builtin``, so that ``modprobe vfio-pci`` in the guest answers "built in";
  ``build-seconds``).  Nothing is built inside the checkout, and a machine builds each
  (source, fragment) pair once; the newest source version installed is used.

Measured: a cold build takes 891 s of CPU (user 740 s, system 151 s), about 7.5
minutes on two idle cores; beside other guests and test runs at a load of 8-11 it took
39-47 minutes.  A cached kernel costs nothing.  The result: a 2.6 MB bzImage, an 18 MB vmlinux.

Only the Python standard library is used.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

SOURCE_PACKAGE = "linux-source-6.12"
SOURCE_TARBALL = Path("/usr/src") / f"{SOURCE_PACKAGE}.tar.xz"
FRAGMENT = Path(__file__).resolve().parent / "kernel" / "guest.config"
#: Programs the build runs besides make and gcc (scripts/setup installs them).
BUILD_TOOLS = ("make", "gcc", "flex", "bison", "bc", "tar", "xz", "depmod")
#: Where the build happens: a directory of the cache (never the checkout).
SUBDIR = "kernels-built"


class BuildError(RuntimeError):
    """The kernel could not be built; the message says why and what to install."""


def source_version() -> str:
    """The installed linux-source-6.12's Debian version, or BuildError."""
    try:
        p = subprocess.run(["dpkg-query", "-W", "-f", "${Status}\t${Version}", SOURCE_PACKAGE],
                           capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise BuildError("dpkg-query not found: the guest kernel is built from Debian's source package") from None
    status, _, version = p.stdout.partition("\t")
    if p.returncode != 0 or not status.endswith("installed") or not version:
        raise BuildError(f"{SOURCE_PACKAGE} is not installed (scripts/setup installs it)")
    if not SOURCE_TARBALL.is_file():
        raise BuildError(f"{SOURCE_TARBALL} is missing although {SOURCE_PACKAGE} {version} is installed")
    return version


def fragment_hash() -> str:
    """Of the fragment's options as Kconfig reads them: its comments change no build."""
    options = "".join(f"{k}={v}\n" for k, v in wanted_options(FRAGMENT.read_text()).items())
    return hashlib.sha256(options.encode()).hexdigest()[:12]


def build_key(version: str | None = None) -> str:
    version = version or source_version()
    return re.sub(r"[^A-Za-z0-9.+~-]", "_", version) + "-" + fragment_hash()


def kernel_dir(cache: Path) -> Path:
    return cache / SUBDIR / build_key()


def cached(cache: Path) -> Path | None:
    """The built kernel's directory if this (source, fragment) pair is built."""
    try:
        kdir = kernel_dir(cache)
    except BuildError:
        return None
    return kdir if (kdir / ".complete").exists() else None


def missing_tools() -> list[str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [t for t in BUILD_TOOLS if not shutil.which(t, path=path)]


def available(cache: Path) -> tuple[bool, str]:
    """(True, "") if the kernel is cached or can be built here."""
    if cached(cache):
        return True, ""
    try:
        source_version()
    except BuildError as e:
        return False, str(e)
    missing = missing_tools()
    if missing:
        return False, f"building the guest kernel needs {', '.join(missing)} (scripts/setup installs them)"
    return True, ""


def wanted_options(text: str) -> dict[str, str]:
    """CONFIG_X -> value ('n' for '# CONFIG_X is not set') of a fragment."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        m = re.fullmatch(r"# (CONFIG_\w+) is not set", line)
        if m:
            out[m.group(1)] = "n"
        elif line.startswith("CONFIG_"):
            name, _, value = line.partition("=")
            out[name] = value
        elif line and not line.startswith("#"):
            raise BuildError(f"{FRAGMENT}: not a Kconfig line: {line!r}")
    return out


def unmet_options(fragment: str, config: str) -> list[str]:
    """The options of `fragment` that the final .config does not have as written."""
    have = wanted_options(config)
    return [f"{k}={v} (got {have.get(k, 'n')})" for k, v in wanted_options(fragment).items()
            if have.get(k, "n") != v]


def _make(src: Path, *args: str, log, nice: int = 19) -> str:
    cmd = ["nice", "-n", str(nice), "make", "-C", str(src), "ARCH=x86_64", *args]
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True)
        f.write(p.stdout)
    if p.returncode != 0:
        tail = "\n".join(Path(log).read_text(errors="replace").splitlines()[-30:])
        raise BuildError(f"make {' '.join(args)} failed ({p.returncode}); the log's end:\n{tail}")
    return p.stdout


def ensure(cache: Path, say) -> tuple[Path, str]:
    """(directory, kernel release) of the built kernel, building it first if needed.

    A lock of its own (not the cache's) is held while building, so guests of
    other kernels keep booting meanwhile; a second caller waits and reuses."""
    import fcntl

    version = source_version()
    kdir = cache / SUBDIR / build_key(version)
    if (kdir / ".complete").exists():
        return kdir, (kdir / ".complete").read_text().strip()
    missing = missing_tools()
    if missing:
        raise BuildError(f"building the guest kernel needs {', '.join(missing)} (scripts/setup installs them)")
    (cache / SUBDIR).mkdir(parents=True, exist_ok=True)
    with open(cache / SUBDIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (kdir / ".complete").exists():
            return kdir, (kdir / ".complete").read_text().strip()
        return _build(cache, kdir, version, say)


def _build(cache: Path, kdir: Path, version: str, say) -> tuple[Path, str]:
    t0 = time.monotonic()
    say(f"vfiod-guest: building the guest kernel from {SOURCE_PACKAGE} {version} with {FRAGMENT.name} "
        f"into {kdir} (once per machine; many minutes on 2 cores)")
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache / SUBDIR))
    log = work / "build.log"
    try:
        subprocess.run(["nice", "-n", "19", "tar", "-xJf", str(SOURCE_TARBALL), "-C", str(work)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        srcs = [p for p in work.iterdir() if p.is_dir() and (p / "Makefile").exists()]
        if len(srcs) != 1:
            raise BuildError(f"{SOURCE_TARBALL} did not unpack to one kernel tree: {srcs}")
        src = srcs[0]
        shutil.copy2(FRAGMENT, src / "kernel/configs/vfiod-guest.config")
        _make(src, "tinyconfig", log=log)
        _make(src, "vfiod-guest.config", log=log)
        config = (src / ".config").read_text()
        unmet = unmet_options(FRAGMENT.read_text(), config)
        if unmet:
            raise BuildError(f"{FRAGMENT}: Kconfig did not take these options (a dependency is missing): "
                             + ", ".join(unmet))
        _make(src, f"-j{min(os.cpu_count() or 1, 2)}", "bzImage", log=log)
        release = _make(src, "-s", "kernelrelease", log=log).strip().splitlines()[-1]
        out = work / "kernel"
        mods = out / "root/lib/modules" / release
        (mods / "kernel").mkdir(parents=True)
        shutil.copy2(src / "arch/x86/boot/bzImage", out / "bzImage")
        shutil.copy2(src / "vmlinux", out / "vmlinux")
        shutil.copy2(src / ".config", out / "config")
        for meta in ("modules.builtin", "modules.builtin.modinfo"):
            if (src / meta).exists():
                shutil.copy2(src / meta, mods / meta)
        (mods / "modules.order").write_text("")
        subprocess.run(["depmod", "-b", str(out / "root"), release], check=True, capture_output=True)
        seconds = time.monotonic() - t0
        (out / "build-seconds").write_text(f"{seconds:.0f}\n")
        shutil.copy2(log, out / "build.log")
        (out / ".complete").write_text(release + "\n")
        os.chmod(out, 0o755)
        if kdir.exists():
            shutil.rmtree(kdir)
        os.rename(out, kdir)
        say(f"vfiod-guest: built {release} in {seconds:.0f} s")
        return kdir, release
    except subprocess.CalledProcessError as e:
        raise BuildError(f"{' '.join(map(str, e.cmd))} failed: {(e.stderr or b'').decode(errors='replace')[-2000:]}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    """``python -m tests.guest.kbuild``: build (or find) the kernel in the guest cache now,
    so that a test run started beside it finds it ready (.ci/run starts it first)."""
    import sys

    from tests.guest.harness import cache_dir, guest_available

    ok, why = guest_available()
    if not ok:
        print(f"vfiod-guest: no guest here ({why}): the kernel is not built", file=sys.stderr)
        return 0
    try:
        kdir, release = ensure(cache_dir(), lambda msg: print(msg, file=sys.stderr, flush=True))
    except BuildError as e:
        print(f"vfiod-guest: {e}", file=sys.stderr)
        return 1
    print(f"vfiod-guest: {release} in {kdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
