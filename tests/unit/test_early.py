"""Early binding: the claims vfiod writes for udev, the udev helper on fake trees (a
swapped card refused), and the marks vfiod believes only while the kernel agrees."""

from __future__ import annotations

import os

import pytest

from vfiod import early
from vfiod.address import PciAddress
from vfiod.errors import PolicyError
from vfiod.policy import Policy
from vfiod.sim import hosts
from vfiod.sim.kernel import SimKernel
from vfiod.sysfs.early import early_bound

from ..source import early_bind_helper

NIC = PciAddress.parse("0000:04:00.0")

POLICY = """
[[resource]]
name = "fast-nic"
devices = [{ address = "0000:04:00.0", ids = "8086:10d3", subsystem = "8086:a01f" }]

[[resource]]
name = "late-nic"
devices = [{ address = "0000:05:00.0", ids = "14e4:167b" }]

[[claim]]
target = "name:fast-nic"
user = "root"
early = true

[[claim]]
target = "name:late-nic"
user = "root"
"""


@pytest.fixture
def host(tmp_path):
    """The ICH10 host as the kernel has it just after adding 04:00.0: not probed yet."""
    roots = hosts.build_spec(hosts.EXAMPLES["ich10"], str(tmp_path / "host"))
    kernel = SimKernel.for_spec(hosts.EXAMPLES["ich10"], roots)
    kernel.unbind(NIC)
    return roots, kernel, str(tmp_path / "early.d")


def _run(helper, roots, claims, bdf="0000:04:00.0"):
    return helper.main([bdf, "--sysfs-root", roots.sysfs, "--proc-root", roots.proc, "--claims-dir", claims,
                        "--run-dir", roots.run])


def test_the_claims_file_lists_only_early_claims_with_their_pinned_ids(tmp_path):
    pol = Policy.from_sources([("40-nics.toml", POLICY)])
    claims = early.early_claims(pol)
    assert [(str(c.addr), c.ids, c.subsystem, c.driver) for c in claims] == \
        [("0000:04:00.0", "8086:10d3", "8086:a01f", "vfio-pci")]
    d = str(tmp_path / "early.d")
    assert early.publish(d, claims) == ["pci-0000:04:00.0"]
    text = open(os.path.join(d, "pci-0000:04:00.0")).read()
    assert "ids=8086:10d3\nsubsystem=8086:a01f\ndriver=vfio-pci\nsource=40-nics.toml:" in text
    assert early.publish(d, claims) == []                     # unchanged: nothing rewritten
    assert os.listdir(d) == ["pci-0000:04:00.0"]              # no temporary file left over
    assert early.publish(d, []) == ["pci-0000:04:00.0"]       # a claim gone: its file goes
    assert os.listdir(d) == []


def test_early_needs_a_resource_and_a_vfio_driver():
    for claim, words in (('target = "0000:04:00.0"', "claim a [[resource]]"),
                         ('target = "name:fast-nic"\nbackend = "libvirt"', "binds vfio-pci or pci-stub")):
        text = POLICY.split("[[claim]]")[0] + f'[[claim]]\n{claim}\nuser = "root"\nearly = true\n'
        with pytest.raises(PolicyError) as e:
            Policy.from_sources([("x.toml", text)])
        assert "key 'early'" in str(e.value) and words in str(e.value)


def test_the_helper_binds_the_claimed_card_before_its_driver(host):
    roots, kernel, claims = host
    early.publish(claims, early.early_claims(Policy.from_sources([("40-nics.toml", POLICY)])))
    assert _run(early_bind_helper(), roots, claims) == 0
    assert kernel.override_of(NIC) == "vfio-pci"
    with open(os.path.join(roots.sysfs, "bus/pci/drivers_probe")) as f:
        assert f.read().startswith("0000:04:00.0")            # vfio-pci is loaded: probed now
    kernel.probe(NIC)                                          # what the kernel does on that write
    assert kernel.driver_of(NIC) == "vfio-pci"
    mark = early_bound(roots, NIC)
    assert mark is not None and mark.driver == "vfio-pci" and mark.ids == "8086:10d3"


def test_a_swapped_card_at_the_claimed_address_is_not_claimed(host, capsys):
    roots, kernel, claims = host
    other = POLICY.replace('ids = "8086:10d3"', 'ids = "8086:1533"')     # the card the admin saw
    early.publish(claims, early.early_claims(Policy.from_sources([("40-nics.toml", other)])))
    before = kernel.state()
    assert _run(early_bind_helper(), roots, claims) == 1
    assert "a different card, not claimed" in capsys.readouterr().err
    assert kernel.state() == before and kernel.override_of(NIC) is None
    assert not os.path.exists(os.path.join(roots.run, "early", "0000:04:00.0"))


def test_a_device_its_driver_already_took_is_left_to_vfiod(host, capsys):
    roots, kernel, claims = host
    kernel.probe(NIC)                                          # e1000e was loaded: it probed first
    early.publish(claims, early.early_claims(Policy.from_sources([("40-nics.toml", POLICY)])))
    assert _run(early_bind_helper(), roots, claims) == 0
    assert "already on e1000e" in capsys.readouterr().err
    assert kernel.driver_of(NIC) == "e1000e" and kernel.override_of(NIC) is None
    assert early_bound(roots, NIC) is None


def test_the_helper_refuses_bad_input_and_changes_nothing(host, capsys):
    roots, kernel, claims = host
    helper = early_bind_helper()
    before = kernel.state()
    assert _run(helper, roots, claims, "../../etc") == 2
    assert _run(helper, roots, claims) == 0                   # no claim file: nothing to do
    os.makedirs(claims, exist_ok=True)
    with open(os.path.join(claims, "pci-0000:04:00.0"), "w") as f:
        f.write("ids=8086:10d3\ndriver=e1000e\n")
    assert _run(helper, roots, claims) == 1
    assert "driver must be one of" in capsys.readouterr().err
    assert kernel.state() == before


def test_a_mark_counts_only_while_the_kernel_agrees(host):
    roots, kernel, claims = host
    early.publish(claims, early.early_claims(Policy.from_sources([("40-nics.toml", POLICY)])))
    _run(early_bind_helper(), roots, claims)
    assert early_bound(roots, NIC) is not None
    kernel.set_override(NIC, None)                             # someone cleared the override
    assert early_bound(roots, NIC) is None
    kernel.set_override(NIC, "vfio-pci")
    assert early_bound(roots, NIC) is not None
    with open(os.path.join(roots.proc, "sys/kernel/random/boot_id"), "w") as f:
        f.write("another-boot\n")                              # a mark of an earlier boot
    assert early_bound(roots, NIC) is None


def _ctl(*argv):
    from vfiod.cmd.ctl import main
    return main(list(argv))


def test_overrides_says_whose_each_override_is(host, tmp_path, capsys):
    roots, kernel, claims = host
    early.publish(claims, early.early_claims(Policy.from_sources([("40-nics.toml", POLICY)])))
    _run(early_bind_helper(), roots, claims)
    kernel.bind(PciAddress.parse("0000:05:00.0"), "pci-stub")            # driverctl's, saved
    (tmp_path / "etc/driverctl.d").mkdir(parents=True)
    (tmp_path / "etc/driverctl.d/pci-0000:05:00.0").write_text("pci-stub\n")
    kernel.set_override(PciAddress.parse("0000:00:1b.0"), "vfio-pci")     # by hand
    capsys.readouterr()
    assert _ctl("overrides", "--sysfs-root", roots.sysfs, "--proc-root", roots.proc, "--run-dir", roots.run,
                "--etc-root", str(tmp_path / "etc"), "--bus", "unix:path=/nonexistent", "--timeout", "1",
                "--json") == 0
    import json

    from ..jsondoc import Schema
    doc = json.loads(capsys.readouterr().out)
    assert Schema().validate(doc) == []                       # as docs/json.md says
    assert doc["kind"] == "overrides" and doc["leases_known"] is False
    got = {r["address"]: (r["override"], r["driver"], r["whose"]) for r in doc["overrides"]}
    assert got == {"0000:00:1b.0": ("vfio-pci", "snd_hda_intel", "unknown"),
                   "0000:04:00.0": ("vfio-pci", None, "early-claim"),
                   "0000:05:00.0": ("pci-stub", "pci-stub", "driverctl")}
    assert "40-nics.toml" in next(r["text"] for r in doc["overrides"] if r["address"] == "0000:04:00.0")


def test_generate_from_host_turns_driverctl_and_vfio_pci_ids_into_early_claims(host, tmp_path, capsys):
    roots, kernel, _claims = host
    kernel.bind(NIC, "vfio-pci")
    etc = tmp_path / "etc"
    (etc / "driverctl.d").mkdir(parents=True)
    (etc / "driverctl.d/pci-0000:04:00.0").write_text("vfio-pci\n")
    (etc / "driverctl.d/pci-0000:00:1f.2").write_text("ahci\n")             # not a VFIO driver
    (etc / "driverctl.d/pci-0000:09:00.0").write_text("vfio-pci\n")         # no such device now
    (etc / "modprobe.d").mkdir()
    (etc / "modprobe.d/vfio.conf").write_text("# GPU\noptions vfio-pci ids=10de:1b80,10de:10f0 disable_vga=1\n")
    with open(os.path.join(roots.proc, "cmdline"), "w") as f:
        f.write("root=/dev/sda1 vfio-pci.ids=1af4:1041\n")
    capsys.readouterr()
    assert _ctl("policy", "generate", "--from-host", "--sysfs-root", roots.sysfs, "--proc-root", roots.proc,
                "--etc-root", str(etc)) == 0
    out = capsys.readouterr().out
    pol = Policy.from_sources([("20-from-host.toml", out)])        # it loads as written
    assert {c.target: (c.user, c.backend, c.early) for c in pol.claims} == {
        "name:group-8": ("root", "vfio", True), "name:group-1": ("root", "vfio", True)}
    assert [(str(d.address), d.ids) for d in pol.resources["group-8"].devices] == \
        [("0000:04:00.0", "8086:10d3"), ("0000:05:00.0", "14e4:167b")]        # the whole group
    assert "# 0000:04:00.0: /etc/driverctl.d/pci-0000:04:00.0 (driverctl: vfio-pci)" in out
    assert "vfio-pci.ids=10de:1b80 (/etc/modprobe.d/vfio.conf:2)" in out
    assert "(driverctl: ahci): not a VFIO driver" in out
    assert "pci-0000:09:00.0 (driverctl: vfio-pci): no such device" in out
    assert "vfio-pci.ids=1af4:1041 (/proc/cmdline): matches no device" in out
    assert [e.ids for e in early.early_claims(pol)] == ["10de:1b80", "10de:10f0", "8086:10d3", "14e4:167b"]


def test_generate_takes_targets_or_from_host(host, capsys):
    roots, _kernel, _claims = host
    base = ("policy", "generate", "--sysfs-root", roots.sysfs, "--proc-root", roots.proc)
    assert _ctl(*base, "--from-host", "04:00.0") == 2
    assert _ctl(*base) == 2
    assert _ctl(*base, "04:00.0") == 2
    err = capsys.readouterr().err
    assert "not both" in err and "or pass --from-host" in err and "--user USER or --unix-group" in err
    assert "Traceback" not in err
