"""Reads of attributes the kernel shows under the device lock, without ever waiting long.

``driver_override`` and ``sriov_numvfs`` are shown under the device lock.  While an
unbind from vfio-pci waits for the device's holders (the revoke ladder's, or one a
killed vfiod left behind), the kernel holds that lock, and a read of either sleeps
uninterruptibly until the holders let go: a process with such a thread cannot even
exit.  So these reads run in a worker thread, and the caller waits for each one at
most `Patience.limit` seconds from the moment the worker started it; a read that
takes longer is left to finish alone (its attribute reads as unknown, and the same
path is not read again until it has), and a fresh worker goes on with the rest.

A scan gathers its reads into one `Batch` as it finds them and has them read at
the end: one worker thread for thousands of devices, not one thread per read.
"""

from __future__ import annotations

import os
import queue
import threading
import time


def read_at(dfd: int | None, name: str, limit: int = 4096) -> bytes | None:
    """Read up to `limit` bytes of `name` (relative to the directory fd `dfd`, if given);
    None if it cannot be read."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    try:
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


class _Worker:
    """One worker's place in a batch: the item it is on and since when (one tuple, so the
    waiting thread reads both at once), and whether it was left behind."""

    def __init__(self) -> None:
        self.at: tuple[int, float] | None = None
        self.left_behind = False


class Batch:
    """Patient reads gathered one by one (`add`) and read together (`results`).  (A worker
    that reads while the caller goes on with its own reads is slower: the two threads
    take the interpreter lock from each other at every system call.)"""

    def __init__(self, patience: "Patience"):
        self._p = patience
        self.paths: list[str] = []
        self._out: list[bytes | None] = []
        self._todo: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._done = 0
        self._worker: _Worker | None = None

    def add(self, path: str) -> int:
        """Read `path` (absolute); its answer is `results()[index]`."""
        self.paths.append(path)
        return len(self.paths) - 1

    def _start(self) -> None:
        worker = self._worker = _Worker()
        threading.Thread(target=self._work, args=(worker,), name="patient reads", daemon=True).start()

    def results(self) -> list[bytes | None]:
        """Every answer, None for each that could not be read in time."""
        p = self._p
        self._out = [None] * len(self.paths)
        with p.lock:
            held = p.waiting.intersection(self.paths)   # still held by a read left behind: unknown
            p.waiting.update(self.paths)
        for i, path in enumerate(self.paths):
            if path in held:
                self._done += 1
            else:
                self._todo.put(i)
        if self._done < len(self.paths):
            self._start()
        with p.lock:
            while self._done < len(self.paths):
                assert self._worker is not None
                at = self._worker.at
                left = p.limit if at is None else at[1] + p.limit - time.monotonic()
                if left <= 0:                   # stuck: it finishes alone; a new worker goes on
                    self._worker.left_behind = True
                    self._done += 1
                    self._start()
                    continue
                p.finished.wait(left)
            if self._worker is not None:
                self._todo.put(None)
        return self._out

    def _work(self, worker: _Worker) -> None:
        p = self._p
        while True:
            i = self._todo.get()
            if i is None:
                self._todo.put(None)          # for a worker that replaced this one, if any
                return
            worker.at = (i, time.monotonic())
            data = read_at(None, self.paths[i])
            with p.lock:
                p.waiting.discard(self.paths[i])
                if worker.left_behind:
                    return
                self._out[i] = data
                self._done += 1
                worker.at = None
                if self._done == len(self.paths):
                    p.finished.notify_all()


class Patience:
    """Where a reader's patient reads meet (see the module); one per reader."""

    def __init__(self, limit: float = 1.0):
        self.limit = limit
        self.waiting: set[str] = set()         # paths whose read the kernel still holds
        self.lock = threading.Lock()
        self.finished = threading.Condition(self.lock)

    def batch(self) -> Batch:
        return Batch(self)
