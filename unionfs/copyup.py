"""Copy-up: bring a lower object into the upper before anything changes it.

Order and atomicity follow overlayfs: parents first (directories are metadata
only, so they never wait), then the object is built complete in the work
directory (data by reflink or copy_file_range, then owner, mode, xattrs,
times) and only then given its name in the upper:
a regular file is an unnamed O_TMPFILE linked into place (as overlayfs does),
anything else a named temporary renamed into place. The parent's times are
put back afterwards, since a copy-up is not a change the user made to the parent.

Identity: the upper copy carries the identity xattr (format.py) with the st_ino the
lower object had in the view, so inode numbers survive copy-up and remounts.

Hard links: when the lower object has several names (st_nlink > 1), every
other name that still shows the same lower object is linked to the new upper
inode at once, so the names stay one inode (what overlayfs needs index=on
for), and a kernel overlayfs mount of the same upper sees the same.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import Awaitable, Callable, cast

import trio

from . import syscalls
from .format import Format
from .owners import StatOverride
from .layers import Layer, walk_tree
from .merge import Entry, Resolver
from .durable import Syncer
from .nodes import Node, absent_bits
from .workdir import WorkDir

Blocking = Callable[..., Awaitable[object]]

#: files up to this size are copied on the trio loop when cached and no fsync follows (CopyUp._fill)
INLINE_COPY = 128 * 1024


def copy_xattrs(src_fd: int, src_name: bytes | None, dst_fd: int,
                dst_name: bytes | None, fmt: Format) -> list[bytes]:
    """Copy every xattr but the union's own markers (opaque, redirect, ino, ...); returns
    the source's names. Objects are addressed as in syscalls (a name None: the fd is the
    open object itself)."""
    names = syscalls.listxattr(src_fd, src_name)
    for attr in names:
        if fmt.is_private(attr):
            continue
        value = syscalls.getxattr(src_fd, src_name, attr)
        if value is None:
            continue
        try:
            syscalls.setxattr(dst_fd, dst_name, attr, value)
        except OSError as e:
            # e.g. security.* refused by an LSM, user.* on a symlink: not fatal for a copy
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES):
                raise
    return names


def copy_meta(st: os.stat_result, src_fd: int, src_name: bytes | None, dst_fd: int,
              dst_name: bytes | None, ino: int, identity: bytes | None = None,
              owner: tuple[int, int] | None = None, *, fmt: Format,
              kept: tuple[int, int, int] | None = None) -> list[bytes]:
    """Owner (unless the new object has it already: *owner*, see WorkDir.owner), then
    mode (chown clears set-id bits), xattrs, identity (*identity*, or the bare inode
    number), then times last; returns the source's xattr names. With names None both
    fds are open files and every call goes to the fd itself, with no /proc/self/fd
    path for the kernel to resolve. *kept*: the upper keeps owners and modes in
    user.containers.override_stat (owners.StatOverride), and this is the origin's."""
    if kept is not None and StatOverride.applies(st.st_mode):
        syscalls.chmod_at(dst_fd, dst_name, stat.S_IMODE(st.st_mode) | 0o755)
        StatOverride.write(dst_fd, dst_name, *kept)
    else:
        if owner != (st.st_uid, st.st_gid):
            try:
                syscalls.chown_at(dst_fd, dst_name, st.st_uid, st.st_gid)
            except PermissionError:
                if kept is None:  # with override_stat, fuse-overlayfs goes on too
                    raise
        if not stat.S_ISLNK(st.st_mode):
            syscalls.chmod_at(dst_fd, dst_name, stat.S_IMODE(st.st_mode))
    names = copy_xattrs(src_fd, src_name, dst_fd, dst_name, fmt)
    if fmt.keeps_identity(st.st_mode):
        fmt.set_identity(dst_fd, dst_name, identity or str(ino).encode())
    syscalls.utimens_at(dst_fd, dst_name, st.st_atime_ns, st.st_mtime_ns)
    return names


class keep_times:
    """Put a directory's atime/mtime back after a copy-up added a name to it: copy-up is
    not a change the user made to the parent. (Nothing to restore if the body raised.)
    *st*: the times to put back, when known (a parent this copy-up made a moment ago
    has its origin's), so there is nothing to ask first."""

    __slots__ = ("fd", "st")

    def __init__(self, dirfd: int, st: os.stat_result | None = None) -> None:
        self.fd = dirfd
        self.st = st

    def __enter__(self) -> None:
        if self.st is None:
            self.st = os.stat(self.fd)

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            assert self.st is not None
            syscalls.utimens_at(self.fd, b"", self.st.st_atime_ns, self.st.st_mtime_ns)


class AliasIndex:
    """Per lower layer: inode number → every path naming it (only for st_nlink > 1).

    Built on the first copy-up of a hard-linked file in that layer, never at
    mount time; lower layers do not change under a mount, so it stays right.
    """

    def __init__(self) -> None:
        self._layers: dict[int, dict[int, list[bytes]]] = {}

    def paths(self, layer: Layer, ino: int) -> list[bytes]:
        index = self._layers.get(layer.index)
        if index is None:
            index = self._layers[layer.index] = self._build(layer)
        return index.get(ino, [])

    @staticmethod
    def _build(layer: Layer) -> dict[int, list[bytes]]:
        index: dict[int, list[bytes]] = {}
        for _fd, path, _name, de in walk_tree(layer.fd):
            if not de.is_dir(follow_symlinks=False):
                st = de.stat(follow_symlinks=False)
                if st.st_nlink > 1:
                    index.setdefault(st.st_ino, []).append(path)
        return index


#: resolves an absolute view path to (parent node, entry), or None (Union.entry_at)
EntryAt = Callable[[bytes], "tuple[Node, Entry] | None"]
#: where a lower path may show in the view (Union.view_paths)
ViewPaths = Callable[[bytes], list[bytes]]


class CopyUp:
    def __init__(self, resolver: Resolver, upper: Layer, work: WorkDir, fsync: bool,
                 blocking: Blocking, syncer: Syncer | None = None,
                 alone: Callable[[], bool] = lambda: False,
                 entry_at: EntryAt = lambda path: None,
                 view_paths: ViewPaths = lambda path: [b"/" + path],
                 override: StatOverride | None = None) -> None:
        self.r = resolver
        self.override = override or StatOverride()
        self.fmt = resolver.fmt
        self.upper = upper
        self.work = work
        self.fsync = fsync
        self.syncer = syncer  # defers the fsync (None: fsync before the link, if at all)
        self.blocking = blocking
        self.alone = alone  # True while no other request is being served (see _fill)
        self.aliases = AliasIndex()
        self._how: dict[int, int] = {}  # lower layer -> copy method that worked (syscalls.copy_data)
        # the other names of a hard-linked file are found in the view by these
        self.entry_at = entry_at
        self.view_paths = view_paths

    # -- directories (metadata only: never awaits) ---------------------------------

    def dir(self, node: Node) -> keep_times | None:
        """Make sure directory *node* and all its ancestors exist in the upper. If this
        call made *node*, returns what puts its times back after a name goes into it."""
        if node.upper:
            return None
        chain = [node]
        for anc in node.ancestors():
            if anc.upper:
                break
            chain.append(anc)
        made: keep_times | None = None
        for d in reversed(chain):
            made = self._one_dir(d, made)
        return made

    def _one_dir(self, node: Node, parent_made: keep_times | None = None) -> keep_times:
        """Built in work/ and set up through an fd of its own (no name or /proc path for
        the kernel to resolve at each call); that fd then serves as the new upper
        directory's fd, which the copy-up that called for this directory needs next.
        The origin is reached by its own (cached) fd, which the copy-up of the
        child needs next as well. *parent_made*: the parent was made by this copy-up a
        moment ago, with its fd (the cache's newest, so still open) and its origin's
        times, to be put back without asking first; returns the same for this one."""
        assert node.parent is not None and node.lowers
        layer, path = node.lowers[0]
        src = self.r.lower_fd(layer, path)
        st = os.fstat(src)
        tmp = self.work.tmpname()
        os.mkdir(tmp, 0o700, dir_fd=self.work.fd)
        fd = -1
        try:
            fd = syscalls.open_dir_at(self.work.fd, tmp, os.O_RDONLY)
            copy_meta(st, src, b"", fd, None, node.id, owner=self.work.owner, fmt=self.fmt,
                      kept=self._kept(layer.index, src, b"", st))
            self._place(node, tmp, parent_made or keep_times(self.r.upper_fd(node.parent)))
        except BaseException:
            if fd >= 0:
                os.close(fd)
            self.work.remove_tree(tmp)
            raise
        node.upper = True
        self.r.cache.put(("u", node.id), fd)
        return keep_times(fd, st)

    def _place(self, node: Node, tmp: bytes, parent: keep_times) -> None:
        """Rename a finished temporary into the parent's upper dir, keeping the parent's times."""
        with parent:
            syscalls.renameat2(self.work.fd, tmp, parent.fd, node.name, syscalls.RENAME_NOREPLACE)

    # -- everything else -----------------------------------------------------------

    async def file(self, node: Node, data: bool = True) -> None:
        """Copy a non-directory up; *data* False when it is about to be truncated to 0."""
        if node.upper:
            return
        layer, path = node.lowers[0]
        sfd, sname = self.r.lower_loc(layer, path)
        st = syscalls.stat_at(sfd, sname)
        if stat.S_ISREG(st.st_mode):
            placed = await self._regular(node, layer, sfd, sname, st, data)
        else:
            placed = self._special(node, sfd, sname, st)
        if not placed:
            return
        node.upper = True
        if st.st_nlink > 1:
            self._link_aliases(node, layer, path, st)

    async def _regular(self, node: Node, layer: Layer, sfd: int, sname: bytes,
                       st: os.stat_result, data: bool) -> bool:
        """A regular file: data and metadata go into an unnamed O_TMPFILE (or a named
        temporary), which gets its name in the upper only when complete."""
        dst, tmp = self.work.new_file()
        tagged = None
        try:
            src = syscalls.open_at(sfd, sname, os.O_RDONLY | os.O_NOATIME)
            try:
                if data and st.st_size:
                    defer = self.fsync and self.syncer is not None
                    await self._fill(layer, src, dst, st.st_size, self.fsync and not defer,
                                     st.st_blocks * 512 < st.st_size)
                    if defer:
                        assert self.syncer is not None
                        # after the data: its batch must not begin syncing before that
                        tagged = self.syncer.tag(node.id, st.st_size)
                names = copy_meta(st, src, None, dst, None, node.id, tagged, self.work.owner,
                                  fmt=self.fmt, kept=self._kept(layer.index, sfd, sname, st))
            finally:
                os.close(src)
            # what the origin lacks, its copy lacks: the kernel's security.capability
            # check at the write that caused this copy-up need not ask the disk
            node.no_xattrs |= absent_bits(names)
            parent = self._still_wanted(node)
            if parent is None:
                return False
            pfd = parent.fd
            with parent:
                if tmp is None:
                    os.link(syscalls.proc_path(dst), node.name, dst_dir_fd=pfd, follow_symlinks=True)
                else:
                    syscalls.renameat2(self.work.fd, tmp, pfd, node.name, syscalls.RENAME_NOREPLACE)
                    tmp = None
            if tagged is not None:
                assert self.syncer is not None
                self.syncer.add()
            return True
        finally:
            os.close(dst)
            if tmp is not None:
                self.work.remove_tree(tmp)

    async def _fill(self, layer: Layer, src: int, dst: int, size: int, sync: bool,
                    sparse: bool = True) -> None:
        """Copy the data (and fdatasync it when asked). A small file without fsync is
        copied on the trio loop when it is in the page cache (the copy cannot block), or
        when no other request is being served: then there is nothing to overlap with, and
        the hop to a worker thread and back costs more than a cold read of a small file
        (the woken thread waits for a CPU, then the loop waits to be woken again). A
        request arriving meanwhile waits one small read, as with fuse-overlayfs. Anything
        bigger, synced, or uncached while other requests are in flight goes to a thread."""
        how = self._how.get(layer.index, syscalls.CLONE)
        if not sync and size <= INLINE_COPY and (self.alone()
                                                  or syscalls.in_page_cache(src, size)):
            done = syscalls.copy_data(src, dst, size, how, sparse, fresh=True)
        else:
            done = cast(int, await self.blocking(_copy_and_sync, src, dst, size, how, sync,
                                                 sparse))
        # a method this layer and the upper refused (no shared extents, another
        # filesystem) is not tried again
        self._how[layer.index] = done

    def _special(self, node: Node, sfd: int, sname: bytes, st: os.stat_result) -> bool:
        """A symlink, device, fifo or socket: built under a name in work/, then renamed."""
        tmp = self.work.tmpname()
        try:
            if stat.S_ISLNK(st.st_mode):
                os.symlink(syscalls.readlink_at(sfd, sname), tmp, dir_fd=self.work.fd)
            else:
                os.mknod(tmp, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=self.work.fd)
            copy_meta(st, sfd, sname, self.work.fd, tmp, node.id, owner=self.work.owner,
                      fmt=self.fmt, kept=self._kept(-1, sfd, sname, st))
            if not self.fmt.keeps_identity(st.st_mode):
                self.r.unmarked[os.lstat(tmp, dir_fd=self.work.fd).st_ino] = node.id
            parent = self._still_wanted(node)
            if parent is None:
                self.work.remove_tree(tmp)
                return False
            self._place(node, tmp, parent)
        except BaseException:
            self.work.remove_tree(tmp)
            raise
        return True

    def _kept(self, index: int, fd: int, name: bytes, st: os.stat_result
              ) -> tuple[int, int, int] | None:
        """The origin's owner and mode for the upper's user.containers.override_stat (as
        its own layer keeps them), or None where the upper keeps none."""
        if not self.override.upper:
            return None
        mode, uid, gid = self.override.shown(index, fd, name, st)
        return uid, gid, mode

    def _still_wanted(self, node: Node) -> keep_times | None:
        """After an await other requests may have run: None if another copy-up of *node*
        won, ENOENT if its last name went; else its parents are made ready in the upper,
        and what keeps the parent's times is returned (knowing them if just made)."""
        if node.upper:
            return None
        if node.parent is None:
            raise OSError(errno.ENOENT, "copy-up of a removed file")
        return self.dir(node.parent) or keep_times(self.r.upper_fd(node.parent))

    def _link_aliases(self, node: Node, layer: Layer, path: bytes, st: os.stat_result) -> None:
        assert node.parent is not None
        src_fd = self.r.upper_fd(node.parent)
        for alias in self.aliases.paths(layer, st.st_ino):
            if alias == path:
                continue
            for view_path in self.view_paths(alias):
                found = self.entry_at(view_path)
                if found is None:
                    continue
                parent, entry = found
                if entry.upper or not entry.lowers or entry.lowers[0] != (layer, alias):
                    continue  # that name now shows something else (whiteout, shadow, replaced)
                self.dir(parent)
                dfd = self.r.upper_fd(parent)
                with contextlib.suppress(FileExistsError), keep_times(dfd):
                    os.link(node.name, entry.name, src_dir_fd=src_fd, dst_dir_fd=dfd,
                            follow_symlinks=False)


def _copy_and_sync(src: int, dst: int, size: int, how: int, fsync: bool,
                   sparse: bool = True) -> int:
    done = syscalls.copy_data(src, dst, size, how, sparse, fresh=True)
    if fsync:
        os.fdatasync(dst)
    return done


async def run_in_thread(fn: Callable[..., object], *args: object) -> object:
    """Run a blocking call off the trio loop (copy-up data, fsync)."""
    return await trio.to_thread.run_sync(fn, *args)
