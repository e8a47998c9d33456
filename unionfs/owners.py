"""Which owner the mount shows for an object (the one on disk, mapped or squashed), and
which it stores for one a caller gives.

fuse-overlayfs's `squash_to_root`, `squash_to_uid=` and `squash_to_gid=` make every
object look owned by one user or group, whatever the layers store (containers/storage
passes `squash_to_uid=` when a container's user namespace maps exactly one id). Only
what is shown changes: what is created or chown'ed is stored as asked. The kernel's
permission checks (default_permissions) go by the owner shown, as in fuse-overlayfs.
"""
from __future__ import annotations

from dataclasses import dataclass


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
