"""Being woken by a directory's changes: Linux inotify, through libc, on the event loop.

vfiod-dra's two halves meet in files: the plugin writes a spec request and waits for
the spec, the spec writer (root) waits for requests and writes specs.  Each used to
look at the other's directory every few tens of milliseconds, which is up to that
long added to every prepare.  A `DirWatch` wakes its side as soon as a file is
written, renamed into or removed from the directory.  Where inotify cannot be had
(no such directory yet, the per-user watch limit reached, another kernel), `start`
says so and the caller goes on looking on its own, as before.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from typing import Callable

log = logging.getLogger("vfiod.dra")

# <sys/inotify.h>
_IN_CLOSE_WRITE = 0x008
_IN_MOVED_FROM = 0x040
_IN_MOVED_TO = 0x080
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_MASK = _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF


class DirWatch:
    """Calls `on_change()` on the event loop whenever a file in `path` is written, renamed
    in or out, or removed (several changes read at once make one call)."""

    def __init__(self, path: str, on_change: Callable[[], None]):
        self.path = path
        self.on_change = on_change
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> bool:
        """Watch from now on; False (and nothing watched) where inotify cannot be had."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            try:
                if libc.inotify_add_watch(fd, os.fsencode(self.path), _MASK) < 0:
                    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), self.path)
                loop = asyncio.get_running_loop()
                loop.add_reader(fd, self._readable)
            except BaseException:
                os.close(fd)
                raise
        except (OSError, AttributeError) as e:     # AttributeError: a libc without inotify
            log.debug("not watching %s (%s): looking at it now and then instead", self.path, e)
            return False
        self._fd, self._loop = fd, loop
        return True

    def _readable(self) -> None:
        changed = False
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                self.close()
                break
            if not data:
                break
            changed = True
        if changed:
            self.on_change()

    def close(self) -> None:
        if self._fd >= 0:
            if self._loop is not None:
                self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "DirWatch":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
