"""What the rootfs tests share: skip conditions, a whole-tree view, its comparison.

A root filesystem on a union is judged by what a process in it sees: for
every path its type, mode, owner, size, content hash, symlink target, device
number and hard-link group. `view()` records that (times never: they differ
from run to run) and `assert_same_views()` says exactly which paths differ.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
import subprocess
from typing import Callable, Iterable, Mapping

import pytest

from helpers.snapshot import snapshot


def overlay_available() -> bool:
    """Kernel overlayfs is there (loading the module if need be)."""
    def listed() -> bool:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == "overlay" for line in f if line.strip())
    if listed():
        return True
    subprocess.run(["modprobe", "overlay"], capture_output=True)
    return listed()


# A rootfs test needs root (chroot, unshare, mknod, mounts), FUSE and kernel overlayfs (the oracle).
ROOTFS_MARKS = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, unshare, mknod, mounts)"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing"),
    pytest.mark.skipif(os.geteuid() == 0 and not overlay_available(),
                       reason="kernel overlayfs is missing"),
]


def _matches(rel: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) for p in patterns)


def view(root: str, *, link_groups: bool = False, xattrs: bool = False,
         ignore_content: Iterable[str] = (),
         normalise: Mapping[str, Callable[[bytes], bytes]] | None = None) -> dict[str, tuple]:
    """Every entry under root: type and mode, owner, link count, size, content or target, rdev.

    link_groups: add, for a non-directory with several links, the smallest
    path of its hard-link group in the view (comparable across two trees,
    where inode numbers are not). xattrs: add the sorted (name, value) list.
    ignore_content: fnmatch patterns of relative paths whose size and content
    are not recorded (only type, mode, owner). normalise: relative path →
    function applied to the file's bytes before hashing (size is then the
    normalised length).
    """
    ignore_content = tuple(ignore_content)
    normalise = normalise or {}
    inodes: dict[tuple[int, int], list[str]] = {}

    def describe(p: str, st: os.stat_result) -> tuple:
        rel = os.path.relpath(p, root)
        is_dir = stat.S_ISDIR(st.st_mode)
        size: int | None = None if is_dir else st.st_size
        what: object = None
        if stat.S_ISREG(st.st_mode):
            with open(p, "rb") as f:
                data = f.read()
            if rel in normalise:
                data = normalise[rel](data)
                size = len(data)
            what = hashlib.sha256(data).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            what = os.readlink(p)
        if _matches(rel, ignore_content):
            size = what = None
        entry: tuple = (stat.filemode(st.st_mode), st.st_mode, st.st_uid, st.st_gid,
                        None if is_dir else st.st_nlink, size, what,
                        st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else None)
        if xattrs:
            names = sorted(os.listxattr(p, follow_symlinks=False))
            entry += (tuple((n, os.getxattr(p, n, follow_symlinks=False)) for n in names),)
        if link_groups and not is_dir and st.st_nlink > 1:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
        return entry

    out = snapshot(root, describe, include_root=True)
    if link_groups:
        group = {rel: min(names) for names in inodes.values() for rel in names}
        out = {rel: entry + (group.get(rel),) for rel, entry in out.items()}
    return out


def hard_link_groups(v: dict[str, tuple]) -> set[frozenset[str]]:
    """The groups of several names of one file in a view made with link_groups=True."""
    groups: dict[str, set[str]] = {}
    for rel, entry in v.items():
        if entry[-1] is not None:
            groups.setdefault(entry[-1], set()).add(rel)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def view_difference(a: dict[str, tuple], b: dict[str, tuple],
                    labels: tuple[str, str] = ("unionfs", "overlayfs")) -> str:
    """'' if equal, else which paths are only in one view and which differ (first 50 each)."""
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    differ = {p: (a[p], b[p]) for p in sorted(set(a) & set(b)) if a[p] != b[p]}
    if not (only_a or only_b or differ):
        return ""
    return (f"only in {labels[0]} ({len(only_a)}): {only_a[:50]}\n"
            f"only in {labels[1]} ({len(only_b)}): {only_b[:50]}\n"
            f"differ ({labels[0]}, {labels[1]}) ({len(differ)}): {dict(list(differ.items())[:50])}")


def assert_same_views(a: dict[str, tuple], b: dict[str, tuple],
                      labels: tuple[str, str] = ("unionfs", "overlayfs")) -> None:
    problem = view_difference(a, b, labels)
    assert not problem, problem
