"""The standing adversarial suite: every Manager and Lease member called by an
unprivileged user with hostile values, on a private bus and a simulated host."""
