"""The command lines: `vfiod` (`server`: the daemon and the offline `inspect`) and
`vfioctl` (`ctl`: the client over D-Bus, and `policy`: offline policy checks).
They only translate between people and the domain: `common` holds what both share
(exit codes, root options, durations), `client` the bus calls."""
