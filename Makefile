# Installation into a system (as root): `make install` (PREFIX=/usr by default).
PREFIX ?= /usr
DESTDIR ?=
PYTHON ?= /usr/bin/python3

install:
	$(PYTHON) -m pip install --root=$(DESTDIR)/ --prefix=$(PREFIX) --no-deps .
	install -Dm644 systemd/vfiod.service $(DESTDIR)/lib/systemd/system/vfiod.service
	install -Dm644 systemd/org.vfiod1.conf $(DESTDIR)$(PREFIX)/share/dbus-1/system.d/org.vfiod1.conf
	install -Dm644 systemd/org.vfiod1.service $(DESTDIR)$(PREFIX)/share/dbus-1/system-services/org.vfiod1.service
	install -Dm644 systemd/vfiod-tmpfiles.conf $(DESTDIR)$(PREFIX)/lib/tmpfiles.d/vfiod.conf
	install -d -m755 $(DESTDIR)/etc/vfiod/policy.d

.PHONY: install
