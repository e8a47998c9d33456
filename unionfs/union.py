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

from . import syscalls
from .changes import Journal
from .config import MountConfig
from .copyup import CopyUp, run_in_thread
from .layers import OVL_OPAQUE, OVL_REDIRECT, FdCache, Layer, is_private_xattr
from .merge import NAME_MAX, Entry, Resolver
from .nodes import ROOT_ID, Node, NodeTable, make_ino
from .workdir import WorkDir, remove_tree_at

log = logging.getLogger("unionfs")

WHITEOUT_DEV = 0


def err(code: int, what: str = "") -> OSError:
    return OSError(code, what or os.strerror(code))


@dataclass
class Caller:
    """Who asks: new objects belong to them."""

    uid: int = 0
    gid: int = 0


@dataclass
class SetAttr:
    """The fields of a setattr request that are to change (None: leave alone)."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


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


class Union:
    """The merged view over one upper (optional) and the lowers."""

    def __init__(self, config: MountConfig, writeback: bool = True) -> None:
        self.config = config
        self.writeback = writeback
        self.upper = Layer(config.upper, 0, True) if config.upper else None
        self.lowers = [Layer(p, i + 1, False) for i, p in enumerate(config.lowers)]
        self.readonly = self.upper is None or config.readonly
        self.cache = FdCache()
        self.r = Resolver(self.upper, self.lowers, self.cache)
        root = Node(ROOT_ID, stat.S_IFDIR, None, b"")
        root.upper = self.upper is not None
        if self.upper is not None:
            root.opaque = syscalls.getxattr(self.upper.fd, b"", OVL_OPAQUE) == b"y"
        root.lowers = [(layer, b"") for layer in self.lowers]
        self.root = root
        self.nodes = NodeTable(root, self._dropped)
        self.work: WorkDir | None = None
        self.copyup: CopyUp | None = None
        self.journal = Journal(None)
        if self.upper is not None and config.workdir:
            self.work = WorkDir(config.workdir)
            if self.work.dev != self.upper.dev:
                raise ValueError("workdir and upper must be on the same filesystem")
            leftovers = self.work.cleanup()
            if leftovers:
                log.info("removed %d leftover work files of an earlier mount", leftovers)
            self.copyup = CopyUp(self.r, self.upper, self.work, config.fsync, run_in_thread)
            self.copyup.entry_at = self.entry_at
            self.copyup.view_paths = self.view_paths
            self.journal = Journal(config.workdir, config.upper)
            self._record_lowers(config)
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._redirects: list[tuple[bytes, bytes]] | None = None  # see view_paths

    @staticmethod
    def _record_lowers(config: MountConfig) -> None:
        """Remember the stack in the workdir, so `unionfs diff UPPER` works unmounted."""
        assert config.workdir is not None
        path = os.path.join(config.workdir, "lowers")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(p + "\n" for p in config.lowers))
        os.replace(tmp, path)

    def close(self) -> None:
        for h in self.handles.values():
            os.close(h.fd)
        self.handles.clear()
        self.journal.close()
        self.cache.clear()
        if self.work:
            self.work.close()
        for layer in self.lowers + ([self.upper] if self.upper else []):
            layer.close()

    # -- nodes -------------------------------------------------------------------------

    def node(self, node_id: int) -> Node:
        node = self.nodes.get(node_id)
        if node is None:
            raise err(errno.ESTALE)
        return node

    def _dropped(self, node: Node) -> None:
        self.cache.drop(("u", node.id))

    def _lock(self, node: Node) -> trio.Lock:
        if node.lock is None:
            node.lock = trio.Lock()
        return node.lock  # type: ignore[return-value]

    def _node_for(self, parent: Node, e: Entry) -> Node:
        """The node an entry resolves to: the registered one for its id, or a new one."""
        assert e.st is not None
        node = self.nodes.get(e.ino)
        if node is not None:
            if node.parent is None and node.id != ROOT_ID:
                self.nodes.set_parent(node, parent, e.name)
            return node
        node = Node(e.ino, stat.S_IFMT(e.st.st_mode), parent, e.name)
        node.upper = e.upper
        node.lowers = e.lowers
        node.opaque = e.opaque
        return node

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
        found: list[tuple[bytes, bytes]] = []
        stack = [(os.open(syscalls.proc_path(self.upper.fd), os.O_RDONLY | os.O_DIRECTORY), b"")]
        while stack:
            fd, path = stack.pop()
            try:
                with os.scandir(fd) as it:
                    for de in it:
                        if not de.is_dir(follow_symlinks=False):
                            continue
                        name = os.fsencode(de.name)
                        rd = syscalls.getxattr(fd, name, OVL_REDIRECT)
                        if rd is not None:
                            found.append((rd, path + b"/" + name))
                        stack.append((syscalls.open_dir_at(fd, name, os.O_RDONLY), path + b"/" + name))
            finally:
                os.close(fd)
        return found

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
            node = self._node_for(node, e)
        e = self.r.resolve(node, parts[-1])
        return (node, e) if e.st is not None else None

    def _check_name(self, name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise err(errno.ENAMETOOLONG)

    def _writable(self) -> None:
        if self.readonly:
            raise err(errno.EROFS)

    # -- attributes ------------------------------------------------------------------------

    def loc(self, node: Node) -> tuple[int, bytes]:
        """(dir fd, name) where the node's top object is, for *at calls."""
        if node.pin is not None:
            return node.pin, b""
        if node.upper:
            assert self.upper is not None
            if node.parent is None:
                return self.upper.fd, b""
            return self.r.upper_fd(node.parent), node.name
        if not node.lowers:
            raise err(errno.ESTALE)
        return self.r.lower_loc(*node.lowers[0])

    def stat(self, node: Node) -> os.stat_result:
        return syscalls.stat_at(*self.loc(node))

    @staticmethod
    def nlink(node: Node, st: os.stat_result) -> int:
        """st_nlink as overlayfs reports it: 1 for a directory merged from several layers,
        whose true subdirectory count no single layer knows (find(1) takes 1 as "unknown")."""
        if node.is_dir and (len(node.lowers) > 1 or node.merged):
            return 1
        return st.st_nlink

    def lookup(self, parent: Node, name: bytes) -> tuple[Node | None, os.stat_result | None]:
        """Resolve a name; the caller counts the reference (NodeTable.ref)."""
        self._check_name(name)
        if name == b".":
            return parent, self.stat(parent)
        if name == b"..":
            up = parent.parent or self.root
            return up, self.stat(up)
        e = self.r.resolve(parent, name)
        if e.st is None:
            return None, None
        return self._node_for(parent, e), e.st

    def list_dir(self, node: Node) -> list[bytes]:
        return self.r.list_names(node)

    def readlink(self, node: Node) -> bytes:
        return syscalls.readlink_at(*self.loc(node))

    async def ensure_upper(self, node: Node, data: bool = True) -> None:
        """Copy *node* (and its parents) up if it is not in the upper yet."""
        if node.upper:
            return
        self._writable()
        assert self.copyup is not None
        if node.is_dir:
            self.copyup.dir(node)
            return
        async with self._lock(node):
            await self.copyup.file(node, data)

    async def setattr(self, node: Node, attrs: SetAttr, fh: int | None) -> os.stat_result:
        self._writable()
        truncating_all = attrs.size == 0 and attrs.mode is None and attrs.uid is None
        await self.ensure_upper(node, data=not truncating_all)
        dfd, name = self.loc(node)
        if attrs.size is not None:
            h = self.handles.get(fh) if fh is not None else None
            if h is not None and h.on_upper and h.flags & os.O_ACCMODE != os.O_RDONLY:
                os.ftruncate(h.fd, attrs.size)
            else:
                fd = syscalls.open_at(dfd, name, os.O_WRONLY)
                try:
                    os.ftruncate(fd, attrs.size)
                finally:
                    os.close(fd)
        if attrs.uid is not None or attrs.gid is not None:
            # chown(2) drops set-uid on disk just as the kernel's VFS did before sending
            # this request (with the cleared mode in it, applied below)
            syscalls.chown_at(dfd, name, -1 if attrs.uid is None else attrs.uid,
                              -1 if attrs.gid is None else attrs.gid)
        if attrs.mode is not None and node.kind != stat.S_IFLNK:
            syscalls.chmod_at(dfd, name, stat.S_IMODE(attrs.mode))
        if attrs.atime_ns is not None or attrs.mtime_ns is not None:
            syscalls.utimens_at(dfd, name, attrs.atime_ns, attrs.mtime_ns)
        self.journal.record(b"C", node.path())
        return syscalls.stat_at(dfd, name)

    # -- xattrs ------------------------------------------------------------------------

    def getxattr(self, node: Node, attr: bytes) -> bytes:
        if is_private_xattr(attr):
            raise err(errno.EOPNOTSUPP)
        dfd, name = self.loc(node)
        try:
            return syscalls.getxattr_strict(dfd, name, attr)
        except OSError as e:
            if e.errno == errno.ENODATA:
                raise err(errno.ENODATA)
            raise

    def listxattr(self, node: Node) -> list[bytes]:
        return [a for a in syscalls.listxattr(*self.loc(node)) if not is_private_xattr(a)]

    async def setxattr(self, node: Node, attr: bytes, value: bytes, flags: int = 0) -> None:
        if is_private_xattr(attr):
            raise err(errno.EOPNOTSUPP)
        self._writable()
        await self.ensure_upper(node)
        syscalls.setxattr(*self.loc(node), attr, value, flags)
        self.journal.record(b"C", node.path())

    async def removexattr(self, node: Node, attr: bytes) -> None:
        if is_private_xattr(attr):
            raise err(errno.EOPNOTSUPP)
        self._writable()
        if attr not in self.listxattr(node):
            raise err(errno.ENODATA)
        await self.ensure_upper(node)
        syscalls.removexattr(*self.loc(node), attr)
        self.journal.record(b"C", node.path())

    # -- creating names --------------------------------------------------------------------

    def _prepare_create(self, parent: Node, name: bytes) -> tuple[Entry, int]:
        """Check a new name may be made in *parent*; copy the parent up; return (entry, upper fd)."""
        self._check_name(name)
        self._writable()
        e = self.r.resolve(parent, name)
        if e.st is not None:
            raise err(errno.EEXIST)
        assert self.copyup is not None
        self.copyup.dir(parent)
        return e, self.r.upper_fd(parent)

    def _owner(self, parent: Node, caller: Caller, mode: int) -> tuple[int, int, int]:
        """Owner and mode of a new object: the caller's, with set-gid directory inheritance."""
        pst = self.stat(parent)
        gid = caller.gid
        if pst.st_mode & stat.S_ISGID:
            gid = pst.st_gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        return caller.uid, gid, mode

    def _finish_new(self, parent: Node, name: bytes, dfd: int, tmp: bytes | None,
                    e: Entry, is_dir: bool) -> os.stat_result:
        """Move a new object built in work/ over a whiteout (or to a free name)."""
        assert self.work is not None
        if tmp is not None:
            ufd = self.r.upper_fd(parent)
            if e.whiteout and is_dir:
                syscalls.renameat2(self.work.fd, tmp, ufd, name, syscalls.RENAME_EXCHANGE)
                os.unlink(tmp, dir_fd=self.work.fd)
            elif e.whiteout:
                syscalls.renameat2(self.work.fd, tmp, ufd, name)
            else:
                syscalls.renameat2(self.work.fd, tmp, ufd, name, syscalls.RENAME_NOREPLACE)
        return syscalls.stat_at(self.r.upper_fd(parent), name)

    def _new_node(self, parent: Node, name: bytes, st: os.stat_result, opaque: bool = False) -> Node:
        node = Node(make_ino(0, st.st_ino), stat.S_IFMT(st.st_mode), parent, name)
        node.upper = True
        node.opaque = opaque
        existing = self.nodes.get(node.id)
        if existing is not None:  # a forgotten-but-pinned inode cannot be reused, so: stale
            log.warning("inode %#x reused while still known", node.id)
        self.journal.record(b"A", node.path())
        return node

    def _make(self, parent: Node, name: bytes, caller: Caller, mode: int,
              build: Callable[[int, bytes], None], opaque_if_hidden: bool = False) -> Node:
        """Create an object with *build(dirfd, name)*: directly in the upper when the name is
        free there, else in work/ first and then over the whiteout, atomically."""
        e, ufd = self._prepare_create(parent, name)
        assert self.work is not None
        uid, gid, mode = self._owner(parent, caller, mode)
        opaque = opaque_if_hidden and (e.hidden or self.r.lower_positive(parent, name))
        via_work = e.whiteout or opaque
        dfd, dname = (self.work.fd, self.work.tmpname()) if via_work else (ufd, name)
        build(dfd, dname)
        try:
            syscalls.chown_at(dfd, dname, uid, gid)
            if not stat.S_ISLNK(mode):
                syscalls.chmod_at(dfd, dname, stat.S_IMODE(mode))
            if opaque:
                syscalls.setxattr(dfd, dname, OVL_OPAQUE, b"y")
            st = self._finish_new(parent, name, dfd, dname if via_work else None, e,
                                  stat.S_ISDIR(mode))
        except BaseException:
            remove_tree_at(dfd, dname)
            raise
        return self._new_node(parent, name, st, opaque)

    def mkdir(self, parent: Node, name: bytes, mode: int, caller: Caller) -> Node:
        return self._make(parent, name, caller, stat.S_IFDIR | mode,
                          lambda d, n: os.mkdir(n, 0o700, dir_fd=d), opaque_if_hidden=True)

    def mknod(self, parent: Node, name: bytes, mode: int, rdev: int, caller: Caller) -> Node:
        if stat.S_ISCHR(mode) and rdev == WHITEOUT_DEV:
            raise err(errno.EPERM, "a 0/0 character device is a whiteout")
        return self._make(parent, name, caller, mode,
                          lambda d, n: os.mknod(n, stat.S_IFMT(mode) | 0o600, rdev, dir_fd=d))

    def symlink(self, parent: Node, name: bytes, target: bytes, caller: Caller) -> Node:
        return self._make(parent, name, caller, stat.S_IFLNK | 0o777,
                          lambda d, n: os.symlink(target, n, dir_fd=d))

    def create(self, parent: Node, name: bytes, mode: int, flags: int,
               caller: Caller) -> tuple[Node, int]:
        """Create and open a regular file; returns the node and a file handle."""
        fds: list[int] = []

        def build(d: int, n: bytes) -> None:
            fds.append(os.open(n, self._open_flags(flags) | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=d))

        try:
            node = self._make(parent, name, caller, stat.S_IFREG | mode, build)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return node, self._new_handle(fds[0], node, True, flags)

    async def link(self, node: Node, parent: Node, name: bytes) -> os.stat_result:
        self._check_name(name)
        self._writable()
        if node.is_dir:
            raise err(errno.EPERM)
        e = self.r.resolve(parent, name)
        if e.st is not None:
            raise err(errno.EEXIST)
        await self.ensure_upper(node)
        e, ufd = self._prepare_create(parent, name)
        assert self.work is not None
        sfd, sname = self.loc(node)
        src = syscalls.proc_path(sfd) if not sname else sname
        if e.whiteout:
            tmp = self.work.tmpname()
            os.link(src, tmp, src_dir_fd=None if not sname else sfd, dst_dir_fd=self.work.fd,
                    follow_symlinks=not sname)
            syscalls.renameat2(self.work.fd, tmp, ufd, name)
        else:
            os.link(src, name, src_dir_fd=None if not sname else sfd, dst_dir_fd=ufd,
                    follow_symlinks=not sname)
        if node.parent is None:
            self.nodes.set_parent(node, parent, name)
        self.journal.record(b"A", parent.path() + b"/" + name if parent.id != ROOT_ID else b"/" + name)
        return self.stat(node)

    # -- removing names ------------------------------------------------------------------

    def _pin(self, node: Node | None) -> None:
        """Keep a removed-but-still-known upper object reachable (fstat of an open file,
        a deleted cwd), and its inode number from being reused while the kernel knows it."""
        if node is None or not node.registered or node.pin is not None or not node.upper:
            return
        dfd, name = self.loc(node)
        node.pin = syscalls.open_at(dfd, name, os.O_PATH)

    def _detach(self, node: Node | None, parent: Node, name: bytes) -> None:
        if node is None:
            return
        if node.parent is parent and node.name == name:
            self.nodes.set_parent(node, None, b"")
        self.cache.drop(("u", node.id))

    async def unlink(self, parent: Node, name: bytes) -> None:
        self._check_name(name)
        self._writable()
        e = self.r.resolve(parent, name)
        if e.st is None:
            raise err(errno.ENOENT)
        if stat.S_ISDIR(e.st.st_mode):
            raise err(errno.EISDIR)
        node = self.nodes.get(e.ino)
        e = await self._up_if_linked(parent, name, e)
        self._remove(parent, name, e, node)

    async def _up_if_linked(self, parent: Node, name: bytes, e: Entry) -> Entry:
        """Before a name of a hard-linked lower file goes away: copy the inode up first (as
        overlayfs with index=on), so the names that stay count one link fewer."""
        assert e.st is not None
        if e.upper or e.st.st_nlink < 2 or stat.S_ISDIR(e.st.st_mode):
            return e
        await self.ensure_upper(self._node_for(parent, e))
        e = self.r.resolve(parent, name)
        if e.st is None:
            raise err(errno.ENOENT)
        return e

    def rmdir(self, parent: Node, name: bytes) -> None:
        self._check_name(name)
        self._writable()
        if name == b".":
            raise err(errno.EINVAL)
        e = self.r.resolve(parent, name)
        if e.st is None:
            raise err(errno.ENOENT)
        if not stat.S_ISDIR(e.st.st_mode):
            raise err(errno.ENOTDIR)
        node = self._node_for(parent, e)
        if self.list_dir(node):
            raise err(errno.ENOTEMPTY)
        self._remove(parent, name, e, node if node.registered else None)

    def _remove(self, parent: Node, name: bytes, e: Entry, node: Node | None) -> None:
        """Take a name out of the view: delete the upper object, leave a whiteout if a lower
        one would show through. Directories leave via work/ so whiteouts inside go too."""
        assert self.copyup is not None and self.work is not None and e.st is not None
        need_wh = self.r.lower_positive(parent, name)
        is_dir = stat.S_ISDIR(e.st.st_mode)
        if e.upper:
            if node is not None and (node.parent is parent and node.name == name or is_dir):
                self._pin(node)
            ufd = self.r.upper_fd(parent)
            if is_dir:
                tmp = self.work.tmpname()
                if need_wh:
                    os.mknod(tmp, stat.S_IFCHR | 0o000, WHITEOUT_DEV, dir_fd=self.work.fd)
                    syscalls.renameat2(self.work.fd, tmp, ufd, name, syscalls.RENAME_EXCHANGE)
                else:
                    syscalls.renameat2(ufd, name, self.work.fd, tmp)
                self.work.remove_tree(tmp)
            elif need_wh:
                tmp = self.work.tmpname()
                syscalls.renameat2(ufd, name, self.work.fd, tmp, syscalls.RENAME_WHITEOUT)
                os.unlink(tmp, dir_fd=self.work.fd)
            else:
                os.unlink(name, dir_fd=ufd)
        else:
            self.copyup.dir(parent)
            os.mknod(name, stat.S_IFCHR | 0o000, WHITEOUT_DEV, dir_fd=self.r.upper_fd(parent))
        self._detach(node, parent, name)
        self.journal.record(b"D", self._child_path(parent, name))

    @staticmethod
    def _child_path(parent: Node, name: bytes) -> bytes:
        return (parent.path() if parent.id != ROOT_ID else b"") + b"/" + name

    # -- rename ------------------------------------------------------------------------------

    async def rename(self, p1: Node, n1: bytes, p2: Node, n2: bytes, flags: int) -> None:
        self._check_name(n1)
        self._check_name(n2)
        self._writable()
        exchange = bool(flags & syscalls.RENAME_EXCHANGE)
        noreplace = bool(flags & syscalls.RENAME_NOREPLACE)
        if flags & ~(syscalls.RENAME_EXCHANGE | syscalls.RENAME_NOREPLACE):
            raise err(errno.EINVAL)
        src, dst = self.r.resolve(p1, n1), self.r.resolve(p2, n2)
        if src.st is None:
            raise err(errno.ENOENT)
        if exchange and dst.st is None:
            raise err(errno.ENOENT)
        if noreplace and dst.st is not None:
            raise err(errno.EEXIST)
        if p1 is p2 and n1 == n2:
            return
        snode = self._node_for(p1, src)
        dnode = self._node_for(p2, dst) if dst.st is not None else None
        if dnode is not None and dnode.id == snode.id and not exchange:
            return  # two names of one inode: rename(2) does nothing
        sdir = stat.S_ISDIR(src.st.st_mode)
        if dst.st is not None and not exchange:
            ddir = stat.S_ISDIR(dst.st.st_mode)
            if sdir and not ddir:
                raise err(errno.ENOTDIR)
            if ddir and not sdir:
                raise err(errno.EISDIR)
            if ddir and dnode is not None and self.list_dir(dnode):
                raise err(errno.ENOTEMPTY)
        await self.ensure_upper(snode)
        if exchange and dnode is not None:
            await self.ensure_upper(dnode)
        elif dst.st is not None:
            dst = await self._up_if_linked(p2, n2, dst)
        # copy-ups may have awaited: look again, the names must still show the same objects
        src2, dst2 = self.r.resolve(p1, n1), self.r.resolve(p2, n2)
        if src2.ino != snode.id or (dst2.st is None) != (dst.st is None) or \
                (dst.st is not None and dst2.ino != dst.ino):
            raise err(errno.EAGAIN)
        assert self.copyup is not None and self.work is not None
        self.copyup.dir(p1)
        self.copyup.dir(p2)
        fd1, fd2 = self.r.upper_fd(p1), self.r.upper_fd(p2)
        if exchange:
            assert dnode is not None
            syscalls.renameat2(fd1, n1, fd2, n2, syscalls.RENAME_EXCHANGE)
            self._moved_dir(snode, p2, n2)
            self._moved_dir(dnode, p1, n1)
            self._redirects = None
            self.nodes.set_parent(snode, p2, n2)
            self.nodes.set_parent(dnode, p1, n1)
            self.journal.record(b"C", self._child_path(p1, n1))
            self.journal.record(b"C", self._child_path(p2, n2))
            return
        need_wh = self.r.lower_positive(p1, n1)
        wh_flag = syscalls.RENAME_WHITEOUT if need_wh else 0
        if dst2.upper:
            if dnode is not None:
                self._pin(dnode if dnode.registered else None)
            if sdir:
                self._clear_whiteouts(fd2, n2)
            syscalls.renameat2(fd1, n1, fd2, n2, wh_flag)
        elif dst2.whiteout and sdir:
            syscalls.renameat2(fd1, n1, fd2, n2, syscalls.RENAME_EXCHANGE)
            if not need_wh:
                os.unlink(n1, dir_fd=fd1)
        else:
            syscalls.renameat2(fd1, n1, fd2, n2, wh_flag)
        if sdir:
            self._moved_dir(snode, p2, n2)
            self._redirects = None
        if dnode is not None:
            self._detach(dnode, p2, n2)
        self.nodes.set_parent(snode, p2, n2)
        self.journal.record(b"D", self._child_path(p1, n1))
        self.journal.record(b"A", snode.path(), tree=sdir)

    def _moved_dir(self, node: Node, parent: Node, name: bytes) -> None:
        """A directory now at (parent, name) keeps its own lower contents: by a redirect to
        where they are, or, for a directory with none, by being opaque where lower ones exist."""
        if not node.is_dir:
            return
        fd = self.r.upper_fd(parent)
        if node.lowers and not node.opaque:
            target = b"/" + node.lowers[0][1]
            syscalls.setxattr(fd, name, OVL_REDIRECT, target)
        elif not node.opaque and (parent.lowers or self.r.lower_positive(parent, name)):
            syscalls.setxattr(fd, name, OVL_OPAQUE, b"y")
            node.opaque = True

    def _clear_whiteouts(self, dirfd: int, name: bytes) -> None:
        """Empty an upper directory that is empty in the view (it may hold whiteouts only)."""
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        try:
            for child in os.listdir(sub):
                c = os.fsencode(child)
                st = syscalls.lstat_at(sub, c)
                if st is not None and syscalls.is_whiteout(st):
                    os.unlink(c, dir_fd=sub)
        finally:
            os.close(sub)

    # -- open files ----------------------------------------------------------------------------

    def _open_flags(self, flags: int) -> int:
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY)
        if self.writeback:
            # the kernel's writeback cache reads pages of write-only files and does
            # O_APPEND itself
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
            flags &= ~os.O_APPEND
        return flags

    def _new_handle(self, fd: int, node: Node, on_upper: bool, flags: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = Handle(fd, node, on_upper, flags & os.O_ACCMODE)
        return fh

    async def open(self, node: Node, flags: int) -> int:
        writing = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        if writing:
            self._writable()
            await self.ensure_upper(node, data=not flags & os.O_TRUNC)
        fd = syscalls.open_at(*self.loc(node), self._open_flags(flags))
        if writing:
            self.journal.record(b"C", node.path())
        return self._new_handle(fd, node, node.upper, self._open_flags(flags))

    def handle(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise err(errno.EBADF)
        if not h.on_upper and h.node.upper:
            fd = syscalls.open_at(*self.loc(h.node), os.O_RDONLY)
            os.close(h.fd)
            h.fd, h.on_upper = fd, True
        return h

    def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is not None:
            os.close(h.fd)

    def statfs(self) -> os.statvfs_result:
        layer = self.upper or self.lowers[0]
        return os.statvfs(syscalls.proc_path(layer.fd))
