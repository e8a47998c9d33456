"""Behaviour through a real unionfs mount, one focused test per behaviour:
Symlinks; special files.

Fixtures are in conftest.py (`mounted`, `pair`, `layers`, ...); every mount is unmounted by
the helpers in helpers/mounting.py, even on failure."""
from __future__ import annotations

import errno
import os
import socket
import stat

import pytest

from helpers.ops import errno_of, read
from helpers.mounting import unionfs_mount

pytestmark = [pytest.mark.mount]


# -- symlinks -----------------------------------------------------------------------------

def test_readlink(mounted):
    assert os.readlink(mounted.m("sym_rel")) == "dir/a.txt"
    assert os.readlink(mounted.m("sym_abs")) == "/etc/hostname"
    assert os.readlink(mounted.m("sym_dangling")) == "does/not/exist"
    assert os.readlink(mounted.m("dir/sym_out")) == "../../etc/passwd"
    assert read(mounted.m("sym_rel")) == b"bottom-a\n"


def test_symlink_out_of_layer_resolved_by_caller(mounted):
    p = mounted.m("dir/sym_out")
    assert stat.S_ISLNK(os.lstat(p).st_mode)
    # mnt/dir/../../etc/passwd is ROOT/etc/passwd, not the layer's neighbour
    assert read(p) == b"caller-side passwd\n"


def test_absolute_symlink_resolved_by_caller(mounted):
    assert read(mounted.m("sym_abs")) == read("/etc/hostname")


def test_dangling_symlink(mounted):
    assert stat.S_ISLNK(os.lstat(mounted.m("sym_dangling")).st_mode)
    assert errno_of(lambda: os.stat(mounted.m("sym_dangling"))) == errno.ENOENT


def test_symlink_create(mounted):
    os.symlink("../x/y", mounted.m("dir/newlink"))
    assert os.readlink(mounted.m("dir/newlink")) == "../x/y"
    assert os.readlink(mounted.u("dir/newlink")) == "../x/y"


def test_symlink_chown_lchown(mounted):
    os.lchown(mounted.m("sym_abs"), 1000, 1000)
    st = os.lstat(mounted.m("sym_abs"))
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert os.readlink(mounted.u("sym_abs")) == "/etc/hostname"


# -- special files ------------------------------------------------------------------------

def test_mknod_char_device(mounted):
    os.mknod(mounted.m("mynull"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    for p in (mounted.m("mynull"), mounted.u("mynull")):
        st = os.lstat(p)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    st = os.lstat(mounted.m("null"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


def test_device_usable_with_dev_option(layers):
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work,
                       options=("dev",)):
        os.mknod(layers.m("mynull"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
        with open(layers.m("mynull"), "r+b", buffering=0) as f:
            assert f.write(b"xyz") == 3
            assert f.read() == b""
        with open(layers.m("null"), "rb") as f:
            assert f.read() == b""


def test_fifo(mounted):
    os.mkfifo(mounted.m("dir/myfifo"))
    assert stat.S_ISFIFO(os.lstat(mounted.u("dir/myfifo")).st_mode)
    for p in (mounted.m("dir/myfifo"), mounted.m("fifo")):
        assert stat.S_ISFIFO(os.lstat(p).st_mode)
        fd = os.open(p, os.O_RDWR | os.O_NONBLOCK)
        try:
            os.write(fd, b"through the pipe")
            assert os.read(fd, 100) == b"through the pipe"
        finally:
            os.close(fd)


def test_unix_socket(mounted):
    p = mounted.m("dir/sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(p)
        srv.listen(1)
        assert stat.S_ISSOCK(os.lstat(p).st_mode)
        assert stat.S_ISSOCK(os.lstat(mounted.u("dir/sock")).st_mode)
        cli.connect(p)
        conn, _ = srv.accept()
        with conn:
            cli.sendall(b"hello")
            assert conn.recv(5) == b"hello"
    finally:
        cli.close()
        srv.close()
