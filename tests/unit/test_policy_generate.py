"""`vfioctl policy generate`: policy written from the devices of a host passes
`policy check` and `policy test` for the user it names, on every built-in host."""

import os

import pytest

from vfiod.cmd.ctl import main as vfioctl_main
from vfiod.sim import hosts
from vfiod.sysfs import SysfsReader
from vfiod.topology import Host


def leasable_groups(name, tmp_path):
    host = Host.scan(SysfsReader(hosts.build(name, str(tmp_path / f"scan-{name}"))))
    return [g.number for g in host.groups.values()
            if host.endpoints(g) and not any(d.protected for d in host.endpoints(g))]


@pytest.mark.parametrize("name", sorted(hosts.EXAMPLES))
def test_generated_policy_passes_check_and_test_for_the_named_user(name, tmp_path, capsys):
    groups = leasable_groups(name, tmp_path)
    assert groups
    for n in groups:
        pdir = tmp_path / f"policy-{name}-{n}"
        pdir.mkdir()
        os.chmod(pdir, 0o755)
        assert vfioctl_main(["policy", "generate", "--simulate", name, f"group:{n}", "--user", "root"]) == 0
        text = capsys.readouterr().out
        assert text.count("[[resource]]") == 1 and 'users = ["root"]' in text
        (pdir / "50-generated.toml").write_text(text)
        assert vfioctl_main(["policy", "check", str(pdir)]) == 0, capsys.readouterr()
        capsys.readouterr()
        rc = vfioctl_main(["policy", "test", "--simulate", name, "--user", "root", "--policy-dir", str(pdir),
                           f"group:{n}"])
        out = capsys.readouterr().out
        assert rc == 0 and "ALLOWED" in out, out
        # and nobody else
        rc = vfioctl_main(["policy", "test", "--simulate", name, "--user", "65534", "--policy-dir", str(pdir),
                           f"group:{n}"])
        assert rc == 3
        capsys.readouterr()


def test_protected_devices_need_to_be_asked_for(capsys):
    # ICH10's 00:19.0 carries the default route
    assert vfioctl_main(["policy", "generate", "--simulate", "ich10", "00:19.0", "--user", "root"]) == 3
    assert "protected" in capsys.readouterr().err
    assert vfioctl_main(["policy", "generate", "--simulate", "ich10", "00:19.0", "--user", "root",
                         "--allow-protected"]) == 0
    assert "allow_protected = true" in capsys.readouterr().out
