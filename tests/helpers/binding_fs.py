"""A tiny filesystem on the built-in FUSE binding alone, no unionfs code: what
tests/test_binding.py mounts to see each of the binding's own features from the kernel's
side. It counts the calls each handler gets and, once unmounted, prints them as JSON.

    python binding_fs.py MOUNTPOINT BACKING_FILE [read_fds=1] [cache_readdir=1]
                         [no_opendir=1] [enable_cache_symlinks=1] [poll_us=N]
                         [max_tasks=N] [passthrough=1]

The tree: data (the backing file's bytes), link -> data, sub/ with three empty files;
a LOOKUP of any other name fails (ENOENT, not cached by the kernel). With passthrough=1,
data's opens get one backing id (the backing file) while any is open, and the JSON says
whether the kernel agreed to passthrough.
"""
from __future__ import annotations

import collections
import errno
import json
import os
import stat
import sys

import trio

from unionfs import _pyfuse3 as pyfuse3

ROOT = pyfuse3.ROOT_INODE
DATA, LINK, SUB = ROOT + 1, ROOT + 2, ROOT + 3
CHILDREN = {ROOT: {b"data": DATA, b"link": LINK, b"sub": SUB},
            SUB: {b"one": SUB + 1, b"two": SUB + 2, b"three": SUB + 3}}
DIR_HANDLE = 1000  # opendir's handle is DIR_HANDLE + inode: readdir can tell which it got


class CountingFs(pyfuse3.Operations):
    def __init__(self, backing: str, features: dict[str, int]) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()
        self.readdir_fhs: set[int] = set()
        self.fd = os.open(backing, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.next_fh = 1
        self.backing_id = 0  # data's, while it is open (passthrough=1)
        self.open_fhs: set[int] = set()
        if features.pop("read_fds", 0):
            self.read_fds = {}
        for name, value in features.items():
            if not hasattr(pyfuse3.Operations, name):
                raise SystemExit(f"binding_fs: no such feature {name}")
            setattr(self, name, value)

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.entry_timeout = a.attr_timeout = 3600
        if inode in CHILDREN:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2
        elif inode == LINK:
            a.st_mode, a.st_size = stat.S_IFLNK | 0o777, 4
        else:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_size = self.size if inode == DATA else 0
        a.st_blksize = 4096
        a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = 1_000_000_000_000_000_000
        return a

    async def getattr(self, inode, ctx=None):
        self.calls["getattr"] += 1
        return self._attrs(inode)

    async def lookup(self, parent, name, ctx=None):
        self.calls["lookup"] += 1
        try:
            return self._attrs(CHILDREN[parent][name])
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def opendir(self, inode, ctx):
        self.calls["opendir"] += 1
        return DIR_HANDLE + inode

    async def readdir(self, fh, start_id, token):
        self.calls["readdir"] += 1
        self.readdir_fhs.add(fh)
        inode = fh - DIR_HANDLE if fh >= DIR_HANDLE else fh
        entries = sorted(CHILDREN[inode].items())
        for i, (name, child) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._attrs(child), i):
                break

    async def releasedir(self, fh):
        self.calls["releasedir"] += 1

    async def readlink(self, inode, ctx):
        self.calls["readlink"] += 1
        return b"data"

    async def open(self, inode, flags, ctx):
        self.calls["open"] += 1
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        if self.read_fds is not None:
            self.read_fds[fh] = self.fd
        if self.passthrough and pyfuse3.passthrough_enabled():
            if not self.backing_id:
                self.backing_id = pyfuse3.backing_open(self.fd)
            self.open_fhs.add(fh)
        return pyfuse3.FileInfo(fh=fh, backing_id=self.backing_id if fh in self.open_fhs else 0)

    async def read(self, fh, off, size):
        self.calls["read"] += 1
        return os.pread(self.fd, size, off)

    async def release(self, fh):
        self.calls["release"] += 1
        if self.read_fds is not None:
            self.read_fds.pop(fh, None)
        self.open_fhs.discard(fh)
        if self.backing_id and not self.open_fhs:
            pyfuse3.backing_close(self.backing_id)
            self.backing_id = 0


def main() -> None:
    mountpoint, backing, *rest = sys.argv[1:]
    features = {k: int(v) for k, v in (arg.split("=", 1) for arg in rest)}
    max_tasks = features.pop("max_tasks", 0) or None
    fs = CountingFs(backing, features)
    pyfuse3.init(fs, mountpoint, {"fsname=binding_fs", "default_permissions"})
    try:
        trio.run(lambda: pyfuse3.main(max_tasks=max_tasks) if max_tasks else pyfuse3.main())
    finally:
        pyfuse3.close(unmount=True)
    json.dump({"calls": fs.calls, "readdir_fhs": sorted(fs.readdir_fhs),
               "passthrough": pyfuse3.passthrough_enabled()}, sys.stdout)


if __name__ == "__main__":
    main()
