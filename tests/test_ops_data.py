"""Behaviour through a real unionfs mount, one focused test per behaviour:
Data operations; read-only mounts.

Fixtures are in conftest.py (`mounted`, `pair`, `layers`, ...); every mount is unmounted by
the helpers in helpers/mounting.py, even on failure."""
from __future__ import annotations

import errno
import mmap
import os
import stat

import pytest

from helpers.libc import fallocate
from helpers.ops import ROOT_NAMES, errno_of, read
from helpers.mounting import unionfs_mount
from unionfs import binding

pytestmark = [pytest.mark.mount]


# -- data operations ----------------------------------------------------------------------

def test_truncate_grow_and_ftruncate(mounted):
    os.truncate(mounted.m("dir/a.txt"), 100)
    data = read(mounted.m("dir/a.txt"))
    assert data == b"bottom-a\n" + b"\0" * 91
    with open(mounted.m("dir/b.txt"), "r+b") as f:
        os.ftruncate(f.fileno(), 3)
    assert read(mounted.m("dir/b.txt")) == b"mid"


def test_posix_fallocate_extends_with_zeros(mounted):
    """posix_fallocate(3) extends a copied-up file with zeros on either binding: through
    the fallocate handler, or where there is none (stock pyfuse3) because fallocate(2)
    then says EOPNOTSUPP, the one errno on which glibc falls back to writing zeros."""
    expected = 0 if "fallocate" in binding.load().fast_paths else errno.EOPNOTSUPP
    fd = os.open(mounted.m("dir/a.txt"), os.O_RDWR)
    try:
        assert errno_of(lambda: fallocate(fd, 0, 0, 1 << 20)) == expected
        os.posix_fallocate(fd, 0, 1 << 20)
    finally:
        os.close(fd)
    assert os.lstat(mounted.m("dir/a.txt")).st_size == 1 << 20
    data = read(mounted.m("dir/a.txt"))
    assert data[:9] == b"bottom-a\n" and data[9:] == bytes((1 << 20) - 9)
    assert read(mounted.u("dir/a.txt")) == data


def test_statfs_reports_upper(mounted):
    a, b = os.statvfs(mounted.mnt), os.statvfs(mounted.upper)
    assert (a.f_bsize, a.f_blocks, a.f_files, a.f_namemax) == (b.f_bsize, b.f_blocks, b.f_files, b.f_namemax)
    assert abs(a.f_bfree - b.f_bfree) < b.f_blocks // 100 + 1024


def test_o_append(mounted):
    fd = os.open(mounted.m("dir/a.txt"), os.O_WRONLY | os.O_APPEND)
    fd2 = os.open(mounted.m("dir/a.txt"), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"one\n")
        os.write(fd2, b"two\n")
        os.write(fd, b"three\n")
    finally:
        os.close(fd)
        os.close(fd2)
    assert read(mounted.m("dir/a.txt")) == b"bottom-a\none\ntwo\nthree\n"


def test_o_excl(mounted):
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    assert errno_of(lambda: os.close(os.open(mounted.m("dir/a.txt"), flags))) == errno.EEXIST
    assert errno_of(lambda: os.close(os.open(mounted.m("sym_dangling"), flags))) == errno.EEXIST
    os.close(os.open(mounted.m("gone.txt"), flags, 0o640))
    assert read(mounted.m("gone.txt")) == b""
    assert stat.S_IMODE(os.lstat(mounted.m("gone.txt")).st_mode) == 0o640
    os.close(os.open(mounted.m("dir/fresh"), flags))
    assert errno_of(lambda: os.close(os.open(mounted.m("dir/fresh"), flags))) == errno.EEXIST


def test_o_trunc(mounted):
    fd = os.open(mounted.m("big.bin"), os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert os.lstat(mounted.m("big.bin")).st_size == 0
    assert os.lstat(mounted.u("big.bin")).st_size == 0
    assert os.lstat(os.path.join(mounted.bottom, "big.bin")).st_size == len(mounted.big)


def test_o_directory(mounted):
    assert errno_of(lambda: os.open(mounted.m("shadow.txt"), os.O_RDONLY | os.O_DIRECTORY)) == errno.ENOTDIR
    os.close(os.open(mounted.m("merged"), os.O_RDONLY | os.O_DIRECTORY))


def test_o_nofollow(mounted):
    assert errno_of(lambda: os.open(mounted.m("sym_rel"), os.O_RDONLY | os.O_NOFOLLOW)) == errno.ELOOP


def test_mmap_read(mounted):
    with open(mounted.m("big.bin"), "rb") as f:
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            assert mm[:] == mounted.big


def test_mmap_write(mounted):
    with open(mounted.m("big.bin"), "r+b") as f:
        with mmap.mmap(f.fileno(), 0) as mm:
            mm[4096:4100] = b"MMAP"
            mm.flush()
    expect = mounted.big[:4096] + b"MMAP" + mounted.big[4100:]
    fd = os.open(mounted.m("big.bin"), os.O_RDONLY)
    try:
        assert os.pread(fd, 8, 4094) == expect[4094:4102]
    finally:
        os.close(fd)
    assert read(mounted.m("big.bin")) == expect
    assert read(mounted.u("big.bin")) == expect


def test_read_write_large_offsets(mounted):
    fd = os.open(mounted.m("big.bin"), os.O_RDWR)
    try:
        os.pwrite(fd, b"END", len(mounted.big))
        assert os.pread(fd, 3, len(mounted.big)) == b"END"
        os.pwrite(fd, b"far", 10 << 20)
    finally:
        os.close(fd)
    assert os.lstat(mounted.m("big.bin")).st_size == (10 << 20) + 3


# -- read-only mounts ---------------------------------------------------------------------

WRITES = {
    "open_write": lambda m: os.close(os.open(m("dir/a.txt"), os.O_WRONLY)),
    "create": lambda m: os.close(os.open(m("new"), os.O_WRONLY | os.O_CREAT)),
    "mkdir": lambda m: os.mkdir(m("newdir")),
    "unlink": lambda m: os.unlink(m("dir/a.txt")),
    "rmdir": lambda m: os.rmdir(m("emptydir")),
    "rename": lambda m: os.rename(m("dir/a.txt"), m("dir/z")),
    "chmod": lambda m: os.chmod(m("dir/a.txt"), 0o600),
    "utime": lambda m: os.utime(m("dir/a.txt")),
    "setxattr": lambda m: os.setxattr(m("dir/a.txt"), "user.x", b"1"),
    "symlink": lambda m: os.symlink("x", m("sl")),
    "truncate": lambda m: os.truncate(m("dir/a.txt"), 0),
}


@pytest.mark.parametrize("mode", ["ro_option", "no_upper"])
def test_read_only_mounts_give_erofs(layers, mode):
    upper = layers.upper if mode == "ro_option" else None
    kw = dict(workdir=layers.work, options=("ro",)) if mode == "ro_option" else {}
    with unionfs_mount(layers.lowers, upper, layers.mnt, **kw):
        assert read(layers.m("shadow.txt")) == b"top-shadow\n"
        assert set(os.listdir(layers.mnt)) == ROOT_NAMES
        for what, fn in WRITES.items():
            assert errno_of(lambda: fn(layers.m)) == errno.EROFS, what
    assert os.listdir(layers.upper) == []
