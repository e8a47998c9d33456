"""Behaviour through a real unionfs mount, one focused test per behaviour:
Ownership, modes, sparse files.

Fixtures are in conftest.py (`mounted`, `pair`, `layers`, ...); every mount is unmounted by
the helpers in helpers/mounting.py, even on failure."""
from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
import subprocess
import time

import pytest

from helpers.libc import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, RENAME_EXCHANGE, fallocate,
                          libc, renameat2)
from helpers.ops import HL, enoent, errno_of, raw_readdir, read, run_as, write
from helpers.snapshot import snapshot
from helpers.mounting import kernel_overlay, unionfs_mount
from helpers.unit_helpers import is_whiteout, xattr
from unionfs import binding

pytestmark = [pytest.mark.mount]


# -- ownership, modes, sparse files -------------------------------------------------------

@contextlib.contextmanager
def both(tmp_path, options=("allow_other",)):
    """A unionfs mount (with *options*) and a kernel overlay over copies of the same layers."""
    from conftest import make_layers
    a = make_layers(str(tmp_path / "uf"))
    b = make_layers(str(tmp_path / "k"))
    with kernel_overlay(b.kernel_lowers, b.upper, b.work, b.mnt):
        with unionfs_mount(a.kernel_lowers, a.upper, a.mnt, workdir=a.work, options=options):
            yield a, b


def test_setgid_dir_inheritance(pair):
    res = []
    for L in (pair.uf, pair.k):
        os.chown(L.m("wdir"), 0, 1000)
        os.chmod(L.m("wdir"), 0o2775)
        write(L.m("wdir/f"), b"f")
        os.mkdir(L.m("wdir/d"))
        res.append((os.lstat(L.m("wdir/f")).st_gid, os.lstat(L.m("wdir/d")).st_gid,
                    oct(os.lstat(L.m("wdir/d")).st_mode)))
    assert res[0] == res[1]
    assert res[0][:2] == (1000, 1000)


def test_create_modes_follow_umask(mounted):
    old = os.umask(0o027)
    try:
        fd = os.open(mounted.m("dir/f"), os.O_CREAT | os.O_WRONLY, 0o777)
        os.close(fd)
        os.mkdir(mounted.m("dir/d"), 0o777)
        os.mkfifo(mounted.m("dir/p"), 0o666)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(mounted.m("dir/f")).st_mode) == 0o750
    assert stat.S_IMODE(os.lstat(mounted.m("dir/d")).st_mode) == 0o750
    assert stat.S_IMODE(os.lstat(mounted.m("dir/p")).st_mode) == 0o640
    assert stat.S_IMODE(os.lstat(mounted.u("dir/f")).st_mode) == 0o750


def test_write_by_other_user_clears_setid(tmp_path):
    with both(tmp_path) as (a, b):
        res = []
        for L in (a, b):
            write(L.m("tmp/s.bin"), b"#!/bin/sh\n")
            os.chmod(L.m("tmp/s.bin"), 0o6777)
            assert run_as(lambda: write("tmp/s.bin", b"x", os.O_WRONLY), cwd=L.mnt) == 0
            res.append(oct(stat.S_IMODE(os.lstat(L.m("tmp/s.bin")).st_mode)))
        assert res[0] == res[1]


def test_user_writes_own_lower_file(mounted_other):
    L = mounted_other
    assert run_as(lambda: write("owned.txt", b"mine\n", os.O_WRONLY | os.O_TRUNC), cwd=L.mnt) == 0
    st = os.lstat(L.u("owned.txt"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o600)
    assert read(L.u("owned.txt")) == b"mine\n"


def test_copy_up_of_sparse_file_stays_sparse(layers):
    p = os.path.join(layers.bottom, "sparse.bin")
    with open(p, "wb") as f:
        f.seek(1 << 30)
        f.write(b"end")
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        os.chmod(layers.m("sparse.bin"), 0o600)
        assert os.lstat(layers.m("sparse.bin")).st_size == (1 << 30) + 3
        with open(layers.m("sparse.bin"), "rb") as f:
            f.seek(1 << 30)
            assert f.read() == b"end"
    assert os.lstat(layers.u("sparse.bin")).st_blocks * 512 < (64 << 20)


def test_dotdot_after_rename(mounted):
    os.rename(mounted.m("wdir"), mounted.m("dir/sub/w"))
    ents = raw_readdir(mounted.m("dir/sub/w"))
    assert ents[".."][0] == os.stat(mounted.m("dir/sub")).st_ino
    assert os.stat(mounted.m("dir/sub/w/..")).st_ino == os.stat(mounted.m("dir/sub")).st_ino


def test_link_of_lower_symlink(mounted):
    os.link(mounted.m("sym_rel"), mounted.m("dir/sym_link"), follow_symlinks=False)
    a, b = os.lstat(mounted.m("sym_rel")), os.lstat(mounted.m("dir/sym_link"))
    assert stat.S_ISLNK(b.st_mode) and a.st_ino == b.st_ino and b.st_nlink == 2
    assert os.readlink(mounted.m("dir/sym_link")) == "dir/a.txt"


def test_xattr_on_merged_dir_keeps_it_merged(mounted):
    os.setxattr(mounted.m("merged"), "user.k", b"v")
    assert os.getxattr(mounted.m("merged"), "user.k") == b"v"
    assert set(os.listdir(mounted.m("merged"))) == {"t1.txt", "m1.txt", "o1.txt", "b1.txt"}
    assert xattr(mounted.u("merged"), "trusted.overlay.opaque") is None


def test_rewinddir_sees_current_state(mounted):
    """POSIX: after rewinddir the stream reflects the directory as it is now."""
    d = libc.opendir(os.fsencode(mounted.m("merged")))
    assert d
    try:
        def names():
            out = []
            while True:
                ent = libc.readdir(d)
                if not ent:
                    return out
                out.append(os.fsdecode(ent.contents.d_name))

        first = names()
        assert "late.txt" not in first
        write(mounted.m("merged/late.txt"), b"late")
        os.unlink(mounted.m("merged/t1.txt"))
        libc.rewinddir(d)
        second = names()
    finally:
        libc.closedir(d)
    assert "late.txt" in second
    assert "t1.txt" not in second


def test_create_via_fd_of_dir_that_was_renamed(mounted):
    fd = os.open(mounted.m("wdir/x"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(mounted.m("wdir"), mounted.m("w2"))
        nfd = os.open("new", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
        os.write(nfd, b"via fd")
        os.close(nfd)
    finally:
        os.close(fd)
    assert read(mounted.m("w2/x/new")) == b"via fd"
    assert set(os.listdir(mounted.m("w2/x"))) == {"y.txt", "new"}
    assert read(mounted.u("w2/x/new")) == b"via fd"


def test_rename_dir_onto_removed_dir_name(pair):
    views = []
    for L in (pair.uf, pair.k):
        os.rmdir(L.m("emptydir"))
        os.rename(L.m("wdir2"), L.m("emptydir"))
        for n in os.listdir(L.m("merged")):
            os.unlink(L.m("merged/" + n))
        os.rmdir(L.m("merged"))
        os.rename(L.m("wdir"), L.m("merged"))
        views.append((sorted(os.listdir(L.m("emptydir"))), sorted(os.listdir(L.m("merged"))),
                      os.path.exists(L.m("wdir2")), os.path.exists(L.m("wdir"))))
    assert views[0] == views[1]


def test_unlink_in_renamed_dir_survives_remount(layers):
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        os.rename(layers.m("wdir"), layers.m("w2"))
        os.unlink(layers.m("w2/z.txt"))
        os.rename(layers.m("w2/x"), layers.m("x2"))
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        assert os.listdir(layers.m("w2")) == []
        assert os.listdir(layers.m("x2")) == ["y.txt"]
        os.rmdir(layers.m("w2"))
        assert enoent(layers.m("w2"))


@pytest.mark.kernel
def test_hard_link_copy_up_readable_by_kernel_overlay(layers):
    with unionfs_mount(layers.kernel_lowers, layers.upper, layers.mnt, workdir=layers.work):
        with open(layers.m("other/two"), "ab") as f:
            f.write(b"+\n")
    kwork = os.path.join(layers.root, "kwork")
    os.mkdir(kwork)
    with kernel_overlay(layers.kernel_lowers, layers.upper, kwork, layers.mnt):
        sts = [os.lstat(layers.m(p)) for p in HL]
        assert len({st.st_ino for st in sts}) == 1
        assert all(st.st_nlink == 3 for st in sts)
        assert all(read(layers.m(p)) == layers.hl_data + b"+\n" for p in HL)


@pytest.mark.kernel
def test_redirect_in_lower_layer_like_kernel(tmp_path):
    from conftest import make_layers
    views = []
    for kind in ("uf", "k"):
        L = make_layers(str(tmp_path / kind))
        os.makedirs(os.path.join(L.mid, "renamed"))
        os.setxattr(os.path.join(L.mid, "renamed"), "trusted.overlay.redirect", b"/wdir")
        write(os.path.join(L.mid, "renamed", "added.txt"), b"added\n")
        os.mknod(os.path.join(L.mid, "wdir"), stat.S_IFCHR, os.makedev(0, 0))
        cm = (unionfs_mount(L.kernel_lowers, L.upper, L.mnt, workdir=L.work) if kind == "uf"
              else kernel_overlay(L.kernel_lowers, L.upper, L.work, L.mnt))
        with cm:
            views.append((sorted(os.listdir(L.m("renamed"))), os.path.exists(L.m("wdir")),
                          read(L.m("renamed/x/y.txt"))))
            os.rename(L.m("renamed"), L.m("again"))
            views.append((sorted(os.listdir(L.m("again"))), read(L.m("again/z.txt"))))
    assert views[:2] == views[2:]


def _direct_io(path: str, write_too: bool) -> bytes:
    fd = os.open(path, (os.O_RDWR if write_too else os.O_RDONLY) | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 8192)   # page-aligned
        if write_too:
            buf[:4096] = b"D" * 4096
            assert os.pwritev(fd, [memoryview(buf)[:4096]], 4096) == 4096
        n = os.preadv(fd, [buf], 0)
        return bytes(buf[:n])
    finally:
        os.close(fd)


def test_o_direct_like_kernel(pair):
    res = []
    for L in (pair.uf, pair.k):
        res.append((errno_of(lambda: _direct_io(L.m("big.bin"), False)),
                    errno_of(lambda: _direct_io(L.m("big.bin"), True))))
        if res[-1] == (0, 0):
            assert read(L.m("big.bin"))[4096:8192] == b"D" * 4096
            assert read(L.m("big.bin"))[:4096] == L.big[:4096]
    assert res[0] == res[1]


def drop_caches() -> None:
    """Make the kernel forget dentries and inodes, so the daemon sees forget and fresh lookups."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def test_identity_and_view_survive_forget(mounted):
    m = mounted.m
    os.rename(m("wdir"), m("dir/sub/w"))
    os.chmod(m("dir/a.txt"), 0o600)
    os.link(m("hl/p1"), m("merged/p3"))
    write(m("dir/sub/w/x/new"), b"new")
    paths = ("dir/sub/w", "dir/sub/w/x", "dir/sub/w/x/y.txt", "dir/sub/w/x/new", "dir/a.txt",
             "merged/p3", "hl/p1", "hl/p2", "other/two", "dir/sub")
    before = {p: os.lstat(m(p)).st_ino for p in paths}
    listing = {p: sorted(os.listdir(m(p))) for p in ("dir/sub/w", "dir/sub/w/x", "dir", "merged")}
    drop_caches()
    assert {p: os.lstat(m(p)).st_ino for p in paths} == before
    drop_caches()
    assert {p: sorted(os.listdir(m(p))) for p in listing} == listing
    drop_caches()
    os.rename(m("dir/sub/w/x"), m("x-again"))
    drop_caches()
    assert set(os.listdir(m("x-again"))) == {"y.txt", "new"}
    assert os.lstat(m("x-again/y.txt")).st_ino == before["dir/sub/w/x/y.txt"]
    assert os.lstat(m("merged/p3")).st_nlink == 3


def test_open_file_survives_forget_and_rename(mounted):
    fd = os.open(mounted.m("wdir/x/y.txt"), os.O_RDWR)
    try:
        os.rename(mounted.m("wdir"), mounted.m("w2"))
        drop_caches()
        os.pwrite(fd, b"W", 0)
        os.fsync(fd)
        assert os.fstat(fd).st_nlink == 1
    finally:
        os.close(fd)
    assert read(mounted.m("w2/x/y.txt")) == b"Wdir-y\n"
    assert read(mounted.u("w2/x/y.txt")) == b"Wdir-y\n"


def test_acl_and_mode_stay_in_sync_like_kernel(pair):
    res = []
    for L in (pair.uf, pair.k):
        p = L.m("rootfile.txt")
        os.chmod(p, 0o640)
        subprocess.run(["setfacl", "-m", "u:1000:rw", p], check=True)
        mode1 = oct(stat.S_IMODE(os.lstat(p).st_mode))
        os.chmod(p, 0o600)
        acl = subprocess.run(["getfacl", "-cpn", p], capture_output=True, text=True, check=True).stdout
        res.append((mode1, oct(stat.S_IMODE(os.lstat(p).st_mode)), acl))
    assert res[0] == res[1]


def test_xattr_on_symlink_like_kernel(pair):
    res = []
    for L in (pair.uf, pair.k):
        p = L.m("sym_abs")
        r1 = errno_of(lambda: os.setxattr(p, "trusted.t", b"1", follow_symlinks=False))
        r2 = errno_of(lambda: os.setxattr(p, "user.t", b"1", follow_symlinks=False))
        got = xattr(p, "trusted.t") if r1 == 0 else None
        res.append((r1, r2, got, os.readlink(p), stat.S_ISLNK(os.lstat(p).st_mode)))
    assert res[0] == res[1]


def test_root_dir_metadata(mounted):
    os.chmod(mounted.mnt, 0o711)
    assert stat.S_IMODE(os.stat(mounted.mnt).st_mode) == 0o711
    assert stat.S_IMODE(os.stat(mounted.upper).st_mode) == 0o711
    os.setxattr(mounted.mnt, "user.root", b"r")
    assert os.getxattr(mounted.mnt, "user.root") == b"r"
    assert errno_of(lambda: os.rmdir(mounted.mnt)) in (errno.EBUSY, errno.EINVAL)


def test_concurrent_writers_during_copy_up(mounted):
    import threading
    errors = []

    def writer(i):
        try:
            fd = os.open(mounted.m("big.bin"), os.O_WRONLY)
            try:
                os.pwrite(fd, b"%02d" % i * 512, i * 65536)
            finally:
                os.close(fd)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    data = read(mounted.m("big.bin"))
    assert len(data) == len(mounted.big)
    for i in range(16):
        assert data[i * 65536:i * 65536 + 1024] == b"%02d" % i * 512, i
    assert data[16 * 65536:] == mounted.big[16 * 65536:]
    assert read(mounted.u("big.bin")) == data


def test_mkdir_over_unlinked_file_like_kernel(pair):
    res = []
    for L in (pair.uf, pair.k):
        os.unlink(L.m("dir/a.txt"))
        os.mkdir(L.m("dir/a.txt"))
        write(L.m("dir/a.txt/f"), b"f")
        res.append((os.listdir(L.m("dir/a.txt")), xattr(L.u("dir/a.txt"), "trusted.overlay.opaque"),
                    sorted(os.listdir(L.m("dir")))))
    assert res[0] == res[1]


@pytest.mark.xfail("dont_mask" not in binding.load().fast_paths, strict=True,
                   reason="a stock pyfuse3 cannot ask for FUSE_CAP_DONT_MASK: the kernel applies the umask despite a default ACL")
def test_default_acl_create_like_kernel(pair):
    """With a default ACL on the parent the umask is not applied (POSIX.1e)."""
    res = []
    old = os.umask(0o022)
    try:
        for L in (pair.uf, pair.k):
            os.mkdir(L.m("dir/acl"))
            subprocess.run(["setfacl", "-d", "-m", "u:1000:rwx,g::rwx,o::---", L.m("dir/acl")], check=True)
            os.close(os.open(L.m("dir/acl/f"), os.O_CREAT | os.O_WRONLY, 0o666))
            os.mkdir(L.m("dir/acl/d"), 0o777)
            res.append([(oct(stat.S_IMODE(os.lstat(L.m(p)).st_mode)),
                         subprocess.run(["getfacl", "-cpn", L.m(p)], capture_output=True, text=True,
                                        check=True).stdout)
                        for p in ("dir/acl/f", "dir/acl/d")])
    finally:
        os.umask(old)
    assert res[0] == res[1]


def _getfacl(path: str) -> str:
    return subprocess.run(["getfacl", "-cpn", path], capture_output=True, text=True, check=True).stdout


def _setfacl(*args: str) -> None:
    subprocess.run(["setfacl", *args], check=True)


def test_named_user_acl_enforced_like_kernel(tmp_path):
    """The kernel checks a named user's ACL entry (it caches the ACL the daemon gives it):
    granted where the mode alone refuses, refused where the mode alone grants; a chmod
    narrows the mask, and the named entry with it."""
    with both(tmp_path) as (a, b):
        res = []
        for L in (a, b):
            write(L.m("tmp/granted"), b"g")
            os.chmod(L.m("tmp/granted"), 0o600)
            write(L.m("tmp/refused"), b"r")
            os.chmod(L.m("tmp/refused"), 0o644)
            _setfacl("-m", "u:1000:rw", L.m("tmp/granted"))
            _setfacl("-m", "u:1000:---", L.m("tmp/refused"))
            row = [run_as(lambda: write("tmp/granted", b"x", os.O_WRONLY), cwd=L.mnt),
                   run_as(lambda: read("tmp/refused"), cwd=L.mnt),
                   run_as(lambda: read("tmp/refused"), cwd=L.mnt, uid=1001, gid=1001)]
            os.chmod(L.m("tmp/granted"), 0o640)  # the mask becomes r--
            row += [run_as(lambda: write("tmp/granted", b"y", os.O_WRONLY), cwd=L.mnt),
                    run_as(lambda: read("tmp/granted"), cwd=L.mnt),
                    oct(stat.S_IMODE(os.lstat(L.m("tmp/granted")).st_mode)), _getfacl(L.m("tmp/granted"))]
            _setfacl("-m", "m::rw", L.m("tmp/granted"))  # and the mode's group bits follow the mask
            row += [oct(stat.S_IMODE(os.lstat(L.m("tmp/granted")).st_mode)),
                    run_as(lambda: write("tmp/granted", b"z", os.O_WRONLY), cwd=L.mnt),
                    _getfacl(L.u("tmp/granted"))]
            res.append(row)
        assert res[0] == res[1]
        assert res[0][:5] == [0, errno.EACCES, 0, errno.EACCES, 0]


def test_lower_file_acl_survives_copy_up_like_kernel(tmp_path):
    """A lower file's ACL is copied up with it and goes on being enforced."""
    from conftest import make_layers
    res = []
    layouts = [make_layers(str(tmp_path / n)) for n in ("uf", "k")]
    for L in layouts:
        os.chmod(os.path.join(L.bottom, "wdir/z.txt"), 0o640)
        _setfacl("-m", "u:1000:r,u:1001:rw", os.path.join(L.bottom, "wdir/z.txt"))
        _setfacl("-d", "-m", "u:1000:rwx", os.path.join(L.bottom, "wdir"))
    a, b = layouts
    with kernel_overlay(b.kernel_lowers, b.upper, b.work, b.mnt):
        with unionfs_mount(a.kernel_lowers, a.upper, a.mnt, workdir=a.work, options=("allow_other",)):
            for L in (a, b):
                row = [_getfacl(L.m("wdir/z.txt")),
                       run_as(lambda: read("wdir/z.txt"), cwd=L.mnt),
                       run_as(lambda: write("wdir/z.txt", b"x", os.O_WRONLY), cwd=L.mnt)]
                write(L.m("wdir/z.txt"), b"appended", os.O_WRONLY | os.O_APPEND)  # copy-up
                row += [_getfacl(L.m("wdir/z.txt")), _getfacl(L.u("wdir/z.txt")), _getfacl(L.u("wdir")),
                        run_as(lambda: read("wdir/z.txt"), cwd=L.mnt),
                        run_as(lambda: write("wdir/z.txt", b"y", os.O_WRONLY), cwd=L.mnt, uid=1001, gid=1001),
                        run_as(lambda: write("wdir/z.txt", b"y", os.O_WRONLY), cwd=L.mnt)]
                res.append(row)
    assert res[0] == res[1]
    assert res[0][1:3] == [0, errno.EACCES] and res[0][-3:] == [0, 0, errno.EACCES], res[0]


@pytest.mark.xfail("dont_mask" not in binding.load().fast_paths, strict=True,
                   reason="a stock pyfuse3 cannot ask for FUSE_CAP_DONT_MASK: the kernel applies the umask despite a default ACL")
def test_default_acl_over_whiteout_and_copied_up_parent_like_kernel(pair):
    """A new name over a whiteout is built in work/, which has no default ACL: it still
    inherits its parent's; so does one in a lower directory copied up for it, and a
    directory passes the default ACL on."""
    res = []
    old = os.umask(0o077)
    try:
        for L in (pair.uf, pair.k):
            _setfacl("-d", "-m", "u:1000:rx,g::rwx,o::r", L.m("dir"))  # copies dir up
            os.unlink(L.m("dir/a.txt"))
            os.close(os.open(L.m("dir/a.txt"), os.O_CREAT | os.O_WRONLY, 0o664))  # over its whiteout
            os.mkdir(L.m("dir/newsub"), 0o750)
            os.close(os.open(L.m("dir/newsub/f"), os.O_CREAT | os.O_WRONLY, 0o666))
            os.mkfifo(L.m("dir/p"), 0o644)
            res.append([(oct(stat.S_IMODE(os.lstat(L.m(p)).st_mode)), _getfacl(L.m(p)), _getfacl(L.u(p)))
                        for p in ("dir/a.txt", "dir/newsub", "dir/newsub/f", "dir/p")])
    finally:
        os.umask(old)
    assert res[0] == res[1]


def test_umask_without_default_acl_like_kernel(pair):
    """Where the parent has no default ACL the daemon applies the caller's umask, which the
    kernel hands it (DONT_MASK) instead of applying it itself."""
    res = []
    old = os.umask(0o027)
    try:
        for L in (pair.uf, pair.k):
            os.close(os.open(L.m("dir/new"), os.O_CREAT | os.O_WRONLY, 0o777))
            os.mkdir(L.m("dir/newd"), 0o777)
            os.mknod(L.m("dir/newp"), stat.S_IFIFO | 0o666)
            os.unlink(L.m("dir/a.txt"))
            os.mkdir(L.m("dir/a.txt"), 0o777)  # over a whiteout, through work/
            res.append([oct(os.lstat(L.m(p)).st_mode) for p in ("dir/new", "dir/newd", "dir/newp", "dir/a.txt")])
    finally:
        os.umask(old)
    assert res[0] == res[1]
    assert res[0][0] == oct(stat.S_IFREG | 0o750)


def test_long_symlink_targets_like_kernel(pair):
    res = []
    for L in (pair.uf, pair.k):
        r1 = errno_of(lambda: os.symlink("t" * 4095, L.m("long1")))
        r2 = errno_of(lambda: os.symlink("t" * 4096, L.m("long2")))
        res.append((r1, r2, os.readlink(L.m("long1")) == "t" * 4095 if r1 == 0 else None))
    assert res[0] == res[1]


def test_special_modes_like_kernel(pair):
    res = []
    old = os.umask(0)
    try:
        for L in (pair.uf, pair.k):
            os.mkdir(L.m("sticky"), 0o1777)
            os.mknod(L.m("blk"), stat.S_IFBLK | 0o640, os.makedev(7, 0))
            fd = os.open(L.m("suidfile"), os.O_CREAT | os.O_WRONLY, 0o4755)
            os.close(fd)
            res.append([(oct(st.st_mode), st.st_rdev) for st in
                        (os.lstat(L.m(p)) for p in ("sticky", "blk", "suidfile"))])
    finally:
        os.umask(old)
    assert res[0] == res[1]


def test_lower_layers_untouched_by_reads(tmp_path):
    """Reading and listing through the mount changes nothing in a lower, atimes included."""
    res = []
    with both(tmp_path, options=()) as (a, b):
        for L in (a, b):
            watch = [os.path.join(L.bottom, p) for p in ("times.txt", "dir", "wdir", "hl/one", "big.bin")]
            before = [os.lstat(p).st_atime_ns for p in watch]
            read(L.m("times.txt"))
            read(L.m("big.bin"))
            os.listdir(L.m("dir"))
            os.listdir(L.m("wdir"))
            read(L.m("other/two"))
            os.chmod(L.m("hl/p1"), 0o600)   # a hard-link copy-up
            res.append([os.lstat(p).st_atime_ns == t for p, t in zip(watch, before)])
    assert res[1] == [True] * 5, "kernel reference"
    assert res[0] == res[1]


def test_open_file_replaced_by_rename(mounted):
    fd_low = os.open(mounted.m("dir/b.txt"), os.O_RDONLY)
    fd_up = os.open(mounted.m("shadow.txt"), os.O_RDWR)
    try:
        os.rename(mounted.m("dir/a.txt"), mounted.m("dir/b.txt"))
        os.rename(mounted.m("dir/top.txt"), mounted.m("shadow.txt"))
        assert os.pread(fd_low, 100, 0) == b"mid-b\n"
        assert os.pread(fd_up, 100, 0) == b"top-shadow\n"
        os.pwrite(fd_up, b"T", 0)
        assert os.fstat(fd_up).st_nlink == 0
    finally:
        r1 = errno_of(lambda: os.close(fd_low))
        r2 = errno_of(lambda: os.close(fd_up))
    assert (r1, r2) == (0, 0)
    assert read(mounted.m("dir/b.txt")) == b"bottom-a\n"
    assert read(mounted.m("shadow.txt")) == b"top\n"


@pytest.mark.xfail("fallocate" not in binding.load().fast_paths, strict=True,
                   reason="stock pyfuse3 has no fallocate handler: every mode gives EOPNOTSUPP")
def test_fallocate_modes_like_kernel(pair):
    res = []
    for L in (pair.uf, pair.k):
        fd = os.open(L.m("big.bin"), os.O_RDWR)
        try:
            r0 = errno_of(lambda: fallocate(fd, 0, len(L.big), 4096))
            r1 = errno_of(lambda: fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192))
            r2 = errno_of(lambda: fallocate(fd, FALLOC_FL_KEEP_SIZE, len(L.big), 1 << 20))
        finally:
            os.close(fd)
        data = read(L.m("big.bin"))
        res.append((r0, r1, r2, len(data), data[4096:12288] == b"\0" * 8192))
    assert res[0] == res[1]


def test_create_and_remove_over_oci_whiteout(mounted):
    write(mounted.m("ocigone.txt"), b"new\n")
    assert read(mounted.m("ocigone.txt")) == b"new\n"
    os.unlink(mounted.m("ocigone.txt"))
    assert enoent(mounted.m("ocigone.txt"))
    os.mkdir(mounted.m("dir/hidden.txt"))
    assert os.listdir(mounted.m("dir/hidden.txt")) == []
    os.rmdir(mounted.m("dir/hidden.txt"))
    assert enoent(mounted.m("dir/hidden.txt"))
    # an OCI-opaque dir stays opaque after copy-up and after a rename
    write(mounted.m("ociopq/added"), b"a")
    assert set(os.listdir(mounted.m("ociopq"))) == {"new.txt", "added"}
    os.rename(mounted.m("ociopq"), mounted.m("ociopq2"))
    assert set(os.listdir(mounted.m("ociopq2"))) == {"new.txt", "added"}


def test_user_moves_own_file_out_of_sticky_dir(mounted_other):
    L = mounted_other
    assert run_as(lambda: os.rename("tmp/userfile", "userdir/moved"), cwd=L.mnt) == 0
    assert read(L.m("userdir/moved")) == b"user in sticky\n"
    st = os.lstat(L.u("userdir/moved"))
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert run_as(lambda: os.rename("userdir", "userdir2"), cwd=L.mnt) == errno.EACCES


def _tree(mnt: str) -> dict:
    def describe(p: str, st: os.stat_result) -> tuple:
        data = read(p) if stat.S_ISREG(st.st_mode) else (
            os.readlink(p) if stat.S_ISLNK(st.st_mode) else None)
        return (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, data,
                st.st_nlink if stat.S_ISREG(st.st_mode) else 0)
    return snapshot(mnt, describe)


@pytest.mark.kernel
def test_upper_format_read_by_kernel_after_many_ops(layers):
    """Whatever unionfs leaves in the upper, a kernel overlay over it shows the same view."""
    m = layers.m
    with unionfs_mount(layers.kernel_lowers, layers.upper, layers.mnt, workdir=layers.work):
        os.rename(m("dir"), m("dir-moved"))
        os.rename(m("dir-moved/sub"), m("merged/sub-moved"))
        os.unlink(m("dir-moved/b.txt"))
        write(m("merged/sub-moved/deep.txt"), b"changed deep\n")
        renameat2(m("wdir"), m("wdir2"), RENAME_EXCHANGE)
        os.rename(m("opq"), m("opq2"))
        os.mkdir(m("opq"))
        os.chmod(m("hl/one"), 0o640)
        os.unlink(m("other/sub/three"))
        os.link(m("hl/p1"), m("dir-moved/p-link"))
        os.symlink("/nowhere", m("merged/sub-moved/ln"))
        os.mkfifo(m("wdir/fifo2"))
        for n in os.listdir(m("emptydir")):
            os.unlink(m("emptydir/" + n))
        os.rmdir(m("emptydir"))
        os.rename(m("shadow.txt"), m("emptydir"))
        os.setxattr(m("xattr.txt"), "user.more", b"1")
        view = _tree(layers.mnt)
    kwork = os.path.join(layers.root, "kwork")
    os.mkdir(kwork)
    with kernel_overlay(layers.kernel_lowers, layers.upper, kwork, layers.mnt):
        kview = _tree(layers.mnt)
        assert os.getxattr(m("xattr.txt"), "user.more") == b"1"
    diff = {k: (view.get(k), kview.get(k)) for k in set(view) | set(kview) if view.get(k) != kview.get(k)}
    assert diff == {}


def test_max_length_names_in_lower(layers):
    name = "n" * 255
    write(os.path.join(layers.bottom, "dir", name), b"long\n")
    os.makedirs(os.path.join(layers.bottom, "d" * 255, "e" * 255))
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        assert read(layers.m("dir/" + name)) == b"long\n"
        assert name in os.listdir(layers.m("dir"))
        os.rename(layers.m("d" * 255), layers.m("short"))
        assert os.listdir(layers.m("short")) == ["e" * 255]
        os.unlink(layers.m("dir/" + name))
        assert enoent(layers.m("dir/" + name))
        assert is_whiteout(layers.u("dir/" + name))


def test_concurrent_ops_on_hard_link_names(layers):
    """Copy-ups of one lower inode started through several names at once agree."""
    import threading
    with open(os.path.join(layers.bottom, "hl/one"), "wb") as f:
        f.write(b"z" * (64 << 20))   # big enough for the copy-ups to overlap
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        errors = []
        ops = [lambda: os.rename(layers.m("hl/one"), layers.m("one-moved")),
               lambda: os.chmod(layers.m("other/two"), 0o600),
               lambda: os.setxattr(layers.m("other/sub/three"), "user.t", b"1"),
               lambda: os.link(layers.m("other/two"), layers.m("four"))]

        def run(fn):
            try:
                fn()
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        threads = [threading.Thread(target=run, args=(fn,)) for fn in ops]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        names = ("one-moved", "other/two", "other/sub/three", "four")
        sts = [os.lstat(layers.m(p)) for p in names]
        assert len({st.st_ino for st in sts}) == 1
        assert all(st.st_nlink == 4 for st in sts)
        assert all(stat.S_IMODE(st.st_mode) == 0o600 for st in sts)
        assert os.getxattr(layers.m("four"), "user.t") == b"1"
        ust = [os.lstat(layers.u(p)) for p in names]
        assert len({st.st_ino for st in ust}) == 1 and ust[0].st_size == 64 << 20
        assert os.listdir(os.path.join(layers.work, "work")) == []


def test_dirty_data_reaches_upper_by_unmount(layers):
    data = os.urandom(8 << 20)
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        with open(layers.m("dir/new.bin"), "wb") as f:
            f.write(data)
        with open(layers.m("big.bin"), "r+b") as f:
            with mmap.mmap(f.fileno(), 0) as mm:
                mm[:4] = b"DIRT"      # no msync: only the unmount writes it back
    assert read(layers.u("dir/new.bin")) == data
    assert read(layers.u("big.bin"))[:4] == b"DIRT"


def test_exec_from_mount(layers):
    write(os.path.join(layers.bottom, "run.sh"), b"#!/bin/sh\necho ran\n")
    os.chmod(os.path.join(layers.bottom, "run.sh"), 0o755)
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        assert subprocess.run([layers.m("run.sh")], capture_output=True, text=True).stdout == "ran\n"
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work,
                       options=("noexec",)):
        assert errno_of(lambda: subprocess.run([layers.m("run.sh")])) == errno.EACCES


@pytest.mark.xfail("lseek" not in binding.load().fast_paths, strict=True,
                   reason="stock pyfuse3 has no lseek handler: SEEK_HOLE/SEEK_DATA do not see holes")
@pytest.mark.kernel
def test_seek_data_hole_like_kernel(tmp_path):
    from conftest import make_layers
    M = 1 << 20
    res = []
    for kind in ("uf", "k"):
        L = make_layers(str(tmp_path / kind))
        with open(os.path.join(L.bottom, "sparse2.bin"), "wb") as f:
            f.write(b"d" * 4096)
            f.seek(4 * M)
            f.write(b"e" * 4096)
        cm = (unionfs_mount(L.kernel_lowers, L.upper, L.mnt, workdir=L.work) if kind == "uf"
              else kernel_overlay(L.kernel_lowers, L.upper, L.work, L.mnt))
        with cm:
            seen = []
            # the lower file; its copy-up written in its hole (asked only past the first
            # MiB: the kernel's copy-up copies the first MiB whole, holes and all); a file
            # made sparse through the mount, synced, then one not synced (its data may be
            # only in the kernel's writeback cache when lseek asks)
            for flags, name, at, frm, sync in (
                    (os.O_RDONLY, "sparse2.bin", None, 0, False),
                    (os.O_RDWR, "sparse2.bin", 5 * M // 2, 2 * M, True),
                    (os.O_RDWR | os.O_CREAT, "sparse3.bin", 3 * M, 0, True),
                    (os.O_RDWR | os.O_CREAT, "sparse4.bin", 3 * M, M, False)):
                fd = os.open(L.m(name), flags, 0o644)
                try:
                    if at is not None:
                        os.pwrite(fd, b"f" * 4096, at)
                        if sync:
                            os.fsync(fd)
                    seen.append((os.lseek(fd, frm, os.SEEK_HOLE), os.lseek(fd, frm + 8192, os.SEEK_DATA),
                                 errno_of(lambda: os.lseek(fd, 8 * M, os.SEEK_DATA))))
                finally:
                    os.close(fd)
            res.append(seen)
    assert res[1] == [(4096, 4 * M, errno.ENXIO), (2 * M, 5 * M // 2, errno.ENXIO),
                      (0, 3 * M, errno.ENXIO), (M, 3 * M, errno.ENXIO)], "kernel reference"
    assert res[0] == res[1]


def test_user_xattr_permissions_like_kernel(tmp_path):
    res = []
    with both(tmp_path) as (a, b):
        for L in (a, b):
            res.append((
                run_as(lambda: os.setxattr("owned.txt", "user.mine", b"1"), cwd=L.mnt),
                run_as(lambda: os.setxattr("rootfile.txt", "user.x", b"1"), cwd=L.mnt),
                run_as(lambda: os.setxattr("owned.txt", "trusted.x", b"1"), cwd=L.mnt),
                run_as(lambda: os.getxattr("xattr.txt", "trusted.secret"), cwd=L.mnt),
                run_as(lambda: os.getxattr("xattr.txt", "user.color"), cwd=L.mnt),
            ))
            # what an unprivileged listxattr shows, read back through a pipe
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(r)
                    os.chdir(L.mnt)
                    os.setgroups([])
                    os.setgid(1000)
                    os.setuid(1000)
                    os.write(w, ",".join(sorted(os.listxattr("xattr.txt"))).encode())
                finally:
                    os._exit(0)
            os.close(w)
            with os.fdopen(r) as f:
                res[-1] += (f.read(),)
            os.waitpid(pid, 0)
    assert res[1][-1] == "user.color", "kernel reference"
    assert res[0] == res[1]


def test_links_after_first_name_removed(mounted):
    m = mounted.m
    write(m("dir/a1"), b"one")
    os.link(m("dir/a1"), m("merged/a2"))
    os.unlink(m("dir/a1"))
    os.link(m("merged/a2"), m("wdir/a3"))
    os.chmod(m("wdir/a3"), 0o600)
    write(m("merged/a2"), b"two", os.O_WRONLY | os.O_TRUNC)
    st2, st3 = os.lstat(m("merged/a2")), os.lstat(m("wdir/a3"))
    assert st2.st_ino == st3.st_ino and st2.st_nlink == st3.st_nlink == 2
    assert stat.S_IMODE(st2.st_mode) == 0o600
    assert read(m("wdir/a3")) == b"two"
    os.rename(m("wdir/a3"), m("a4"))
    assert read(m("a4")) == b"two"
    assert os.lstat(mounted.u("a4")).st_ino == os.lstat(mounted.u("merged/a2")).st_ino


def test_same_for_lower_hard_link_after_first_name_removed(mounted):
    m = mounted.m
    os.unlink(m("hl/one"))
    os.link(m("other/two"), m("dir/again"))
    os.chmod(m("other/sub/three"), 0o600)
    sts = [os.lstat(m(p)) for p in ("other/two", "other/sub/three", "dir/again")]
    assert len({st.st_ino for st in sts}) == 1
    assert all(st.st_nlink == 3 and stat.S_IMODE(st.st_mode) == 0o600 for st in sts)
    assert enoent(m("hl/one"))


@pytest.mark.kernel
def test_hard_link_aliases_below_renamed_dirs(layers):
    m = layers.m
    with unionfs_mount(layers.kernel_lowers, layers.upper, layers.mnt, workdir=layers.work):
        os.rename(m("other"), m("o2"))
        os.rename(m("o2/sub"), m("dir/s2"))
        os.chmod(m("hl/one"), 0o600)
        names = ("hl/one", "o2/two", "dir/s2/three")
        sts = [os.lstat(m(p)) for p in names]
        assert len({st.st_ino for st in sts}) == 1
        assert all(st.st_nlink == 3 and stat.S_IMODE(st.st_mode) == 0o600 for st in sts)
        write(m("dir/s2/three"), b"via three\n")
        assert read(m("o2/two")) == b"via three\n"
    kwork = os.path.join(layers.root, "kwork")
    os.mkdir(kwork)
    with kernel_overlay(layers.kernel_lowers, layers.upper, kwork, layers.mnt):
        sts = [os.lstat(m(p)) for p in names]
        assert len({st.st_ino for st in sts}) == 1
        assert read(m("hl/one")) == b"via three\n"


@pytest.mark.kernel
def test_reads_upper_written_by_kernel_overlay(layers):
    """The other direction: unionfs shows what a kernel overlay left in an upper."""
    m = layers.m
    kwork = os.path.join(layers.root, "kwork")
    os.mkdir(kwork)
    with kernel_overlay(layers.kernel_lowers, layers.upper, kwork, layers.mnt):
        os.rename(m("dir"), m("dir-moved"))
        os.rename(m("dir-moved/sub"), m("merged/sub-moved"))
        os.rename(m("wdir/x"), m("wdir/x2"))
        os.unlink(m("dir-moved/b.txt"))
        write(m("merged/sub-moved/deep.txt"), b"changed deep\n")
        renameat2(m("wdir"), m("wdir2"), RENAME_EXCHANGE)
        os.rename(m("opq"), m("opq2"))
        os.mkdir(m("opq"))
        os.symlink("/nowhere", m("merged/sub-moved/ln"))
        for n in os.listdir(m("emptydir")):
            os.unlink(m("emptydir/" + n))
        os.rmdir(m("emptydir"))
        os.rename(m("shadow.txt"), m("emptydir"))
        os.rmdir(m("opq"))
        os.mkdir(m("opq"))
        os.setxattr(m("xattr.txt"), "user.more", b"1")
        kview = _tree(layers.mnt)
    with unionfs_mount(layers.kernel_lowers, layers.upper, layers.mnt, workdir=layers.work):
        view = _tree(layers.mnt)
        assert os.getxattr(m("xattr.txt"), "user.more") == b"1"
    diff = {k: (view.get(k), kview.get(k)) for k in set(view) | set(kview) if view.get(k) != kview.get(k)}
    assert diff == {}


def test_daemon_never_follows_layer_symlinks(layers):
    os.symlink("../etc", os.path.join(layers.bottom, "linkdir"))
    daemon_side = os.path.join(layers.root, "layers", "etc", "passwd")
    before = os.lstat(daemon_side)
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        m = layers.m
        assert stat.S_ISLNK(os.lstat(m("linkdir")).st_mode)
        assert read(m("linkdir/passwd")) == b"caller-side passwd\n"
        write(m("linkdir/passwd"), b"written by caller\n")
        assert read(os.path.join(layers.root, "etc", "passwd")) == b"written by caller\n"
        os.lchown(m("dir/sym_out"), 1000, 1000)
        os.utime(m("dir/sym_out"), ns=(5, 6), follow_symlinks=False)
        os.setxattr(m("dir/sym_out"), "trusted.t", b"1", follow_symlinks=False)
        assert stat.S_ISLNK(os.lstat(mounted_u := layers.u("dir/sym_out")).st_mode)
        assert os.lstat(mounted_u).st_uid == 1000
    after = os.lstat(daemon_side)
    assert (after.st_uid, after.st_mtime_ns, after.st_size) == (before.st_uid, before.st_mtime_ns, before.st_size)
    assert xattr(daemon_side, "trusted.t") is None
    assert read(daemon_side) == b"daemon-side passwd\n"
    assert not os.path.lexists(layers.u("linkdir"))


def test_wh_prefixed_names_created_through_mount_are_plain_files(mounted):
    """The upper is kernel format: a `.wh.NAME` made through the mount is an ordinary file."""
    write(mounted.m(".wh.shadow.txt"), b"plain\n")
    os.mkdir(mounted.m("dir/.wh..wh..opq"))
    assert read(mounted.m(".wh.shadow.txt")) == b"plain\n"
    assert ".wh.shadow.txt" in os.listdir(mounted.mnt)
    assert read(mounted.m("shadow.txt")) == b"top-shadow\n"
    assert ".wh..wh..opq" in os.listdir(mounted.m("dir"))
    assert "a.txt" in os.listdir(mounted.m("dir"))
    os.unlink(mounted.m(".wh.shadow.txt"))
    assert enoent(mounted.m(".wh.shadow.txt"))


def test_type_changes_like_kernel(pair):
    views = []
    for L in (pair.uf, pair.k):
        m = L.m
        subprocess.run(["rm", "-rf", m("wdir")], check=True)
        write(m("wdir"), b"now a file\n")
        os.unlink(m("wdir"))
        os.mkdir(m("wdir"))
        os.unlink(m("shadow.txt"))
        os.mkdir(m("shadow.txt"))
        write(m("shadow.txt/inside"), b"i")
        os.symlink("target", m("dir/b.txt.tmp"))
        os.rename(m("dir/b.txt.tmp"), m("dir/b.txt"))
        os.rename(m("merged/t1.txt"), m("emptydir/t1.txt"))
        os.rename(m("emptydir"), m("merged/e"))
        views.append(_tree(L.mnt))
    a, b = views
    assert {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)} == {}


def test_large_xattr_values_and_many_names(mounted):
    p = mounted.m("dir/a.txt")
    big = bytes(range(256)) * 12   # 3 KiB
    os.setxattr(p, "user.big", big)
    for i in range(20):
        os.setxattr(p, f"user.n{i:02d}", b"%d" % i)
    assert os.getxattr(p, "user.big") == big
    names = set(os.listxattr(p))
    assert {"user.big"} | {f"user.n{i:02d}" for i in range(20)} <= names
    assert xattr(mounted.u("dir/a.txt"), "user.big") == big
    os.setxattr(p, "user.empty", b"")
    assert os.getxattr(p, "user.empty") == b""


def test_copy_up_racing_parent_rename(layers):
    import threading
    data = os.urandom(1 << 20) * 48
    with open(os.path.join(layers.bottom, "wdir", "x", "big"), "wb") as f:
        f.write(data)
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        m = layers.m
        os.stat(m("wdir/x/big"))
        errors = []

        def run(fn):
            try:
                fn()
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        t1 = threading.Thread(target=run, args=(lambda: os.chmod(m("wdir/x/big"), 0o600),))
        t2 = threading.Thread(target=run, args=(lambda: (time.sleep(0.02), os.rename(m("wdir"), m("w2"))),))
        t1.start()
        t2.start()
        t1.join()
        t2.join()
        assert errors == []
        assert enoent(m("wdir"))
        assert stat.S_IMODE(os.lstat(m("w2/x/big")).st_mode) == 0o600
        assert read(m("w2/x/big")) == data
        assert set(os.listdir(m("w2/x"))) == {"y.txt", "big"}
        assert os.listdir(os.path.join(layers.work, "work")) == []
    assert is_whiteout(layers.u("wdir"))
    assert read(layers.u("w2/x/big")) == data


def test_remove_trees_after_renames_like_kernel(pair):
    views = []
    for L in (pair.uf, pair.k):
        m = L.m
        os.rename(m("dir"), m("wdir2/dir-in"))
        os.unlink(m("wdir2/dir-in/sub/deep.txt"))
        subprocess.run(["rm", "-rf", m("wdir2/dir-in/sub")], check=True)
        os.rename(m("merged"), m("wdir2/dir-in/merged"))
        subprocess.run(["rm", "-rf", m("wdir2/dir-in/merged")], check=True)
        os.mkdir(m("merged"))
        os.mkdir(m("wdir2/dir-in/sub"))
        views.append((_tree(L.mnt), sorted(os.listdir(m("merged"))), sorted(os.listdir(m("wdir2/dir-in/sub")))))
    (a, *ra), (b, *rb) = views
    assert {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)} == {}
    assert ra == rb == [[], []]


def test_view_survives_remount(layers):
    m = layers.m
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        os.rename(m("dir"), m("wdir2/dir-in"))
        subprocess.run(["rm", "-rf", m("wdir2/dir-in/sub")], check=True)
        os.rename(m("merged"), m("m2"))
        os.mkdir(m("merged"))
        os.unlink(m("ociopq/new.txt"))
        write(m("ocigone.txt"), b"back\n")
        os.link(m("hl/p1"), m("m2/p-link"))
        os.chmod(m("other/two"), 0o604)
        renameat2(m("wdir"), m("opq"), RENAME_EXCHANGE)
        before = _tree(layers.mnt)
        inos = {p: os.lstat(os.path.join(layers.mnt, p)).st_ino for p in before}
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        after = _tree(layers.mnt)
        assert {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                if before.get(k) != after.get(k)} == {}
        assert {p: os.lstat(os.path.join(layers.mnt, p)).st_ino for p in after} == inos
