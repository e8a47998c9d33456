"""A mount's entry in libmount's table of userspace mount options, for umount(8).

util-linux's umount(8) runs a helper, /sbin/umount.<type>, only once it knows a
mount's type from the mount table. Run by root on a directory it asks statfs(2)
instead, which says only "fuse", unless /run/mount/utab has an entry for the
mountpoint: then it reads the table, finds fuse.unionfs, and runs
umount.fuse.unionfs (scripts/umount.fuse.unionfs), which waits for the daemon as
`unionfs umount` does. So a mount made by root adds such an entry, with
helper=fuse.unionfs, through mount(8) itself (--fake: no mount(2), --internal-only:
no mount helper, --no-canonicalize: it never looks at the mountpoint, which is
not served yet). umount(8) removes the entry after its helper; the daemon removes
it when the mount went some other way (umount -i, fusermount3 -u, umount(2)).
Users other than root need no entry: their umount(8) always reads the table.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess

from .config import FSTYPE

log = logging.getLogger("unionfs")

UTAB_ENV = "LIBMOUNT_UTAB"   # libmount's own override of the path
DEFAULT_UTAB = "/run/mount/utab"
HELPER_OPTION = f"helper={FSTYPE}"


def _path() -> str:
    return os.environ.get(UTAB_ENV) or DEFAULT_UTAB


def _mangle(path: str) -> str:
    """How libmount writes a path in utab (as the kernel does in mountinfo)."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def has_entry(mountpoint: str) -> bool:
    try:
        with open(_path()) as f:
            return any(f"TARGET={_mangle(mountpoint)}" in line.split() for line in f)
    except OSError:
        return False


def _run(argv: list[str]) -> None:
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.debug("%s: %s", " ".join(argv), e)
        return
    if proc.returncode != 0:
        log.debug("%s: %s", " ".join(argv), proc.stderr.strip())


def add(source: str, mountpoint: str) -> None:
    """Record the live mount at *mountpoint* (best effort: without the entry, plain
    `umount` still unmounts, only without waiting for the daemon)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return
    _run(["mount", "--fake", "--internal-only", "--no-canonicalize", "-t", FSTYPE,
          "-o", HELPER_OPTION, "--", source, mountpoint])


def remove(mountpoint: str, still_mounted: bool) -> None:
    """Drop the entry of a mount that is gone. Not while something is mounted there
    (*still_mounted*): the entry would be that mount's."""
    if still_mounted or os.geteuid() != 0 or not has_entry(mountpoint) \
            or shutil.which("umount") is None:
        return
    _run(["umount", "--fake", "--internal-only", "--no-canonicalize", "--", mountpoint])
