"""Which owner the mount shows for an object (the one on disk, mapped or squashed), and
which it stores for one a caller gives.

fuse-overlayfs's `squash_to_root`, `squash_to_uid=` and `squash_to_gid=` make every
object look owned by one user or group, whatever the layers store (containers/storage
passes `squash_to_uid=` when a container's user namespace maps exactly one id). Only
what is shown changes: what is created or chown'ed is stored as asked. The kernel's
permission checks (default_permissions) go by the owner shown, as in fuse-overlayfs.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import ClassVar

from . import syscalls
from .format import OVERRIDE_STAT


def overflow_id(kind: str) -> int:
    """The id the kernel shows for one it cannot map (/proc/sys/fs/overflowuid, -gid)."""
    try:
        with open(f"/proc/sys/fs/overflow{kind}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65534


@dataclass(frozen=True)
class IdMap:
    """fuse-overlayfs's `uidmapping=`/`gidmapping=`: ranges (id on disk, id shown, count).

    An id on disk in a range is shown shifted into its mapped range; an id a caller brings
    (creating, chown) in a mapped range is stored shifted back. Ids in no range become the
    overflow id both ways, and the last range given wins where ranges overlap, as in
    fuse-overlayfs (its list is searched newest first)."""

    ranges: tuple[tuple[int, int, int], ...]
    overflow: int

    def shown(self, disk: int) -> int:
        for first, mapped, count in reversed(self.ranges):
            if first <= disk < first + count:
                return mapped + disk - first
        return self.overflow

    def stored(self, shown: int) -> int:
        for first, mapped, count in reversed(self.ranges):
            if mapped <= shown < mapped + count:
                return first + shown - mapped
        return self.overflow


@dataclass(frozen=True)
class Owners:
    squash_uid: int | None = None  # None: the uid on disk
    squash_gid: int | None = None
    uid_map: IdMap | None = None
    gid_map: IdMap | None = None

    def shown(self, uid: int, gid: int) -> tuple[int, int]:
        """The owner the mount shows for one on disk: squashed, else mapped."""
        if self.uid_map is not None:
            uid = self.uid_map.shown(uid)
        if self.gid_map is not None:
            gid = self.gid_map.shown(gid)
        return (uid if self.squash_uid is None else self.squash_uid,
                gid if self.squash_gid is None else self.squash_gid)

    def stored(self, uid: int, gid: int) -> tuple[int, int]:
        """The owner to store for a caller's or a chown's ids (-1: leave alone)."""
        if self.uid_map is not None and uid != -1:
            uid = self.uid_map.stored(uid)
        if self.gid_map is not None and gid != -1:
            gid = self.gid_map.stored(gid)
        return uid, gid

    @classmethod
    def for_config(cls, config) -> "Owners":
        return cls(config.squash_uid, config.squash_gid,
                   IdMap(config.uid_map, overflow_id("uid")) if config.uid_map else None,
                   IdMap(config.gid_map, overflow_id("gid")) if config.gid_map else None)


class StatOverride:
    """fuse-overlayfs's `user.containers.override_stat` (its xattr_permissions=2): the owner
    and mode an object is to have, kept in an xattr where the daemon may not chown.

    The rules are fuse-overlayfs's: a layer whose root directory carries the xattr is read
    with it (for the upper: also with `-o xattr_permissions=2`, which gives its root one,
    copied from the first lower root that has one, else `0:0:555`). The value is
    `UID:GID:MODE` (MODE octal, permission bits; a fourth field naming the type is read and
    its type ignored) and counts only on directories and regular files. In such an upper a
    chown or chmod writes the xattr and nothing else, a new object or a copy-up stores the
    caller's or the origin's owner and mode there, and the object itself is the daemon's
    with its mode or'ed with 0755, so the daemon can always read it."""

    KEY: ClassVar[bytes] = OVERRIDE_STAT
    DEFAULT: ClassVar[bytes] = b"0:0:555"

    def __init__(self, layers: frozenset[int] = frozenset()) -> None:
        self.layers = layers        # indices (0: the upper) of the layers read with it

    @property
    def upper(self) -> bool:
        return 0 in self.layers

    @staticmethod
    def applies(mode: int) -> bool:
        return stat.S_ISREG(mode) or stat.S_ISDIR(mode)

    @classmethod
    def read(cls, fd: int, name: bytes | None) -> tuple[int, int, int] | None:
        value = syscalls.getxattr(fd, name, cls.KEY)
        if value is None:
            return None
        parts = value.split(b":")
        try:
            uid, gid, mode = int(parts[0]), int(parts[1]), int(parts[2], 8)
        except (IndexError, ValueError):
            return None
        return uid, gid, stat.S_IMODE(mode)  # the type is the object's own

    @classmethod
    def write(cls, fd: int, name: bytes | None, uid: int, gid: int, mode: int) -> None:
        """*mode*: st_mode (type and permissions, written whole, as fuse-overlayfs does)."""
        syscalls.setxattr(fd, name, cls.KEY, b"%d:%d:%o" % (uid, gid, mode))

    def shown(self, index: int, fd: int, name: bytes | None, st: os.stat_result
              ) -> tuple[int, int, int]:
        """(st_mode, uid, gid) of an object of layer *index* at (fd, name), as stored."""
        if index in self.layers and self.applies(st.st_mode):
            kept = self.read(fd, name)
            if kept is not None:
                return stat.S_IFMT(st.st_mode) | kept[2], kept[0], kept[1]
        return st.st_mode, st.st_uid, st.st_gid

    @classmethod
    def for_layers(cls, roots: list[tuple[int, int]], upper_fd: int | None, enable: bool
                   ) -> "StatOverride":
        """*roots*: (index, fd) of every layer root; *enable*: xattr_permissions=2 (marks
        the upper's root if it is not marked yet)."""
        marked = {index for index, fd in roots if syscalls.getxattr(fd, b"", cls.KEY) is not None}
        if enable and upper_fd is not None and 0 not in marked:
            value = next((syscalls.getxattr(fd, b"", cls.KEY) for index, fd in roots
                          if index in marked), None) or cls.DEFAULT
            syscalls.setxattr(upper_fd, b"", cls.KEY, value)
            marked.add(0)
        return cls(frozenset(marked))
