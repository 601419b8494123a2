"""A root on which a Debian package is installed, made without installing it here.

``installed_layer(deb, dest)`` writes into ``dest`` what dpkg leaves on a
system that has the package installed and enabled: the package's files, its
record in ``/var/lib/dpkg/status`` (this machine's database with the package's
paragraph added, ``Status: install ok installed``), ``info/PKG.list``,
``.md5sums`` and the maintainer scripts, and the unit's enablement as
deb-systemd-helper makes it.  Laid over the guest's root
(``Guest(root_layers=[dest])``), the guest sees a host with the package
installed, and this machine stays as it is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

STATUS = Path("/var/lib/dpkg/status")


def _deb(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], check=True, capture_output=True, text=True).stdout


def installed_layer(deb: Path, dest: Path, units=("vfiod.service",), wanted_by="multi-user.target") -> str:
    """Fill dest; return the package name."""
    dest.mkdir(parents=True, exist_ok=True)
    control = _deb("-f", str(deb))
    fields = [line for line in control.splitlines() if line.strip()]
    name = next(line.split(":", 1)[1].strip() for line in fields if line.startswith("Package:"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    _follow_merged_usr(dest)
    info = dest / "var/lib/dpkg/info"
    info.mkdir(parents=True, exist_ok=True)
    with open(dest / "var/lib/dpkg/status", "w") as out:
        base = STATUS.read_text()
        out.write(base.rstrip("\n") + "\n\n")
        out.write(f"Package: {name}\nStatus: install ok installed\n")
        out.write("".join(line + "\n" for line in fields if not line.startswith("Package:")))
    paths = ["/."]
    for line in _deb("-c", str(deb)).splitlines():
        path = line.split(None, 5)[5].split(" -> ")[0].rstrip("/")
        if path not in (".", ""):
            paths.append(path[1:])
    (info / f"{name}.list").write_text("".join(p + "\n" for p in paths))
    ctl = dest / ".control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(ctl)], check=True)
    for f in ctl.iterdir():
        if f.name != "control":
            shutil.copy2(f, info / f"{name}.{f.name}")
    shutil.rmtree(ctl)
    for unit in units:
        wants = dest / "etc/systemd/system" / f"{wanted_by}.wants"
        wants.mkdir(parents=True, exist_ok=True)
        os.symlink(f"/lib/systemd/system/{unit}", wants / unit)
        dsh = dest / "var/lib/systemd/deb-systemd-helper-enabled"
        (dsh / f"{wanted_by}.wants").mkdir(parents=True, exist_ok=True)
        (dsh / f"{wanted_by}.wants" / unit).write_text("")
        (dsh / f"{unit}.dsh-also").write_text(f"/etc/systemd/system/{wanted_by}.wants/{unit}\n")
    return name


def _follow_merged_usr(dest: Path) -> None:
    """Where this machine's /lib, /bin, ... are symlinks (merged /usr), move what the
    package put there to where dpkg's writes would land, and make them the same
    symlinks: a real /lib in the layer would hide the root's whole /usr/lib."""
    for top in list(dest.iterdir()):
        host = Path("/") / top.name
        if top.is_dir() and not top.is_symlink() and host.is_symlink():
            link = os.readlink(host)
            target = (host.parent / link).resolve()
            shutil.copytree(top, dest / target.relative_to("/"), symlinks=True, dirs_exist_ok=True)
            shutil.rmtree(top)
            os.symlink(link, top)
