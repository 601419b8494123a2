"""vfiod: PCI driver rebinding and VFIO IOMMU-group leasing, under admin-written policy."""

__version__ = "0.1.0"
