"""vfiod-dra: the node side of a Kubernetes DRA driver, as a client of vfiod over D-Bus.

The kubelet finds the driver through its plugin registry socket (`plugin`), asks
it to prepare and unprepare ResourceClaims (`driver`); the driver reads each
claim's allocation from the API server (`kube`), asks vfiod for a persistent
lease of every allocated IOMMU group on behalf of the claim's namespace (vfiod's
policy decides), writes a CDI spec for the container runtime (`cdi`), and
records what it did (`checkpoint`) so that a restart strands nothing.  It
publishes this node's leasable groups as a ResourceSlice (`slices`) and keeps it
current from vfiod's signals.

Nothing here writes sysfs or touches /dev/vfio: vfiod does, under its policy.
"""

DRIVER_NAME = "vfiod.io"
