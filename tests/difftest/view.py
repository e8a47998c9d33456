"""Capture a mounted union's view, and compare two views.

A view maps every path under the mountpoint (walked with readdir + lstat,
never following symlinks) to what a user can observe about it, minus the
things overlayfs does not promise to keep stable: times, st_ino and st_dev
values, directory sizes and directory link counts. Inode numbers matter only
as a partition: which non-directory paths share one (hard-link groups).
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from typing import Any

from helpers.snapshot import snapshot

View = dict[str, Any]


def errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__


def ftype(mode: int) -> str:
    return {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
            stat.S_IFCHR: "chr", stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo",
            stat.S_IFSOCK: "sock"}.get(stat.S_IFMT(mode), f"?{stat.S_IFMT(mode):o}")


def hash_file(path: str) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()[:16]


def xattrs_of(path: str) -> dict[str, Any]:
    """All xattr names (so leaked private ones show), values of user.* ones."""
    try:
        names = sorted(os.listxattr(path, follow_symlinks=False))
    except OSError as e:
        return {"<listxattr>": errname(e)}
    out: dict[str, Any] = {}
    for n in names:
        if n.startswith("user."):
            try:
                out[n] = os.getxattr(path, n, follow_symlinks=False)
            except OSError as e:
                out[n] = errname(e)
        else:
            out[n] = "<present>"
    return out


def describe(path: str, st: os.stat_result, content: bool = True) -> dict[str, Any]:
    """What lstat & co. say about one object (no times, inode numbers, dir sizes/nlink)."""
    t = ftype(st.st_mode)
    d: dict[str, Any] = {"type": t, "mode": oct(stat.S_IMODE(st.st_mode)),
                         "uid": st.st_uid, "gid": st.st_gid}
    if t != "dir":
        d["nlink"] = st.st_nlink
        d["size"] = st.st_size
    if t == "file" and content:
        try:
            d["sha"] = hash_file(path)
        except OSError as e:
            d["sha"] = errname(e)
    elif t == "symlink":
        try:
            d["target"] = os.readlink(path)
        except OSError as e:
            d["target"] = errname(e)
    elif t in ("chr", "blk"):
        d["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    d["xattrs"] = xattrs_of(path)
    return d


def capture(root: str) -> View:
    """Walk *root*; return {relpath: description} plus the hard-link partition."""
    inos: dict[int, list[str]] = {}

    def one(path: str, st: os.stat_result) -> dict[str, Any]:
        if not stat.S_ISDIR(st.st_mode):
            inos.setdefault(st.st_ino, []).append(os.path.relpath(path, root))
        return describe(path, st)

    def on_error(rel: str, op: str, e: OSError) -> tuple[str, Any]:
        if op == "list":
            return (rel or ".") + "/<readdir>", errname(e)
        return rel, {"lstat": errname(e)}

    view: View = snapshot(root, one, on_error=on_error)
    view["<root>"] = describe(root, os.lstat(root), False)
    groups = sorted(sorted(g) for g in inos.values() if len(g) > 1)
    view["<hardlink-groups>"] = [tuple(g) for g in groups]
    return view


def diff_views(a: View, b: View, limit: int = 40) -> list[str]:
    """Human-readable differences, empty when the views agree."""
    out: list[str] = []
    for k in sorted(set(a) | set(b)):
        if k not in b:
            out.append(f"  {k}: only in kernel: {a[k]}")
        elif k not in a:
            out.append(f"  {k}: only in other: {b[k]}")
        elif a[k] != b[k]:
            if isinstance(a[k], dict) and isinstance(b[k], dict):
                fields = sorted(set(a[k]) | set(b[k]))
                parts = [f"{f}: {a[k].get(f, '<absent>')!r} != {b[k].get(f, '<absent>')!r}"
                         for f in fields if a[k].get(f, "<absent>") != b[k].get(f, "<absent>")]
                out.append(f"  {k}: " + "; ".join(parts))
            else:
                out.append(f"  {k}: kernel {a[k]!r} != other {b[k]!r}")
        if len(out) >= limit:
            out.append("  ...")
            break
    return out


def dir_paths(view: View) -> list[str]:
    return sorted(k for k, v in view.items() if isinstance(v, dict) and v.get("type") == "dir")
