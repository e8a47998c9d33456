"""The union rules: lookup through layers, whiteouts, opaque dirs, redirects, readdir.

Resolution reads layers only (no FUSE, no writes). Given a parent node's
stack (its upper directory, then the lower directories that merge into it)
and one name, it finds what the view shows at that name:

* the upper wins; a whiteout there (char device 0/0, or the xattr form: see
  format.py) hides everything below;
* otherwise each lower, top-most first; a kernel whiteout or an OCI
  ``.wh.NAME`` in a lower hides the name in that layer and all below;
* a directory merges with the directories of the same name below it until an
  opaque one (the overlay ``opaque`` xattr or an OCI ``.wh..wh..opq`` inside)
  or a non-directory stops the stack;
* a directory with the overlay ``redirect`` xattr takes its lower stack from the
  redirect path instead of its own name (how a renamed directory keeps its
  lower contents).

The format itself (xattr names, whiteouts, OCI markers) is format.py's.
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from collections import OrderedDict
from typing import Iterator, NamedTuple, Sequence

from . import format, syscalls
from .format import OCI_WHITEOUT, Format
from .layers import FdCache, Layer, walk_dir
from .nodes import ROOT_ID, Node, make_ino, parse_ino

ABSENT_CACHE = 65536  # names remembered absent from the lower layers (Resolver._absent)
FOUND_CACHE = 4096  # lower scans that found something, remembered (Resolver._found): each
                    # holds a stat, so few enough that forgotten nodes still free memory
LISTED_CACHE = 256  # lower directories whose names are remembered from a listing (Resolver._listed)


@dataclass
class Entry:
    """What one name in one directory resolves to."""

    name: bytes
    st: os.stat_result | None = None           # the top object (None: nothing visible)
    upper: bool = False                          # the top object is in the upper
    lowers: list[tuple[Layer, bytes]] = field(default_factory=list)
    opaque: bool = False
    whiteout: bool = False                       # the upper holds a whiteout at this name
    hidden: bool = False                         # a whiteout was met in some layer
    ino: int = 0
    origin: int = 0                              # view inode of the first lower under an upper dir

    @property
    def exists(self) -> bool:
        return self.st is not None


class _Found(NamedTuple):
    """What a lower scan added to an Entry (st and ino only when no upper object was there)."""

    st: os.stat_result | None
    ino: int
    lowers: tuple[tuple[Layer, bytes], ...]
    hidden: bool
    origin: int


def child_path(dirpath: bytes, name: bytes) -> bytes:
    return dirpath + b"/" + name if dirpath else name


class Resolver:
    """Resolves names against the layers; shared by the filesystem and offline tools."""

    def __init__(self, upper: Layer | None, lowers: list[Layer], cache: FdCache,
                 fmt: Format = format.OVERLAY) -> None:
        self.upper = upper
        self.lowers = lowers
        self.cache = cache
        self.fmt = fmt
        # upper st_ino -> identity of the copies this mount made that cannot carry the
        # identity xattr (Format.keeps_identity), and of the directories a rename copied
        # (namespace.Namespace._seal_tree): they keep their node until unmounted
        self.unmarked: dict[int, int] = {}
        # (lower dirs searched, name) found in none of them: lower layers never change
        # under a mount, so a name a LOOKUP missed is not probed again by the CREATE,
        # MKDIR or RENAME that follows (two syscalls per layer each time)
        self._absent: set[tuple[tuple[tuple[Layer, bytes], ...], bytes]] = set()
        # and what was found where something was (see _scan_lowers), the most recent ones
        self._found: OrderedDict[tuple[object, ...], _Found] = OrderedDict()
        # (layer index, path) -> xwhiteout_keys of the lower directories that hold xattr
        # whiteouts (few), noted where a lookup reads their opaque xattrs anyway: every
        # lower directory of a node's stack was read so, or is a layer root, noted here
        self._xdirs: dict[tuple[int, bytes], tuple[bytes, ...]] = {}
        # (layer index, path) -> the names a listing of that lower directory gave, the most
        # recent ones: the lookups of a READDIRPLUS that follow skip the layers a name is
        # not in (an lstat and an OCI check each) without a syscall
        self._listed: OrderedDict[tuple[int, bytes], frozenset[bytes]] = OrderedDict()
        for layer in lowers:
            self._note_marks(layer, b"", self.fmt.xwhiteout_keys(layer.fd, lower=True))

    def root_node(self) -> Node:
        """A root node of the view these layers make (its upper root opaque by the xattr)."""
        root = Node(ROOT_ID, stat.S_IFDIR, None, b"")
        root.upper = self.upper is not None
        if self.upper is not None:
            root.opaque = self.fmt.is_opaque(self.upper.fd, b"")
        root.lowers = [(layer, b"") for layer in self.lowers]
        return root

    # -- fds -------------------------------------------------------------------------

    def upper_fd(self, node: Node) -> int:
        """fd of a directory node's upper directory (it must exist there)."""
        assert self.upper is not None
        if node.id == ROOT_ID:
            return self.upper.fd
        if node.pin is not None:
            return node.pin
        parent = node.parent
        if parent is None:
            raise OSError(errno.ENOENT, "directory was removed")

        def opener() -> int:
            return syscalls.open_dir_real(self.upper_fd(parent), node.name)

        return self.cache.get(("u", node.id), opener)

    def loc(self, node: Node) -> tuple[int, bytes]:
        """(dir fd, name) where the node's top object is, for *at calls."""
        if node.pin is not None:
            return node.pin, b""
        if node.upper:
            assert self.upper is not None
            if node.parent is None:
                return self.upper.fd, b""
            return self.upper_fd(node.parent), node.name
        if not node.lowers:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return self.lower_loc(*node.lowers[0])

    def lower_fd(self, layer: Layer, path: bytes) -> int:
        return walk_dir(layer, self.cache, path)

    def lower_loc(self, layer: Layer, path: bytes) -> tuple[int, bytes]:
        """(dir fd, name) of a lower object, for *at calls."""
        parent, _, name = path.rpartition(b"/")
        if not name:
            return layer.fd, b""
        return self.lower_fd(layer, parent), name

    # -- lookup ----------------------------------------------------------------------

    def resolve(self, parent: Node, name: bytes) -> Entry:
        """What the view shows at *name* in directory *parent*."""
        e = Entry(name)
        redirect: bytes | None = None
        own: int | None = None
        if parent.upper and self.upper is not None:
            ufd = self.upper_fd(parent)
            st = syscalls.lstat_at(ufd, name)
            if st is not None:
                if self.fmt.whiteout_at(ufd, name, st):
                    e.whiteout = e.hidden = True
                    return e
                e.st, e.upper = st, True
                own = parse_ino(self.fmt.identity(ufd, name))
                kept = self.unmarked.get(st.st_ino) if own is None and self.unmarked else None
                # a number this mount keeps for the object is believed as it is; a claim
                # read from the disk is checked (_check_origin)
                e.ino = own if own is not None else kept if kept is not None \
                    else make_ino(0, st.st_ino)
                if not stat.S_ISDIR(st.st_mode):
                    return e
                if self.fmt.is_opaque(ufd, name):
                    e.opaque = True
                    return self._check_origin(e, own)
                redirect = self.fmt.redirect(ufd, name)
        if parent.opaque and parent.upper and not (redirect and redirect.startswith(b"/")):
            # an absolute redirect searches from the layer roots, as overlayfs does
            return self._check_origin(e, own) if e.upper else e
        self._scan_lowers(parent, name, redirect, e)
        return self._check_origin(e, own) if e.upper else e

    @staticmethod
    def _check_origin(e: Entry, claim: int | None) -> Entry:
        """An upper directory keeps the inode number of the lower directory it was copied up
        from; a claim that no lower directory here backs (a forged or stale xattr) would make it
        another directory's node, so it falls back to its own number."""
        if claim is not None and claim != e.origin:
            assert e.st is not None
            e.ino = make_ino(0, e.st.st_ino)
        return e

    def _scan_lowers(self, parent: Node, name: bytes, redirect: bytes | None, e: Entry) -> None:
        """Add to *e* what the lower layers show at *name*. Lower layers never change under
        a mount, so the outcome is remembered: a name found nowhere for as long as the mount
        lives (``_absent``, no stat to keep), a name found somewhere in a bounded LRU
        (``_found``), so the RENAME or UNLINK after a LOOKUP does not probe every layer
        again (an lstat and an OCI check per layer). Its stat is the one the LOOKUP saw;
        GETATTR still asks the layer."""
        if format.is_oci_marker(name):
            return  # in a lower layer, .wh.* names are OCI markers, never objects
        lname = name if redirect is None else redirect.rstrip(b"/").rpartition(b"/")[2]
        dirs = tuple(self._search_dirs(parent, name, redirect))
        key = (dirs, lname)
        if key in self._absent:
            return
        merging = e.st is not None  # under an upper directory: lower directories merge in
        fkey = (dirs, lname, merging)
        found = self._found.get(fkey)
        if found is not None:
            self._found.move_to_end(fkey)
            if not merging:
                e.st, e.ino = found.st, found.ino
            e.lowers = list(found.lowers)
            e.hidden, e.origin = found.hidden, found.origin
            return
        if not self._scan_dirs(dirs, lname, e):
            if len(self._absent) >= ABSENT_CACHE:
                self._absent.clear()
            self._absent.add(key)
            return
        self._found[fkey] = _Found(None if merging else e.st, e.ino, tuple(e.lowers),
                                   e.hidden, e.origin)
        if len(self._found) > FOUND_CACHE:
            self._found.popitem(last=False)

    def _scan_dirs(self, dirs: tuple[tuple[Layer, bytes], ...], lname: bytes, e: Entry) -> bool:
        """The lower scan itself; False if no layer has anything (not even a whiteout)."""
        found = False
        for layer, dirpath, fd, st in self._probe(dirs, lname):
            found = True
            if st is None:
                e.hidden = True
                return True
            path = child_path(dirpath, lname)
            isdir = stat.S_ISDIR(st.st_mode)
            if e.st is None:
                e.st = st
                e.ino = make_ino(layer.index, st.st_ino)
                e.lowers.append((layer, path))
                if not isdir:
                    return True
            elif not stat.S_ISDIR(e.st.st_mode) or not isdir:
                return True
            else:
                if not e.lowers:
                    e.origin = make_ino(layer.index, st.st_ino)
                e.lowers.append((layer, path))
            opaque, rd = self._lower_dir(layer, path, fd, lname)
            if opaque:
                return True
            if rd is not None:
                # the remaining layers are searched at the redirect target
                self._scan_redirect(layer, rd, e)
                return True
        return found

    def _lower_dir(self, layer: Layer, path: bytes, fd: int, name: bytes
                   ) -> tuple[bool, bytes | None]:
        """(is the lower directory (fd, name), at *path* in *layer*, opaque; its redirect).
        Notes whether it holds xattr whiteouts, from the same read."""
        opaque, xkeys, rd = self.fmt.lower_dir(fd, name)
        self._note_marks(layer, path, xkeys)
        return opaque, rd

    def _note_marks(self, layer: Layer, path: bytes, xkeys: tuple[bytes, ...]) -> None:
        if xkeys:
            self._xdirs[(layer.index, path)] = xkeys
        else:
            self._xdirs.pop((layer.index, path), None)

    def _note_listing(self, layer: Layer, path: bytes, scanned: list[tuple[bytes, int | None]]
                      ) -> None:
        key = (layer.index, path)
        self._listed[key] = frozenset(name for name, _ in scanned)
        self._listed.move_to_end(key)
        if len(self._listed) > LISTED_CACHE:
            self._listed.popitem(last=False)

    def forget_found(self) -> None:
        """Drop the remembered lower scans (after the kernel forgot most nodes: their
        stats, spread over the heap, would keep the pages a walk took from going back)."""
        self._found.clear()
        self._listed.clear()

    def _search_dirs(self, parent: Node, name: bytes, redirect: bytes | None):
        """(layer, directory path) pairs in which to look for the lower objects of a name."""
        if redirect is not None and redirect.startswith(b"/"):
            dirpath = redirect.strip(b"/").rpartition(b"/")[0]
            return [(layer, dirpath) for layer in self.lowers]
        return list(parent.lowers)

    def _scan_redirect(self, after: Layer, redirect: bytes, e: Entry) -> None:
        target = redirect.strip(b"/")
        if not redirect.startswith(b"/"):
            base = e.lowers[-1][1].rpartition(b"/")[0]
            target = child_path(base, target)
        dirpath, _, lname = target.rpartition(b"/")
        below = [(layer, dirpath) for layer in self.lowers if layer.index > after.index]
        for layer, _dirpath, fd, st in self._probe(below, lname):
            if st is None or not stat.S_ISDIR(st.st_mode):
                return
            e.lowers.append((layer, target))
            opaque, rd = self._lower_dir(layer, target, fd, lname)
            if opaque:
                return
            if rd is not None:
                # a lower layer made from an upper with its own renames: follow on, as
                # overlayfs does (each step goes strictly down the stack, so it ends)
                return self._scan_redirect(layer, rd, e)

    def lower_positive(self, parent: Node, name: bytes) -> bool:
        """Does any lower layer show something at *name* in *parent*?

        This decides whether removing or renaming the name must leave a
        whiteout behind, the way overlayfs's ovl_lower_positive does.
        """
        if (parent.opaque and parent.upper) or format.is_oci_marker(name):
            return False
        for _layer, _dirpath, _fd, st in self._probe(parent.lowers, name):
            return st is not None
        return False

    def _probe(self, dirs: Sequence[tuple[Layer, bytes]], name: bytes
               ) -> Iterator[tuple[Layer, bytes, int, os.stat_result | None]]:
        """Look *name* up in each lower directory in turn, top-most first, skipping layers
        that lack the directory: yields (layer, dir path, dir fd, stat) where something is
        there; a whiteout is yielded with stat None, and ends the search."""
        for layer, dirpath in dirs:
            listed = self._listed.get((layer.index, dirpath))
            if listed is not None and name not in listed and OCI_WHITEOUT + name not in listed:
                continue
            try:
                fd = self.lower_fd(layer, dirpath)
            except OSError:
                continue
            st = syscalls.lstat_at(fd, name)
            if self.fmt.lower_hides(fd, name, st, self._xdirs.get((layer.index, dirpath), ())):
                yield layer, dirpath, fd, None
                return
            if st is not None:
                yield layer, dirpath, fd, st

    # -- readdir ---------------------------------------------------------------------

    def list_names(self, node: Node) -> list[bytes]:
        """Names the merged directory shows: upper ones, then unshadowed lower ones."""
        seen: set[bytes] = set()
        out: list[bytes] = []
        if node.upper and self.upper is not None:
            ufd = self.upper_fd(node)
            xkeys = self.fmt.xwhiteout_keys(ufd)
            for name, dtype in _scan(ufd):
                seen.add(name)
                if not format.listed_whiteout(ufd, name, dtype, xkeys):
                    out.append(name)
            if node.opaque:
                return out
        for layer, path in node.lowers:
            try:
                fd = self.lower_fd(layer, path)
            except OSError:
                continue
            hidden: list[bytes] = []
            xkeys = self._xdirs.get((layer.index, path), ())
            scanned = _scan(fd)
            self._note_listing(layer, path, scanned)
            for name, dtype in scanned:
                if format.is_oci_marker(name):
                    target = format.oci_hidden(name)
                    if target is not None:
                        hidden.append(target)
                    continue
                if name in seen:
                    continue
                seen.add(name)
                if not format.listed_whiteout(fd, name, dtype, xkeys):
                    out.append(name)
            seen.update(hidden)
        return out


def _scan(dirfd: int) -> list[tuple[bytes, int | None]]:
    """(name, S_IFMT or None) for each entry of a directory, from one getdents pass."""
    fd = syscalls.open_noatime(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOATIME,
                               dir_fd=dirfd)
    out: list[tuple[bytes, int | None]] = []
    with os.scandir(fd) as it:
        for de in it:
            name = os.fsencode(de.name)
            if de.is_symlink():
                out.append((name, stat.S_IFLNK))
            elif de.is_dir(follow_symlinks=False):
                out.append((name, stat.S_IFDIR))
            elif de.is_file(follow_symlinks=False):
                out.append((name, stat.S_IFREG))
            else:
                out.append((name, None))
    os.close(fd)
    return out
