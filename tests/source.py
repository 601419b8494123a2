"""Reading the project's own source in tests."""

import ast
import pickle
import subprocess
import sys

_FRESH = "import ast, pickle, sys; sys.stdout.buffer.write(pickle.dumps(ast.parse(open(sys.argv[1]).read())))"


def parse(path: str) -> ast.Module:
    """The module's AST.  CPython 3.11.2's ast.parse can fail late in a long test process
    with "AST constructor recursion depth mismatch" (fixed in 3.11.5); then the tree comes
    from a fresh interpreter, pickled."""
    with open(path) as f:
        text = f.read()
    try:
        return ast.parse(text)
    except SystemError:
        out = subprocess.run([sys.executable, "-c", _FRESH, path], capture_output=True, check=True).stdout
        tree: ast.Module = pickle.loads(out)
        return tree


def early_bind_helper():
    """udev/vfiod-early-bind (a script, not a module of the package), loaded as a module."""
    import importlib.machinery
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "udev", "vfiod-early-bind")
    loader = importlib.machinery.SourceFileLoader("vfiod_early_bind", path)
    spec = importlib.util.spec_from_loader("vfiod_early_bind", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
