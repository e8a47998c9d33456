"""`unionfs import`: OCI layers and images become layer directories in the overlay format.

A layer (tar, tar+gzip, tar+zstd) is unpacked into a new directory: its OCI
markers become the kernel overlayfs format (``.wh.NAME`` a whiteout, a char
device 0/0; ``.wh..wh..opq`` the opaque xattr on its directory; a directory that
an entry of the same layer whited out is made opaque too, since the whiteout
removes the lower one), so the result serves as a lower layer of unionfs and of
kernel overlayfs. An image (``docker save`` tar, or an OCI image layout as a
directory or tar) unpacks every layer into DIR/0 (the bottom), DIR/1, ...

Safety: an archive is hostile until proven otherwise.

* Names are relative, without ``..``; every directory on the way to an entry is
  opened with O_NOFOLLOW below the previous one, so an entry can never be
  written through a symlink (or anything but a directory) an earlier entry made;
  a hard link may only name a non-directory the same archive made (a file, symlink,
  fifo or device: linked as itself, never followed).
* Device nodes only as root; the overlay format's own xattrs are refused (they
  would redirect or hide what the layer shows); other xattrs than user.*,
  security.capability and ACLs are left out, with a warning.
* Everything is unpacked aside (a private directory beside DIR) and renamed to
  DIR only when the archive was read to its end and every digest checked: a
  refusal, a digest mismatch, a truncated or corrupt archive leaves nothing.
"""
from __future__ import annotations

import collections
import errno
import gzip
import io
import json
import os
import re
import stat
import sys
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

from .. import format as fmtmod, syscalls
from ..format import OCI_OPAQUE, OCI_WHITEOUT, Format
from ..workdir import remove_tree_at
from .export import exported_xattr, PAX_XATTR
from .tarstream import HashingReader, StreamError, ZstdReader, sniff

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Refused(Exception):
    """The archive is refused (one line says why); nothing is left behind."""


def _show(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def clean_name(name: str, what: str = "name") -> str:
    """An archive name as a relative path without '.', '' or '..' parts ('' is the root)."""
    if name.startswith("/"):
        raise Refused(f"absolute {what} '{_show(name)}' in the archive")
    parts = [p for p in name.split("/") if p and p != "."]
    if ".." in parts:
        raise Refused(f"'..' in the {what} '{_show(name)}'")
    if "\0" in name:
        raise Refused(f"NUL in the {what} '{_show(name)}'")
    return "/".join(parts)


@dataclass
class _DirMeta:
    mode: int
    uid: int
    gid: int
    mtime_ns: int


@dataclass
class Unpacker:
    """Unpacks one layer's entries under the directory fd *root*."""

    root: int
    fmt: Format
    as_root: bool = field(default_factory=lambda: os.geteuid() == 0)
    files: set[str] = field(default_factory=set)       # non-directories this archive made
    whited: set[str] = field(default_factory=set)      # names this archive whited out
    dirs: dict[str, _DirMeta] = field(default_factory=dict)
    skipped_xattrs: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._fds: collections.OrderedDict[str, int] = collections.OrderedDict()

    # -- directories ----------------------------------------------------------------

    def dir_fd(self, path: str) -> int:
        """fd of directory *path* (made if missing, as tar does), never through a symlink."""
        if not path:
            return self.root
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        head, _, name = path.rpartition("/")
        parent = self.dir_fd(head)
        bname = os.fsencode(name)
        try:
            fd = os.open(bname, DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            os.mkdir(bname, 0o755, dir_fd=parent)
            fd = os.open(bname, DIR_FLAGS, dir_fd=parent)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = syscalls.lstat_at(parent, bname)
            if not (path in self.whited and st is not None and fmtmod.is_whiteout(st)):
                raise Refused(f"'{_show(path)}' is a symlink or not a directory, and an entry "
                              "would be written through it") from None
            # `.wh.d` then `d/x`: d is made again in this layer, and hides the lower d
            os.unlink(bname, dir_fd=parent)
            os.mkdir(bname, 0o755, dir_fd=parent)
            self.fmt.set_opaque(parent, bname)
            fd = os.open(bname, DIR_FLAGS, dir_fd=parent)
        self._fds[path] = fd
        if len(self._fds) > 256:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _clear(self, parent: int, path: str, name: bytes, keep_dir: bool) -> os.stat_result | None:
        """Make room at *name* for a new entry; a directory stays if *keep_dir*."""
        st = syscalls.lstat_at(parent, name)
        if st is None:
            return None
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return st
            self._forget(path)
            remove_tree_at(parent, name)
        else:
            os.unlink(name, dir_fd=parent)
        self.files.discard(path)
        return None

    def _forget(self, path: str) -> None:
        for p in [p for p in self._fds if p == path or p.startswith(path + "/")]:
            os.close(self._fds.pop(p))

    # -- entries --------------------------------------------------------------------

    def add(self, m: tarfile.TarInfo, data: Callable[[], BinaryIO | None]) -> None:
        path = clean_name(m.name)
        head, _, last = path.rpartition("/")
        if last.startswith(".wh."):
            self._marker(path, head, last)
            return
        xattrs = self._xattrs(m, path)
        if not path:
            if not m.isdir():
                raise Refused("the archive's root entry is not a directory")
            self.dirs[""] = _DirMeta(m.mode, m.uid, m.gid, _ns(m))
            self._set_xattrs(self.root, b"", xattrs)
            return
        parent = self.dir_fd(head)
        name = os.fsencode(last)
        opaque = path in self.whited
        if m.isdir():
            if self._clear(parent, path, name, keep_dir=True) is None:
                os.mkdir(name, 0o700, dir_fd=parent)
            if opaque:
                self.fmt.set_opaque(parent, name)
            self.dirs[path] = _DirMeta(m.mode, m.uid, m.gid, _ns(m))
            self._set_xattrs(parent, name, xattrs)
            return
        if m.islnk():
            target = clean_name(m.linkname, "hard link target")
            if target not in self.files:
                raise Refused(f"hard link '{_show(path)}' names '{_show(target)}', which is not a "
                              "non-directory of this archive")
            thead, _, tlast = target.rpartition("/")
            tfd = self.dir_fd(thead)
            st = syscalls.lstat_at(tfd, os.fsencode(tlast))
            if st is None or stat.S_ISDIR(st.st_mode) or fmtmod.is_whiteout(st):
                raise Refused(f"hard link target '{_show(target)}' is no longer what the "
                              "archive made there")
            if target == path:
                return
            self._clear(parent, path, name, keep_dir=False)
            os.link(os.fsencode(tlast), name, src_dir_fd=tfd, dst_dir_fd=parent,
                    follow_symlinks=False)
            self.files.add(path)
            return
        self._clear(parent, path, name, keep_dir=False)
        if m.isreg():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=parent)
            try:
                src = data()
                assert src is not None
                while chunk := src.read(1 << 20):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                if self.as_root:
                    os.fchown(fd, m.uid, m.gid)
                self._set_xattrs(fd, None, xattrs)
                os.fchmod(fd, m.mode & 0o7777)
                syscalls.futimens(fd, _ns(m), _ns(m))
            finally:
                os.close(fd)
            self.files.add(path)
            return
        if m.issym():
            os.symlink(os.fsencode(m.linkname), name, dir_fd=parent)
        elif m.ischr() or m.isblk():
            if not self.as_root:
                raise Refused(f"device node '{_show(path)}': only root may import device nodes")
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(name, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=parent)
        elif m.isfifo():
            os.mkfifo(name, 0o600, dir_fd=parent)
        else:
            raise Refused(f"entry '{_show(path)}' has a type unionfs cannot make ({m.type!r})")
        self.files.add(path)
        if self.as_root:
            os.chown(name, m.uid, m.gid, dir_fd=parent, follow_symlinks=False)
        if not m.issym():
            self._set_xattrs(parent, name, xattrs)
            os.chmod(name, m.mode & 0o7777, dir_fd=parent)
        syscalls.utimensat(parent, name, _ns(m), _ns(m))

    def _marker(self, path: str, head: str, last: str) -> None:
        if not self.as_root:
            raise Refused(f"whiteout '{_show(path)}': only root may make overlay whiteouts "
                          "and opaque directories")
        parent = self.dir_fd(head)
        if last == OCI_OPAQUE.decode():
            self.fmt.set_opaque(parent, None)
            return
        hidden = last[len(OCI_WHITEOUT):]
        if hidden in ("", ".", ".."):
            raise Refused(f"whiteout '{_show(path)}' names no entry")
        target = f"{head}/{hidden}" if head else hidden
        name = os.fsencode(hidden)
        self.whited.add(target)
        st = syscalls.lstat_at(parent, name)
        if st is None:
            fmtmod.make_whiteout(parent, name)
        elif stat.S_ISDIR(st.st_mode):
            # an entry of this layer stays (the whiteout hides only what is below), but
            # the lower directory of that name is gone: nothing below may merge in
            self.fmt.set_opaque(parent, name)

    def _xattrs(self, m: tarfile.TarInfo, path: str) -> dict[bytes, bytes]:
        out = {}
        for key, value in m.pax_headers.items():
            if not key.startswith(PAX_XATTR):
                continue
            attr = key[len(PAX_XATTR):].encode("utf-8", "surrogateescape")
            if self.fmt.is_private(attr) or attr.startswith((fmtmod.TRUSTED, fmtmod.USER)):
                raise Refused(f"entry '{_show(path)}' carries the overlay format's own xattr "
                              f"'{_show(attr.decode('utf-8', 'surrogateescape'))}'")
            if not exported_xattr(attr):
                self.skipped_xattrs.add(attr.decode("utf-8", "backslashreplace"))
                continue
            out[attr] = value.encode("utf-8", "surrogateescape")
        return out

    def _set_xattrs(self, fd: int, name: bytes | None, xattrs: dict[bytes, bytes]) -> None:
        for attr, value in xattrs.items():
            syscalls.setxattr(fd, name, attr, value)

    def finish(self) -> None:
        """Directory owners, modes and times last, deepest first (entries made in them moved
        their times; a read-only mode would have stopped the writes)."""
        if "" not in self.dirs:   # no root entry: the layer's root is an ordinary directory
            os.fchmod(self.root, 0o755)
        for path in sorted(self.dirs, key=lambda p: p.count("/") if p else -1, reverse=True):
            meta = self.dirs[path]
            if path:
                head, _, last = path.rpartition("/")
                parent, name = self.dir_fd(head), os.fsencode(last)
            else:
                parent, name = self.root, None
            if self.as_root:
                syscalls.chown_at(parent, name, meta.uid, meta.gid)
            syscalls.chmod_at(parent, name, meta.mode & 0o7777)
            syscalls.utimens_at(parent, name, meta.mtime_ns, meta.mtime_ns)
        self.close()


def _ns(m: tarfile.TarInfo) -> int:
    return int(round(float(m.mtime) * 1_000_000_000))


# --------------------------------------------------------------------------------------
# Streams: the blob, its decompression, and the end of the tar
# --------------------------------------------------------------------------------------

class _TailReader:
    """Passes reads through, counting them and keeping the last bytes, so the end-of-archive
    marker can be checked: tarfile stops quietly at a missing or damaged header."""

    KEEP = 1 << 16

    def __init__(self, src) -> None:
        self.src = src
        self.pos = 0
        self.tail = bytearray()

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        self.pos += len(data)
        self.tail += data
        if len(self.tail) > 2 * self.KEEP:
            del self.tail[:-self.KEEP]
        return data

    def at(self, offset: int, n: int) -> bytes | None:
        start = offset - (self.pos - len(self.tail))
        if start < 0:
            return None
        return bytes(self.tail[start:start + n])


def unpack_layer(src: BinaryIO, dest_fd: int, fmt: Format, label: str) -> tuple[str, str, set[str]]:
    """Unpack a layer blob read from *src* under *dest_fd*; returns (blob digest, diffID,
    xattrs left out). Refused on anything wrong."""
    blob = HashingReader(src)
    head = blob.read(4)
    comp = sniff(head)
    raw = _Prefixed(head, blob)
    closer = None
    try:
        if comp == "gzip":
            plain = gzip.GzipFile(fileobj=raw, mode="rb")
        elif comp == "zstd":
            plain = closer = ZstdReader(raw)
        else:
            plain = raw
        tar_in = HashingReader(plain)
        tail = _TailReader(tar_in)
        u = Unpacker(dest_fd, fmt)
        try:
            with tarfile.open(fileobj=tail, mode="r|", encoding="utf-8",
                              errors="surrogateescape") as tar:
                for m in tar:
                    u.add(m, lambda m=m: tar.extractfile(m))
                end = tar.offset
            # tarfile has read at most a record past *end*: read up to the two end blocks
            # and check them before draining the rest (which may be longer than the tail)
            while tail.pos < end + 1024 and tail.read(end + 1024 - tail.pos):
                pass
            marker = tail.at(end, 1024)
            while tail.read(1 << 16):
                pass
            if marker is None or len(marker) < 1024 or marker.count(0) != 1024:
                raise Refused(f"{label} is truncated or corrupt (no end-of-archive marker after "
                              f"byte {end})")
            u.finish()
        finally:
            u.close()
        blob.drain()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, StreamError) as e:
        raise Refused(f"{label} is truncated or corrupt ({e})") from None
    finally:
        if closer is not None:
            closer.close()
    return blob.digest(), tar_in.digest(), u.skipped_xattrs


class _Prefixed:
    """A stream with some bytes already read put back in front."""

    def __init__(self, head: bytes, rest) -> None:
        self.head = head
        self.rest = rest

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n < 0:
                out, self.head = self.head + self.rest.read(), b""
                return out
            out, self.head = self.head[:n], self.head[n:]
            return out
        return self.rest.read(n)


# --------------------------------------------------------------------------------------
# Images: docker save, OCI image layouts (directory or tar)
# --------------------------------------------------------------------------------------

@dataclass
class ImageLayer:
    open: Callable[[], BinaryIO]
    digest: str | None        # the blob's, when the format names it
    diff_id: str | None       # from the config
    created_by: str = ""
    created: str = ""


class _Source:
    """Files of an image archive by name: a directory (OCI layout) or a tar."""

    def __init__(self, path: str) -> None:
        self.dir = path if os.path.isdir(path) else None
        self.tar = None if self.dir else tarfile.open(path, "r:")

    def has(self, name: str) -> bool:
        if self.dir is not None:
            return os.path.isfile(os.path.join(self.dir, name))
        assert self.tar is not None
        try:
            self.tar.getmember(name)
            return True
        except KeyError:
            return False

    def open(self, name: str) -> BinaryIO:
        if self.dir is not None:
            return open(os.path.join(self.dir, clean_name(name)), "rb")
        assert self.tar is not None
        try:
            f = self.tar.extractfile(self.tar.getmember(name))
        except KeyError:
            raise Refused(f"the image names '{name}', which the archive does not hold") from None
        if f is None:
            raise Refused(f"'{name}' in the image archive is not a file")
        return f

    def json(self, name: str):
        try:
            with self.open(name) as f:
                return json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise Refused(f"'{name}' in the image is not valid JSON ({e})") from None
        except OSError as e:
            raise Refused(f"cannot read '{name}' of the image: {e.strerror}") from None

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()


def _blob_name(digest) -> str:
    if not isinstance(digest, str) or not DIGEST.match(digest):
        raise Refused(f"bad digest {digest!r} in the image")
    return "blobs/sha256/" + digest.split(":", 1)[1]


def _history(config: dict, n: int) -> list[tuple[str, str]]:
    hist = [h for h in config.get("history") or [] if isinstance(h, dict) and not h.get("empty_layer")]
    out = [(str(h.get("created", "")), str(h.get("created_by", ""))) for h in hist]
    return (out + [("", "")] * n)[:n]


def image_layers(src: _Source) -> list[ImageLayer] | None:
    """The layers of an image archive, bottom first; None if it is no image."""
    try:
        return _image_layers(src)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise Refused(f"the image's manifest or config is malformed ({type(e).__name__}: {e})") from None


def _image_layers(src: _Source) -> list[ImageLayer] | None:
    if src.has("manifest.json") and not src.has("index.json"):
        doc = src.json("manifest.json")
        if not (isinstance(doc, list) and doc and isinstance(doc[0], dict) and "Layers" in doc[0]):
            return None
        entry = doc[0]
        config = src.json(entry["Config"])
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        names = entry["Layers"]
        if len(diff_ids) != len(names):
            raise Refused("the image config names a different number of layers than its manifest")
        hist = _history(config, len(names))
        return [ImageLayer(lambda n=n: src.open(n), None, d, h[1], h[0])
                for n, d, h in zip(names, diff_ids, hist)]
    if src.has("oci-layout") and src.has("index.json"):
        index = src.json("index.json")
        desc = _pick(src, index)
        manifest = _checked_json(src, desc)
        config = _checked_json(src, manifest.get("config") or {})
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        layers = manifest.get("layers") or []
        if len(diff_ids) != len(layers):
            raise Refused("the image config names a different number of layers than its manifest")
        hist = _history(config, len(layers))
        return [ImageLayer(lambda d=d: src.open(_blob_name(d.get("digest"))), d.get("digest"), i,
                           h[1], h[0]) for d, i, h in zip(layers, diff_ids, hist)]
    return None


def _pick(src: _Source, index: dict) -> dict:
    """The image manifest an index names (the first one; an index inside is followed)."""
    for _ in range(4):
        manifests = index.get("manifests") or []
        if not manifests:
            raise Refused("the image index names no manifest")
        desc = manifests[0]
        if "index" not in str(desc.get("mediaType", "")):
            return desc
        index = _checked_json(src, desc)
    raise Refused("the image indexes nest too deep")


def _checked_json(src: _Source, desc: dict):
    name = _blob_name(desc.get("digest"))
    with src.open(name) as f:
        r = HashingReader(f)
        data = r.read()
    if r.digest() != desc["digest"]:
        raise Refused(f"blob {desc['digest']} does not match its digest")
    try:
        return json.loads(data)
    except ValueError as e:
        raise Refused(f"blob {desc['digest']} is not valid JSON ({e})") from None


# --------------------------------------------------------------------------------------
# The command's work: aside, then renamed into place
# --------------------------------------------------------------------------------------

@dataclass
class Imported:
    dest: str
    layers: list[tuple[str, str, str, str]]   # (dir, diffID, created, created_by), bottom first
    is_image: bool
    skipped_xattrs: set[str]


def import_archive(archive: str, dest: str, digest: str | None = None,
                   fmt: Format = fmtmod.OVERLAY) -> Imported:
    if digest is not None and not DIGEST.match(digest):
        raise Refused(f"bad --digest '{digest}' (want sha256: and 64 hex digits)")
    dest = os.path.abspath(dest)
    parent, base = os.path.split(dest)
    if os.path.lexists(dest):
        raise Refused(f"'{dest}' exists (import makes a new directory)")
    if not os.path.isdir(parent):
        raise Refused(f"'{parent}' is not a directory")
    if not os.path.exists(archive):
        raise Refused(f"'{archive}' does not exist")
    src, layers = None, None
    if os.path.isdir(archive) or _is_plain_tar(archive):
        try:
            src = _Source(archive)
            layers = image_layers(src)
        except (tarfile.TarError, EOFError):
            # a damaged tar is no image we could read: unpacking it as a layer says where
            if src is not None:
                src.close()
            src, layers = None, None
    if os.path.isdir(archive) and layers is None:
        raise Refused(f"'{archive}' is a directory but no OCI image layout (no oci-layout, index.json)")
    if layers is not None and digest is not None:
        raise Refused("--digest checks a layer archive; an image's digests are in its manifest")
    pfd = os.open(parent, DIR_FLAGS)
    tmp = os.fsencode(f".{base}.unionfs-import-{os.getpid()}")
    done = False
    try:
        os.mkdir(tmp, 0o700, dir_fd=pfd)
        tfd = os.open(tmp, DIR_FLAGS, dir_fd=pfd)
        try:
            if layers is None:
                with open(archive, "rb") as f:
                    got, diff_id, skipped = unpack_layer(f, tfd, fmt, f"'{archive}'")
                if digest is not None and got != digest:
                    raise Refused(f"'{archive}' has digest {got}, not {digest}")
                out = Imported(dest, [(dest, diff_id, "", "")], False, skipped)
            else:
                out = Imported(dest, [], True, set())
                os.chmod(tfd, 0o755)
                for i, layer in enumerate(layers):
                    os.mkdir(str(i), 0o700, dir_fd=tfd)
                    lfd = os.open(str(i), DIR_FLAGS, dir_fd=tfd)
                    try:
                        with layer.open() as f:
                            got, diff_id, skipped = unpack_layer(f, lfd, fmt, f"layer {i}")
                    finally:
                        os.close(lfd)
                    if layer.digest is not None and got != layer.digest:
                        raise Refused(f"layer {i} has digest {got}, but the manifest says {layer.digest}")
                    if layer.diff_id is not None and diff_id != layer.diff_id:
                        raise Refused(f"layer {i} has diffID {diff_id}, but the config says {layer.diff_id}")
                    out.layers.append((os.path.join(dest, str(i)), diff_id, layer.created,
                                       layer.created_by))
                    out.skipped_xattrs |= skipped
            os.fsync(tfd)
        finally:
            os.close(tfd)
        syscalls.renameat2(pfd, tmp, pfd, os.fsencode(base), syscalls.RENAME_NOREPLACE)
        os.fsync(pfd)
        done = True
        return out
    except OSError as e:
        raise Refused(f"import failed: {e.filename or ''} {e.strerror}") from None
    finally:
        if not done:
            try:
                remove_tree_at(pfd, tmp)
            except OSError:
                pass
        os.close(pfd)
        if src is not None:
            src.close()


def _is_plain_tar(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return sniff(head) is None and len(head) == 512 and head[257:262] == b"ustar"
