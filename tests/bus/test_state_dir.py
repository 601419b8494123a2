"""One daemon per journal, a journal of one host, and simulations kept apart from
the production paths: vfiod started as a process, on a private bus."""

import hashlib
import os
import shutil
import subprocess

import pytest

from .conftest import VENV_BIN

VFIOD = os.path.join(VENV_BIN, "vfiod")


def vfiod(world, *args, timeout=30):
    """Start a second vfiod on `world`'s bus and wait for it to end (it must refuse)."""
    return subprocess.run([VFIOD, "--bus", world.address, *args], capture_output=True, text=True,
                          timeout=timeout)


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def one_error_line(p):
    lines = [line for line in p.stderr.splitlines() if line.startswith("vfiod: ")]
    assert p.returncode != 0, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_a_second_daemon_on_the_same_state_dir_refuses_and_names_the_holder(make_world, tmp_path):
    w = make_world()
    journal = os.path.join(w.state_dir, "state.db")
    before = digest(journal)
    p = vfiod(w, "--simulate", "ich10", "--sim-dir", str(tmp_path / "other-sim"), "--state-dir", w.state_dir,
              "--policy-dir", w.policy_dir)
    line = one_error_line(p)
    assert w.state_dir in line and f"pid {w.daemon.pid}" in line, line
    assert digest(journal) == before
    assert w.daemon.poll() is None                 # the first one serves on
    w.ctl("leases")
    # Once the holder is gone, its lock goes with it: the next daemon starts.
    w.stop_daemon()
    w.start_daemon()
    w.ctl("leases")


def test_a_journal_of_another_host_is_refused_naming_both(make_world, tmp_path):
    w = make_world()
    w.ctl("lease", "group:8", "--persistent")
    w.stop_daemon()
    journal = os.path.join(w.state_dir, "state.db")
    before = digest(journal)
    other = str(tmp_path / "another-sim")
    p = vfiod(w, "--simulate", "ich10", "--sim-dir", other, "--state-dir", w.state_dir,
              "--policy-dir", w.policy_dir)
    line = one_error_line(p)
    assert os.path.realpath(w.sim_dir) in line and os.path.realpath(other) in line, line
    assert "left untouched" in line
    assert digest(journal) == before
    # The other simulated host was not touched either: no write at all.
    assert not os.path.exists(os.path.join(other, "writes.log"))


def test_a_journal_records_the_machine_id_and_refuses_another(tmp_path):
    from vfiod.errors import StateError
    from vfiod.state import Journal
    from vfiod.statedir import machine_host

    mid = tmp_path / "machine-id"
    mid.write_text("3d1219c7c4c5404aaa1f6d2a48adfda4\n")
    path = str(tmp_path / "state" / "state.db")
    Journal(path, host=machine_host(str(mid))).close()
    Journal(path, host=machine_host(str(mid))).close()           # the same machine: served
    before = digest(path)
    mid.write_text("0123456789abcdef0123456789abcdef\n")
    with pytest.raises(StateError) as e:
        Journal(path, host=machine_host(str(mid)))
    assert "3d1219c7c4c5404aaa1f6d2a48adfda4" in str(e.value) and "0123456789abcdef0123456789abcdef" in str(e.value)
    assert digest(path) == before
    mid.write_text("")
    with pytest.raises(StateError, match="holds no machine id"):
        machine_host(str(mid))


def test_a_simulated_daemon_keeps_its_state_and_policy_in_its_sim_dir(make_world, tmp_path):
    w = make_world()
    existed = os.path.exists("/var/lib/vfiod")
    listing = sorted(os.listdir("/var/lib/vfiod")) if existed else None
    sim = str(tmp_path / "sim")
    p = subprocess.Popen([VFIOD, "--bus", w.address, "--simulate", "gpu", "--sim-dir", sim],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # It cannot take the bus name (the world's daemon has it) and ends; by then it has
        # opened its journal and read its policy.
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert "cannot own org.vfiod1" in out, out
    assert os.path.exists(os.path.join(sim, "state", "state.db")), out
    assert os.path.isdir(os.path.join(sim, "policy.d"))
    assert os.path.exists("/var/lib/vfiod") == existed
    if existed:
        assert sorted(os.listdir("/var/lib/vfiod")) == listing
    # Named explicitly, the production journal is refused before anything is created.
    p = vfiod(w, "--simulate", "--state-dir", "/var/lib/vfiod", "--sim-dir", str(tmp_path / "sim2"))
    assert "never uses /var/lib/vfiod" in one_error_line(p)
    assert os.path.exists("/var/lib/vfiod") == existed
    assert not os.path.exists(tmp_path / "sim2")


def test_a_sim_dir_reused_with_another_topology_is_refused(make_world):
    w = make_world()
    w.stop_daemon()
    shutil.rmtree(w.state_dir)
    p = vfiod(w, "--simulate", "gpu", "--sim-dir", w.sim_dir, "--state-dir", w.state_dir,
              "--policy-dir", w.policy_dir)
    line = one_error_line(p)
    assert "'ich10'" in line and "'gpu'" in line and w.sim_dir in line, line
    assert not os.path.exists(os.path.join(w.state_dir, "state.db"))
    # The same topology is served again.
    w.start_daemon()
    w.ctl("leases")


def test_a_sim_dir_from_before_the_name_was_recorded_is_checked_against_the_table(make_world):
    w = make_world()
    w.stop_daemon()
    os.unlink(os.path.join(w.sim_dir, "topology"))
    p = vfiod(w, "--simulate", "gpu", "--sim-dir", w.sim_dir, "--state-dir", w.state_dir + "2",
              "--policy-dir", w.policy_dir)
    assert "is not 'gpu'" in one_error_line(p)
    w.start_daemon()                               # ich10's table matches its tree
    with open(os.path.join(w.sim_dir, "topology")) as f:
        assert f.read().strip() == "ich10"


def end_leases(w):
    return subprocess.run([VFIOD, "--simulate", w.topology, "--sim-dir", w.sim_dir, "--state-dir", w.state_dir,
                           "end-leases"], capture_output=True, text=True, timeout=120)


def test_end_leases_gives_every_device_back_persistent_leases_too(make_world):
    w = make_world()
    before = w.drivers()
    w.ctl("lease", "group:8", "--persistent")
    assert w.drivers()["0000:04:00.0"] == "vfio-pci"
    # Refused while a daemon serves the directory.
    p = end_leases(w)
    assert f"pid {w.daemon.pid}" in one_error_line(p)
    assert w.drivers()["0000:04:00.0"] == "vfio-pci"
    w.stop_daemon()
    assert w.drivers()["0000:04:00.0"] == "vfio-pci"      # a persistent lease outlives the daemon
    mark = len(w.writes())
    p = end_leases(w)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 lease(s) ended" in p.stderr
    assert w.drivers() == before
    assert ["bus/pci/drivers/vfio-pci/unbind", "0000:04:00.0"] in w.writes()[mark:]
    # Nothing left to end: the journal holds no lease.
    assert "0 lease(s) ended" in end_leases(w).stderr
    import sqlite3
    db = sqlite3.connect(os.path.join(w.state_dir, "state.db"))
    assert db.execute("SELECT COUNT(*) FROM leases").fetchone() == (0,)
    assert [r[0] for r in db.execute("SELECT outcome FROM audit WHERE event='release'")] == ["released"]
    db.close()
