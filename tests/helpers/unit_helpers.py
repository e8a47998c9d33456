"""Helpers shared by the tests: drive a Union the way the kernel would, and read the upper."""
from __future__ import annotations

import errno
import hashlib
import inspect
import os
import stat

import trio


def do(fn, *args):
    """Call a Union method, under trio.run when it is a coroutine function."""
    if inspect.iscoroutinefunction(fn):
        return trio.run(fn, *args)
    res = fn(*args)
    if inspect.iscoroutine(res):
        async def wait():
            return await res
        return trio.run(wait)
    return res


def walk(u, path: str):
    """Look a view path up component by component, counting references like the kernel."""
    node = u.root
    for part in [p for p in path.split("/") if p]:
        child, _ = u.lookup(node, part.encode())
        if child is None:
            raise FileNotFoundError(errno.ENOENT, "not in the view", path)
        node = u.nodes.ref(child)
    return node


def read(u, path: str) -> bytes:
    """Contents of a view path, read from wherever the union has the object."""
    from unionfs import syscalls
    fd = syscalls.open_at(*u.loc(walk(u, path)), os.O_RDONLY)
    try:
        return os.read(fd, 1 << 24)
    finally:
        os.close(fd)


def is_whiteout(path: str) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)


def xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.ENODATA:
            return None
        raise


def seeded(tag: str, size: int) -> bytes:
    """*size* bytes determined by *tag*, different in every 32-byte piece (so data written
    at a wrong offset, or another write's data, never compares equal)."""
    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(f"{tag}:{i}".encode()).digest()
        i += 1
    return bytes(out[:size])
