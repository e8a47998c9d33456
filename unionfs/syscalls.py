"""The few Linux syscalls Python's os module lacks, and fd-relative helpers.

Everything here takes a directory fd and a single name (or an fd alone), never
a joined path, so no caller can be walked out of a layer by a symlink: names
are resolved with AT_SYMLINK_NOFOLLOW / O_NOFOLLOW, one component at a time. The
one two-component path (exists_below) is resolved by openat2 with
RESOLVE_BENEATH and RESOLVE_NO_SYMLINKS, which refuse the same.
Extended attributes have no *at syscalls in Python, so they go through the
/proc/self/fd magic link of the directory plus one name, with the final
component never followed.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat

_libc = ctypes.CDLL(None, use_errno=True)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000

FICLONE = 0x40049409

_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.renameat2.restype = ctypes.c_int


def _check(ret: int, what: str, name: bytes | None = None) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", name)
    return ret


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int = 0) -> None:
    """rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE / RENAME_WHITEOUT."""
    _check(_libc.renameat2(olddirfd, oldname, newdirfd, newname, flags), "renameat2", oldname)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_libc.utimensat.restype = ctypes.c_int


def _ts(value: int | None, now: bool) -> _Timespec:
    if now:
        return _Timespec(0, UTIME_NOW)
    if value is None:
        return _Timespec(0, UTIME_OMIT)
    return _Timespec(value // 1_000_000_000, value % 1_000_000_000)


def utimensat(dirfd: int, name: bytes, atime_ns: int | None, mtime_ns: int | None,
              atime_now: bool = False, mtime_now: bool = False, follow: bool = False) -> None:
    """utimensat(2) with per-field OMIT (None) and NOW; a final symlink is not followed.

    Both times given (copy-up, keep_times): os.utime makes the same call from C, with
    no ctypes timespecs to build in Python first."""
    if atime_ns is not None and mtime_ns is not None and not (atime_now or mtime_now):
        os.utime(name, ns=(atime_ns, mtime_ns), dir_fd=None if dirfd == AT_FDCWD else dirfd,
                 follow_symlinks=follow)
        return
    times = (_Timespec * 2)(_ts(atime_ns, atime_now), _ts(mtime_ns, mtime_now))
    flags = 0 if follow else AT_SYMLINK_NOFOLLOW
    _check(_libc.utimensat(dirfd, name, times, flags), "utimensat", name)


# --- extended attributes, addressed as (dirfd, name) -------------------------

def proc_path(fd: int) -> bytes:
    """The magic link that reaches the object an (O_PATH) fd holds, even a symlink itself."""
    return b"/proc/self/fd/%d" % fd


def _xpath(dirfd: int, name: bytes | None) -> tuple[bytes | int, bool]:
    """A path (or fd) for the xattr syscalls and whether to follow it.

    An empty name means the object *dirfd* itself, reached by following its
    magic link (which stops at that object even if it is a symlink); None means
    *dirfd* is an open file (not O_PATH), used as it is (f*xattr, no path to
    resolve); any other name is one component below the directory, never followed.
    """
    if name is None:
        return dirfd, True
    if not name:
        return proc_path(dirfd), True
    return b"/proc/self/fd/%d/%s" % (dirfd, name), False


def getxattr(dirfd: int, name: bytes | None, attr: bytes) -> bytes | None:
    """The value of *attr*, or None when it is not set (or xattrs are unsupported)."""
    path, follow = _xpath(dirfd, name)
    try:
        return os.getxattr(path, attr, follow_symlinks=follow)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise


def getxattr_strict(dirfd: int, name: bytes | None, attr: bytes) -> bytes:
    path, follow = _xpath(dirfd, name)
    return os.getxattr(path, attr, follow_symlinks=follow)


def setxattr(dirfd: int, name: bytes | None, attr: bytes, value: bytes, flags: int = 0) -> None:
    path, follow = _xpath(dirfd, name)
    os.setxattr(path, attr, value, flags, follow_symlinks=follow)


def removexattr(dirfd: int, name: bytes | None, attr: bytes) -> None:
    path, follow = _xpath(dirfd, name)
    os.removexattr(path, attr, follow_symlinks=follow)


def listxattr(dirfd: int, name: bytes | None) -> list[bytes]:
    """Names of the xattrs set. For the object *dirfd* itself (name b"") the fd is tried
    first: a real fd (a held-open directory, as a directory copy-up reads its origin)
    needs no /proc path resolved; an O_PATH fd fails EBADF at once, and the path serves."""
    if name == b"":
        try:
            return _listxattr(dirfd, True)
        except OSError as e:
            if e.errno != errno.EBADF:
                raise
    return _listxattr(*_xpath(dirfd, name))


def _listxattr(path: bytes | int, follow: bool) -> list[bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise
    return [n.encode("utf-8", "surrogateescape") for n in names]


# --- small stat helpers -------------------------------------------------------

def stat_at(dirfd: int, name: bytes) -> os.stat_result:
    """lstat of (dirfd, name); an empty name means the object *dirfd* holds."""
    if not name:
        return os.stat(dirfd)
    return os.stat(name, dir_fd=dirfd, follow_symlinks=False)


def chown_at(dirfd: int, name: bytes | None, uid: int, gid: int) -> None:
    """As the xattr calls: name None is the open file *dirfd*, b"" the object it holds."""
    if name is None:
        os.fchown(dirfd, uid, gid)
    elif not name:
        os.chown(proc_path(dirfd), uid, gid)
    else:
        os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)


def utimens_at(dirfd: int, name: bytes | None, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Set times (None leaves one as it is) without following a final symlink; name None:
    the open file *dirfd*; b"": the object *dirfd* holds, a real fd or an O_PATH one."""
    if name is None:
        futimens(dirfd, atime_ns, mtime_ns)
    elif not name:
        if atime_ns is not None and mtime_ns is not None:
            try:  # a real fd (see open_dir_real): no magic link to resolve
                os.utime(dirfd, ns=(atime_ns, mtime_ns))
                return
            except OSError as e:
                if e.errno != errno.EBADF:  # EBADF: an O_PATH fd
                    raise
        utimensat(AT_FDCWD, proc_path(dirfd), atime_ns, mtime_ns, follow=True)
    else:
        utimensat(dirfd, name, atime_ns, mtime_ns)


def open_at(dirfd: int, name: bytes, flags: int, mode: int = 0o600) -> int:
    """open(2) of one name below *dirfd* (or of the object *dirfd* holds), never through a symlink."""
    if not name:  # the magic link must be followed: it leads to the object itself
        return open_noatime(proc_path(dirfd), (flags & ~os.O_NOFOLLOW) | os.O_CLOEXEC, mode)
    return open_noatime(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dirfd)


def open_noatime(path: bytes | str, flags: int, mode: int = 0o600, dir_fd: int | None = None) -> int:
    """os.open, where O_NOATIME is a wish: only the owner (or CAP_FOWNER) may ask for it,
    so a daemon without root reading someone else's readable file opens it without."""
    try:
        return os.open(path, flags, mode, dir_fd=dir_fd)
    except PermissionError as e:
        if not flags & os.O_NOATIME or e.errno != errno.EPERM:
            raise
        return os.open(path, flags & ~os.O_NOATIME, mode, dir_fd=dir_fd)


def readlink_at(dirfd: int, name: bytes) -> bytes:
    return os.readlink(name, dir_fd=dirfd)


def lstat_at(dirfd: int, name: bytes) -> os.stat_result | None:
    """lstat of (dirfd, name), or None when it does not exist."""
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def open_dir_at(dirfd: int, name: bytes, flags: int = os.O_PATH) -> int:
    """Open a directory (never a symlink to one) below *dirfd*."""
    return os.open(name, flags | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)


def open_dir_real(dirfd: int, name: bytes, follow: bool = False) -> int:
    """Open a directory below *dirfd* for real (O_RDONLY) where the daemon may read it,
    else O_PATH: calls on a real fd (futimens, fstat) reach the directory directly,
    where an O_PATH fd needs its /proc/self/fd magic link resolved (a path walk in the
    kernel) at each call, as the utimensat of every copy-up's parent would. *follow*: a
    final symlink is followed (a layer's root given by the user), else refused."""
    flags = os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        return os.open(name, flags | os.O_RDONLY, dir_fd=dirfd)
    except PermissionError:
        return os.open(name, flags | os.O_PATH, dir_fd=dirfd)


_libc.syscall.restype = ctypes.c_long


class _NewSyscall:
    """A syscall newer than glibc's wrappers, called by its number (the same on every
    architecture for these); after one ENOSYS it is not tried again."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.available = True

    def __call__(self, *args: object) -> int:
        """0, or the errno it failed with."""
        if not self.available:
            return errno.ENOSYS
        if _libc.syscall(ctypes.c_long(self.number), *args) == 0:
            return 0
        e = ctypes.get_errno()
        if e == errno.ENOSYS:
            self.available = False
        return e


_fchmodat2 = _NewSyscall(452)   # Linux 6.6+
_cachestat = _NewSyscall(451)   # Linux 6.5+


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_RESOLVE_NO_MAGICLINKS, _RESOLVE_NO_SYMLINKS, _RESOLVE_BENEATH = 0x02, 0x04, 0x08
_openat2_available = True


def exists_below(dirfd: int, name: bytes, child: bytes) -> bool:
    """Is there an entry *child* in the directory (dirfd, name)? One openat2(2) of
    "name/child" that may not leave *dirfd* nor pass a symlink (RESOLVE_BENEATH,
    RESOLVE_NO_SYMLINKS), where an open of the directory, an lstat and a close would be
    three calls. Before Linux 5.6, or where the answer is a symlink (ELOOP), it is
    those three calls."""
    global _openat2_available
    if _openat2_available:
        how = _OpenHow(os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, 0,
                       _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
        fd = _libc.syscall(ctypes.c_long(437), ctypes.c_int(dirfd), name + b"/" + child,
                           ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            os.close(fd)
            return True
        e = ctypes.get_errno()
        if e in (errno.ENOENT, errno.ENOTDIR):
            return False
        if e == errno.ENOSYS:
            _openat2_available = False
    try:
        sub = open_dir_at(dirfd, name)
    except OSError:
        return False
    try:
        return lstat_at(sub, child) is not None
    finally:
        os.close(sub)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


_OPEN_TREE_CLONE, _AT_RECURSIVE = 1, 0x8000
_MOUNT_ATTR_NOATIME, _MOUNT_ATTR__ATIME = 0x10, 0x70


def open_noatime_tree(path: bytes) -> int:
    """An O_PATH fd on the directory *path* as the root of a new, detached mount of it that
    never updates access times (open_tree(2) with OPEN_TREE_CLONE, then mount_setattr(2);
    Linux 5.12+, CAP_SYS_ADMIN). Files opened below it keep that mount, whoever reopens
    them. Mounts below *path* come along (recursively), noatime too, so the tree reads as
    it does through *path*. Raises OSError where the kernel refuses."""
    fd = _check(_libc.syscall(ctypes.c_long(428), ctypes.c_int(AT_FDCWD), path,
                              ctypes.c_uint(_OPEN_TREE_CLONE | _AT_RECURSIVE | os.O_CLOEXEC)),
                "open_tree", path)
    attr = _MountAttr(_MOUNT_ATTR_NOATIME, _MOUNT_ATTR__ATIME, 0, 0)
    try:
        _check(_libc.syscall(ctypes.c_long(442), ctypes.c_int(fd), b"",
                             ctypes.c_uint(AT_EMPTY_PATH | _AT_RECURSIVE), ctypes.byref(attr),
                             ctypes.c_size_t(ctypes.sizeof(attr))), "mount_setattr", path)
    except OSError:
        os.close(fd)
        raise
    return fd


class _CacheRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [("nr_cache", ctypes.c_uint64), ("nr_dirty", ctypes.c_uint64),
                ("nr_writeback", ctypes.c_uint64), ("nr_evicted", ctypes.c_uint64),
                ("nr_recently_evicted", ctypes.c_uint64)]


_PAGE = os.sysconf("SC_PAGE_SIZE")


def in_page_cache(fd: int, size: int) -> bool:
    """Are all of the first *size* bytes of *fd* in the page cache, so that reading them
    cannot block on the disk? (cachestat(2); False where the kernel lacks it.)"""
    rng, out = _CacheRange(0, size), _CacheStat()
    if _cachestat(ctypes.c_int(fd), ctypes.byref(rng), ctypes.byref(out), ctypes.c_uint(0)):
        return False
    return out.nr_cache >= (size + _PAGE - 1) // _PAGE


def syncfs(fd: int) -> None:
    """syncfs(2): write back and flush the whole filesystem *fd* is on (a real fd, not O_PATH)."""
    _check(_libc.syncfs(fd), "syncfs", b"")


def futimens(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Times of the open file *fd* (None leaves one as it is)."""
    if atime_ns is not None and mtime_ns is not None:  # from C, as in utimensat above
        os.utime(fd, ns=(atime_ns, mtime_ns))
        return
    times = (_Timespec * 2)(_ts(atime_ns, False), _ts(mtime_ns, False))
    _check(_libc.utimensat(fd, b"", times, AT_EMPTY_PATH), "futimens", b"")


def chmod_at(dirfd: int, name: bytes | None, mode: int) -> None:
    """fchmodat that refuses to follow a final symlink (symlinks have no mode on Linux):
    fchmodat2(AT_SYMLINK_NOFOLLOW) where the kernel has it, one call instead of four.
    Name None: the open file *dirfd* (fchmod)."""
    if name is None:
        os.fchmod(dirfd, mode)
        return
    if not name:
        os.chmod(proc_path(dirfd), mode)
        return
    e = _fchmodat2(ctypes.c_int(dirfd), ctypes.c_char_p(name), ctypes.c_uint(mode),
                   ctypes.c_int(AT_SYMLINK_NOFOLLOW))
    if e == 0:
        return
    if e != errno.ENOSYS:
        raise OSError(e, os.strerror(e), name)
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            raise OSError(errno.EOPNOTSUPP, "chmod of a symlink", name)
        os.chmod(b"/proc/self/fd/%d" % fd, mode)
    finally:
        os.close(fd)


_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its *mode* (os.posix_fallocate has none: no punching, no KEEP_SIZE)."""
    _check(_libc.fallocate(fd, mode, offset, length), "fallocate")


def pwrite_all(fd: int, data: bytes, offset: int) -> int:
    """Write all of *data* at *offset*, or raise: FUSE takes a short write for an error
    (an O_DIRECT writer gets EIO, written-back pages lose their tail), so a pwrite cut
    short (the upper filled up) goes on until the call itself fails with the reason."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done


#: copy_data's methods, best first: reflink, in-kernel copy, sendfile
CLONE, RANGE, SENDFILE = 0, 1, 2


def copy_data(src: int, dst: int, size: int, how: int = CLONE, sparse: bool = True,
              fresh: bool = False) -> int:
    """Copy *size* bytes between file fds inside the kernel: reflink, else copy_file_range,
    else sendfile (copy_file_range refuses EXDEV between two ext4 filesystems). *how* is
    the first method to try; returns the one that worked, so the caller can start there
    next time instead of failing through the refused ones again. *sparse* False: the
    source has no holes (st_blocks covers st_size), so the SEEK_DATA/SEEK_HOLE walk is
    skipped. *fresh*: *dst* was just opened (its offset is 0), so sendfile, which writes
    at the file offset, needs no lseek first."""
    if how == CLONE:
        try:
            fcntl.ioctl(dst, FICLONE, src)
            return CLONE
        except OSError:
            how = RANGE
    extents = _data_extents(src, size) if sparse else [(0, size)]
    pos = 0 if fresh else -1  # dst's file offset, where sendfile writes (-1: not known)
    for start, end in extents:
        off = start
        while off < end:
            if how == RANGE:
                try:
                    n = os.copy_file_range(src, dst, end - off, off, off)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    how = SENDFILE
                    continue
            else:
                if pos != off:
                    os.lseek(dst, off, os.SEEK_SET)
                n = os.sendfile(dst, src, off, end - off)
                pos = off + n
            if n == 0:
                break
            off += n
    if not extents or extents[-1][1] < size:
        os.ftruncate(dst, size)  # holes at the end stay holes
    return how


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (start, end) ranges holding data, by SEEK_DATA/SEEK_HOLE, so holes stay holes."""
    out: list[tuple[int, int]] = []
    off = 0
    try:
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end))
            off = end
    except OSError:
        return [(0, size)]
    return out
