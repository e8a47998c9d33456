"""The union filesystem's operations, in terms of nodes, names and OSError.

This is the whole behaviour of a mount without the FUSE protocol: fs.py only
translates requests into these calls and OSError into FUSEError. Tests can
drive it directly under trio.

Concurrency: handlers run as trio tasks. Only copy-up data and fsync await;
everything else runs to completion without yielding, so each namespace change
is atomic with respect to the others. A copy-up holds the node's lock, and
re-checks after its await that the node is still where it was.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from typing import Callable
import trio

from . import durable, syscalls, workdir
from .changes import Journal
from .config import MountConfig
from .copyup import CopyUp, run_in_thread
from .files import Handle, Handles, Passthrough, kill_setid
from .format import NAME_MAX, OVERLAY, Format, check_upper
from .layers import walk_tree
from .merge import Entry
from .namespace import Caller, Namespace, err
from .owners import Owners, StatOverride
from .nodes import ABSENT_XATTRS, ALT_INO, ROOT_ID, Node, NodeTable, low_ino, make_ino
from .stack import LayerStack
from .workdir import WorkDir

__all__ = ["Union", "Caller", "SetAttr", "Handle", "err"]

log = logging.getLogger("unionfs")


@dataclass
class SetAttr:
    """The fields of a setattr request that are to change (None: leave alone)."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


class Union:
    """The merged view over one upper (optional) and the lowers.

    Its collaborators, each built here with what it needs: the layer stack (stack.py)
    and its resolver (merge.py), the node table (nodes.py), copy-up (copyup.py), the changes log (changes.py), the
    handle table (files.py) and the namespace changes (namespace.py), which the
    methods below hand their requests to. Attributes, xattrs and opening are here."""

    def __init__(self, config: MountConfig, writeback: bool = True, fmt: Format = OVERLAY,
                 lower_passthrough: bool = False) -> None:
        """*lower_passthrough*: the mount asks the kernel for FUSE passthrough of lower files
        too (fs.make_operations), so the lowers are opened such that their files can be
        backing files (files.py)."""
        self.config = config
        self.fmt = fmt
        self.writeback = writeback
        self.stack = LayerStack(config.upper, config.lowers, fmt, writable=True,
                                noatime_lowers=lower_passthrough)
        self.upper, self.lowers, self.cache = self.stack.upper, self.stack.lowers, self.stack.cache
        self.readonly = self.upper is None or config.readonly
        self.owners = Owners.for_config(config)
        roots = ([(0, self.upper.fd)] if self.upper is not None else []) + \
            [(layer.index, layer.fd) for layer in self.lowers]
        self.override = StatOverride.for_layers(
            roots, self.upper.fd if self.upper is not None and not config.readonly else None,
            config.override_stat)
        self.r = self.stack.resolver()
        self.root = self.r.root_node()
        self.nodes = NodeTable(self.root, self._dropped, self.r.forget_found)
        self.work: WorkDir | None = None
        self.copyup: CopyUp | None = None
        self.syncer: durable.Syncer | None = None
        # awaits that may have let other requests run (thread hops, contended node
        # locks): a handler that saw no change here across its awaits knows its names
        # still resolve as they did (trio switches tasks only at awaits)
        self.yields = 0
        # requests being served right now (counted by the FUSE adapter): a handler that
        # is alone may do a short blocking read on the loop, since nothing waits on it
        self.serving = 0
        self.journal = Journal(None)
        self._redirects: list[tuple[bytes, bytes]] | None = None  # see view_paths
        if self.upper is not None and config.upper is not None and config.workdir:
            self.work = WorkDir(config.workdir)
            if self.work.dev != self.upper.dev:
                raise ValueError("workdir and upper must be on the same filesystem")
            recorded = workdir.recorded_format(config.workdir)
            check_upper(self.upper.fd, fmt, recorded, config.upper)
            if recorded != fmt.prefix and not config.readonly:
                workdir.record_format(config.workdir, fmt.prefix)
            leftovers = self.work.cleanup()
            if leftovers:
                log.info("removed %d leftover work files of an earlier mount", leftovers)
            repaired = durable.recover(config.upper, config.workdir, self._find_origins,
                                       self._open_origin, fmt)
            if repaired:
                log.warning("copied the data of %d files up again after a power loss", repaired)
            if config.fsync:
                self.syncer = durable.Syncer(config.upper, config.workdir, fmt)
            self.copyup = CopyUp(self.r, self.upper, self.work, config.fsync, self._blocking,
                                 self.syncer, alone=lambda: self.serving <= 1,
                                 entry_at=self.entry_at, view_paths=self.view_paths,
                                 override=self.override)
            self.journal = Journal(config.workdir, config.upper, fmt, durable=not config.volatile)
            workdir.record_lowers(config.workdir, config.lowers)
        self.files = Handles(self.r, writeback)
        self.handles = self.files.handles
        self.fds = self.files.fds  # fh -> fd, for the patched pyfuse3 to answer READs itself
        self.ns = Namespace(self, self.r, self.nodes, fmt, self.journal, self.files, self.work,
                            self.copyup, self.owners, self.override, acls=config.acl)

    def _find_origins(self, index: int, inos: set[int]) -> dict[int, bytes]:
        """Paths of the regular files with these st_inos (low 48 bits, as make_ino keeps
        them) in lower layer number *index* (1 = top-most): one walk of the layer, made
        only to repair copy-ups a power loss tore."""
        if not 1 <= index <= len(self.lowers):
            return {}
        found: dict[int, bytes] = {}
        for _fd, path, _name, de in walk_tree(self.lowers[index - 1].fd):
            ino = low_ino(de.inode())
            if ino in inos and ino not in found and de.is_file(follow_symlinks=False):
                found[ino] = path
        return found

    def _open_origin(self, index: int, path: bytes) -> int:
        """*path* in lower layer number *index*, opened for reading (never by a symlink)."""
        return syscalls.open_at(*self.r.lower_loc(self.lowers[index - 1], path),
                                os.O_RDONLY | os.O_NOFOLLOW)

    async def _blocking(self, fn: Callable[..., object], *args: object) -> object:
        """A blocking call (copy-up data, fsync) on a worker thread, counted in yields."""
        self.yields += 1
        return await run_in_thread(fn, *args)

    def flush(self) -> None:
        """Pending copy-ups made durable (at unmount, before the changes log is closed)."""
        if self.syncer is not None:
            self.syncer.close()

    def fsync(self, fd: int, datasync: bool) -> None:
        """The user's fsync (blocking: run it in a worker thread)."""
        if self.syncer is not None:
            self.syncer.fsync(fd, datasync)
        else:
            (os.fdatasync if datasync else os.fsync)(fd)

    def release_layers(self) -> None:
        """At unmount, first: close every fd the union serves from (open files, pinned
        objects, work/, cached directories, the layer roots). Whoever unmounted may
        unmount the layers' filesystem next; after this only finish()'s few fds in the
        workdir are left on it. Serving is over: nothing may use the union afterwards."""
        self.files.close()
        self.nodes.close_pins()
        if self.work:
            self.work.close()
            self.work = None
        self.stack.close()

    def finish(self) -> None:
        """At unmount, after release_layers: the stop recorded as clean (copy-ups made
        durable, then the changes log closed and marked; see durable.py, changes.py)."""
        try:
            self.flush()   # a batch that failed leaves its hint (durable.py): the log is still closed
        finally:
            self.journal.close()

    def close(self) -> None:
        self.release_layers()
        self.finish()
        if self.syncer is not None:
            self.syncer.end_thread()

    # -- nodes -------------------------------------------------------------------------

    def node(self, node_id: int) -> Node:
        node = self.nodes.get(node_id)
        if node is None:
            raise err(errno.ESTALE)
        return node

    def stats(self) -> dict[str, int]:
        """What the daemon holds, for SIGUSR1 (memory and fds must follow the kernel's
        references: forget() frees nodes, release() handles)."""
        return {"nodes": len(self.nodes), "handles": len(self.handles), "cached_dir_fds": len(self.cache)}

    def _dropped(self, node: Node) -> None:
        self.cache.drop(("u", node.id))

    def _lock(self, node: Node) -> trio.Lock:
        if node.lock is None:
            node.lock = trio.Lock()
        return node.lock  # type: ignore[return-value]

    def node_for(self, parent: Node, e: Entry) -> Node:
        """The node an entry resolves to: the registered one for its id, or a new one."""
        assert e.st is not None
        node = self.nodes.get(e.ino)
        if node is not None and node.kind != stat.S_IFMT(e.st.st_mode):
            # an identity claim (format.py's identity xattr) naming an object of another
            # type is not ours to believe: the claimant keeps its own number; if the
            # claimant got the number first, the rightful object takes its alternate one
            if e.upper:
                log.warning("%r: ignoring the inode number it claims (%#x)", e.name, e.ino)
                e.ino = make_ino(0, e.st.st_ino)
            else:
                log.warning("%r: its inode number %#x was claimed by an upper object; "
                            "using another", e.name, e.ino)
                e.ino |= ALT_INO
            node = self.nodes.get(e.ino)
        if node is not None:
            if node.id != ROOT_ID:
                self.nodes.name_added(node, parent, e.name)
            return node
        node = Node(e.ino, stat.S_IFMT(e.st.st_mode), parent, e.name)
        node.upper = e.upper
        node.lowers = e.lowers
        node.opaque = e.opaque
        return node

    def forget_redirects(self) -> None:
        """A directory was renamed: the redirects view_paths knows may have changed."""
        self._redirects = None

    def view_paths(self, lower_path: bytes) -> list[bytes]:
        """Where a lower path may show in the view: at itself, and below every renamed
        directory (upper dir with a redirect) whose lower contents include it."""
        if self._redirects is None:
            self._redirects = self._scan_redirects()
        out = [b"/" + lower_path]
        for target, view in self._redirects:
            prefix = target.strip(b"/") + b"/"
            if lower_path.startswith(prefix):
                out.append(view + b"/" + lower_path[len(prefix):])
        return out

    def _scan_redirects(self) -> list[tuple[bytes, bytes]]:
        """(redirect target, view path) of every redirected upper directory."""
        assert self.upper is not None
        return [(rd, b"/" + path) for fd, path, name, de in walk_tree(self.upper.fd)
                if de.is_dir(follow_symlinks=False)
                and (rd := self.fmt.raw_redirect(fd, name)) is not None]

    def entry_at(self, path: bytes) -> tuple[Node, Entry] | None:
        """Resolve an absolute view path to (parent node, entry), without kernel references."""
        parts = [p for p in path.split(b"/") if p]
        if not parts:
            return None
        node = self.root
        for part in parts[:-1]:
            e = self.r.resolve(node, part)
            if e.st is None or not stat.S_ISDIR(e.st.st_mode):
                return None
            node = self.node_for(node, e)
        e = self.r.resolve(node, parts[-1])
        return (node, e) if e.st is not None else None

    def check_name(self, name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise err(errno.ENAMETOOLONG)

    def writable(self) -> None:
        if self.readonly:
            raise err(errno.EROFS)

    # -- attributes ------------------------------------------------------------------------

    def loc(self, node: Node) -> tuple[int, bytes]:
        """(dir fd, name) where the node's top object is, for *at calls."""
        return self.r.loc(node)

    def stat(self, node: Node) -> os.stat_result:
        return syscalls.stat_at(*self.loc(node))

    def shown(self, node: Node, st: os.stat_result) -> tuple[int, int, int]:
        """(st_mode, st_uid, st_gid) the mount shows for *node*, whose object's stat is *st*:
        an owner and mode kept in user.containers.override_stat, then mapped or squashed."""
        mode, uid, gid = st.st_mode, st.st_uid, st.st_gid
        if self.override.layers:
            index = 0 if node.upper else node.lowers[0][0].index if node.lowers else -1
            mode, uid, gid = self.override.shown(index, *self.loc(node), st)
        return (mode, *self.owners.shown(uid, gid))

    def nlink(self, node: Node, st: os.stat_result) -> int:
        """st_nlink as overlayfs reports it: 1 for a directory merged from several layers,
        whose true subdirectory count no single layer knows (find(1) takes 1 as "unknown");
        with static_nlink, 1 for every directory."""
        if node.is_dir and (self.config.static_nlink or len(node.lowers) > 1 or node.merged):
            return 1
        return st.st_nlink

    def lookup(self, parent: Node, name: bytes) -> tuple[Node | None, os.stat_result | None]:
        """Resolve a name; the caller counts the reference (NodeTable.ref)."""
        self.check_name(name)
        if name == b".":
            return parent, self.stat(parent)
        if name == b"..":
            up = parent.parent or self.root
            return up, self.stat(up)
        e = self.r.resolve(parent, name)
        if e.st is None:
            return None, None
        return self.node_for(parent, e), e.st

    def list_dir(self, node: Node) -> list[bytes]:
        return self.r.list_names(node)

    def readlink(self, node: Node) -> bytes:
        return syscalls.readlink_at(*self.loc(node))

    async def ensure_upper(self, node: Node, data: bool = True) -> None:
        """Copy *node* (and its parents) up if it is not in the upper yet."""
        if node.upper:
            return
        self.writable()
        assert self.copyup is not None
        if node.is_dir:
            self.copyup.dir(node)
            return
        lock = self._lock(node)
        try:
            # uncontended (the usual case): no trip through trio's scheduler, which
            # `async with lock` would make even then
            lock.acquire_nowait()
        except trio.WouldBlock:
            self.yields += 1
            await lock.acquire()
        try:
            await self.copyup.file(node, data)
        finally:
            lock.release()
        if node.upper:
            self.files.to_upper(node)
            if self.files.lower_backed(node.kid):  # that inode keeps its lower backing file
                await self._new_inode(node)

    async def _new_inode(self, node: Node) -> None:
        """The kernel's inode of *node* keeps its lower backing file while its opens last:
        new entries name the node by a new node id, so the kernel makes a new inode for
        what opens it next. The old inode's cached attributes (size, times) are dropped,
        and from now on given with no time to live (Operations.getattr), so that fstat of
        an fd still on it shows the file as it is, as kernel overlayfs shows it."""
        old = node.kid
        self.nodes.new_kid(node)
        pt = self.files.passthrough
        assert pt is not None and pt.forget_attrs is not None  # lower backings need both
        await trio.to_thread.run_sync(pt.forget_attrs, old)

    async def setattr(self, node: Node, attrs: SetAttr, fh: int | None) -> os.stat_result:
        self.writable()
        times_only = attrs.mode is None and attrs.uid is None and attrs.gid is None \
            and attrs.size is None
        if not node.upper and node.parent is None and node.id != ROOT_ID:
            # a lower file whose last name went away while open: the writeback cache may
            # still flush its times at close; there is nothing left to change
            if times_only:
                return self.stat(node)
            raise err(errno.ENOENT)
        if node.upper and times_only:
            # times only: the writeback cache flushes them after rename and link too,
            # unchanged; then there is nothing to write and no change to record
            st = self.stat(node)
            if attrs.atime_ns in (None, st.st_atime_ns) and attrs.mtime_ns in (None, st.st_mtime_ns):
                return st
        truncating_all = attrs.size == 0 and attrs.mode is None and attrs.uid is None
        await self.ensure_upper(node, data=not truncating_all)
        h = self.handles.get(fh) if fh is not None else None
        writable: int | None = None
        name: bytes | None
        if h is not None and h.on_upper and node.upper:
            dfd, name = h.fd, None  # the open file itself: no name to resolve
            if h.flags & os.O_ACCMODE != os.O_RDONLY:
                writable = h.fd
        else:
            dfd, name = self.loc(node)
        if attrs.size is not None:
            fd = writable if writable is not None else \
                syscalls.open_at(dfd, name or b"", os.O_WRONLY)
            try:
                os.ftruncate(fd, attrs.size)
            finally:
                if fd != writable:
                    os.close(fd)
        uid, gid = self.owners.stored(-1 if attrs.uid is None else attrs.uid,
                                      -1 if attrs.gid is None else attrs.gid)
        if self.override.upper and (uid, gid, attrs.mode) != (-1, -1, None) and \
                self.override.applies(node.kind):
            # the wanted owner and mode go into the xattr, the object stays the daemon's
            mode, old_uid, old_gid = self.override.shown(0, dfd, name, syscalls.stat_at(dfd, name)
                                                         if name is not None else os.fstat(dfd))
            self.override.write(dfd, name, old_uid if uid == -1 else uid,
                                old_gid if gid == -1 else gid,
                                mode if attrs.mode is None else
                                stat.S_IFMT(mode) | stat.S_IMODE(attrs.mode))
        else:
            if (uid, gid) != (-1, -1):
                # chown(2) drops set-uid on disk just as the kernel's VFS did before sending
                # this request (with the cleared mode in it, applied below)
                syscalls.chown_at(dfd, name, uid, gid)
            if attrs.mode is not None and node.kind != stat.S_IFLNK:
                syscalls.chmod_at(dfd, name, stat.S_IMODE(attrs.mode))
        if attrs.atime_ns is not None or attrs.mtime_ns is not None:
            syscalls.utimens_at(dfd, name, attrs.atime_ns, attrs.mtime_ns)
        self.journal.record(b"C", node.path())
        return os.fstat(dfd) if name is None else syscalls.stat_at(dfd, name)

    # -- open files (the handle table is files.py's) ---------------------------------------

    async def open(self, node: Node, flags: int, privileged: bool = True, kid: int = 0) -> int:
        """Open for I/O; a write open copies up first. *privileged*: the caller may keep
        set-id bits when truncating (CAP_FSETID; we go by uid 0). *kid*: the kernel inode
        (node id) it came by, if not the node's current one.

        ESTALE where that inode is open in passthrough mode on the lower file while the
        open needs the upper copy (files.py): the node has a new kernel inode by then
        (after the copy-up this open makes, if none did before), which the kernel finds
        when it retries the open, looking the name up again."""
        kid = kid or node.kid
        writing = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        if writing:
            self.writable()
            await self.ensure_upper(node, data=not flags & os.O_TRUNC)
        if node.upper and self.files.lower_backed(kid):
            assert kid != node.kid
            raise err(errno.ESTALE)
        real = self.files.open_flags(flags)
        if not node.upper:
            real |= os.O_NOATIME  # reading through the union leaves the lower layers untouched
        fd = syscalls.open_at(*self.loc(node), real)
        if flags & os.O_TRUNC and not privileged:
            kill_setid(fd)
        if writing:
            self.journal.record(b"C", node.path())
        return self.files.add(fd, node, node.upper, self.files.open_flags(flags), kid)

    def handle(self, fh: int) -> Handle:
        return self.files.get(fh)

    def use_passthrough(self, pt: Passthrough) -> None:
        """The kernel does FUSE passthrough on this mount (and so no writeback cache)."""
        self.writeback = False
        if self.syncer is not None:
            pt.settled = self.syncer.settled
        self.files.use_passthrough(pt)

    def write(self, fh: int, off: int, data: bytes) -> int:
        return self.files.write(fh, off, data)

    def release(self, fh: int) -> None:
        self.files.release(fh)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        self.files.fallocate(fh, mode, offset, length)

    def unwritten_pages(self, fh: int) -> Node | None:
        return self.files.unwritten_pages(fh)

    def seek(self, fh: int, offset: int, whence: int) -> int:
        return self.files.seek(fh, offset, whence)

    # -- namespace changes (namespace.py) -------------------------------------------------

    def mkdir(self, parent: Node, name: bytes, mode: int, caller: Caller) -> Node:
        return self.ns.mkdir(parent, name, mode, caller)

    def mknod(self, parent: Node, name: bytes, mode: int, rdev: int, caller: Caller) -> Node:
        return self.ns.mknod(parent, name, mode, rdev, caller)

    def symlink(self, parent: Node, name: bytes, target: bytes, caller: Caller) -> Node:
        return self.ns.symlink(parent, name, target, caller)

    def create(self, parent: Node, name: bytes, mode: int, flags: int,
               caller: Caller) -> tuple[Node, int]:
        """Create and open a regular file; returns the node and a file handle."""
        return self.ns.create(parent, name, mode, flags, caller)

    async def link(self, node: Node, parent: Node, name: bytes) -> os.stat_result:
        return await self.ns.link(node, parent, name)

    async def unlink(self, parent: Node, name: bytes) -> None:
        await self.ns.unlink(parent, name)

    def rmdir(self, parent: Node, name: bytes) -> None:
        self.ns.rmdir(parent, name)

    async def rename(self, p1: Node, n1: bytes, p2: Node, n2: bytes, flags: int) -> None:
        await self.ns.rename(p1, n1, p2, n2, flags)

    # -- xattrs ------------------------------------------------------------------------

    def _xattrs_on(self) -> None:
        if not self.config.xattrs:  # noxattrs=1
            raise err(errno.EOPNOTSUPP)

    def getxattr(self, node: Node, attr: bytes) -> bytes:
        self._xattrs_on()
        bit = ABSENT_XATTRS.get(attr, 0)
        if node.no_xattrs & bit:
            raise err(errno.ENODATA)
        if self.fmt.is_private(attr):
            raise err(errno.EOPNOTSUPP)
        dfd, name = self.loc(node)
        try:
            return syscalls.getxattr_strict(dfd, name, attr)
        except OSError as e:
            if e.errno == errno.ENODATA:
                # remembered: lower layers never change, and the upper object gets xattrs
                # only through setxattr (below). The upper's filesystem may drop
                # security.capability by itself (a write), never add it.
                node.no_xattrs |= bit
                raise err(errno.ENODATA)
            raise

    def listxattr(self, node: Node, privileged: bool = True) -> list[bytes]:
        """Names of the node's xattrs; trusted.* only for a privileged caller (as the
        kernel lists them: the daemon itself reads as root)."""
        self._xattrs_on()
        return [a for a in syscalls.listxattr(*self.loc(node))
                if not self.fmt.is_private(a) and (privileged or not a.startswith(b"trusted."))]

    async def setxattr(self, node: Node, attr: bytes, value: bytes, flags: int = 0) -> None:
        self._xattrs_on()
        if self.fmt.is_private(attr):
            raise err(errno.EOPNOTSUPP)
        self.writable()
        await self.ensure_upper(node)
        node.no_xattrs = 0
        syscalls.setxattr(*self.loc(node), attr, value, flags)
        self.journal.record(b"C", node.path())

    async def removexattr(self, node: Node, attr: bytes) -> None:
        self._xattrs_on()
        if self.fmt.is_private(attr):
            raise err(errno.EOPNOTSUPP)
        self.writable()
        if attr not in self.listxattr(node):
            raise err(errno.ENODATA)
        await self.ensure_upper(node)
        syscalls.removexattr(*self.loc(node), attr)
        self.journal.record(b"C", node.path())

    def statfs(self) -> os.statvfs_result:
        layer = self.upper or self.lowers[0]
        return os.statvfs(syscalls.proc_path(layer.fd))
