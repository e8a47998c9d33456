"""Namespace changes: creating, removing and renaming names in the union.

Rules (overlayfs's): a new name goes straight into the upper when the name is
free there, otherwise it is built in the work directory and renamed over the
whiteout in one step; a removed name that a lower layer would show again
leaves a whiteout (made atomically by RENAME_WHITEOUT or mknod, or in the xattr
form where those are refused: format.Format.make_whiteout); a removed
directory leaves through the work directory with any whiteouts inside it; a
renamed directory with lower contents gets a redirect to them, so renaming
is O(1) and never EXDEV; in a format without redirects (userxattr) it is copied
up whole where it is, made opaque and moved (Namespace._copy_tree_up).

Namespace is a collaborator of union.Union, built with what it works on (the
resolver, the node table, the workdir, copy-up, the changes log, the handle
table) and the few things it asks of the union as a whole (View, below).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol

from . import acl, format, syscalls
from .changes import Journal
from .copyup import CopyUp
from .files import Handles
from .format import Format
from .merge import Entry, Resolver
from .nodes import NEW_OBJECT_ABSENT, ROOT_ID, Node, NodeTable, make_ino
from .owners import Owners, StatOverride
from .layers import walk_tree
from .workdir import WorkDir, remove_tree_at

log = logging.getLogger("unionfs")

def err(code: int, what: str = "") -> OSError:
    return OSError(code, what or os.strerror(code))


@dataclass
class Caller:
    """Who asks: new objects belong to them."""

    uid: int = 0
    gid: int = 0
    umask: int = 0  # applied by the daemon (acl.new_mode): the kernel leaves it (DONT_MASK)


class View(Protocol):
    """What namespace changes ask of the union as a whole (union.Union is one)."""

    yields: int

    def check_name(self, name: bytes) -> None: ...
    def writable(self) -> None: ...
    def stat(self, node: Node) -> os.stat_result: ...
    def node_for(self, parent: Node, e: Entry) -> Node: ...
    def list_dir(self, node: Node) -> list[bytes]: ...
    def ensure_upper(self, node: Node, data: bool = True) -> Awaitable[None]: ...
    def forget_redirects(self) -> None: ...


class Namespace:
    """mkdir, mknod, symlink, create, link, unlink, rmdir, rename."""

    def __init__(self, view: View, resolver: Resolver, nodes: NodeTable, fmt: Format,
                 journal: Journal, files: Handles, work: WorkDir | None,
                 copyup: CopyUp | None, owners: Owners, override: StatOverride,
                 acls: bool = True) -> None:
        self.u = view
        self.acls = acls  # default ACLs of parents apply to new objects (not with noacl)
        self.owners = owners  # who a caller's new object belongs to on disk (uidmapping=)
        self.override = override  # or in user.containers.override_stat (xattr_permissions=2)
        self.r = resolver
        self.nodes = nodes
        self.fmt = fmt
        self.journal = journal
        self.files = files
        self.work = work      # None (with copyup): a read-only union, where writable() refuses
        self.copyup = copyup

    # -- creating names --------------------------------------------------------------------

    def _prepare_create(self, parent: Node, name: bytes) -> tuple[Entry, int]:
        """Check a new name may be made in *parent*; copy the parent up; return (entry, upper fd)."""
        self.u.check_name(name)
        self.u.writable()
        e = self.r.resolve(parent, name)
        if e.st is not None:
            raise err(errno.EEXIST)
        assert self.copyup is not None
        self.copyup.dir(parent)
        return e, self.r.upper_fd(parent)

    def _owner(self, parent: Node, caller: Caller, mode: int) -> tuple[int, int, int]:
        """Owner and mode of a new object: the caller's (as stored: uidmapping=), with set-gid
        directory inheritance."""
        pst = self.u.stat(parent)
        pmode, _, pgid = self.override.shown(0 if parent.upper else -1, *self.r.loc(parent), pst)
        uid, gid = self.owners.stored(caller.uid, caller.gid)
        if pmode & stat.S_ISGID:
            gid = pgid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        return uid, gid, mode

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
        # the upper's filesystem may give the number of a deleted copy that could not carry
        # its identity (Resolver.unmarked): that entry is the dead copy's, not this object's
        self.r.unmarked.pop(st.st_ino, None)
        node = Node(make_ino(0, st.st_ino), stat.S_IFMT(st.st_mode), parent, name)
        node.upper = True
        node.opaque = opaque
        node.no_xattrs = NEW_OBJECT_ABSENT
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
        default_acl = (syscalls.getxattr(ufd, b"", acl.DEFAULT)
                       if self.acls and not stat.S_ISLNK(mode) else None)
        mode, access_acl = acl.new_mode(mode, caller.umask, default_acl)
        opaque = opaque_if_hidden and (e.hidden or self.r.lower_positive(parent, name))
        via_work = e.whiteout or opaque
        dfd, dname = (self.work.fd, self.work.tmpname()) if via_work else (ufd, name)
        build(dfd, dname)
        try:
            if self.override.upper and self.override.applies(mode):
                # the object stays the daemon's (readable by it whatever the mode says)
                syscalls.chmod_at(dfd, dname, stat.S_IMODE(mode) | 0o755)
                self.override.write(dfd, dname, uid, gid, mode)
            else:
                try:
                    syscalls.chown_at(dfd, dname, uid, gid)
                except PermissionError:
                    if not self.override.upper:  # nowhere to keep it: as fuse-overlayfs
                        raise
                if not stat.S_ISLNK(mode):
                    syscalls.chmod_at(dfd, dname, stat.S_IMODE(mode))
                # set in full, not left to the upper's filesystem: work/ has no default ACL,
                # and the chmod above has rewritten what a creation in place inherited
                if access_acl is not None:
                    syscalls.setxattr(dfd, dname, acl.ACCESS, access_acl)
                if default_acl is not None and stat.S_ISDIR(mode):
                    syscalls.setxattr(dfd, dname, acl.DEFAULT, default_acl)
            if opaque:
                self.fmt.set_opaque(dfd, dname)
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
        if format.is_whiteout_node(mode, rdev):
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
            fds.append(os.open(n, self.files.open_flags(flags) | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=d))

        try:
            node = self._make(parent, name, caller, stat.S_IFREG | mode, build)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return node, self.files.add(fds[0], node, True, flags)

    async def link(self, node: Node, parent: Node, name: bytes) -> os.stat_result:
        self.u.check_name(name)
        self.u.writable()
        if node.is_dir:
            raise err(errno.EPERM)
        e = self.r.resolve(parent, name)
        if e.st is not None:
            raise err(errno.EEXIST)
        await self.u.ensure_upper(node)
        e, ufd = self._prepare_create(parent, name)
        assert self.work is not None
        sfd, sname = self.r.loc(node)
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
        return self.u.stat(node)

    # -- removing names ------------------------------------------------------------------

    def _pin(self, node: Node | None) -> None:
        """Keep a removed-but-still-known upper object reachable (fstat of an open file,
        a deleted cwd), and its inode number from being reused while the kernel knows it."""
        if node is None or not node.registered or node.pin is not None or not node.upper:
            return
        dfd, name = self.r.loc(node)
        node.pin = syscalls.open_at(dfd, name, os.O_PATH)

    def _detach(self, node: Node | None, parent: Node, name: bytes) -> None:
        if node is None:
            return
        self.nodes.name_gone(node, parent, name)
        if node.parent is None:
            self.r.cache.drop(("u", node.id))

    async def unlink(self, parent: Node, name: bytes) -> None:
        self.u.check_name(name)
        self.u.writable()
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
        await self.u.ensure_upper(self.u.node_for(parent, e))
        e = self.r.resolve(parent, name)
        if e.st is None:
            raise err(errno.ENOENT)
        return e

    def rmdir(self, parent: Node, name: bytes) -> None:
        self.u.check_name(name)
        self.u.writable()
        if name == b".":
            raise err(errno.EINVAL)
        e = self.r.resolve(parent, name)
        if e.st is None:
            raise err(errno.ENOENT)
        if not stat.S_ISDIR(e.st.st_mode):
            raise err(errno.ENOTDIR)
        node = self.u.node_for(parent, e)
        if self.u.list_dir(node):
            raise err(errno.ENOTEMPTY)
        self._remove(parent, name, e, node if node.registered else None)

    def _remove(self, parent: Node, name: bytes, e: Entry, node: Node | None) -> None:
        """Take a name out of the view: delete the upper object, leave a whiteout if a lower
        one would show through. Directories leave via work/ so whiteouts inside go too."""
        assert self.copyup is not None and self.work is not None and e.st is not None
        is_dir = stat.S_ISDIR(e.st.st_mode)
        # as in rename: a non-directory that resolved to a lower object needs a whiteout
        need_wh = (not is_dir and bool(e.lowers)) or self.r.lower_positive(parent, name)
        if e.upper:
            if node is not None and (node.parent is parent and node.name == name or is_dir):
                self._pin(node)
            ufd = self.r.upper_fd(parent)
            if is_dir:
                if need_wh:
                    tmp = self.fmt.scratch_whiteout(self.work, ufd)
                    syscalls.renameat2(self.work.fd, tmp, ufd, name, syscalls.RENAME_EXCHANGE)
                else:
                    tmp = self.work.tmpname()
                    syscalls.renameat2(ufd, name, self.work.fd, tmp)
                self.work.remove_tree(tmp)
            elif need_wh:
                tmp = self.work.tmpname()
                self.fmt.rename_whiteout(ufd, name, self.work.fd, tmp, self.work)
                os.unlink(tmp, dir_fd=self.work.fd)
            else:
                os.unlink(name, dir_fd=ufd)
        else:
            self.copyup.dir(parent)
            self.fmt.make_whiteout(self.r.upper_fd(parent), name, self.work)
        self._detach(node, parent, name)
        self.journal.record(b"D", self._child_path(parent, name))
        self._names_left(node, e)

    def _names_left(self, node: Node | None, e: Entry) -> None:
        """A name of a hard-linked upper file went: `unionfs diff` finds a file's other
        names by inode from a logged one, and the logged one may have been this. Log the
        name the node keeps, or (none known) an unknown path, which makes diff rescan."""
        if e.upper and e.st is not None and e.st.st_nlink > 1 and not stat.S_ISDIR(e.st.st_mode):
            self.journal.record(b"C", node.path() if node is not None else b"")

    @staticmethod
    def _child_path(parent: Node, name: bytes) -> bytes:
        return (parent.path() if parent.id != ROOT_ID else b"") + b"/" + name

    # -- rename ------------------------------------------------------------------------------

    async def rename(self, p1: Node, n1: bytes, p2: Node, n2: bytes, flags: int) -> None:
        self.u.check_name(n1)
        self.u.check_name(n2)
        self.u.writable()
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
        snode = self.u.node_for(p1, src)
        dnode = self.u.node_for(p2, dst) if dst.st is not None else None
        if dnode is not None and dnode.id == snode.id and not exchange:
            return  # two names of one inode: rename(2) does nothing
        sdir = stat.S_ISDIR(src.st.st_mode)
        if dst.st is not None and not exchange:
            ddir = stat.S_ISDIR(dst.st.st_mode)
            if sdir and not ddir:
                raise err(errno.ENOTDIR)
            if ddir and not sdir:
                raise err(errno.EISDIR)
        if dst.st is not None and not exchange:
            if ddir and dnode is not None and self.u.list_dir(dnode):
                raise err(errno.ENOTEMPTY)
        yields = self.u.yields
        # without redirects (the userxattr format) a directory with lower contents takes
        # them along as copies: where overlayfs gives EXDEV and mv copies, the rename
        # copies its tree up in place, and the directory moves whole as an opaque one
        trees = [n for n in (snode, dnode if exchange else None)
                 if n is not None and not self.fmt.redirects and self._needs_redirect(n)]
        sealed = [await self._copy_tree_up(n) for n in trees]
        await self.u.ensure_upper(snode)
        if exchange and dnode is not None:
            await self.u.ensure_upper(dnode)
        elif dst.st is not None:
            dst = await self._up_if_linked(p2, n2, dst)
        src2, dst2 = src, dst
        if self.u.yields != yields:
            # other requests may have run: look again, the names must still show the same
            # objects (else only our own copy-ups ran, which change neither name's object,
            # and _up_if_linked re-resolved dst if it copied it)
            src2, dst2 = self.r.resolve(p1, n1), self.r.resolve(p2, n2)
            if src2.ino != snode.id or (dst2.st is None) != (dst.st is None) or \
                    (dst.st is not None and dst2.ino != dst.ino):
                raise err(errno.EAGAIN)
        assert self.copyup is not None and self.work is not None
        self.copyup.dir(p1)
        self.copyup.dir(p2)
        fd1, fd2 = self.r.upper_fd(p1), self.r.upper_fd(p2)
        for node, dirs in zip(trees, sealed):
            self._seal_tree(node, dirs)
        if exchange:
            assert dnode is not None
            syscalls.renameat2(fd1, n1, fd2, n2, syscalls.RENAME_EXCHANGE)
            self._moved_dir(snode, p2, n2)
            self._moved_dir(dnode, p1, n1)
            self.u.forget_redirects()
            self._renamed(snode, p1, n1, p2, n2)
            self._renamed(dnode, p2, n2, p1, n1)
            for node in trees:
                self._drop_whiteouts(node)
            self.journal.records((b"C", self._child_path(p1, n1), False),
                                 (b"C", self._child_path(p2, n2), False))
            return
        # a non-directory name that resolved to a lower object needs a whiteout when it goes
        # (the same probe, already made); otherwise ask the layers: an upper object may
        # shadow one, and a directory's redirect may have found lowers an opaque parent hides
        need_wh = (not sdir and src2 is src and bool(src.lowers)) or self.r.lower_positive(p1, n1)
        if dst2.upper:
            if dnode is not None:
                self._pin(dnode if dnode.registered else None)
            if sdir:
                self._clear_whiteouts(fd2, n2)
            self._rename_leaving(fd1, n1, fd2, n2, need_wh)
        elif dst2.whiteout and sdir:
            if need_wh:  # the whiteout at n2 lands at n1: in its xattr form, p1 must say so
                wst = syscalls.lstat_at(fd2, n2)
                if wst is not None and not format.is_whiteout(wst):
                    self.fmt.mark_xwhiteouts(fd1)
            syscalls.renameat2(fd1, n1, fd2, n2, syscalls.RENAME_EXCHANGE)
            if not need_wh:
                os.unlink(n1, dir_fd=fd1)
        else:
            self._rename_leaving(fd1, n1, fd2, n2, need_wh)
        if sdir:
            self._moved_dir(snode, p2, n2)
            self.u.forget_redirects()
        if dnode is not None:
            self._detach(dnode, p2, n2)
        if dst2.st is not None:
            self._names_left(dnode, dst2)
        self._renamed(snode, p1, n1, p2, n2)
        for node in trees:
            self._drop_whiteouts(node)
        self.journal.records((b"D", self._child_path(p1, n1), False), (b"A", snode.path(), sdir))

    async def _copy_tree_up(self, top: Node) -> list[Node]:
        """Copy everything the merged directory *top* shows, to the bottom, into the upper
        where it is, by copy-up (data, owners, modes, times, xattrs; hard links stay one
        inode, within the tree and beyond it). Nothing in the view changes, so a crash
        at any point loses nothing: the old name still shows the whole directory. Returns
        the directories copied that still have lower contents (see _seal_tree)."""
        for _ in range(8):
            dirs: list[Node] = []
            todo: list[tuple[Node, bytes] | Node] = [top]
            complete = True
            while todo:
                item = todo.pop()
                if isinstance(item, Node):
                    d = item
                else:
                    # looked up now, not when listed: a hard link's copy-up may have made
                    # this directory in the upper since (it links the file's other names)
                    e = self.r.resolve(*item)
                    if e.st is None or not stat.S_ISDIR(e.st.st_mode):
                        complete = False
                        continue
                    d = self.u.node_for(item[0], e)
                await self.u.ensure_upper(d)
                if d.opaque or not d.lowers:
                    continue  # an upper-only directory: nothing below it to copy
                dirs.append(d)
                for name in self.u.list_dir(d):
                    e = self.r.resolve(d, name)
                    if e.st is None:
                        continue
                    if stat.S_ISDIR(e.st.st_mode):
                        todo.append((d, name))
                        continue
                    child = self.u.node_for(d, e)
                    if not child.upper:
                        complete = False  # awaits below: look at the tree once more after
                        await self.u.ensure_upper(child)
            if complete:
                return dirs
        raise err(errno.EAGAIN, "the directory kept changing while it was copied")

    def _seal_tree(self, top: Node, dirs: list[Node]) -> None:
        """After _copy_tree_up, with no await since its last pass: *top* becomes opaque,
        which changes nothing in the view (everything it shows is in the upper now), and
        its directories stop reading lower layers, so it can move without a redirect."""
        fd, name = self.r.loc(top)
        syscalls.setxattr(fd, name, self.fmt.opaque_key, b"y")
        top.opaque = True
        for d in dirs:
            d.lowers = []
            # no lower directory backs its inode number any more: it keeps the number for
            # this mount's life, and shows its own after a remount, as a copy would
            dfd, dname = self.r.loc(d)
            with contextlib.suppress(OSError):
                syscalls.removexattr(dfd, dname, self.fmt.ino_key)
            self.r.unmarked[syscalls.stat_at(dfd, dname).st_ino] = d.id
        self.u.forget_redirects()

    def _drop_whiteouts(self, top: Node) -> None:
        """Below a sealed tree nothing is hidden any more: its whiteouts go (kernel
        overlayfs lists a whiteout in a directory it does not merge as a name it cannot
        stat). After the rename, so a crash before leaves them harmless."""
        fd, name = self.r.loc(top)
        sub = syscalls.open_dir_at(fd, name)
        try:
            for dfd, rel, cname, de in walk_tree(sub):
                if not de.is_dir(follow_symlinks=False):
                    st = de.stat(follow_symlinks=False)
                    # the top's own mark is "y" now, no longer the "x" its xattr
                    # whiteouts were made under (nothing else sets that xattr there)
                    if self.fmt.whiteout_at(dfd, cname, st) or (b"/" not in rel and
                            format.is_xwhiteout(dfd, cname, st, (self.fmt.whiteout_key,))):
                        os.unlink(cname, dir_fd=dfd)
        finally:
            os.close(sub)

    def _rename_leaving(self, fd1: int, n1: bytes, fd2: int, n2: bytes, whiteout: bool) -> None:
        """rename(2), leaving a whiteout at the old name if asked."""
        if whiteout:
            assert self.work is not None
            self.fmt.rename_whiteout(fd1, n1, fd2, n2, self.work)
        else:
            syscalls.renameat2(fd1, n1, fd2, n2)

    def _renamed(self, node: Node, p1: Node, n1: bytes, p2: Node, n2: bytes) -> None:
        """The name (p1, n1) of *node* is now (p2, n2); a hard link's other names stay."""
        if node.is_dir or node.parent is None or (node.parent is p1 and node.name == n1):
            self.nodes.set_parent(node, p2, n2)
        else:
            self.nodes.name_gone(node, p1, n1)
            self.nodes.name_added(node, p2, n2)

    @staticmethod
    def _needs_redirect(node: Node) -> bool:
        """A directory whose lower contents only a redirect could take along if it moved."""
        return node.is_dir and bool(node.lowers) and not node.opaque

    def _moved_dir(self, node: Node, parent: Node, name: bytes) -> None:
        """A directory now at (parent, name) keeps its own lower contents: by a redirect to
        where they are, or, for a directory with none, by being opaque where lower ones exist."""
        if not node.is_dir:
            return
        fd = self.r.upper_fd(parent)
        if self._needs_redirect(node):
            target = b"/" + node.lowers[0][1]
            self.fmt.set_redirect(fd, name, target)
        elif not node.opaque and (parent.lowers or self.r.lower_positive(parent, name)):
            self.fmt.set_opaque(fd, name)
            node.opaque = True

    def _clear_whiteouts(self, dirfd: int, name: bytes) -> None:
        """Empty an upper directory that is empty in the view (it may hold whiteouts only)."""
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        try:
            for child in os.listdir(sub):
                c = os.fsencode(child)
                st = syscalls.lstat_at(sub, c)
                if st is not None and self.fmt.whiteout_at(sub, c, st):
                    os.unlink(c, dir_fd=sub)
        finally:
            os.close(sub)

