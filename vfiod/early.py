"""Early binding: the boot claims udev applies before a host driver probes.

A ``[[claim]]`` with ``early = true`` names a ``[[resource]]``, which pins each
device to its address and ids.  Whenever a policy loads, vfiod writes one file
per device of those claims into ``STATE/early.d`` (``/var/lib/vfiod/early.d``,
on disk, so it is there at the next boot before vfiod runs), each replaced
atomically, and removes the files of claims that are gone::

    /var/lib/vfiod/early.d/pci-0000:04:00.0
        # vfiod early claim: name:fast-nic for dpdk-svc (/etc/vfiod/policy.d/40-dpdk-claim.toml:15)
        ids=8086:10d3
        subsystem=8086:a01f
        driver=vfio-pci
        source=/etc/vfiod/policy.d/40-dpdk-claim.toml:15

udev's ``70-vfiod-early.rules`` runs ``vfiod-early-bind BDF`` on a PCI ``add``
only where such a file exists; the helper writes ``driver_override`` only if the
device's ids read now are the file's (a swapped card is left alone), and leaves
a mark that `vfiod.sysfs.early` checks.  These files are instructions for the
helper, never evidence: vfiod itself acts on the kernel's word alone.
"""

from __future__ import annotations

import os
import tempfile

import attrs

from .address import PciAddress
from .policy import Policy

DIRECTORY = "early.d"          # below the state directory
PREFIX = "pci-"


@attrs.frozen
class EarlyClaim:
    """One device of an early claim, as the helper gets it."""

    addr: PciAddress
    ids: str                   # vendor:device
    subsystem: str             # subsystem vendor:device, "" where the resource names none
    driver: str
    source: str                # the claim's file:line
    what: str                  # "name:fast-nic for dpdk-svc", for people

    @property
    def file_name(self) -> str:
        return PREFIX + self.addr.sysfs_name

    def text(self) -> str:
        return (f"# vfiod early claim: {self.what} ({self.source})\n"
                f"ids={self.ids}\nsubsystem={self.subsystem}\ndriver={self.driver}\nsource={self.source}\n")


def early_claims(policy: Policy) -> list[EarlyClaim]:
    """Every device of the policy's early claims, in address order."""
    out: dict[PciAddress, EarlyClaim] = {}
    for claim in policy.claims:
        if not claim.early or not claim.target.startswith("name:"):
            continue
        resource = policy.resources.get(claim.target[5:])
        for d in resource.devices if resource else ():
            sub = f"{d.subsystem[0]:04x}:{d.subsystem[1]:04x}" if d.subsystem else ""
            out.setdefault(d.address, EarlyClaim(d.address, d.ids, sub, claim.early_driver, claim.source,
                                                 f"{claim.target} for {claim.user}"))
    return [out[a] for a in sorted(out)]


def publish(directory: str, claims: list[EarlyClaim]) -> list[str]:
    """Make `directory` hold exactly `claims` (one file each, each replaced atomically);
    returns the names written or removed.  The directory is made (0755) if missing."""
    os.makedirs(directory, mode=0o755, exist_ok=True)
    changed = []
    want = {c.file_name: c.text() for c in claims}
    for name, text in want.items():
        path = os.path.join(directory, name)
        try:
            with open(path) as f:
                if f.read() == text:
                    continue
        except OSError:
            pass
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        changed.append(name)
    for name in sorted(os.listdir(directory)):
        if (name.startswith(PREFIX) or name.startswith(".tmp-")) and name not in want:
            os.unlink(os.path.join(directory, name))
            changed.append(name)
    if changed:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return changed
