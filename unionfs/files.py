"""Open files: real fds on the upper or lower object, behind small integer handles.

The handle table of a union (union.Union holds one); opening, which may copy up
first, is the Union's, and so are read and fsync (fs.py).

With FUSE passthrough (`Handles.passthrough`), the kernel reads and writes an open
file's backing file itself. Its rules, which this table keeps per kernel inode (the node
id an open came by: a node may have several, nodes.NodeTable.new_kid): an inode has one
backing file while it is open in passthrough mode, so every open of it then gets the
same backing id; and no open of an inode may keep the kernel's page cache (caching mode)
while another is in passthrough mode, so an inode that has handles of one kind gets only
more of that kind. A file whose copy-up is not yet durable does not pass through either:
its syncs (an O_SYNC write, an msync) must reach the daemon, which drops the copy-up's tag
so that no repair after a power loss copies the origin over synced data (durable.py).

A read-only open of a lower file of 1 MiB or more passes through too, where lower files
may (a read-only mount, or passthrough=all: fs.make_operations) and its layer was opened through
a mount of its own that never updates access times (layers.Layer.noatime: the kernel
opens the backing file by the registered fd's path, with the caller's flags, so our
O_NOATIME would not reach it). The backing file stays the lower one for the whole open,
as fuse-overlayfs leaves a read-only fd opened before a copy-up on the lower file (kernel
overlayfs moves it to the upper copy, and so does a handle served by the daemon: to_upper;
hence the choice is the user's on a writable mount). So a copy-up of a file whose inode
has lower-backed opens gives the file a new kernel inode (Union._new_inode): opens that
reach the old inode then fail with ESTALE, on which the kernel looks the name up again
and finds the new one (Union.open).
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import weakref
from typing import Callable

from . import syscalls
from .merge import Resolver
from .nodes import Node


#: the size from which a lower file's read-only opens pass through (where they may)
LOWER_PASSTHROUGH_MIN = 1 << 20


class Handle:
    """An open file: a real fd on the upper or lower object.

    A read-only open of a lower file that is copied up later switches to the
    upper copy on its next read, so it never serves stale data.
    """

    __slots__ = ("fd", "node", "kid", "on_upper", "flags", "backing")

    def __init__(self, fd: int, node: Node, on_upper: bool, flags: int, kid: int) -> None:
        self.fd = fd
        self.node = node
        self.kid = kid  # the kernel inode (node id) it was opened by
        self.on_upper = on_upper
        self.flags = flags
        self.backing = 0  # the backing id the kernel does this open's I/O with (0: none)


log = logging.getLogger("unionfs")


class Passthrough:
    """The binding's FUSE_DEV_IOC_BACKING_OPEN and _CLOSE: fd -> backing id, and back."""

    def __init__(self, register: Callable[[int], int], unregister: Callable[[int], None],
                 forget_attrs: Callable[[int], None] | None = None) -> None:
        self.register = register
        self.unregister = unregister
        # node id -> the kernel drops its cached attributes of that inode (a notification
        # written from a worker thread); None: no new kernel inodes (the binding cannot
        # give an entry a node id apart from its st_ino), so no lower file passes through
        self.forget_attrs = forget_attrs
        self.failed = False  # a registration failed (logged once)
        # fd -> False while its copy-up is not yet durable (durable.Syncer.settled): such a
        # file's syncs must reach the daemon, which then drops the copy-up's tag
        self.settled: Callable[[int], bool] = lambda fd: True


class Handles:
    """The open files of one union, by handle number."""

    def __init__(self, resolver: Resolver, writeback: bool) -> None:
        self.r = resolver
        self.writeback = writeback
        self.handles: dict[int, Handle] = {}
        # fh -> fd of every open file, for the patched pyfuse3 to answer READs by itself
        self.fds: dict[int, int] = {}
        self._lower: dict[Node, set[int]] = {}  # open read-only on the lower copy
        self._next_fh = 1
        # FUSE passthrough, when the kernel does it (use_passthrough): per kernel inode
        # (node id) with open handles, [backing id, handles, 1 if the backing file is a
        # lower one] for passthrough ones, or the number of others
        self.passthrough: Passthrough | None = None
        self._backing: dict[int, list[int]] = {}
        self._cached: dict[int, int] = {}
        self._passed: weakref.WeakSet[Node] = weakref.WeakSet()  # have had a passthrough open
        self._no_backing: set[int] = set()  # lower layers whose files cannot be backing files

    def use_passthrough(self, pt: Passthrough) -> None:
        """From the first request on, the kernel does passthrough (and no writeback cache)."""
        self.passthrough = pt
        self.writeback = False

    def open_flags(self, flags: int) -> int:
        """The flags our own fd is opened with, for the kernel's *flags*."""
        # O_DIRECT is the kernel's business (it bypasses its page cache); our own fd reads into
        # unaligned buffers, so it must not have it
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT)
        if self.writeback:
            # the kernel's writeback cache reads pages of write-only files and does
            # O_APPEND itself
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
            flags &= ~os.O_APPEND
        return flags

    def add(self, fd: int, node: Node, on_upper: bool, flags: int, kid: int = 0) -> int:
        """A new handle for *fd*, open on *node*'s upper (else lower) object, by the kernel
        inode *kid* (default: the node's current one)."""
        fh = self._next_fh
        self._next_fh += 1
        h = self.handles[fh] = Handle(fd, node, on_upper, flags & os.O_ACCMODE, kid or node.kid)
        self.fds[fh] = fd
        if not on_upper:
            self._lower.setdefault(node, set()).add(fh)
        if self.passthrough is not None:
            h.backing = self._backing_for(h)
        return fh

    def _backing_for(self, h: Handle) -> int:
        """The backing id *h* is opened with, or 0 (caching mode), by the rules above."""
        pt, node, kid = self.passthrough, h.node, h.kid
        assert pt is not None  # add() asks only with passthrough on
        entry = self._backing.get(kid)
        if entry is not None:
            entry[1] += 1
            return entry[0]
        if not self._cached.get(kid) and self._may_pass(h, pt):
            try:
                backing = pt.register(h.fd)
            except OSError as e:
                if not h.on_upper:  # this layer's files cannot be: do not try again
                    self._no_backing.add(node.lowers[0][0].index)
                if not pt.failed:  # ELOOP: the layer is on a stacked filesystem, say
                    pt.failed = True
                    log.warning("passthrough: %s cannot be a backing file (%s); such opens "
                                "are served by the daemon", node.path().decode(errors="replace"),
                                os.strerror(e.errno or 0))
            else:
                self._backing[kid] = [backing, 1, 0 if h.on_upper else 1]
                self._passed.add(node)
                return backing
        self._cached[kid] = self._cached.get(kid, 0) + 1
        return 0

    def _may_pass(self, h: Handle, pt: Passthrough) -> bool:
        if h.on_upper:
            return pt.settled(h.fd)
        layer = h.node.lowers[0][0]
        # a smaller lower file is read in a few requests, or from the page cache the kernel
        # keeps for caching opens; registering a backing file costs more at each open. Its
        # size is fixed while it is a lower file, so an inode's opens all decide alike.
        return (h.flags == os.O_RDONLY and pt.forget_attrs is not None and layer.noatime
                and layer.index not in self._no_backing
                and os.fstat(h.fd).st_size >= LOWER_PASSTHROUGH_MIN)

    def lower_backed(self, kid: int) -> bool:
        """Is the kernel inode *kid* open in passthrough mode on a lower file?"""
        entry = self._backing.get(kid)
        return entry is not None and entry[2] == 1

    def reply(self, fh: int) -> tuple[bool, int]:
        """What the open's reply tells the kernel: (keep its page cache, backing id).
        A caching open of a node that has had a passthrough open drops the page cache: the
        kernel wrote that file past it."""
        h = self.handles[fh]
        if h.backing:
            return False, h.backing
        return h.node not in self._passed, 0

    def to_upper(self, node: Node) -> None:
        """*node* was just copied up: its open lower handles read the upper copy from now.

        At once, not at their next read: the patched pyfuse3 answers READs from `fds`
        without calling us. If the upper copy cannot be opened (EMFILE, say), the handle
        leaves `fds`, so its reads come to `get()`, which tries again or fails them."""
        for fh in self._lower.pop(node, ()):
            try:
                self._reopen_upper(fh, self.handles[fh])
            except OSError:
                del self.fds[fh]

    def _reopen_upper(self, fh: int, h: Handle) -> None:
        fd = syscalls.open_at(*self.r.loc(h.node), os.O_RDONLY)
        os.close(h.fd)
        h.fd, h.on_upper = fd, True
        self.fds[fh] = fd

    def get(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        if not h.on_upper and h.node.upper:  # to_upper could not open it
            self._reopen_upper(fh, h)
        return h

    def write(self, fh: int, off: int, data: bytes) -> int:
        """Write through to the upper file. With the writeback cache the kernel owns a
        file's mtime: it sets its own at write(2) and sends it in a SETATTR later, but
        not when the write fell in the clock tick of the mtime it already had. Our
        pwrite would move the upper's mtime all the same, and the view would show
        another time after a remount; so the upper keeps the mtime the kernel knows."""
        fd = self.get(fh).fd
        if not self.writeback:
            return syscalls.pwrite_all(fd, data, off)
        st = os.fstat(fd)  # both times put back (pwrite changes neither atime): one C call
        try:
            return syscalls.pwrite_all(fd, data, off)
        finally:
            syscalls.futimens(fd, st.st_atime_ns, st.st_mtime_ns)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on the upper file: a handle that can be written is on the upper."""
        h = self.get(fh)
        if h.flags == os.O_RDONLY:  # the kernel refuses these itself; never the lower file
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        syscalls.fallocate(h.fd, mode, offset, length)

    def unwritten_pages(self, fh: int) -> Node | None:
        """The node of *fh* if the kernel's writeback cache may hold pages written to it
        that the upper file has not got: while a handle on it is open for writing. (The
        kernel writes an inode's dirty pages back whenever one of its fds is closed, and
        a shared mapping keeps its fd's handle open.)"""
        node = self.get(fh).node
        if self.writeback and any(h.node is node and h.flags != os.O_RDONLY
                                  for h in self.handles.values()):
            return node
        return None

    def seek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE in the file the handle reads (the kernel asks for no
        other *whence*). Our fds are read and written at explicit offsets only, so
        moving this one's offset changes nothing else."""
        return os.lseek(self.get(fh).fd, offset, whence)

    def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is not None:
            self.fds.pop(fh, None)
            if not h.on_upper:
                fhs = self._lower.get(h.node)
                if fhs is not None:
                    fhs.discard(fh)
                    if not fhs:
                        del self._lower[h.node]
            if self.passthrough is not None:
                self._release_mode(h)
            os.close(h.fd)

    def _release_mode(self, h: Handle) -> None:
        """The kernel has let go of this open's I/O mode before it sent RELEASE: once a
        node has no handles of a kind here, it has none of it in the kernel either."""
        kid = h.kid
        if h.backing:
            entry = self._backing[kid]
            entry[1] -= 1
            if not entry[1]:
                del self._backing[kid]
                assert self.passthrough is not None  # a backing id exists only with it on
                try:
                    self.passthrough.unregister(entry[0])
                except OSError as e:
                    log.warning("passthrough: closing backing id %d: %s", entry[0], os.strerror(e.errno or 0))
        else:
            left = self._cached[kid] - 1
            if left:
                self._cached[kid] = left
            else:
                del self._cached[kid]

    def close(self) -> None:
        self.fds.clear()
        self._lower.clear()
        self._backing.clear()  # the backing ids end with the session
        self._cached.clear()
        for h in self.handles.values():
            os.close(h.fd)
        self.handles.clear()


def kill_setid(fd: int) -> None:
    """What the kernel does when an unprivileged caller truncates: drop set-uid, and
    set-gid where group-execute makes it one (the kernel leaves this to us when open
    truncates atomically)."""
    mode = os.fstat(fd).st_mode
    kill = mode & stat.S_ISUID
    if mode & stat.S_ISGID and mode & stat.S_IXGRP:
        kill |= stat.S_ISGID
    if kill and stat.S_ISREG(mode):
        os.fchmod(fd, stat.S_IMODE(mode) & ~kill)
