"""The C library calls the tests make that Python's os module lacks, loaded and typed once.

Each wrapper raises OSError (with the errno and the path, where there is one) instead of
returning -1; `libc` itself is there for a caller that must see the raw return, such as a
loop that counts failures.
"""
from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
FALLOC_FL_ZERO_RANGE = 0x10
SYS_GETDENTS64 = 217   # x86-64
CLONE_NEWNS = 0x20000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class Dirent(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]


libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(Timespec), ctypes.c_int]
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
libc.syncfs.argtypes = [ctypes.c_int]
libc.opendir.argtypes = [ctypes.c_char_p]
libc.opendir.restype = ctypes.c_void_p
libc.readdir.argtypes = [ctypes.c_void_p]
libc.readdir.restype = ctypes.POINTER(Dirent)
libc.rewinddir.argtypes = [ctypes.c_void_p]
libc.closedir.argtypes = [ctypes.c_void_p]
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.unshare.argtypes = [ctypes.c_int]
libc.inotify_init1.argtypes = [ctypes.c_int]
libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


def check(ret: int, what: str, path: str | None = None) -> int:
    """*ret* unless it says failure (< 0), then the errno as an OSError."""
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}", path)
    return ret


def renameat2(old: str, new: str, flags: int, olddirfd: int = AT_FDCWD,
              newdirfd: int = AT_FDCWD) -> None:
    check(libc.renameat2(olddirfd, os.fsencode(old), newdirfd, os.fsencode(new), flags),
          "renameat2", old)


def utimensat(path: str, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    times = (Timespec * 2)(Timespec(*atime), Timespec(*mtime))
    check(libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0), "utimensat", path)


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    check(libc.fallocate(fd, mode, off, length), "fallocate")


def syncfs(fd: int) -> None:
    check(libc.syncfs(fd), "syncfs")


def getdents(fd: int, size: int) -> tuple[int, ctypes.Array]:
    """One getdents64(2) call into a *size*-byte buffer: (bytes returned, the buffer)."""
    buf = ctypes.create_string_buffer(size)
    return check(libc.syscall(SYS_GETDENTS64, fd, buf, size), "getdents64"), buf
