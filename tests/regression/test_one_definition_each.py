"""One definition each: durations, the VFIO driver set, backends by entry point,
no import cycles, and test doubles that are the real classes.

Before: `vfioctl lease --duration` had its own grammar (it took 0 and no
weeks), the set of VFIO drivers was written three times, the built-in
backends were imported by name while third-party ones came by entry point,
the command-line modules imported each other through function-level imports,
and the lease tests carried drifted copies of Caller, Target and Decision."""

import argparse
import ast
import importlib.metadata
import os

import pytest

from vfiod.cmd.common import duration_arg
from vfiod.policy import parse_duration
from tests.source import parse

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400),
                                          ("1w", 604800), ("1h30m", 5400)])
def test_the_command_line_takes_the_policys_durations(text, seconds):
    assert duration_arg(text) == parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "", "1x", "-5", "1h 30m", "99999999999999w"])
def test_the_command_line_refuses_what_the_policy_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        duration_arg(text)
    with pytest.raises(ValueError):
        parse_duration(text)


def _py_files(*dirs):
    for d in dirs:
        for dirpath, _, files in os.walk(os.path.join(ROOT, d)):
            for f in files:
                if f.endswith(".py"):
                    yield os.path.join(dirpath, f)


def test_the_vfio_driver_set_is_written_once():
    places = []
    for path in _py_files("vfiod", "plugins"):
        for node in ast.walk(parse(path)):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                values = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                if {"vfio-pci", "pci-stub"} <= values:
                    places.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert len(places) == 1 and places[0].startswith("vfiod/sysfs/device.py:"), places


def test_built_in_backends_come_through_the_entry_points():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="vfiod.backends")}
    assert eps == {"vfio": "vfiod_plugins.vfio", "pci-stub": "vfiod_plugins.pci_stub",
                   "libvirt": "vfiod_plugins.libvirt"}
    from vfiod.backends import load_backends, plugin_manager
    pm = plugin_manager()
    assert {name for name, _ in pm.list_name_plugin()} >= {"vfio", "pci-stub", "libvirt"}
    assert set(load_backends(pm)) == {"vfio", "pci-stub", "libvirt"}


def _module_of(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-9] if rel.endswith(".__init__") else rel


def test_no_import_cycles_not_even_through_function_level_imports():
    graph = {}
    for path in _py_files("vfiod"):
        mod = _module_of(path)
        package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        deps = set()
        tree = parse(path)
        typing_only = {id(n) for top in ast.walk(tree) if isinstance(top, ast.If)
                       and getattr(top.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(top)}
        for node in ast.walk(tree):
            if id(node) in typing_only:      # annotations only: never imported at run time
                continue
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" for a in node.names]
                deps.update(n for n in names if os.path.exists(os.path.join(ROOT, *n.split("."))) or
                            os.path.exists(os.path.join(ROOT, *n.split(".")) + ".py"))
                deps.add(target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("vfiod"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vfiod"):
                deps.add(node.module)
        graph[mod] = {d for d in deps if d != mod and d in {_module_of(p) for p in _py_files("vfiod")}
                      and not mod.startswith(d + ".")}   # a submodule's import of its own package is its __init__

    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert len(graph) > 30


def test_the_lease_tests_use_the_real_policy_classes():
    tree = parse(os.path.join(ROOT, "tests/sim/leasekit.py"))
    defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    assert not defined & {"Caller", "Target", "Decision", "DeviceDecision", "Policy"}, defined


def test_the_built_in_host_names_offered_are_the_tables():
    from vfiod import sim
    from vfiod.sim import hosts

    assert tuple(sorted(hosts.EXAMPLES)) == sim.BUILT_IN
    assert sim.DEFAULT == hosts.DEFAULT
