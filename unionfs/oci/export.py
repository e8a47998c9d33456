"""`unionfs export`: a union's changes as one OCI image layer (image-spec layer.md).

What goes in is decided by diff.compute, the same resolution `unionfs diff`
prints (the changes log names where to look, the upper is the truth); this
module turns those changes into changeset entries:

* a path gone from the view (D) is a ``.wh.NAME`` whiteout;
* a new or changed object (A, C) is written whole, with its parent directories;
* a path whose type changed is a whiteout of the old object followed by the new
  one (the spec lets a whiteout and a name sit in one layer: the whiteout only
  hides what is below);
* a directory whose lower stack differs from the old view's (opaque, redirected
  by a rename, replaced) is written with its whole subtree, and with a
  ``.wh..wh..opq`` first where the old view had something in it to hide; the old
  path of a renamed directory is gone from the view, so it is a whiteout;
* a non-directory with several names (a file, symlink, fifo or device) is written
  once, its other names as tar hard links to the first (in entry order); an upper
  object's names are all found (copy-up links every name), so the applied layer
  keeps the link;
* owners are numeric, modes, mtimes (whole seconds, clamped by ``--mtime``),
  device numbers and fifos are kept; sockets cannot be in a layer and are skipped
  with a warning; user.*, security.capability and POSIX ACL xattrs travel as PAX
  ``SCHILY.xattr.`` records, the union format's own xattrs never do.

Entries are sorted by path component (within a directory: the opaque marker
first, then each name's whiteout right before the name), so the same union gives
the same bytes.
"""
from __future__ import annotations

import os
import stat
import sys
import tarfile
import time
from dataclasses import dataclass
from typing import Iterable

from .. import syscalls
from ..diff import Layers, Live, ancestors, child_of, compute, hardlink_index
from ..format import OCI_OPAQUE, OCI_WHITEOUT

EXPORTED_XATTRS = (b"user.", b"security.capability", b"system.posix_acl_access",
                   b"system.posix_acl_default")
PAX_XATTR = "SCHILY.xattr."

WHITEOUT, OPAQUE, OBJECT = 0, 1, 2


class ExportError(Exception):
    """The union holds something a layer cannot say."""


def exported_xattr(name: bytes) -> bool:
    """An xattr a layer carries. Objects' xattrs come without the union format's own
    (diff.Live.xattrs filters them with the layers' Format), and none of those is under
    these prefixes anyway."""
    return name.startswith(EXPORTED_XATTRS)


@dataclass
class Item:
    path: bytes            # the view path the entry is about (for a marker: its directory's)
    kind: int              # WHITEOUT, OPAQUE or OBJECT
    obj: Live | None = None

    def tar_path(self) -> bytes:
        if self.kind == OPAQUE:
            return child_of(self.path, OCI_OPAQUE)
        if self.kind == WHITEOUT:
            head, _, name = self.path.rpartition(b"/")
            return (head or b"") + b"/" + OCI_WHITEOUT + name
        return self.path

    def key(self) -> tuple:
        parts = self.path.split(b"/")[1:]
        if self.kind == OPAQUE:
            return tuple((1, p, 1) for p in parts) + ((0, b"", 0),)
        return tuple((1, p, 1) for p in parts[:-1]) + ((1, parts[-1], 0 if self.kind == WHITEOUT else 1),)


def plan(layers: Layers, candidates: Iterable[bytes]) -> list[Item]:
    """The layer's entries, sorted, from the changes between the lowers and the union."""
    new, base = layers.new, layers.base
    items: dict[tuple[int, bytes], Item] = {}
    whole: list[bytes] = []          # directories written with their whole subtree

    def under_whole(path: bytes) -> bool:
        return any(path.startswith(w + b"/") for w in whole)

    def add(kind: int, path: bytes, obj: Live | None = None) -> None:
        items.setdefault((kind, path), Item(path, kind, obj))

    for c in compute(layers, candidates):   # sorted: a directory comes before its subtree
        if under_whole(c.path):
            continue
        if c.kind == "D":
            add(WHITEOUT, c.path)
            continue
        cur = c.new
        assert isinstance(cur, Live)
        if c.kind == "C" and "type" in c.changes:
            add(WHITEOUT, c.path)
        elif (c.kind == "C" and cur.is_dir and isinstance(c.old, Live) and c.old.is_dir
              and c.old.stack() != cur.stack()):
            if base.children(c.path):
                add(OPAQUE, c.path)
            for path, obj in new.walk(c.path):
                add(OBJECT, path, obj)
            whole.append(c.path)
        add(OBJECT, c.path, cur)
    _add_link_names(layers, items)
    for kind, path in list(items):
        for anc in ancestors(path if kind != OPAQUE else child_of(path, b"x")):
            if (OBJECT, anc) not in items:
                obj = new.lookup(anc)
                assert obj is not None and obj.is_dir
                add(OBJECT, anc, obj)
    for item in items.values():
        name = item.path.rpartition(b"/")[2]
        if item.kind == OBJECT and name.startswith(OCI_WHITEOUT):
            raise ExportError(f"'{os.fsdecode(item.path)}': an OCI layer cannot hold a name "
                              "starting with '.wh.' (it would read as a whiteout)")
    return sorted(items.values(), key=Item.key)


def _add_link_names(layers: Layers, items: dict[tuple[int, bytes], Item]) -> None:
    """Every view name of an upper file with several names, so the applied layer keeps the
    link: copy-up links all of a file's names into the upper, but only the changed ones
    are changes."""
    multi = [it for it in items.values() if it.kind == OBJECT and it.obj is not None
             and it.obj.upper and not it.obj.is_dir and it.obj.st.st_nlink > 1]
    if not multi:
        return
    index = hardlink_index(layers.upper_path)
    for it in multi:
        assert it.obj is not None
        ident = it.obj.identity()
        for path in index.get(ident, []):
            if (OBJECT, path) in items:
                continue
            obj = layers.new.lookup(path)
            if obj is not None and obj.identity() == ident:
                items[(OBJECT, path)] = Item(path, OBJECT, obj)


class Progress:
    """A one-line counter on a terminal's stderr, refreshed at most twice a second."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.last = 0.0
        self.shown = False

    def update(self, entries: int, total: int, nbytes: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.5:
            return
        self.last = now
        self.shown = True
        sys.stderr.write(f"\rexport: {entries}/{total} entries, {nbytes / 1048576:.1f} MiB")
        sys.stderr.flush()

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def tar_name(path: bytes) -> str:
    return os.fsdecode(path.lstrip(b"/"))


def write_tar(items: list[Item], out, clamp: int | None = None,
              progress: Progress | None = None) -> None:
    """Write *items* as a PAX tar to *out* (a tarstream.LayerWriter, or any writer with
    write() and a size: the bytes written so far)."""
    progress = progress or Progress(False)
    first_name: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tar:
        for n, item in enumerate(items, 1):
            ti = tarfile.TarInfo(tar_name(item.tar_path()))
            ti.uname = ti.gname = ""
            ti.mtime = 0
            if item.kind != OBJECT:
                ti.type, ti.mode, ti.size = tarfile.REGTYPE, 0o644, 0
                tar.addfile(ti)
                continue
            obj = item.obj
            assert obj is not None
            st = obj.st
            fmt = stat.S_IFMT(st.st_mode)
            if fmt == stat.S_IFSOCK:
                print(f"unionfs: warning: skipping socket '{os.fsdecode(item.path)}' "
                      "(a layer cannot hold one)", file=sys.stderr)
                continue
            ti.mode = stat.S_IMODE(st.st_mode)
            ti.uid, ti.gid = st.st_uid, st.st_gid
            mtime = st.st_mtime_ns // 1_000_000_000
            ti.mtime = min(mtime, clamp) if clamp is not None else mtime
            xattrs = {k: v for k, v in sorted(obj.xattrs().items()) if exported_xattr(k)}
            ti.pax_headers = {PAX_XATTR + os.fsdecode(k): v.decode("utf-8", "surrogateescape")
                              for k, v in xattrs.items()}
            data = None
            ident = obj.identity() if fmt != stat.S_IFDIR and st.st_nlink > 1 else None
            if ident is not None and ident in first_name:
                # a link has no metadata of its own: the first name carries it
                ti.type, ti.linkname = tarfile.LNKTYPE, first_name[ident]
                ti.pax_headers = {}
            elif fmt == stat.S_IFDIR:
                ti.type = tarfile.DIRTYPE
            elif fmt == stat.S_IFLNK:
                ti.type = tarfile.SYMTYPE
                ti.linkname = os.fsdecode(obj.target())
            elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
                ti.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
                ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            elif fmt == stat.S_IFIFO:
                ti.type = tarfile.FIFOTYPE
            elif fmt == stat.S_IFREG:
                ti.type, ti.size = tarfile.REGTYPE, st.st_size
                data = syscalls.open_at(*obj.loc(), os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
            else:
                raise ExportError(f"'{os.fsdecode(item.path)}': unknown file type {fmt:o}")
            if ident is not None and ti.type != tarfile.LNKTYPE:
                first_name[ident] = ti.name
            if data is None:
                tar.addfile(ti)
            else:
                with os.fdopen(data, "rb") as f:
                    _addfile_exact(tar, ti, f, item.path)
            progress.update(n, len(items), out.size)
    progress.done()


def _addfile_exact(tar: tarfile.TarFile, ti: tarfile.TarInfo, f, path: bytes) -> None:
    """tar.addfile, but a file that shrank while being read is an error, not a short entry."""
    size = os.fstat(f.fileno()).st_size
    if size != ti.size:
        raise ExportError(f"'{os.fsdecode(path)}' changed size while being exported")
    try:
        tar.addfile(ti, f)
    except OSError as e:
        if e.errno is None:   # tarfile's "unexpected end of data"
            raise ExportError(f"'{os.fsdecode(path)}' shrank while being exported") from None
        raise
