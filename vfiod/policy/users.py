"""The user and group database: the system's, or a static one for tests."""

from __future__ import annotations

import grp
import os
import pwd
from typing import Iterable, Mapping

import attrs



# ---------------------------------------------------------------- users and groups

class UserDb:
    """Who exists: the system's users and groups (pwd, grp, getgrouplist).

    The loader takes one as ``users``; tests pass a `StaticUserDb`."""

    _ERRORS = (KeyError, ValueError, OverflowError, TypeError)

    def uid(self, name: str) -> int | None:
        try:
            return pwd.getpwnam(name).pw_uid
        except self._ERRORS:
            return None

    def gid(self, name: str) -> int | None:
        try:
            return grp.getgrnam(name).gr_gid
        except self._ERRORS:
            return None

    def user_name(self, uid: int) -> str | None:
        try:
            return pwd.getpwuid(uid).pw_name
        except self._ERRORS:
            return None

    def group_name(self, gid: int) -> str | None:
        try:
            return grp.getgrgid(gid).gr_name
        except self._ERRORS:
            return None

    def groups_of(self, uid: int) -> frozenset[int]:
        """Every gid of the user, the primary one included; none for an unknown uid."""
        try:
            pw = pwd.getpwuid(uid)
            return frozenset(os.getgrouplist(pw.pw_name, pw.pw_gid))
        except (*self._ERRORS, OSError):
            return frozenset()


@attrs.frozen
class StaticUserDb(UserDb):
    """A fixed user and group database.

    `users` maps a name to its uid, or to (uid, primary gid) (default: a
    user-private group with gid = uid); `groups` maps a name to (gid, member
    names)."""

    users: Mapping[str, int | tuple[int, int]] = attrs.field(factory=dict)
    groups: Mapping[str, tuple[int, Iterable[str]]] = attrs.field(factory=dict)

    def _entry(self, name: str) -> tuple[int, int] | None:
        return self._ids(name) if name in self.users else None

    def _ids(self, name: str) -> tuple[int, int]:
        """(uid, primary gid) of a user this database names."""
        v = self.users[name]
        return (v, v) if isinstance(v, int) else (v[0], v[1])

    def uid(self, name: str) -> int | None:
        e = self._entry(name) if isinstance(name, str) else None
        return e[0] if e else None

    def gid(self, name: str) -> int | None:
        g = self.groups.get(name) if isinstance(name, str) else None
        return g[0] if g else None

    def user_name(self, uid: int) -> str | None:
        return next((n for n in self.users if self._ids(n)[0] == uid), None)

    def group_name(self, gid: int) -> str | None:
        return next((n for n, (g, _) in self.groups.items() if g == gid), None)

    def groups_of(self, uid: int) -> frozenset[int]:
        name = self.user_name(uid)
        if name is None:
            return frozenset()
        gids = {self._ids(name)[1]}
        gids.update(g for g, members in self.groups.values() if name in members)
        return frozenset(gids)


def system_users() -> UserDb:
    """The database used when a caller passes none: the system's."""
    return UserDb()


@attrs.frozen
class LayeredUserDb(UserDb):
    """Several databases asked in order: the first that knows a name or id answers."""

    layers: tuple[UserDb, ...]

    def uid(self, name: str) -> int | None:
        return next((v for db in self.layers if (v := db.uid(name)) is not None), None)

    def gid(self, name: str) -> int | None:
        return next((v for db in self.layers if (v := db.gid(name)) is not None), None)

    def user_name(self, uid: int) -> str | None:
        return next((v for db in self.layers if (v := db.user_name(uid)) is not None), None)

    def group_name(self, gid: int) -> str | None:
        return next((v for db in self.layers if (v := db.group_name(gid)) is not None), None)

    def groups_of(self, uid: int) -> frozenset[int]:
        """The groups of the first database that knows the uid, each by the gid its name
        has here (a group of the same name in an earlier database is that group)."""
        for db in self.layers:
            if db.user_name(uid) is not None:
                gids: set[int] = set()
                for gid in db.groups_of(uid):
                    name = db.group_name(gid)
                    here = self.gid(name) if name is not None else None
                    gids.add(gid if here is None else here)
                return frozenset(gids)
        return frozenset()
