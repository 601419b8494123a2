"""`vfioctl policy check` reports every error of every file in one run.

Before, the shipped examples on a fresh machine stopped at the first error
("no group named 'dpdk'") and the admin had to fix and rerun for each."""

import os

from vfiod.cmd.ctl import main as vfioctl_main


def test_every_error_of_every_file_in_one_run(tmp_path, capsys):
    (tmp_path / "10-a.toml").write_text('[[rule]]\nids = "8086:*"\ngroups = ["no-such-group-x"]\n\n'
                                        '[[rule]]\naddress = "0000:04:00.0"\neveryone = true\nbacknds = ["vfio"]\n')
    (tmp_path / "20-b.toml").write_text('[[rule\n')
    (tmp_path / "30-c.toml").write_text('[[rule]]\nresource = "nope"\neveryone = true\n')
    os.chmod(tmp_path, 0o755)
    rc = vfioctl_main(["policy", "check", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert "10-a.toml:3: key 'groups'" in lines[0]
    assert any("10-a.toml:8: key 'backnds'" in line for line in lines), err
    assert any("20-b.toml:1: TOML syntax error" in line for line in lines), err
    assert any("30-c.toml:2: key 'resource': no resource named 'nope'" in line for line in lines), err
    assert "Traceback" not in err


def test_every_error_of_one_rule_in_one_run(tmp_path, capsys):
    """Three typos in one [[rule]] took three runs: the check stopped at a table's first
    problem.  Now each key's problem is reported, in line order, and a problem that only
    follows from a key set aside (the rule "names nobody" once its bad 'groups' is) is not."""
    (tmp_path / "10-x.toml").write_text('[[rule]]\nclass = "02"\nidz = ["8086:*"]\ngroups = ["dpkd"]\n'
                                        'backends = ["vfoi"]\npersistant = true\n')
    (tmp_path / "20-y.toml").write_text('[[resource]]\nname = "nic"\ndevices = [{ address = "0000:04:00.0", '
                                        'ids = "8086:10d3" }]\ncoment = "x"\n\n[[rule]]\nresource = "nic"\n'
                                        'users = ["root"]\nallow_protected = "yes"\n')
    os.chmod(tmp_path, 0o755)
    rc = vfioctl_main(["policy", "check", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line.removeprefix("vfioctl: ") for line in err.splitlines() if line.strip()]
    assert [line.split(": ", 2)[:2] for line in lines] == [
        ["{}/10-x.toml:3".format(tmp_path), "key 'idz'"],
        ["{}/10-x.toml:4".format(tmp_path), "key 'groups'"],
        ["{}/10-x.toml:5".format(tmp_path), "key 'backends'"],
        ["{}/10-x.toml:6".format(tmp_path), "key 'persistant'"],
        ["{}/20-y.toml:4".format(tmp_path), "key 'coment'"],
        ["{}/20-y.toml:9".format(tmp_path), "key 'allow_protected'"],
    ], err
    assert "names nobody" not in err and "no resource named" not in err
