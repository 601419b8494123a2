"""vfiod's built-in backends, importable as ``vfiod_plugins``."""
