"""The layers stay one-way and each room keeps its job.

- No import cycle among the modules of ``vfiod/`` and ``plugins/``, counting the
  imports made for annotations only (``if TYPE_CHECKING:``) and inside functions:
  a cycle there is still two modules that cannot be understood apart.
- No module of ``vfiod/`` or ``plugins/`` over 600 lines; no class over 400 lines
  or 35 methods (the lease manager once had 801 lines and 46 methods).
- vfiod-dra is a client: it imports nothing of vfiod but the client library and
  the shared bus names (`vfiod.client`, `vfiod.wire`), and loading it loads no
  policy engine, journal or kernel code.
- One walk over ``/proc/*/fd``: `vfiod.sysfs.procs.open_files`.  The holder search
  and the in-use check both use it; a second walker would read other rules.
- One list of request options: `vfiod.terms.LeaseTerms`.
"""

import ast
import os
import subprocess
import sys

from tests.source import parse

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _modules():
    out = {}
    for top in ("vfiod", "plugins"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(d, f)
                    mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                    out[mod] = path
    return out


def _imports(mod, path, known):
    """Every module of `known` that `mod` imports, anywhere in the file."""
    package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
    deps = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            deps.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names} & known
            # `from . import x` names the submodule x, not the package
            deps.update(subs if subs and len(subs) == len(node.names) else subs | {target})
    return {d for d in deps if d in known and d != mod}


def _graph():
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def test_no_import_cycle_not_even_for_annotations():
    graph = _graph()
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                cycles.append(sorted(part))

    limit = sys.getrecursionlimit()          # the walk is as deep as the longest import chain
    sys.setrecursionlimit(max(limit, 4 * len(graph)))
    try:
        for v in sorted(graph):
            if v not in index:
                connect(v)
    finally:
        sys.setrecursionlimit(limit)     # other tests (the TOML nesting limit) see the default
    assert len(graph) > 60
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_class_or_method_list_outgrows_a_room():
    big = []
    for mod, path in sorted(_modules().items()):
        lines = sum(1 for _ in open(path))
        if lines > 600:
            big.append(f"{mod}: {lines} lines")
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                methods = sum(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in node.body)
                if size > 400 or methods > 35:
                    big.append(f"{mod}.{node.name}: {size} lines, {methods} methods")
    assert not big, big


def test_vfiod_dra_imports_only_the_client_library_and_the_shared_names():
    graph = _graph()
    outside = {d for m, deps in graph.items() if m.startswith("vfiod.dra") for d in deps
               if not d.startswith("vfiod.dra")}
    allowed = {"vfiod.client", "vfiod.wire", "vfiod.wire.names", "vfiod.wire.transport"}
    assert outside and outside <= allowed, sorted(outside - allowed)
    # and what loading it drags in, as Python does it
    code = ("import sys, vfiod.dra.main, vfiod.dra.driver, vfiod.dra.slices, vfiod.dra.plugin, vfiod.dra.cdi\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('vfiod') and not m.startswith('vfiod.dra'))))")
    got = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = set(got.stdout.split())
    assert loaded <= {"vfiod", "vfiod.address", "vfiod.client", "vfiod.errors", "vfiod.wire", "vfiod.wire.names",
                      "vfiod.wire.transport"}, sorted(loaded)


def test_one_walker_of_open_files():
    walkers = []
    for mod, path in sorted(_modules().items()):
        for node in ast.walk(parse(path)):
            if isinstance(node, (ast.Constant, ast.JoinedStr)):
                text = node.value if isinstance(node, ast.Constant) else "".join(
                    v.value for v in node.values if isinstance(v, ast.Constant))
                if isinstance(text, str) and (text.endswith("/fd") or "/fd/" in text or text == "fd"):
                    walkers.append(f"{mod}:{node.lineno}")
    assert walkers and all(w.startswith("vfiod.sysfs.procs:") for w in walkers), walkers


def test_one_list_of_request_options():
    from vfiod.terms import LeaseTerms

    names = set(LeaseTerms.OPTIONS)
    assert names == {f.name for f in LeaseTerms.__attrs_attrs__}
    places = []
    for mod, path in sorted(_modules().items()):
        for node in ast.walk(parse(path)):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
                elts = node.keys if isinstance(node, ast.Dict) else node.elts
                values = {e.value for e in elts if isinstance(e, ast.Constant)}
                if {"duration", "persistent", "force"} <= values:
                    places.append(f"{mod}:{node.lineno}")
    assert places and all(p.startswith("vfiod.terms:") for p in places), places
