# Installation into a system (as root).
#
#   make deb        the Debian packages, ./vfiod_VERSION_all.deb and the Cockpit page's
#                   ./cockpit-vfiod_VERSION_all.deb (or DEBDIR=DIR): the way to install,
#                   `make deb && apt install ./vfiod_*.deb` (older ones there are replaced)
#   make install    from source: vfiod and its Python dependencies in a venv under
#                   $(PREFIX)/lib/vfiod, the programs in $(PREFIX)/bin where the unit runs them,
#                   and the unit, D-Bus policy and activation, tmpfiles, the udev rule for early
#                   claims and its helper, man pages and completion
#   make install-data   only the files that are not Python (the Debian package uses this too)
PREFIX ?= /usr
DESTDIR ?=
PYTHON ?= /usr/bin/python3
VENV ?= $(PREFIX)/lib/vfiod
# systemd's unit directory for packages (Debian 12: /lib, merged with /usr/lib)
UNITDIR ?= /lib/systemd/system
GENERATORDIR ?= /lib/systemd/system-generators
# udev's directory for packages: the early-claims rule and its helper
UDEVDIR ?= $(PREFIX)/lib/udev
DEBDIR ?= .

install: install-data
	$(PYTHON) -m venv $(DESTDIR)$(VENV)
	$(DESTDIR)$(VENV)/bin/pip install --quiet --disable-pip-version-check .
	# the venv was made below DESTDIR: its scripts must name the final path
	if [ -n "$(DESTDIR)" ]; then \
	    grep -rlI -- '$(DESTDIR)$(VENV)' $(DESTDIR)$(VENV)/bin | xargs -r sed -i 's|$(DESTDIR)$(VENV)|$(VENV)|g'; fi
	install -d $(DESTDIR)$(PREFIX)/bin
	ln -sf $(VENV)/bin/vfiod $(DESTDIR)$(PREFIX)/bin/vfiod
	ln -sf $(VENV)/bin/vfioctl $(DESTDIR)$(PREFIX)/bin/vfioctl

install-data: man
	install -Dm644 systemd/vfiod.service $(DESTDIR)$(UNITDIR)/vfiod.service
	sed -i 's|/usr/bin/vfiod|$(PREFIX)/bin/vfiod|g' $(DESTDIR)$(UNITDIR)/vfiod.service
	install -Dm755 systemd/vfiod-sysfs-generator $(DESTDIR)$(GENERATORDIR)/vfiod-sysfs-generator
	install -Dm644 systemd/org.vfiod1.conf $(DESTDIR)$(PREFIX)/share/dbus-1/system.d/org.vfiod1.conf
	install -Dm644 systemd/org.vfiod1.service $(DESTDIR)$(PREFIX)/share/dbus-1/system-services/org.vfiod1.service
	install -Dm644 systemd/vfiod-tmpfiles.conf $(DESTDIR)$(PREFIX)/lib/tmpfiles.d/vfiod.conf
	install -Dm644 systemd/vfiod-modules.conf $(DESTDIR)$(PREFIX)/lib/modules-load.d/vfiod.conf
	install -Dm755 udev/vfiod-early-bind $(DESTDIR)$(UDEVDIR)/vfiod-early-bind
	install -Dm644 udev/70-vfiod-early.rules $(DESTDIR)$(UDEVDIR)/rules.d/70-vfiod-early.rules
	sed -i 's|/usr/lib/udev/vfiod-early-bind|$(UDEVDIR)/vfiod-early-bind|g' $(DESTDIR)$(UDEVDIR)/rules.d/70-vfiod-early.rules
	install -Dm644 completion/vfiod $(DESTDIR)$(PREFIX)/share/bash-completion/completions/vfiod
	ln -sf vfiod $(DESTDIR)$(PREFIX)/share/bash-completion/completions/vfioctl
	install -Dm644 build/man/vfiod.8 $(DESTDIR)$(PREFIX)/share/man/man8/vfiod.8
	install -Dm644 build/man/vfioctl.1 $(DESTDIR)$(PREFIX)/share/man/man1/vfioctl.1
	install -Dm644 build/man/vfiod.policy.5 $(DESTDIR)$(PREFIX)/share/man/man5/vfiod.policy.5
	install -Dm644 build/man/vfiod-dra.8 $(DESTDIR)$(PREFIX)/share/man/man8/vfiod-dra.8
	install -d -m755 $(DESTDIR)$(PREFIX)/share/doc/vfiod/examples
	install -m644 policy/*.toml policy/README systemd/dpdk-example.service $(DESTDIR)$(PREFIX)/share/doc/vfiod/examples/
	install -m644 deploy/* $(DESTDIR)$(PREFIX)/share/doc/vfiod/examples/
	# the admin's guide and, in docs/ next to it as in the source (so its links work),
	# the reference the man pages name
	install -m644 README.md $(DESTDIR)$(PREFIX)/share/doc/vfiod/
	install -d -m755 $(DESTDIR)$(PREFIX)/share/doc/vfiod/docs
	install -m644 docs/*.md docs/*.png $(DESTDIR)$(PREFIX)/share/doc/vfiod/docs/
	install -d -m755 $(DESTDIR)/etc/vfiod/policy.d

# The man pages, from the parsers and the policy docstring.
man:
	PYTHONPATH=. $(PYTHON) -m vfiod.cmd.manpage build/man

# The bash completion script, from the parsers (a test checks it is current).
completion/vfiod: vfiod/cmd/*.py
	PYTHONPATH=. $(PYTHON) -m vfiod.cmd.completion > $@

# A Debian package from this checkout (dpkg-buildpackage; build dependencies: scripts/setup).
deb:
	rm -rf build/deb && mkdir -p build/deb/src
	tar -c --exclude-vcs --exclude=./.venv --exclude=./build --exclude='*.egg-info' --exclude=__pycache__ \
	    --exclude=.pytest_cache --exclude=.hypothesis --exclude='./vfiod_*.deb' \
	    --exclude='./cockpit-vfiod_*.deb' . | tar -x -C build/deb/src
	# with Debian's own Python and tools, whatever else is first on PATH
	cd build/deb/src && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b --no-sign
	mkdir -p $(DEBDIR) && rm -f $(DEBDIR)/vfiod_*.deb $(DEBDIR)/cockpit-vfiod_*.deb && \
	    mv build/deb/vfiod_*.deb build/deb/cockpit-vfiod_*.deb $(DEBDIR)/
	@ls -l $(DEBDIR)/vfiod_*.deb $(DEBDIR)/cockpit-vfiod_*.deb

.PHONY: install install-data man deb
