"""The on-disk format of a union's layers, in one place.

The upper directory is in kernel overlayfs's format, so a kernel mount of it
shows the same view:

* a whiteout is a character device 0/0 at the name it hides, or, where mknod of
  one is refused, overlayfs's xattr form: a zero-size regular file with
  ``<prefix>whiteout`` inside a directory whose ``<prefix>opaque`` is ``x`` (a
  value that marks "holds xattr whiteouts", never "opaque");
* an opaque directory has the xattr ``<prefix>opaque`` = ``y``: nothing below
  it merges in;
* a renamed directory that keeps lower contents has ``<prefix>redirect``, the
  layer-relative path (absolute from the layer root, or relative to its own
  parent) of where those contents are.

Our own markers live inside the same namespace (``<prefix>unionfs.``), which
kernel overlayfs hides from its users too, so a kernel mount of our upper looks
clean: ``<prefix>unionfs.ino`` is the identity xattr, the st_ino a copied-up
object keeps from its origin (nodes.py makes and parses the number, durable.py
adds its pending tag to the value).

The prefix is a value of a Format, not a constant: kernel overlayfs keeps these
xattrs under ``trusted.overlay.`` (only root may set them), or, with its
``userxattr`` option, under ``user.overlay.``. A Format is built once per mount
and handed to everything that reads or writes the format. Lower layers are
read with the Format's ``lower_prefixes`` (every prefix a lower layer may have
been written with), and also as OCI image layers, whose markers are names:

* ``.wh.NAME`` hides NAME in the layers below its own;
* ``.wh..wh..opq`` inside a directory makes it opaque.

Nothing here knows about nodes or FUSE: only names, xattrs and stats.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Callable, Final, Protocol

from . import syscalls
from .layers import walk_tree

NAME_MAX = 255

#: a whiteout's device number (character device 0/0)
WHITEOUT_DEV = 0

OCI_WHITEOUT = b".wh."
OCI_OPAQUE = b".wh..wh..opq"

#: where fuse-overlayfs's xattr_permissions=2 keeps an owner and mode (owners.StatOverride)
OVERRIDE_STAT: Final = b"user.containers.override_stat"

#: the ``<prefix>opaque`` value of a directory that holds xattr whiteouts (not opaque)
XWHITEOUTS = b"x"

#: the prefix kernel overlayfs uses by default, and with its userxattr option
TRUSTED = b"trusted.overlay."
USER = b"user.overlay."


# -- whiteouts ---------------------------------------------------------------------

def is_whiteout(st: os.stat_result) -> bool:
    """Kernel overlayfs whiteout: a character device with device number 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == WHITEOUT_DEV


def listed_whiteout(fd: int, name: bytes, dtype: int | None,
                    xkeys: tuple[bytes, ...] = ()) -> bool:
    """Does the entry *name* a listing of directory *fd* gave, of type *dtype* (an S_IFMT;
    None: the listing did not say), show nothing: a whiteout, or gone since? Only a
    character device or an unknown type needs an lstat to tell, and a regular file where
    the directory holds xattr whiteouts (*xkeys*: Format.xwhiteout_keys of *fd*)."""
    if dtype is not None and dtype != stat.S_IFCHR and not (xkeys and dtype == stat.S_IFREG):
        return False
    st = syscalls.lstat_at(fd, name)
    return st is None or is_whiteout(st) or is_xwhiteout(fd, name, st, xkeys)


def is_xwhiteout(fd: int, name: bytes, st: os.stat_result, xkeys: tuple[bytes, ...]) -> bool:
    """Is (fd, name), of lstat *st*, a whiteout in the xattr form, in a directory whose
    Format.xwhiteout_keys are *xkeys*? (overlayfs asks only for the xattr's presence.)"""
    if not xkeys or not stat.S_ISREG(st.st_mode) or st.st_size != 0:
        return False
    return any(syscalls.getxattr(fd, name, key) is not None for key in xkeys)


def is_whiteout_node(mode: int, rdev: int) -> bool:
    """Would mknod(mode, rdev) make a whiteout?"""
    return stat.S_ISCHR(mode) and rdev == WHITEOUT_DEV


def make_whiteout(dirfd: int, name: bytes) -> None:
    """Make a device whiteout at (dirfd, name) (Format.make_whiteout falls back to the
    xattr form where this is refused)."""
    os.mknod(name, stat.S_IFCHR | 0o000, WHITEOUT_DEV, dir_fd=dirfd)


#: the errors by which mknod of a 0/0 device, or RENAME_WHITEOUT, is refused: EPERM (a
#: seccomp policy, a filesystem without mknod), EINVAL/EOPNOTSUPP (no RENAME_WHITEOUT there)
REFUSED = (errno.EPERM, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS)


class Scratch(Protocol):
    """Where a whiteout in the xattr form is built before it is renamed into place (the
    work directory: on the upper's filesystem)."""

    fd: int

    def tmpname(self) -> bytes: ...


# -- OCI markers (lower layers only) ---------------------------------------------------

def is_oci_marker(name: bytes) -> bool:
    """A ``.wh.`` name: in a lower layer an OCI marker, never an object of the view."""
    return name.startswith(OCI_WHITEOUT)


def oci_hidden(name: bytes) -> bytes | None:
    """The name an OCI marker *name* hides (None: the opaque marker, which hides no name)."""
    return None if name == OCI_OPAQUE else name[len(OCI_WHITEOUT):]


def oci_whiteout(fd: int, name: bytes) -> bool:
    """Is there a ``.wh.NAME`` beside *name*? (An existence test: faccessat, which answers
    a miss, the usual case, without an exception to raise and catch.)"""
    wh = OCI_WHITEOUT + name
    return len(wh) <= NAME_MAX and os.access(wh, os.F_OK, dir_fd=fd, follow_symlinks=False)


def oci_opaque(fd: int, name: bytes) -> bool:
    """Does directory (fd, name) hold the OCI opaque marker?"""
    return syscalls.exists_below(fd, name, OCI_OPAQUE)


# -- redirects -----------------------------------------------------------------------

def valid_redirect(value: bytes) -> bool:
    """Redirects are layer-relative paths: no empty, '.' or '..' components, no NULs."""
    if not value or b"\0" in value:
        return False
    parts = value.strip(b"/").split(b"/")
    return all(p and p not in (b".", b"..") for p in parts)


def redirect_target(path: bytes, value: bytes) -> bytes:
    """The absolute layer path a redirect *value* found on the directory at absolute
    path *path* names: absolute values from the layer root, others beside *path*."""
    if value.startswith(b"/"):
        target = b"/" + value.strip(b"/")
    else:
        target = path.rpartition(b"/")[0] + b"/" + value.strip(b"/")
    return os.path.normpath(target)


# -- the xattrs ------------------------------------------------------------------------

class Format:
    """The overlay xattrs under one prefix: how the upper is written and read, how lower
    layers are read, and which xattrs are private to the union (never shown or accepted
    through the mount)."""

    def __init__(self, prefix: bytes = TRUSTED, lower_prefixes: tuple[bytes, ...] | None = None,
                 redirects: bool = True) -> None:
        self.prefix = prefix
        # renamed directories keep their lower contents by a redirect; without (as
        # overlayfs's userxattr mode, which refuses redirect_dir=on), by copies
        # (namespace.py)
        self.redirects = redirects
        self.opaque_key = prefix + b"opaque"
        self.whiteout_key = prefix + b"whiteout"
        # (opaque, whiteout) xattr names by which a directory holds xattr whiteouts
        self._upper_xw = ((self.opaque_key, self.whiteout_key),)
        # set once a 0/0 device was refused: whiteouts are made in the xattr form from then on
        self.mknod_refused = False
        self.redirect_key = prefix + b"redirect"
        self.own_prefix = prefix + b"unionfs."
        self.ino_key = self.own_prefix + b"ino"
        self.lower_prefixes = lower_prefixes or (prefix,)
        self._lower_redirect = tuple(p + b"redirect" for p in self.lower_prefixes)
        self._lower_xw = tuple((p + b"opaque", p + b"whiteout") for p in self.lower_prefixes)
        # both prefixes, whichever the upper uses: a lower layer may be in either format,
        # and a name of the other one set through the mount would be a marker to whatever
        # stacks this upper as a lower layer later
        self._private = (TRUSTED, USER, b"trusted.unionfs.", OVERRIDE_STAT)

    def __repr__(self) -> str:
        return f"Format({self.prefix!r})"

    def is_private(self, attr: bytes) -> bool:
        """An xattr of the union format (ours or overlayfs's), never shown or accepted
        through the mount."""
        return attr.startswith(self._private)

    # objects are addressed as in syscalls: (dirfd, name); b"": the object dirfd holds;
    # None: dirfd is the open object itself

    def is_opaque(self, fd: int, name: bytes | None) -> bool:
        """Is the upper directory (fd, name) opaque? (``x`` is not: see xwhiteout_keys)"""
        return syscalls.getxattr(fd, name, self.opaque_key) == b"y"

    def set_opaque(self, fd: int, name: bytes | None) -> None:
        if syscalls.getxattr(fd, name, self.opaque_key) == XWHITEOUTS:
            # an opaque directory's xattr whiteouts would be empty files: they go first
            sub = os.open(name or b".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW |
                          os.O_CLOEXEC, dir_fd=fd)
            try:
                for child, dtype in _names(sub):
                    st = syscalls.lstat_at(sub, child) if dtype in (None, stat.S_IFREG) else None
                    if st is not None and is_xwhiteout(sub, child, st, (self.whiteout_key,)):
                        os.unlink(child, dir_fd=sub)
            finally:
                os.close(sub)
        syscalls.setxattr(fd, name, self.opaque_key, b"y")

    # -- whiteouts: a 0/0 device, or the xattr form ----------------------------------------

    def xwhiteout_keys(self, fd: int, lower: bool = False) -> tuple[bytes, ...]:
        """The whiteout xattr names that count in the directory *fd* holds: for each prefix
        (the upper's, or a lower's *lower_prefixes*) whose opaque xattr there is ``x``. Most
        directories have none, and then no regular file in them is a whiteout."""
        pairs = self._lower_xw if lower else self._upper_xw
        return tuple(wk for ok, wk in pairs if syscalls.getxattr(fd, b"", ok) == XWHITEOUTS)

    def whiteout_at(self, fd: int, name: bytes, st: os.stat_result, lower: bool = False,
                    xkeys: tuple[bytes, ...] | None = None) -> bool:
        """Is (fd, name), of lstat *st*, a whiteout, in either form? The one whiteout rule of
        every reader of layers (*lower*: read as a lower layer, in any of its prefixes).
        overlayfs honours the xattr form in every layer's lookups (its readdir skips the
        check in the upper and the bottom layer: unionfs checks everywhere)."""
        if is_whiteout(st):
            return True
        if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
            return False
        return is_xwhiteout(fd, name, st, self.xwhiteout_keys(fd, lower) if xkeys is None
                            else xkeys)

    def lower_hides(self, fd: int, name: bytes, st: os.stat_result | None,
                    xkeys: tuple[bytes, ...] | None = None) -> bool:
        """Is *name* whited out in this lower directory (for this layer and all below)?
        *st*: its lstat (None: nothing there); *xkeys*: the directory's xwhiteout_keys,
        where known.

        A kernel whiteout is the entry itself. An OCI ``.wh.NAME`` hides NAME only in
        the layers below its own (the OCI spec), so an entry beside it still shows.
        """
        if st is not None:
            return self.whiteout_at(fd, name, st, lower=True, xkeys=xkeys)
        return oci_whiteout(fd, name)

    def scratch_whiteout(self, scratch: Scratch, target: int) -> bytes:
        """A whiteout made under a fresh name in *scratch* (returned), to be renamed into the
        upper directory *target*: a 0/0 device, or, where mknod of one is refused, a
        zero-size file with the whiteout xattr, *target* marked as holding such first (so
        the file is a whiteout the moment it lands, never an empty file of the view)."""
        tmp = scratch.tmpname()
        if self._device_form(lambda: make_whiteout(scratch.fd, tmp)):
            return tmp
        self.mark_xwhiteouts(target)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o000,
                     dir_fd=scratch.fd)
        try:
            os.setxattr(fd, self.whiteout_key, b"")
        except BaseException:
            os.unlink(tmp, dir_fd=scratch.fd)
            raise
        finally:
            os.close(fd)
        return tmp

    def _device_form(self, make: Callable[[], object], remember: bool = True) -> bool:
        """Make a whiteout in the device form by *make*: False where the device form is
        refused (REFUSED), and then, with *remember*, not tried again by this Format."""
        if self.mknod_refused:
            return False
        try:
            make()
            return True
        except OSError as e:
            if e.errno not in REFUSED:
                raise
            if remember:
                self.mknod_refused = True
            return False

    def mark_xwhiteouts(self, target: int) -> None:
        """Mark the upper directory *target* as one that holds xattr whiteouts."""
        mark = syscalls.getxattr(target, b"", self.opaque_key)
        if mark is None:
            syscalls.setxattr(target, b"", self.opaque_key, XWHITEOUTS)
        elif mark != XWHITEOUTS:
            raise OSError(errno.EIO, "an opaque directory takes no xattr whiteout")

    def make_whiteout(self, dirfd: int, name: bytes, scratch: Scratch) -> None:
        """Make a whiteout at the free name (dirfd, name) of the upper."""
        if self._device_form(lambda: make_whiteout(dirfd, name)):
            return
        tmp = self.scratch_whiteout(scratch, dirfd)
        try:
            syscalls.renameat2(scratch.fd, tmp, dirfd, name, syscalls.RENAME_NOREPLACE)
        except BaseException:
            os.unlink(tmp, dir_fd=scratch.fd)
            raise

    def rename_whiteout(self, fd1: int, n1: bytes, fd2: int, n2: bytes, scratch: Scratch) -> None:
        """rename(2) of (fd1, n1) to (fd2, n2) that leaves a whiteout at the old name: in one
        step by RENAME_WHITEOUT; where that is refused, the object moves first and a
        whiteout of the xattr form lands at the old name after (a crash between shows the
        lower object at the old name again, and loses nothing). A filesystem may refuse
        RENAME_WHITEOUT and still make 0/0 devices: its refusal is not remembered."""
        if self._device_form(lambda: syscalls.renameat2(fd1, n1, fd2, n2,
                                                         syscalls.RENAME_WHITEOUT),
                             remember=False):
            return
        tmp = self.scratch_whiteout(scratch, fd1)
        try:
            syscalls.renameat2(fd1, n1, fd2, n2)
        except BaseException:
            os.unlink(tmp, dir_fd=scratch.fd)
            raise
        syscalls.renameat2(scratch.fd, tmp, fd1, n1, syscalls.RENAME_NOREPLACE)

    def raw_redirect(self, fd: int, name: bytes | None) -> bytes | None:
        """The redirect xattr of the upper directory (fd, name) as it is, valid or not."""
        return syscalls.getxattr(fd, name, self.redirect_key)

    def redirect(self, fd: int, name: bytes | None) -> bytes | None:
        """The redirect of the upper directory (fd, name), None if it has no valid one (or
        the format follows none, as overlayfs's userxattr mode)."""
        if not self.redirects:
            return None
        rd = syscalls.getxattr(fd, name, self.redirect_key)
        return rd if rd is not None and valid_redirect(rd) else None

    def set_redirect(self, fd: int, name: bytes | None, target: bytes) -> None:
        syscalls.setxattr(fd, name, self.redirect_key, target)

    def identity(self, fd: int, name: bytes | None) -> bytes | None:
        """The identity xattr's value (see nodes.parse_ino, durable.parse_tag), or None."""
        return syscalls.getxattr(fd, name, self.ino_key)

    def keeps_identity(self, mode: int) -> bool:
        """Can an object of this type carry the identity xattr? user.* xattrs exist only on
        regular files and directories, so in the userxattr format a copied-up symlink,
        fifo, socket or device shows its upper inode number, as on overlayfs there."""
        return self.prefix != USER or stat.S_ISREG(mode) or stat.S_ISDIR(mode)

    def set_identity(self, fd: int, name: bytes | None, value: bytes) -> None:
        syscalls.setxattr(fd, name, self.ino_key, value)

    # lower layers: any of lower_prefixes, and OCI markers

    def lower_opaque(self, fd: int, name: bytes) -> bool:
        """A lower directory is opaque by the overlay xattr or by an OCI marker inside it."""
        return self.lower_dir(fd, name)[0]

    def lower_dir(self, fd: int, name: bytes) -> tuple[bool, tuple[bytes, ...], bytes | None]:
        """What a lower directory (fd, name) says of the layers below it: (is it opaque, its
        xwhiteout_keys, its valid redirect or None; no redirect is read of an opaque one).
        One listxattr tells which of the overlay xattrs are there at all: most lower
        directories have none, and then one call answers where a read of each would be
        one each."""
        present = syscalls.listxattr(fd, name)
        xkeys = []
        for okey, wkey in self._lower_xw:
            value = syscalls.getxattr(fd, name, okey) if okey in present else None
            if value == b"y":
                return True, (), None
            if value == XWHITEOUTS:
                xkeys.append(wkey)
        if oci_opaque(fd, name):
            return True, tuple(xkeys), None
        for key in self._lower_redirect:
            rd = syscalls.getxattr(fd, name, key) if key in present else None
            if rd is not None and valid_redirect(rd):
                return False, tuple(xkeys), rd
        return False, tuple(xkeys), None


#: the format kernel overlayfs writes by default (trusted.overlay.*)
OVERLAY = Format(TRUSTED, (TRUSTED, USER))


def for_mount(userxattr: bool, privileged: bool) -> Format:
    """The upper's format: trusted.overlay.* by default, user.overlay.* with userxattr
    (kernel overlayfs's option: no redirects followed or made there). Lower layers are read
    in both, except that trusted.* names are invisible to an unprivileged reader anyway."""
    if not userxattr:
        return OVERLAY
    return Format(USER, (USER, TRUSTED) if privileged else (USER,), redirects=False)


# -- which format an upper is in ---------------------------------------------------------

FORMAT_NAMES = {TRUSTED: "trusted.overlay.*", USER: "userxattr (user.overlay.*)"}


class MixedFormat(ValueError):
    """An upper written in one format, asked to be mounted in the other."""


def check_upper(upper_fd: int, fmt: Format, recorded: bytes | None, upper: str) -> None:
    """Refuse to write *fmt* into an upper that holds the other format's xattrs.

    *recorded* is the prefix a previous mount noted in the workdir; without one (a first
    mount, or an upper that kernel overlayfs wrote) the upper is walked once for the
    other prefix. Names of a format the caller may not read (trusted.* to a user) cannot
    be seen, so only a recorded format tells of those."""
    other = USER if fmt.prefix == TRUSTED else TRUSTED
    found = recorded if recorded in FORMAT_NAMES else None
    if found is None and _holds_prefix(upper_fd, other):
        found = other
    if found is not None and found != fmt.prefix:
        hint = ("mount it with -o userxattr" if found == USER else
                "only root, without -o userxattr, can mount it")
        raise MixedFormat(f"upper layer '{upper}' is in the {FORMAT_NAMES[found]} format, "
                          f"not {FORMAT_NAMES[fmt.prefix]}: {hint}")


def _names(fd: int) -> list[tuple[bytes, int | None]]:
    """(name, S_IFREG / S_IFCHR / None) of each entry of the open directory *fd*."""
    out: list[tuple[bytes, int | None]] = []
    with os.scandir(fd) as it:
        for de in it:
            reg = de.is_file(follow_symlinks=False) and not de.is_symlink()
            out.append((os.fsencode(de.name), stat.S_IFREG if reg else None))
    return out


def _holds_prefix(upper_fd: int, prefix: bytes) -> bool:
    if any(a.startswith(prefix) for a in syscalls.listxattr(upper_fd, b"")):
        return True
    for fd, _path, name, _de in walk_tree(upper_fd):
        try:
            names = syscalls.listxattr(fd, name)
        except OSError:
            continue
        if any(a.startswith(prefix) for a in names):
            return True
    return False
