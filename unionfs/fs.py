"""The pyfuse3 Operations: a protocol adapter only.

Every handler turns a request into a call on union.Union and the answer into
pyfuse3 types; OSError becomes FUSEError here and nowhere else. Lookup counts
rise where the protocol says (lookup, create, mkdir, mknod, symlink, link,
readdirplus entries) and fall only in forget.

Caching: lower layers never change under a mount and every change to the
upper passes through this daemon, so the kernel may keep entries, negative
entries, attributes and page cache for a long time; inode numbers survive
copy-up, so nothing the kernel cached goes stale when an object moves up.
"""
from __future__ import annotations

import array
import bisect
import errno
import functools
import hashlib
import logging
import os
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import trio

from . import binding, format, syscalls
from .config import MountConfig, privileged
from .files import Passthrough
from .nodes import Node
from .union import Caller, SetAttr, Union

pyfuse3 = binding.load().module  # the built-in binding, else a stock pyfuse3 (binding.py)
log = logging.getLogger("unionfs")

# The built-in binding (patches/pyfuse3, docs/binding.md) answers OPENDIR with
# ENOSYS itself: directories are then opened without a round trip, as files stay opened
# with one (OPEN decides copy-up and O_TRUNC).
ZERO_OPENDIR = getattr(pyfuse3, "UNIONFS_PATCH", 0) >= 2
# A directory offset is a name's place in one order that depends on the name alone (a
# hash of it), not an index into one listing: a reader that goes on from an offset after
# the names changed, or in another reader's listing (readers of a directory share the
# kernel's readdir cache, and with no handles also this daemon's listing), is shown every
# name that stayed exactly once. The hash is a fixed one (not Python's per-process hash)
# so a directory lists in the same order on every mount, as `tar c` of it wants.
# 1 and 2 are "." and "..". Two names of one directory with the same 62-bit hash could
# lose the second to a reader that stops between them, as with ext4's hashed offsets;
# with n names that has odds of about n*n/2**63.
_OFFSET_MASK = (1 << 62) - 1


def _offset(name: bytes) -> int:
    return (int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little")
            & _OFFSET_MASK) + 3


class _Listing:
    """One listing of a directory in offset order (the offsets in one array, not an int
    object each: a walk holds a listing per directory it is in)."""

    __slots__ = ("names", "offsets")

    def __init__(self, names: list[bytes]) -> None:
        names.sort(key=_offset)
        self.names = [b".", b".."] + names
        self.offsets = array.array("Q", [1, 2])
        self.offsets.extend(map(_offset, names))


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def fuse_errors(fn: F) -> F:
    """The one place where OSError turns into FUSEError (and a bug into EIO, not a crash)."""

    @functools.wraps(fn)
    async def wrapper(self: "Operations", *args: Any) -> Any:
        if self.debug:
            log.debug("%s%r", fn.__name__, args[:-1] if args and _is_ctx(args[-1]) else args)
        self.u.serving += 1  # see Union.serving
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            if self.debug:
                log.debug("%s -> %s", fn.__name__, errno.errorcode.get(e.errno or 0, e.errno))
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            self.u.serving -= 1

    return wrapper  # type: ignore[return-value]


def _is_ctx(obj: object) -> bool:
    return isinstance(obj, pyfuse3.RequestContext)


def _caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(ctx.uid, ctx.gid, ctx.umask)


class Operations(pyfuse3.Operations):
    enable_writeback_cache = True
    enable_acl = True  # the kernel checks and caches POSIX ACLs (no GETXATTR per ls -l)
    # the built-in binding only (docs/binding.md), ignored by a stock pyfuse3:
    cache_readdir = True  # listings stay in the kernel until the directory changes
    enable_cache_symlinks = True  # a symlink's target never changes: the kernel keeps it
    # the kernel leaves the umask to the daemon, which applies it unless the parent has a
    # default ACL (acl.py); on a stock pyfuse3 the kernel applies it first, as POSIX.1e
    # does not want where a default ACL is
    enable_dont_mask = True
    no_opendir = ZERO_OPENDIR  # no OPENDIR/RELEASEDIR round trips; readdir gets the inode
    # after a reply, poll for the next request this long before sleeping (-o poll_us=)
    poll_us = MountConfig.poll_us
    supports_dot_lookup = True
    passthrough = False  # ask the kernel for FUSE passthrough (passthrough_plan)

    def __init__(self, union: Union, debug: bool = False) -> None:
        super().__init__()
        self.u = union
        self.debug = debug
        config = union.config
        self.timeout = config.timeout  # seconds the kernel may trust an entry or attributes
        self.enable_acl = config.acl
        self.enable_dont_mask = config.acl  # without ACLs the kernel's umask is the rule
        self.enable_writeback_cache = config.writeback
        self.volatile = config.volatile
        # the built-in binding (UNIONFS_PATCH 5) answers READs of these handles itself
        self.read_fds = union.fds
        self._dir_handles: dict[int, Node] = {}  # stock pyfuse3 only: opendir's handles
        self._next_dh = 1
        # The newest listing of each directory that readers are part-way through, by handle
        # (by inode when there are no handles): a read from offset 0 makes a new one
        self._listings: dict[int, _Listing] = {}

    def init(self) -> None:
        """During INIT, before its reply: the kernel's offer is known, and with it whether
        open upper files pass through (the binding then turns the writeback cache off)."""
        if not self.passthrough:
            return
        if pyfuse3.passthrough_offered():
            # a new kernel inode for a copied-up file needs an entry's node id apart from
            # its st_ino (patch 0011); without it only upper files pass through
            lowers = hasattr(pyfuse3.EntryAttributes, "nodeid") and \
                any(layer.noatime for layer in self.u.lowers)
            self.u.use_passthrough(Passthrough(
                pyfuse3.backing_open, pyfuse3.backing_close,
                (lambda kid: pyfuse3.invalidate_inode(kid, True)) if lowers else None))
            log.info("passthrough: on (the kernel reads and writes open upper files%s "
                     "itself; no writeback cache)", " and lower files read" if lowers else "")
        else:
            log.warning("passthrough: off (the kernel did not offer FUSE passthrough)")

    def release_layers(self) -> None:
        """At unmount, first: every fd on the layers closed (Union.release_layers; not
        `release`, which is the FUSE handler of that name)."""
        self.u.release_layers()

    def shutdown(self) -> None:
        """At unmount, then: the stop recorded as clean (Union.finish)."""
        self.u.finish()

    def stats(self) -> dict[str, int]:
        return {**self.u.stats(), "listings": len(self._listings), "dir_handles": len(self._dir_handles)}

    # -- attributes --------------------------------------------------------------------

    def _attrs(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.id
        a.generation = 0
        a.entry_timeout = self.timeout
        a.attr_timeout = self.timeout
        a.st_nlink = self.u.nlink(node, st)
        a.st_mode, a.st_uid, a.st_gid = self.u.shown(node, st)
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _entry(self, node: Node, st: os.stat_result | None = None) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that hands the kernel a reference: counts it."""
        node = self.u.nodes.ref(node)
        a = self._attrs(node, st if st is not None else self.u.stat(node))
        if node.kid != node.id:
            a.nodeid = node.kid
        return a

    def _attrs_of(self, inode: int, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """Attributes of the kernel inode *inode*: an old inode of a node (Union._new_inode)
        may not cache them, since the node changes through its new one."""
        a = self._attrs(node, st)
        if inode != node.kid:
            a.attr_timeout = 0
        return a

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext):
        parent = self.u.node(parent_inode)
        node, st = self.u.lookup(parent, name)
        if node is None:
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = 0
            neg.entry_timeout = self.timeout
            return neg
        return self._entry(node, st)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # no reply to turn an error into: log it, since an exception escaping a
        # handler would end pyfuse3's request loop and with it the mount
        for inode, count in inode_list:
            try:
                self.u.nodes.forget(inode, count)
            except Exception:
                log.exception("internal error in forget of %#x", inode)
            if ZERO_OPENDIR:
                self._listings.pop(inode, None)  # a reader that stopped part-way

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext):
        node = self.u.node(inode)
        return self._attrs_of(inode, node, self.u.stat(node))

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext):
        node = self.u.node(inode)
        req = SetAttr(
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        if req == SetAttr():  # nothing to change
            return self._attrs_of(inode, node, self.u.stat(node))
        st = await self.u.setattr(node, req, fh)
        return self._attrs_of(inode, node, st)

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.u.readlink(self.u.node(inode))

    # -- namespace -----------------------------------------------------------------------

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext):
        node = self.u.mknod(self.u.node(parent_inode), name, mode, rdev, _caller(ctx))
        return self._entry(node)

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext):
        node = self.u.mkdir(self.u.node(parent_inode), name, mode, _caller(ctx))
        return self._entry(node)

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext):
        node = self.u.symlink(self.u.node(parent_inode), name, target, _caller(ctx))
        return self._entry(node)

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext):
        node = self.u.node(inode)
        st = await self.u.link(node, self.u.node(new_parent_inode), new_name)
        return self._entry(node, st)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.u.unlink(self.u.node(parent_inode), name)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.u.rmdir(self.u.node(parent_inode), name)

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        await self.u.rename(self.u.node(parent_inode_old), name_old,
                            self.u.node(parent_inode_new), name_new, flags)

    # -- files -----------------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext):
        fh = await self.u.open(self.u.node(inode), flags, privileged=ctx.uid == 0, kid=inode)
        keep, backing = self.u.files.reply(fh)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep, **_backing(backing))

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext):
        node, fh = self.u.create(self.u.node(parent_inode), name, mode, flags, _caller(ctx))
        keep, backing = self.u.files.reply(fh)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep, **_backing(backing)), self._entry(node)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.u.handle(fh).fd, size, off)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self.u.write(fh, off, buf)

    async def flush(self, fh: int) -> None:
        # Nothing to do at close: data reaches the upper fd at write, and locks are the
        # kernel's (no lock handlers). ENOSYS tells the kernel so once: it then stops
        # sending FLUSH at every close(), still writing dirty pages back first.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_errors
    async def release(self, fh: int) -> None:
        self.u.release(fh)

    @fuse_errors
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        self.u.fallocate(fh, mode, offset, length)

    @fuse_errors
    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        node = self.u.unwritten_pages(fh)
        if node is not None:
            # the kernel asks without writing its dirty pages back first, so the upper file
            # may lack written data (and length): invalidating the pages makes it write
            # them back, through this loop, which must go on serving meanwhile
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, node.kid, False)
        return self.u.seek(fh, offset, whence)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        if self.volatile:  # nothing is to be durable; ENOSYS: the kernel stops asking
            raise pyfuse3.FUSEError(errno.ENOSYS)
        fd = self.u.handle(fh).fd
        await trio.to_thread.run_sync(self.u.fsync, fd, datasync)

    # -- directories -------------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        """Stock pyfuse3 only (the patched one answers OPENDIR itself). The listing is made
        at the first readdir: with cache_readdir the kernel often never asks."""
        dh = self._next_dh
        self._next_dh += 1
        self._dir_handles[dh] = self.u.node(inode)
        return dh

    def _dir(self, fh: int) -> Node:
        return self.u.node(fh) if ZERO_OPENDIR else self._dir_handles[fh]

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        node = self._dir(fh)
        listing = self._listings.get(fh) if start_id else None
        if listing is None:  # a first read, rewinddir, or a listing since dropped: what is there now
            listing = self._listings[fh] = _Listing(self.u.list_dir(node))
        names, offsets = listing.names, listing.offsets
        first = bisect.bisect_right(offsets, start_id)
        if first >= len(names):  # the end: with no RELEASEDIR coming, drop it now
            self._listings.pop(fh, None)
            return
        for i in range(first, len(names)):
            name = names[i]
            child, st = self.u.lookup(node, name)
            if child is None or st is None:
                continue  # gone since the listing was made
            if not pyfuse3.readdir_reply(token, name, self._attrs(child, st), offsets[i]):
                return
            if name not in (b".", b".."):
                self.u.nodes.ref(child)

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)
        self._listings.pop(fh, None)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        if self.volatile:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        node = self._dir(fh)
        if node.upper:
            # never by a path that could be followed: a symlink put at the name behind
            # our back would lead out of the upper
            fd = syscalls.open_at(*self.u.loc(node), os.O_RDONLY | os.O_DIRECTORY)
            try:
                await trio.to_thread.run_sync(os.fsync, fd)
            finally:
                os.close(fd)

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext):
        sv = self.u.statfs()
        out = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                  "f_ffree", "f_favail", "f_namemax"):
            setattr(out, f, getattr(sv, f))
        return out

    # -- xattrs ------------------------------------------------------------------------------

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return self.u.getxattr(self.u.node(inode), name)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext):
        return self.u.listxattr(self.u.node(inode), privileged=ctx.uid == 0)

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext):
        await self.u.setxattr(self.u.node(inode), name, value)
        await self._acl_changed(inode, name)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext):
        await self.u.removexattr(self.u.node(inode), name)
        await self._acl_changed(inode, name)

    @staticmethod
    async def _acl_changed(inode: int, name: bytes) -> None:
        """An access ACL rewrites the mode on disk behind the kernel's attribute cache."""
        if name.startswith(b"system.posix_acl"):
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, True)

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True  # default_permissions: the kernel has already checked


def _backing(backing: int) -> dict[str, int]:
    # a stock pyfuse3's FileInfo has no backing_id (and its opens never get one)
    return {"backing_id": backing} if backing else {}


def passthrough_plan(config: MountConfig) -> tuple[bool, str]:
    """Whether the mount asks the kernel for FUSE passthrough, and if not, why (one phrase
    for the daemon's log). Whether the kernel agrees is known at INIT (Operations.init)."""
    if config.passthrough == "off":
        return False, "-o passthrough=off, or writeback=1"
    if not hasattr(pyfuse3, "backing_open"):
        return False, "the FUSE binding has no passthrough"
    if not privileged():
        return False, "backing files need CAP_SYS_ADMIN in the initial user namespace"
    return True, ""


def fuse_options(config: MountConfig) -> set[str]:
    """pyfuse3.init options for a mount described by *config*."""
    opts = {"default_permissions", f"fsname={config.fsname}", "subtype=unionfs"}
    if config.allow_other:
        opts.add("allow_other")
    opts.add("dev" if config.dev else "nodev")
    opts.add("suid" if config.suid else "nosuid")
    if not config.writable:
        opts.add("ro")
    return opts


def make_operations(config: MountConfig, passthrough: bool) -> Operations:
    """Open the layers and build the Operations for a mount (raises OSError/ValueError);
    *passthrough*: whether to ask the kernel for it (passthrough_plan)."""
    fmt = format.for_mount(config.userxattr, privileged())
    # lower files pass through where no copy-up can leave an fd on the lower file behind
    # the upper copy, or where the user chose that (files.py)
    lowers = passthrough and (config.passthrough == "all" or not config.writable)
    ops = Operations(Union(config, writeback=config.writeback, fmt=fmt, lower_passthrough=lowers),
                     debug=config.debug)
    ops.poll_us = config.poll_us
    ops.passthrough = passthrough
    return ops
