"""Which owner the mount shows for an object: the one on disk, or a squashed one.

fuse-overlayfs's `squash_to_root`, `squash_to_uid=` and `squash_to_gid=` make every
object look owned by one user or group, whatever the layers store (containers/storage
passes `squash_to_uid=` when a container's user namespace maps exactly one id). Only
what is shown changes: what is created or chown'ed is stored as asked. The kernel's
permission checks (default_permissions) go by the owner shown, as in fuse-overlayfs.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Owners:
    squash_uid: int | None = None  # None: the uid on disk
    squash_gid: int | None = None

    def shown(self, uid: int, gid: int) -> tuple[int, int]:
        return (uid if self.squash_uid is None else self.squash_uid,
                gid if self.squash_gid is None else self.squash_gid)
