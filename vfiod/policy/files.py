"""Reading the policy directory: only files and directories root (or the given owners)
owns and nobody else may write, opened without following links."""

from __future__ import annotations

import errno
import os
import stat

from ..errors import PolicyError
from .model import MAX_FILE_SIZE


#: Who may own policy files and every directory above them: root.  Anyone else who owns
#: one could grant themselves devices.
TRUSTED_OWNERS: tuple[int, ...] = (0,)


def read_directory(directory: str, owners: tuple[int, ...] = TRUSTED_OWNERS) -> list[tuple[str, bytes]]:
    """``(path, content)`` of every ``*.toml`` of `directory`, in name order.

    Whoever can change a policy file, or put one in place, can grant themselves
    devices, so `PolicyError` for a file or directory that cannot be read, or that
    is not owned by one of `owners` (root; a test or a user checking their own draft
    passes their uid explicitly), or that its group or others may write, or that is
    a symbolic link.  Every directory from ``/`` down is checked and opened without
    following links; above the policy directory a directory others may write is
    accepted only with the sticky bit (``/tmp``), where nobody may replace what
    another owns.  Files are opened with ``O_NOFOLLOW`` and checked on the open fd."""
    path = os.path.abspath(directory)
    dfd = _open_trusted_dir(path, owners)
    try:
        try:
            names = sorted(os.listdir(dfd))
        except OSError as e:
            raise PolicyError(f"{directory}: cannot list the policy directory: {e.strerror}") from None
        sources = []
        for name in names:
            if not name.endswith(".toml") or name.startswith("."):
                continue
            file = os.path.join(directory, name)
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise PolicyError(f"{file}: a symbolic link; policy files are read without following "
                                      "links (copy the file in place)") from None
                raise PolicyError(f"{file}: cannot read: {e.strerror}") from None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                continue
            with os.fdopen(fd, "rb") as f:
                _refuse_untrusted(file, st, owners, sticky_ok=False)
                try:
                    sources.append((file, f.read(MAX_FILE_SIZE + 1)))
                except OSError as e:
                    raise PolicyError(f"{file}: cannot read: {e.strerror}") from None
        return sources
    finally:
        os.close(dfd)


def _open_trusted_dir(path: str, owners: tuple[int, ...]) -> int:
    """An fd of directory `path`, reached from ``/`` one component at a time without
    following links, each component checked (see `read_directory`)."""
    parts = [p for p in path.split("/") if p]
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _refuse_untrusted("/", os.fstat(fd), owners, sticky_ok=bool(parts))
        sofar = ""
        for i, name in enumerate(parts):
            sofar += "/" + name
            try:
                nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    raise PolicyError(f"{path}: no such policy directory") from None
                if e.errno == errno.ELOOP or (e.errno == errno.ENOTDIR and os.path.islink(sofar)):
                    raise PolicyError(f"{sofar}: a symbolic link on the way to the policy directory {path}; "
                                      "the policy is read without following links") from None
                if e.errno == errno.ENOTDIR:
                    raise PolicyError(f"{sofar}: not a directory") from None
                raise PolicyError(f"{sofar}: cannot open the policy directory: {e.strerror}") from None
            os.close(fd)
            fd = nfd
            _refuse_untrusted(sofar, os.fstat(fd), owners, sticky_ok=i + 1 < len(parts))
        return fd
    except BaseException:
        os.close(fd)
        raise


def _refuse_untrusted(path: str, st: os.stat_result, owners: tuple[int, ...], sticky_ok: bool) -> None:
    """Anyone who can write a policy file (or add one, or swap a directory) could grant
    themselves devices."""
    mode = st.st_mode
    fix = f"chown root {path}" if len(owners) == 1 else f"chown to uid {' or '.join(map(str, owners))}"
    if st.st_uid not in owners:
        raise PolicyError(f"{path}: owned by uid {st.st_uid}, not root, so that user could grant "
                          f"themselves devices; refusing the policy ({fix})")
    if mode & 0o022 and not (sticky_ok and mode & stat.S_ISVTX):
        who = "anyone" if mode & 0o002 else "its group"
        raise PolicyError(f"{path}: writable by {who} (mode {mode & 0o7777:04o}), so {who} could grant "
                          f"themselves devices; refusing the policy (chmod go-w {path})")
