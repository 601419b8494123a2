"""The commands the README and docs/ show as runnable (shell blocks fenced ```sh simulated)
run as written against vfiod on the simulated host, each exiting 0 with no traceback;
and the README keeps the two set-up commands of a fresh machine and how to run one tier."""

import glob
import os
import re
import subprocess

import pytest

from tests.bus.conftest import ROOT, VENV_BIN

DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
BLOCK = re.compile(r"^```sh simulated\n(.*?)^```", re.M | re.S)


def runnable():
    for path in DOCS:
        with open(path) as f:
            for block in BLOCK.findall(f.read()):
                for line in block.splitlines():
                    if line.strip() and not line.lstrip().startswith("#"):
                        yield os.path.relpath(path, ROOT), line


def test_the_readme_is_the_admins_document():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert len(text.splitlines()) <= 400
    quick = text.split("## Quick start", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    assert [line.split()[0] for line in quick.splitlines() if line.strip()] == ["./scripts/demo", "./scripts/test"]
    assert "pytest tests/unit" in text and "## Troubleshooting" in text and "## Upgrade and uninstall" in text
    order = [text.index(h) for h in ("## Quick start", "## Install on a real host", "## `vfioctl`", "## Policy",
                                     "## DPDK", "## libvirt", "## Kubernetes", "## Troubleshooting",
                                     "## Upgrade and uninstall")]
    assert order == sorted(order)
    assert list(runnable())


@pytest.mark.bus
def test_every_runnable_command_runs_on_the_simulated_host(make_world):
    w = make_world()
    env = dict(os.environ, VFIOD_BUS=w.address, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
    for where, line in runnable():
        p = subprocess.run(["bash", "-c", line], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
        assert p.returncode == 0, (where, line, p.stdout[-2000:], p.stderr[-2000:])
        assert "Traceback" not in p.stdout + p.stderr and "internal error" not in p.stderr, (where, line)
    assert "Traceback" not in w.read_log()
