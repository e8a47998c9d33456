"""One layer directory, and a bounded cache of open directory fds.

A Layer is a root directory fd plus its place in the stack. Nothing here
knows about union rules or FUSE: it reads (and, for the upper, writes) one
directory tree fd-relatively.

Directory fds are what make every syscall "dir fd + one name", but a large
tree has more directories than a process may hold fds (the hard limit here is
20,000), so they live in an LRU: a hit costs a dict lookup, a miss re-opens
the directory from its parent's fd and one name.
"""
from __future__ import annotations

import collections
import os
from typing import Callable, Hashable, Iterator

from . import syscalls
from .syscalls import AT_FDCWD

class Layer:
    """One directory of the stack: index 0 is the upper (if any), then lowers top-most first."""

    __slots__ = ("path", "index", "writable", "fd", "dev", "noatime", "_tree")

    def __init__(self, path: str, index: int, writable: bool, noatime: bool = False) -> None:
        """*noatime*: open it through a mount of its own that never updates access times,
        where the kernel allows (then `noatime` is true), so that files the kernel reopens
        from our fds (FUSE passthrough's backing files) leave its access times alone too."""
        self.path = path
        self.index = index
        self.writable = writable
        self.noatime = False
        self._tree: int | None = None  # the O_PATH fd holding that mount
        root, name = AT_FDCWD, os.fsencode(path)
        if noatime:
            try:
                self._tree = root = syscalls.open_noatime_tree(name)
                name = b"."
                self.noatime = True
            except OSError:  # EPERM without CAP_SYS_ADMIN, ENOSYS: before Linux 5.12
                pass
        # every layer directory, root or not, is held open for real where the daemon may
        # read it (else O_PATH; see syscalls.open_dir_real); the user's path may be a symlink
        try:
            self.fd = syscalls.open_dir_real(root, name, follow=True)
        except BaseException:
            self._close_tree()
            raise
        self.dev = os.fstat(self.fd).st_dev

    def _close_tree(self) -> None:
        if self._tree is not None:
            os.close(self._tree)
            self._tree = None

    def close(self) -> None:
        os.close(self.fd)
        self._close_tree()

    def __repr__(self) -> str:
        return f"Layer({self.path!r}, {self.index})"


class FdCache:
    """LRU of directory fds (real where the daemon may read them, else O_PATH), keyed by
    anything hashable.

    Callers use an fd only until their next await, and an operation touches at
    most a handful of directories, so a capacity of thousands can never evict
    an fd still in use.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._fds: collections.OrderedDict[Hashable, int] = collections.OrderedDict()

    def get(self, key: Hashable, opener: Callable[[], int]) -> int:
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        fd = opener()
        self._fds[key] = fd
        if len(self._fds) > self.capacity:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def put(self, key: Hashable, fd: int) -> None:
        """Hand over *fd*, already open (any directory fd serves *at calls), for *key*."""
        self.drop(key)
        self._fds[key] = fd
        if len(self._fds) > self.capacity:
            _, old = self._fds.popitem(last=False)
            os.close(old)

    def drop(self, key: Hashable) -> None:
        fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)

    def clear(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __len__(self) -> int:
        return len(self._fds)


def walk_dir(layer: Layer, cache: FdCache, path: bytes) -> int:
    """fd of directory *path* (relative, b"" for the root) in a read-only layer.

    Lower layers never change under a mount, so (layer, path) is a stable key.
    Each miss opens one component below its (cached) parent, never following
    symlinks, so a symlink in a layer cannot lead out of it.
    """
    if not path:
        return layer.fd

    def opener() -> int:
        parent, _, name = path.rpartition(b"/")
        # real where readable, as Layer's root: a directory copy-up then reads its
        # origin's xattrs through the fd, with no /proc path
        return syscalls.open_dir_real(walk_dir(layer, cache, parent), name)

    return cache.get((layer.index, path), opener)


def walk_tree(root_fd: int) -> Iterator[tuple[int, bytes, bytes, os.DirEntry]]:
    """Every entry below the directory *root_fd* (an fd or O_PATH fd), depth first:
    (its directory's fd, its path relative to the root, its name, its DirEntry).

    fd-relative and never through a symlink; holds one fd per level of depth (not
    per pending directory), so a wide tree cannot exhaust descriptors. Directories
    are opened with O_NOATIME: walking a layer leaves its times alone. The fd given
    with an entry is valid only until the walk moves on.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOATIME

    def walk(fd: int, rel: bytes) -> Iterator[tuple[int, bytes, bytes, os.DirEntry]]:
        try:
            with os.scandir(fd) as it:
                entries = list(it)
            for de in entries:
                name = os.fsencode(de.name)
                path = rel + b"/" + name if rel else name
                yield fd, path, name, de
                if de.is_dir(follow_symlinks=False):
                    try:
                        sub = syscalls.open_noatime(name, flags | os.O_NOFOLLOW, dir_fd=fd)
                    except OSError:
                        continue
                    yield from walk(sub, path)
        finally:
            os.close(fd)

    yield from walk(syscalls.open_noatime(b"/proc/self/fd/%d" % root_fd, flags), b"")
