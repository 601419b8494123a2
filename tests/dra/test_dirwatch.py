"""`DirWatch`: vfiod-dra's halves are woken by each other's files, not by a timer."""

from __future__ import annotations

import asyncio
import os

from vfiod.dra.dirwatch import DirWatch


async def _wakes(tmp_path, change) -> list[str]:
    seen: list[str] = []
    woke = asyncio.Event()

    def on_change() -> None:
        seen.append("change")
        woke.set()

    with DirWatch(str(tmp_path), on_change) as watch:
        assert watch.start()
        await asyncio.sleep(0.05)
        assert not seen                     # nothing changed: no call
        change()
        await asyncio.wait_for(woke.wait(), 5)
    return seen


def test_a_file_renamed_into_the_directory_wakes_the_watcher(tmp_path):
    def write_atomically() -> None:
        (tmp_path / ".req.tmp").write_text("{}")
        os.rename(tmp_path / ".req.tmp", tmp_path / "req.json")

    assert asyncio.run(_wakes(tmp_path, write_atomically))


def test_a_removed_file_wakes_the_watcher(tmp_path):
    (tmp_path / "spec.json").write_text("{}")
    assert asyncio.run(_wakes(tmp_path, lambda: os.unlink(tmp_path / "spec.json")))


def test_a_missing_directory_is_said_and_nothing_is_watched(tmp_path):
    async def go() -> bool:
        with DirWatch(str(tmp_path / "not-there"), lambda: None) as watch:
            return watch.start()

    assert asyncio.run(go()) is False


def _inotify_fds() -> set[int]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:inotify":
                out.add(int(name))
        except OSError:
            pass
    return out


def test_the_watch_is_closed_with_its_block(tmp_path):
    async def go() -> int:
        with DirWatch(str(tmp_path), lambda: None) as watch:
            assert watch.start()
            fd = watch._fd
            assert fd in _inotify_fds()
        assert watch._fd == -1
        return fd

    before = _inotify_fds()
    fd = asyncio.run(go())
    assert fd not in _inotify_fds() - before
