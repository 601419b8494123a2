"""POSIX access ACLs on one node, through the ``system.posix_acl_access`` xattr.

Just enough to give one user rw on /dev/vfio/vfio for a lease and take it
back: the kernel's xattr format is a version header (2) and entries of
(tag u16, perm u16, id u32), sorted by tag then id, with a mask entry whenever
named users are present.
"""

from __future__ import annotations

import errno
import os
import struct

XATTR = "system.posix_acl_access"
VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF


def _read(path: str) -> list[tuple[int, int, int]] | None:
    try:
        data = os.getxattr(path, XATTR)
    except OSError as e:
        if e.errno == errno.ENODATA:          # no ACL (Linux says ENODATA for ENOATTR)
            return None
        raise
    if len(data) < 4 or struct.unpack_from("<I", data)[0] != VERSION:
        raise OSError(errno.EINVAL, f"unknown ACL format on {path}")
    return [struct.unpack_from("<HHI", data, off) for off in range(4, len(data) - 7, 8)]


def _minimal(mode: int) -> list[tuple[int, int, int]]:
    return [(USER_OBJ, (mode >> 6) & 7, UNDEFINED_ID), (GROUP_OBJ, (mode >> 3) & 7, UNDEFINED_ID),
            (OTHER, mode & 7, UNDEFINED_ID)]


def user_perm(path: str, uid: int) -> int | None:
    """The named-user entry for `uid`, or None."""
    for tag, perm, ident in _read(path) or []:
        if tag == USER and ident == uid:
            return perm
    return None


def set_user(path: str, uid: int, perm: int | None) -> bool:
    """Set (perm given) or remove (None) the entry for `uid`; returns whether anything changed."""
    entries = _read(path)
    if entries is None:
        if perm is None:
            return False
        entries = _minimal(os.stat(path).st_mode)
    others = [e for e in entries if not (e[0] == USER and e[2] == uid) and e[0] != MASK]
    before = user_perm(path, uid)
    if perm is not None:
        others.append((USER, perm & 7, uid))
    named = [e for e in others if e[0] in (USER, GROUP)]
    if named:
        group_obj = next((e[1] for e in others if e[0] == GROUP_OBJ), 0)
        mask = group_obj
        for e in named:
            mask |= e[1]
        others.append((MASK, mask, UNDEFINED_ID))
        others.sort(key=lambda e: (e[0], e[2]))
        os.setxattr(path, XATTR, struct.pack("<I", VERSION) + b"".join(struct.pack("<HHI", *e) for e in others))
    else:
        group_obj = next((e[1] for e in others if e[0] == GROUP_OBJ), 0)
        mode = os.stat(path).st_mode & 0o7777
        os.chmod(path, (mode & ~0o070) | (group_obj << 3))   # the group bits showed the mask
        try:
            os.removexattr(path, XATTR)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
    return before != perm
