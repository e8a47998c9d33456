"""Open files: real fds on the upper or lower object, behind small integer handles.

A mixin of union.Union.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING

from . import syscalls
from .namespace import err
from .nodes import Node

if TYPE_CHECKING:
    from .union import Union


class Handle:
    """An open file: a real fd on the upper or lower object.

    A read-only open of a lower file that is copied up later switches to the
    upper copy on its next read, so it never serves stale data.
    """

    __slots__ = ("fd", "node", "on_upper", "flags")

    def __init__(self, fd: int, node: Node, on_upper: bool, flags: int) -> None:
        self.fd = fd
        self.node = node
        self.on_upper = on_upper
        self.flags = flags


class FileOps:
    """open/release and the handle table (mixed into Union); read and write are fs.py's."""

    # -- open files ----------------------------------------------------------------------------

    def _open_flags(self: "Union", flags: int) -> int:
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

    def _new_handle(self: "Union", fd: int, node: Node, on_upper: bool, flags: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = Handle(fd, node, on_upper, flags & os.O_ACCMODE)
        self.fds[fh] = fd
        if not on_upper:
            self._lower_handles.setdefault(node, set()).add(fh)
        return fh

    def _handles_to_upper(self: "Union", node: Node) -> None:
        """*node* was just copied up: its open lower handles read the upper copy from now.

        At once, not at their next read: the patched pyfuse3 answers READs from `fds`
        without calling us. If the upper copy cannot be opened (EMFILE, say), the handle
        leaves `fds`, so its reads come to `handle()`, which tries again or fails them."""
        for fh in self._lower_handles.pop(node, ()):
            try:
                self._reopen_upper(fh, self.handles[fh])
            except OSError:
                del self.fds[fh]

    def _reopen_upper(self: "Union", fh: int, h: Handle) -> None:
        fd = syscalls.open_at(*self.loc(h.node), os.O_RDONLY)
        os.close(h.fd)
        h.fd, h.on_upper = fd, True
        self.fds[fh] = fd

    async def open(self: "Union", node: Node, flags: int, privileged: bool = True) -> int:
        """Open for I/O; a write open copies up first. *privileged*: the caller may keep
        set-id bits when truncating (CAP_FSETID; we go by uid 0)."""
        writing = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        if writing:
            self._writable()
            await self.ensure_upper(node, data=not flags & os.O_TRUNC)
        real = self._open_flags(flags)
        if not node.upper:
            real |= os.O_NOATIME  # reading through the union leaves the lower layers untouched
        fd = syscalls.open_at(*self.loc(node), real)
        if flags & os.O_TRUNC and not privileged:
            _kill_setid(fd)
        if writing:
            self.journal.record(b"C", node.path())
        return self._new_handle(fd, node, node.upper, self._open_flags(flags))

    def handle(self: "Union", fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise err(errno.EBADF)
        if not h.on_upper and h.node.upper:  # _handles_to_upper could not open it
            self._reopen_upper(fh, h)
        return h

    def write(self: "Union", fh: int, off: int, data: bytes) -> int:
        """Write through to the upper file. With the writeback cache the kernel owns a
        file's mtime: it sets its own at write(2) and sends it in a SETATTR later, but
        not when the write fell in the clock tick of the mtime it already had. Our
        pwrite would move the upper's mtime all the same, and the view would show
        another time after a remount; so the upper keeps the mtime the kernel knows."""
        fd = self.handle(fh).fd
        if not self.writeback:
            return syscalls.pwrite_all(fd, data, off)
        st = os.fstat(fd)  # both times put back (pwrite changes neither atime): one C call
        try:
            return syscalls.pwrite_all(fd, data, off)
        finally:
            syscalls.futimens(fd, st.st_atime_ns, st.st_mtime_ns)

    def release(self: "Union", fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is not None:
            self.fds.pop(fh, None)
            if not h.on_upper:
                fhs = self._lower_handles.get(h.node)
                if fhs is not None:
                    fhs.discard(fh)
                    if not fhs:
                        del self._lower_handles[h.node]
            os.close(h.fd)


def _kill_setid(fd: int) -> None:
    """What the kernel does when an unprivileged caller truncates: drop set-uid, and
    set-gid where group-execute makes it one (the kernel leaves this to us when open
    truncates atomically)."""
    mode = os.fstat(fd).st_mode
    kill = mode & stat.S_ISUID
    if mode & stat.S_ISGID and mode & stat.S_IXGRP:
        kill |= stat.S_ISGID
    if kill and stat.S_ISREG(mode):
        os.fchmod(fd, stat.S_IMODE(mode) & ~kill)
