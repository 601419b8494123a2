"""vfiod: PCI driver rebinding and VFIO IOMMU-group leasing, under admin-written policy."""

from . import pycompat as _pycompat

__version__ = "0.1.0"

_pycompat.install()
