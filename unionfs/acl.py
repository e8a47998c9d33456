"""POSIX ACL inheritance for new objects (POSIX.1e, as Linux's posix_acl_create does).

With FUSE_CAP_DONT_MASK the kernel hands the daemon a new object's mode without the
caller's umask, and the umask beside it: the daemon decides. When the parent directory
has a default ACL the umask is not applied; the new object's access ACL is the default
ACL with its owner, group-class (the mask, else the owning group) and other entries
limited to the requested mode, and the mode follows those entries; a new directory also
inherits the default ACL itself. Without a default ACL the umask applies.

The daemon sets what this computes explicitly (rather than relying on the upper's
filesystem to inherit at creation) because a new name over a whiteout is built in
work/, whose directory has no default ACL, and because its mode is set after creation.
"""
from __future__ import annotations

import stat
import struct

ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"

_VERSION = 2
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def _entries(value: bytes) -> list[list[int]]:
    """[tag, perm, id] of each entry of an ACL xattr; ValueError if it is not one."""
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise ValueError("not a POSIX ACL")
    (version,) = _HEADER.unpack_from(value)
    if version != _VERSION:
        raise ValueError(f"POSIX ACL version {version}")
    return [list(_ENTRY.unpack_from(value, off))
            for off in range(_HEADER.size, len(value), _ENTRY.size)]


def _pack(entries: list[list[int]]) -> bytes:
    return _HEADER.pack(_VERSION) + b"".join(_ENTRY.pack(*e) for e in entries)


def inherit(default_acl: bytes, mode: int) -> tuple[int, bytes | None]:
    """For a new object of *mode* (type and permission bits, umask not applied) in a
    directory with *default_acl*: its mode, and its access ACL (None when the mode says
    it all: the default ACL has only the owner, group and other entries)."""
    entries = _entries(default_acl)
    perm = mode & 0o777
    group_obj = mask = None
    extended = False
    for e in entries:
        tag = e[0]
        if tag == USER_OBJ:
            e[1] &= perm >> 6
            perm &= (e[1] << 6) | 0o077
        elif tag == OTHER:
            e[1] &= perm & 0o7
            perm &= e[1] | 0o770
        elif tag == GROUP_OBJ:
            group_obj = e
        elif tag == MASK:
            mask, extended = e, True
        elif tag in (USER, GROUP):
            extended = True
    group_class = mask if mask is not None else group_obj
    if group_class is None:
        raise ValueError("a POSIX ACL without a group entry")
    group_class[1] &= (perm >> 3) & 0o7
    perm &= (group_class[1] << 3) | 0o707
    new_mode = (mode & ~0o777) | perm
    return new_mode, (_pack(entries) if extended else None)


def new_mode(mode: int, umask: int, default_acl: bytes | None) -> tuple[int, bytes | None]:
    """Mode and access ACL of a new object: inherited from *default_acl* if the parent has
    one (the umask then ignored), else *mode* less the umask. Symlinks keep their mode."""
    if stat.S_ISLNK(mode):
        return mode, None
    if default_acl is None:
        return mode & ~(umask & 0o777), None
    return inherit(default_acl, mode)
