import ast
import os

from vfiod.pciids import PciIds
from tests.source import parse

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SAMPLE = b"""# comment
8086  Intel Corporation
\t10d3  82574L Gigabit Network Connection
\t\t8086 a01f  Gigabit CT Desktop Adapter
\t1521  I350 Gigabit Network Connection
# another comment
14e4  Broadcom Inc. and subsidiaries
\t167b  NetXtreme BCM5755 Gigabit Ethernet PCI Express
C 02  Network controller
\t00  Ethernet controller
C 06  Bridge
\t04  PCI bridge
"""


def test_names_from_pci_ids():
    ids = PciIds(SAMPLE)
    assert ids.describe(0x8086, 0x10D3) == "Intel Corporation 82574L Gigabit Network Connection"
    assert ids.describe(0x14E4, 0x167B) == "Broadcom Inc. and subsidiaries NetXtreme BCM5755 Gigabit Ethernet PCI Express"
    assert ids.describe(0x8086, 0xFFFF) == "Intel Corporation device ffff"
    assert ids.describe(0x1234, 0x5678) == "1234:5678"
    assert ids.class_name(0x020000) == "Ethernet controller"
    assert ids.class_name(0x060400) == "PCI bridge"
    assert ids.class_name(0x028000) == "Network controller"


def test_numeric_fallback_without_pci_ids():
    ids = PciIds(None)
    assert ids.describe(0x8086, 0x10D3) == "8086:10d3"
    assert ids.class_name(0x020000) == "Network controller"
    assert ids.class_name(0xFF0000) == "Class ff00"


def test_pci_ids_is_not_read_until_a_name_is_asked_for():
    ids = PciIds()
    assert ids._data is not None  # sentinel, not loaded
    from vfiod import pciids
    assert ids._data is pciids._UNSET


#: The domain: it imports neither the bus nor udev (the layers of README's architecture).
DOMAIN = ("topology.py", "policy", "leases", "terms.py", "state.py", "address.py", "report.py", "backends.py",
          "hookspecs.py", "sysfs")
FORBIDDEN = {"dbus_next", "dbus_fast", "pyudev"}


def _imports(path):
    tree = parse(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def _sources(*names):
    for name in names:
        path = os.path.join(ROOT, "vfiod", name)
        if os.path.isdir(path):
            for f in sorted(os.listdir(path)):
                if f.endswith(".py"):
                    yield os.path.join(path, f)
        else:
            yield path


def test_domain_modules_import_neither_bus_nor_udev():
    paths = list(_sources(*DOMAIN))
    assert len(paths) >= 15
    for path in paths:
        assert not (set(_imports(path)) & FORBIDDEN), path


#: Where vfiod opens files: the kernel edge, the simulation, the journal (and its lock and
#: the machine id it records), policy files, the early claims it writes for udev,
#: the man page generator (a build step that writes its pages), and vfiod-dra's own
#: files (its checkpoint, its spec requests and the CDI specs its writer writes; it never
#: opens the host's sysfs).
OPENERS = ("vfiod/sysfs/", "vfiod/sim/", "vfiod/state.py", "vfiod/statedir.py", "vfiod/early.py", "vfiod/policy/files.py", "vfiod/cmd/manpage.py",
           "vfiod/dra/checkpoint.py", "vfiod/dra/cdi.py")


def test_only_the_kernel_edge_opens_files():
    """Outside the kernel edge (and the simulation, the journal and the policy loader),
    vfiod code never calls open(), os.open(), listdir, readlink or scandir."""
    for dirpath, _, files in os.walk(os.path.join(ROOT, "vfiod")):
        for f in files:
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, ROOT)
            if not f.endswith(".py") or rel.startswith(OPENERS):
                continue
            tree = parse(path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    fn = node.func
                    name = fn.id if isinstance(fn, ast.Name) else (fn.attr if isinstance(fn, ast.Attribute) else "")
                    assert name not in ("open", "listdir", "readlink", "scandir"), f"{rel}:{node.lineno}"
