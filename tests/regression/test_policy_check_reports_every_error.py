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
