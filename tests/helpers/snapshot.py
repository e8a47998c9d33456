"""The one tree snapshot: what a walk of a tree shows, for comparing two views or one view
before and after.

Every test that compares trees walks them the same way (by listing, sorted, never following
a symlink, parents before children); what it records of each object is its own choice, the
*describe* function it passes.
"""
from __future__ import annotations

import os
import stat
from typing import Any, Callable

#: (relative path, "list" or "lstat", the error) -> (the key to record, what to record there)
OnError = Callable[[str, str, OSError], tuple[str, Any]]


def snapshot(root: str, describe: Callable[[str, os.stat_result], Any], *,
             include_root: bool = False, on_error: OnError | None = None,
             noatime: bool = False) -> dict[str, Any]:
    """Relative path ("a/b") -> describe(path, lstat of it), for everything below *root*;
    *root* itself too as "." with *include_root* (a root that is not a directory is then
    all there is). *on_error* records a name that cannot be listed or stat'ed (else the
    error is raised); *noatime* lists directories without moving their atimes."""
    out: dict[str, Any] = {}

    def failed(rel: str, op: str, e: OSError) -> None:
        if on_error is None:
            raise e
        key, value = on_error(rel, op, e)
        out[key] = value

    def one(rel: str, path: str) -> None:
        try:
            st = os.lstat(path)
        except OSError as e:
            return failed(rel, "lstat", e)
        out[rel or "."] = describe(path, st)
        if stat.S_ISDIR(st.st_mode):
            walk(rel, path)

    def walk(rel: str, path: str) -> None:
        try:
            names = sorted(listdir(path, noatime))
        except OSError as e:
            return failed(rel, "list", e)
        for name in names:
            one(f"{rel}/{name}" if rel else name, os.path.join(path, name))

    if include_root:
        one("", root)
    else:
        walk("", root)
    return out


def listdir(path: str, noatime: bool = False) -> list[str]:
    """A directory's names (without moving its atime, if asked)."""
    if not noatime:
        return os.listdir(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME)
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def read_bytes(path: str, noatime: bool = False) -> bytes:
    """A file's data (without moving its atime, if asked)."""
    fd = os.open(path, os.O_RDONLY | (os.O_NOATIME if noatime else 0))
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
