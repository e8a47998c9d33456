"""Behaviour through a real unionfs mount: one focused test per behaviour.

Fixtures (conftest.py): `mounted` is a live mount over four lowers (one with
OCI whiteouts) with an upper and an explicit workdir; `pair` is a unionfs
mount and a kernel overlay mount over two copies of the kernel-compatible
lowers, for the cases where the kernel's answer is the reference.
Every mount is unmounted by the helpers in mounting.py, even on failure.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import mmap
import os
import re
import socket
import stat
import subprocess
import time
from typing import Callable, Sequence

import pytest

from helpers.libc import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, RENAME_EXCHANGE, RENAME_NOREPLACE,
                          UTIME_NOW, UTIME_OMIT, check, fallocate, libc, renameat2,
                          utimensat)
from mounting import kernel_overlay, unionfs_mount
from unit_helpers import is_whiteout, xattr
from unionfs import binding

pytestmark = [pytest.mark.mount]

# -- helpers ------------------------------------------------------------------------------

def raw_readdir(path: str) -> dict[str, tuple[int, int]]:
    """name -> (d_ino, d_type) for every entry, '.' and '..' included."""
    d = libc.opendir(os.fsencode(path))
    if not d:
        check(-1, "opendir", path)
    out: dict[str, tuple[int, int]] = {}
    try:
        while True:
            ent = libc.readdir(d)
            if not ent:
                break
            name = os.fsdecode(ent.contents.d_name)
            assert name not in out, f"{name!r} listed twice in {path}"
            out[name] = (ent.contents.d_ino, ent.contents.d_type)
    finally:
        libc.closedir(d)
    return out


def errno_of(fn: Callable[[], object]) -> int:
    """0 if fn() succeeds, else the errno of the OSError it raises."""
    try:
        fn()
    except OSError as e:
        return e.errno or -1
    return 0


def run_as(fn: Callable[[], object], cwd: str, uid: int = 1000, gid: int = 1000,
           groups: Sequence[int] = ()) -> int:
    """Run fn in a forked child as uid:gid (and supplementary *groups*) with cwd (entered
    while still root, since the tmp_path ancestors are 0700); 0 if it returned, else the
    errno it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            os.chdir(cwd)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            fn()
        except OSError as e:
            code = e.errno or 255
        except BaseException:
            code = 254
        os.write(w, str(code).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return int(out) if out else 253


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write(path: str, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def enoent(path: str) -> bool:
    return errno_of(lambda: os.lstat(path)) == errno.ENOENT


def all_names(top: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        out += dirnames + filenames
    return out


def other_sees(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30)


ROOT_NAMES = {"dir", "shadow.txt", "opq", "ociopq", "merged", "hl", "other", "sym_rel", "sym_abs",
              "sym_dangling", "fifo", "null", "xattr.txt", "owned.txt", "suid.bin", "rootfile.txt",
              "times.txt", "big.bin", "tmp", "userdir", "emptydir", "wdir", "wdir2"}


# -- lookup and readdir -------------------------------------------------------------------

def test_lookup_through_layers(mounted):
    m = mounted.m
    assert read(m("shadow.txt")) == b"top-shadow\n"
    assert read(m("dir/b.txt")) == b"mid-b\n"
    assert read(m("dir/a.txt")) == b"bottom-a\n"
    assert read(m("dir/top.txt")) == b"top\n"
    assert read(m("dir/sub/deep.txt")) == b"deep\n"
    assert read(m("big.bin")) == mounted.big


def test_merged_readdir(mounted):
    assert set(os.listdir(mounted.mnt)) == ROOT_NAMES
    assert set(os.listdir(mounted.m("merged"))) == {"t1.txt", "m1.txt", "o1.txt", "b1.txt"}
    assert set(os.listdir(mounted.m("dir"))) == {"a.txt", "b.txt", "top.txt", "sub", "sym_out"}


def test_readdir_dot_dotdot_and_d_ino(mounted):
    for rel, parent in (("dir", ""), ("dir/sub", "dir"), ("merged", ""), ("hl", "")):
        ents = raw_readdir(mounted.m(rel))
        assert "." in ents and ".." in ents, ents
        assert ents["."][0] == os.stat(mounted.m(rel)).st_ino, rel
        assert ents[".."][0] == os.stat(mounted.m(parent)).st_ino, rel
        for name, (d_ino, d_type) in ents.items():
            if name in (".", ".."):
                continue
            st = os.lstat(os.path.join(mounted.m(rel), name))
            assert d_ino == st.st_ino, (rel, name)
            if d_type:  # DT_UNKNOWN allowed, a wrong type is not
                assert d_type == stat.S_IFMT(st.st_mode) >> 12, (rel, name)


def test_root_dot_inode_and_children(mounted):
    write(mounted.m("new.txt"), b"n")
    os.mkfifo(mounted.m("newfifo"))
    ents = raw_readdir(mounted.mnt)
    assert ents["."][0] == os.stat(mounted.mnt).st_ino
    assert ".." in ents
    for name, (d_ino, d_type) in ents.items():
        if name in (".", ".."):
            continue
        st = os.lstat(mounted.m(name))
        assert d_ino == st.st_ino, name
        if d_type:
            assert d_type == stat.S_IFMT(st.st_mode) >> 12, name


def test_lower_whiteouts_never_visible(mounted):
    assert enoent(mounted.m("gone.txt"))
    assert enoent(mounted.m("dir/gone2.txt"))
    names = all_names(mounted.mnt)
    assert "gone.txt" not in names and "gone2.txt" not in names


def test_upper_whiteout_never_visible(mounted):
    os.unlink(mounted.m("dir/a.txt"))
    assert is_whiteout(mounted.u("dir/a.txt"))
    assert enoent(mounted.m("dir/a.txt"))
    assert "a.txt" not in os.listdir(mounted.m("dir"))
    assert "a.txt" not in raw_readdir(mounted.m("dir"))


def test_oci_whiteouts_respected(mounted):
    assert enoent(mounted.m("ocigone.txt"))
    assert enoent(mounted.m("dir/hidden.txt"))
    assert set(os.listdir(mounted.m("ociopq"))) == {"new.txt"}
    assert enoent(mounted.m("ociopq/old.txt"))


def test_oci_markers_never_listed(mounted):
    assert not [n for n in all_names(mounted.mnt) if n.startswith(".wh.")]


def test_oci_markers_not_found_by_name(mounted):
    for rel in (".wh.ocigone.txt", "dir/.wh.hidden.txt", "ociopq/.wh..wh..opq"):
        assert enoent(mounted.m(rel)), rel


def test_kernel_opaque_dir(mounted):
    assert os.listdir(mounted.m("opq")) == ["new.txt"]
    assert enoent(mounted.m("opq/old.txt"))


# -- copy-up triggers and what they leave in the upper ------------------------------------

def test_open_read_does_not_copy_up(mounted):
    read(mounted.m("dir/a.txt"))
    assert not os.path.lexists(mounted.u("dir/a.txt"))


def test_copy_up_on_open_for_write(mounted):
    fd = os.open(mounted.m("dir/a.txt"), os.O_WRONLY)
    os.write(fd, b"B")
    os.close(fd)
    assert read(mounted.m("dir/a.txt")) == b"Bottom-a\n"
    assert read(mounted.u("dir/a.txt")) == b"Bottom-a\n"
    assert read(os.path.join(mounted.bottom, "dir/a.txt")) == b"bottom-a\n"


def test_read_only_fd_opened_before_a_copy_up_reads_the_upper_copy(mounted):
    """An fd that read the lower file keeps reading the file, not the lower layer, once a
    write through another fd copied it up; also when the daemon answers READs without
    calling Python (the patched pyfuse3 reads the fd it was given at open)."""
    reader = os.open(mounted.m("big.bin"), os.O_RDONLY)
    try:
        assert os.pread(reader, 8, 4096) == mounted.big[4096:4104]
        writer = os.open(mounted.m("big.bin"), os.O_WRONLY)
        try:
            os.pwrite(writer, b"upper!!!", 4096)
            os.fsync(writer)
        finally:
            os.close(writer)
        os.posix_fadvise(reader, 0, 0, os.POSIX_FADV_DONTNEED)  # the next read reaches the daemon
        assert os.pread(reader, 8, 4096) == b"upper!!!"
        assert os.pread(reader, 8, 0) == mounted.big[:8]
    finally:
        os.close(reader)
    assert read(os.path.join(mounted.bottom, "big.bin")) == mounted.big


def test_copy_up_on_truncate(mounted):
    os.truncate(mounted.m("big.bin"), 10)
    assert read(mounted.m("big.bin")) == mounted.big[:10]
    assert read(mounted.u("big.bin")) == mounted.big[:10]


def test_copy_up_on_chmod(mounted):
    os.chmod(mounted.m("big.bin"), 0o600)
    assert stat.S_IMODE(os.lstat(mounted.m("big.bin")).st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(mounted.u("big.bin")).st_mode) == 0o600
    assert read(mounted.u("big.bin")) == mounted.big


def test_copy_up_on_chown(mounted):
    os.chown(mounted.m("rootfile.txt"), 1000, 1001)
    for p in (mounted.m("rootfile.txt"), mounted.u("rootfile.txt")):
        st = os.lstat(p)
        assert (st.st_uid, st.st_gid) == (1000, 1001)
    assert read(mounted.u("rootfile.txt")) == b"root's\n"


def test_chown_clears_setuid(mounted):
    os.chown(mounted.m("suid.bin"), 1000, 1000)
    assert not os.lstat(mounted.m("suid.bin")).st_mode & stat.S_ISUID
    assert not os.lstat(mounted.u("suid.bin")).st_mode & stat.S_ISUID


def test_copy_up_on_utimens_explicit(mounted):
    t = (1_500_000_000_111_111_111, 1_600_000_000_222_222_222)
    os.utime(mounted.m("dir/a.txt"), ns=t)
    for p in (mounted.m("dir/a.txt"), mounted.u("dir/a.txt")):
        st = os.lstat(p)
        assert (st.st_atime_ns, st.st_mtime_ns) == t
    assert read(mounted.u("dir/a.txt")) == b"bottom-a\n"


def test_utimens_now(mounted):
    before = time.time_ns() - 2_000_000_000
    os.utime(mounted.m("times.txt"))
    st = os.lstat(mounted.m("times.txt"))
    assert st.st_atime_ns >= before and st.st_mtime_ns >= before
    ust = os.lstat(mounted.u("times.txt"))
    assert (ust.st_atime_ns, ust.st_mtime_ns) == (st.st_atime_ns, st.st_mtime_ns)


def test_utimens_omit_atime(mounted):
    atime, _ = mounted.times_ns
    utimensat(mounted.m("times.txt"), (0, UTIME_OMIT), (1_700_000_000, 5))
    st = os.lstat(mounted.m("times.txt"))
    assert (st.st_atime_ns, st.st_mtime_ns) == (atime, 1_700_000_000_000_000_005)
    ust = os.lstat(mounted.u("times.txt"))
    assert (ust.st_atime_ns, ust.st_mtime_ns) == (atime, 1_700_000_000_000_000_005)


def test_utimens_omit_mtime(mounted):
    _, mtime = mounted.times_ns
    utimensat(mounted.m("times.txt"), (1_700_000_000, 7), (0, UTIME_OMIT))
    st = os.lstat(mounted.m("times.txt"))
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_700_000_000_000_000_007, mtime)


def test_touch_m_keeps_atime(mounted):
    atime, mtime = mounted.times_ns
    subprocess.run(["touch", "-m", mounted.m("times.txt")], check=True)
    st = os.lstat(mounted.m("times.txt"))
    assert st.st_atime_ns == atime
    assert st.st_mtime_ns > mtime
    assert os.lstat(mounted.u("times.txt")).st_atime_ns == atime


def test_touch_a_keeps_mtime(mounted):
    atime, mtime = mounted.times_ns
    subprocess.run(["touch", "-a", mounted.m("times.txt")], check=True)
    st = os.lstat(mounted.m("times.txt"))
    assert st.st_mtime_ns == mtime
    assert st.st_atime_ns > atime
    assert os.lstat(mounted.u("times.txt")).st_mtime_ns == mtime


def test_utime_ns_on_lower_dir(mounted):
    t = (1_234_567_890_123_456_789, 1_234_567_891_987_654_321)
    os.utime(mounted.m("wdir"), ns=t)
    st = os.lstat(mounted.m("wdir"))
    assert (st.st_atime_ns, st.st_mtime_ns) == t
    assert set(os.listdir(mounted.m("wdir"))) == {"x", "z.txt"}


def test_copy_up_on_setxattr(mounted):
    os.setxattr(mounted.m("xattr.txt"), "user.new", b"v")
    assert xattr(mounted.u("xattr.txt"), "user.new") == b"v"
    assert xattr(mounted.u("xattr.txt"), "user.color") == b"blue"
    assert xattr(mounted.u("xattr.txt"), "trusted.secret") == b"s3"
    assert read(mounted.u("xattr.txt")) == b"xattrs\n"


def test_copy_up_on_link(mounted):
    os.link(mounted.m("dir/a.txt"), mounted.m("merged/a-link"))
    assert os.lstat(mounted.u("dir/a.txt")).st_ino == os.lstat(mounted.u("merged/a-link")).st_ino
    assert read(mounted.m("merged/a-link")) == b"bottom-a\n"


def test_copy_up_on_rename(mounted):
    os.rename(mounted.m("dir/a.txt"), mounted.m("merged/a.txt"))
    assert read(mounted.m("merged/a.txt")) == b"bottom-a\n"
    assert read(mounted.u("merged/a.txt")) == b"bottom-a\n"
    assert enoent(mounted.m("dir/a.txt"))
    assert is_whiteout(mounted.u("dir/a.txt"))


def test_copy_up_keeps_metadata(mounted):
    os.setxattr(mounted.m("owned.txt"), "user.k", b"v")
    st = os.lstat(mounted.u("owned.txt"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o600)
    low = os.lstat(os.path.join(mounted.bottom, "owned.txt"))
    assert st.st_mtime_ns == low.st_mtime_ns


def test_copy_up_leaves_nothing_in_work(mounted):
    os.chmod(mounted.m("big.bin"), 0o600)
    os.unlink(mounted.m("dir/a.txt"))
    os.rename(mounted.m("wdir"), mounted.m("wdir-moved"))
    os.rmdir(mounted.m("emptydir"))
    assert os.listdir(os.path.join(mounted.work, "work")) == []


# -- whiteouts, opaque dirs, redirects in the upper ----------------------------------------

def test_unlink_lower_file_makes_kernel_whiteout(mounted):
    os.unlink(mounted.m("shadow.txt"))
    assert is_whiteout(mounted.u("shadow.txt"))
    assert enoent(mounted.m("shadow.txt"))


def test_rmdir_merged_dir_enotempty(mounted):
    assert errno_of(lambda: os.rmdir(mounted.m("merged"))) == errno.ENOTEMPTY
    assert errno_of(lambda: os.rmdir(mounted.m("dir"))) == errno.ENOTEMPTY


def test_rmdir_then_mkdir_gives_empty_opaque_dir(mounted):
    for n in os.listdir(mounted.m("merged")):
        os.unlink(mounted.m("merged/" + n))
    os.rmdir(mounted.m("merged"))
    assert is_whiteout(mounted.u("merged"))
    os.mkdir(mounted.m("merged"))
    assert os.listdir(mounted.m("merged")) == []
    assert xattr(mounted.u("merged"), "trusted.overlay.opaque") == b"y"


def test_rmdir_empty_lower_dir(mounted):
    os.rmdir(mounted.m("emptydir"))
    assert is_whiteout(mounted.u("emptydir"))
    assert enoent(mounted.m("emptydir"))


def test_rename_lower_dir(mounted):
    os.rename(mounted.m("wdir"), mounted.m("wdir-moved"))
    assert set(os.listdir(mounted.m("wdir-moved"))) == {"x", "z.txt"}
    assert read(mounted.m("wdir-moved/x/y.txt")) == b"wdir-y\n"
    assert enoent(mounted.m("wdir"))
    assert is_whiteout(mounted.u("wdir"))
    assert xattr(mounted.u("wdir-moved"), "trusted.overlay.redirect") in (b"/wdir", b"wdir")


def test_rename_lower_dir_with_mv_into_subdir(mounted):
    subprocess.run(["mv", mounted.m("wdir"), mounted.m("dir/sub/")], check=True)
    assert read(mounted.m("dir/sub/wdir/z.txt")) == b"wdir-z\n"
    assert xattr(mounted.u("dir/sub/wdir"), "trusted.overlay.redirect") == b"/wdir"


def test_renamed_dir_survives_remount(layers):
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        os.rename(layers.m("wdir"), layers.m("w2"))
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        assert set(os.listdir(layers.m("w2"))) == {"x", "z.txt"}
        assert enoent(layers.m("wdir"))


@pytest.mark.kernel
def test_renamed_dir_readable_by_kernel_overlay(layers):
    """The upper unionfs wrote is kernel overlayfs format: a kernel mount sees the same."""
    with unionfs_mount(layers.kernel_lowers, layers.upper, layers.mnt, workdir=layers.work):
        os.rename(layers.m("wdir"), layers.m("w2"))
        os.unlink(layers.m("dir/a.txt"))
        os.rmdir(layers.m("emptydir"))
        os.mkdir(layers.m("emptydir"))
        for n in os.listdir(layers.m("merged")):
            os.unlink(layers.m("merged/" + n))
        os.rmdir(layers.m("merged"))
        os.mkdir(layers.m("merged"))
        write(layers.m("merged/new"), b"n")
        expect = sorted(all_names(layers.mnt))
    kwork = os.path.join(layers.root, "kwork")
    os.mkdir(kwork)
    with kernel_overlay(layers.kernel_lowers, layers.upper, kwork, layers.mnt):
        assert set(os.listdir(layers.m("w2"))) == {"x", "z.txt"}
        assert enoent(layers.m("wdir")) and enoent(layers.m("dir/a.txt"))
        assert os.listdir(layers.m("merged")) == ["new"]
        assert sorted(all_names(layers.mnt)) == expect


def test_rename_noreplace(mounted):
    assert errno_of(lambda: renameat2(mounted.m("dir/a.txt"), mounted.m("dir/b.txt"),
                                      RENAME_NOREPLACE)) == errno.EEXIST
    assert read(mounted.m("dir/b.txt")) == b"mid-b\n"
    renameat2(mounted.m("dir/a.txt"), mounted.m("dir/new.txt"), RENAME_NOREPLACE)
    assert read(mounted.m("dir/new.txt")) == b"bottom-a\n"
    assert enoent(mounted.m("dir/a.txt"))


def test_rename_exchange_files(mounted):
    renameat2(mounted.m("dir/a.txt"), mounted.m("shadow.txt"), RENAME_EXCHANGE)
    assert read(mounted.m("dir/a.txt")) == b"top-shadow\n"
    assert read(mounted.m("shadow.txt")) == b"bottom-a\n"


def test_rename_exchange_dirs(mounted):
    renameat2(mounted.m("wdir"), mounted.m("wdir2"), RENAME_EXCHANGE)
    assert set(os.listdir(mounted.m("wdir"))) == {"q.txt"}
    assert set(os.listdir(mounted.m("wdir2"))) == {"x", "z.txt"}


def test_rename_exchange_missing_enoent(mounted):
    assert errno_of(lambda: renameat2(mounted.m("dir/a.txt"), mounted.m("dir/none"),
                                      RENAME_EXCHANGE)) == errno.ENOENT


# -- hard links ---------------------------------------------------------------------------

HL = ("hl/one", "other/two", "other/sub/three")


def test_link_of_lower_file(mounted):
    os.link(mounted.m("dir/a.txt"), mounted.m("dir/a2"))
    a, b = os.lstat(mounted.m("dir/a.txt")), os.lstat(mounted.m("dir/a2"))
    assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
    write(mounted.m("dir/a2"), b"via a2\n")
    assert read(mounted.m("dir/a.txt")) == b"via a2\n"


def test_lower_hard_links_show_one_inode(mounted):
    sts = [os.lstat(mounted.m(p)) for p in HL]
    assert len({st.st_ino for st in sts}) == 1
    assert all(st.st_nlink == 3 for st in sts)


def test_lower_hard_links_stay_one_inode_after_copy_up(mounted):
    ino = os.lstat(mounted.m("other/two")).st_ino
    with open(mounted.m("other/two"), "ab") as f:
        f.write(b"more\n")
    for p in HL:
        st = os.lstat(mounted.m(p))
        assert st.st_ino == ino, p
        assert st.st_nlink == 3, p
        assert read(mounted.m(p)) == mounted.hl_data + b"more\n", p


def test_unlink_one_name_of_lower_hard_link(mounted):
    os.unlink(mounted.m("hl/one"))
    for p in HL[1:]:
        assert os.lstat(mounted.m(p)).st_nlink == 2
        assert read(mounted.m(p)) == mounted.hl_data


def test_fstat_after_unlink_new_file(mounted):
    p = mounted.m("dir/newfile")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"data")
        os.unlink(p)
        st = os.fstat(fd)
        assert st.st_nlink == 0
        assert os.pread(fd, 4, 0) == b"data"
    finally:
        os.close(fd)


def test_fstat_after_unlink_copied_up_file(mounted):
    p = mounted.m("dir/a.txt")
    fd = os.open(p, os.O_RDWR)
    try:
        os.unlink(p)
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 9, 0) == b"bottom-a\n"
    finally:
        os.close(fd)


# -- identity -----------------------------------------------------------------------------

def test_ino_stable_across_copy_up_rename_remount(layers):
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        ino = os.lstat(layers.m("dir/a.txt")).st_ino
        dino = os.lstat(layers.m("wdir")).st_ino
        os.chmod(layers.m("dir/a.txt"), 0o600)
        assert os.lstat(layers.m("dir/a.txt")).st_ino == ino
        os.rename(layers.m("dir/a.txt"), layers.m("merged/a.txt"))
        assert os.lstat(layers.m("merged/a.txt")).st_ino == ino
        os.rename(layers.m("wdir"), layers.m("w2"))
        assert os.lstat(layers.m("w2")).st_ino == dino
        write(layers.m("new.txt"), b"n")
        nino = os.lstat(layers.m("new.txt")).st_ino
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        assert os.lstat(layers.m("merged/a.txt")).st_ino == ino
        assert os.lstat(layers.m("w2")).st_ino == dino
        assert os.lstat(layers.m("new.txt")).st_ino == nino


def test_ino_stable_untouched_across_remount(layers):
    paths = ("dir", "dir/a.txt", "shadow.txt", "hl/one", "merged/b1.txt", "sym_rel")
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        first = {p: os.lstat(layers.m(p)).st_ino for p in paths}
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        assert {p: os.lstat(layers.m(p)).st_ino for p in paths} == first


def test_inos_unique(mounted):
    """Names share an inode number only where the layers hold one hard-linked file under
    them (conftest's two groups); a directory, or any other pair, never does."""
    by_ino: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(mounted.mnt):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            by_ino.setdefault(os.lstat(p).st_ino, []).append(os.path.relpath(p, mounted.mnt))
    shared = sorted(sorted(names) for names in by_ino.values() if len(names) > 1)
    assert shared == [["hl/one", "other/sub/three", "other/two"], ["hl/p1", "hl/p2"]], shared


def test_one_st_dev(mounted):
    write(mounted.m("new.txt"), b"n")
    os.chmod(mounted.m("dir/b.txt"), 0o600)
    dev = os.stat(mounted.mnt).st_dev
    for p in ("new.txt", "dir", "dir/a.txt", "dir/b.txt", "shadow.txt", "merged/b1.txt", "sym_rel",
              "fifo", "null", "opq/new.txt"):
        assert os.lstat(mounted.m(p)).st_dev == dev, p


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


# -- xattrs -------------------------------------------------------------------------------

@pytest.mark.parametrize("ns", ["user", "trusted", "security"])
def test_xattr_roundtrip(mounted, ns):
    p = mounted.m("dir/a.txt")
    name = f"{ns}.unionfs-test"
    os.setxattr(p, name, b"value")
    assert os.getxattr(p, name) == b"value"
    assert name in os.listxattr(p)
    assert xattr(mounted.u("dir/a.txt"), name) == b"value"
    os.setxattr(p, name, b"v2", os.XATTR_REPLACE)
    assert os.getxattr(p, name) == b"v2"
    assert errno_of(lambda: os.setxattr(p, name, b"v3", os.XATTR_CREATE)) == errno.EEXIST
    os.removexattr(p, name)
    assert errno_of(lambda: os.getxattr(p, name)) == errno.ENODATA
    assert name not in os.listxattr(p)


@pytest.mark.parametrize("name", ["security.capability", "security.selinux"])
def test_absent_security_xattr_remembered_until_set(mounted, name):
    """The daemon remembers that these are absent (the kernel asks for security.capability
    at every write, ls -l for security.selinux at every entry): setting one through the
    mount must show at once, on every name of the file."""
    p = mounted.m("dir/a.txt")
    for _ in range(2):
        assert errno_of(lambda: os.getxattr(p, name)) == errno.ENODATA
    with open(p, "ab") as f:
        f.write(b"x")   # the kernel's own security.capability check, on a write
    os.link(p, mounted.m("dir/a-link"))
    value = bytes.fromhex("0100000200200000000000000000000000000000") \
        if name == "security.capability" else b"system_u:object_r:etc_t:s0\0"
    os.setxattr(p, name, value)
    assert os.getxattr(p, name) == value
    assert os.getxattr(mounted.m("dir/a-link"), name) == value
    assert xattr(mounted.u("dir/a.txt"), name) == value
    os.removexattr(p, name)
    assert errno_of(lambda: os.getxattr(mounted.m("dir/a-link"), name)) == errno.ENODATA


CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")  # vfs cap v2, permitted


@pytest.mark.kernel
def test_file_capability_copied_up_then_dropped_by_a_write_like_kernel(tmp_path):
    """A lower file with security.capability keeps it through a copy-up, and a write then
    drops it (the kernel's own check, as on a local disk); one without stays without.
    The same on kernel overlayfs."""
    lower = tmp_path / "lower"
    lower.mkdir()
    for name in ("capped", "plain"):
        (lower / name).write_bytes(b"#!/bin/true\n")
    os.setxattr(lower / "capped", "security.capability", CAP_NET_RAW)
    seen = []
    for kind in ("unionfs", "kernel"):
        upper, work, mnt = (str(tmp_path / f"{kind}-{n}") for n in ("upper", "work", "mnt"))
        for d in (upper, work, mnt):
            os.makedirs(d)
        ctx = unionfs_mount([str(lower)], upper, mnt, workdir=work) if kind == "unionfs" \
            else kernel_overlay([str(lower)], upper, work, mnt)
        with ctx:
            capped, plain = os.path.join(mnt, "capped"), os.path.join(mnt, "plain")
            os.chmod(capped, 0o755)   # a copy-up that is no write
            os.chmod(plain, 0o755)
            before = xattr(capped, "security.capability")
            for p in (capped, plain):
                with open(p, "ab") as f:
                    f.write(b"# more\n")
            seen.append((before, xattr(capped, "security.capability"),
                         xattr(plain, "security.capability")))
    assert seen[0] == seen[1] == (CAP_NET_RAW, None, None)


def test_lower_xattrs_visible(mounted):
    assert os.getxattr(mounted.m("xattr.txt"), "user.color") == b"blue"
    assert os.getxattr(mounted.m("xattr.txt"), "trusted.secret") == b"s3"
    assert {"user.color", "trusted.secret"} <= set(os.listxattr(mounted.m("xattr.txt")))


def test_removexattr_of_lower_xattr(mounted):
    os.removexattr(mounted.m("xattr.txt"), "user.color")
    assert errno_of(lambda: os.getxattr(mounted.m("xattr.txt"), "user.color")) == errno.ENODATA
    assert xattr(mounted.u("xattr.txt"), "user.color") is None
    assert xattr(os.path.join(mounted.bottom, "xattr.txt"), "user.color") == b"blue"


def test_removexattr_missing_enodata(mounted):
    assert errno_of(lambda: os.removexattr(mounted.m("dir/a.txt"), "user.none")) == errno.ENODATA
    assert not os.path.lexists(mounted.u("dir/a.txt"))


def test_overlay_xattrs_hidden(mounted):
    os.rename(mounted.m("wdir"), mounted.m("w2"))
    os.rmdir(mounted.m("emptydir"))
    os.mkdir(mounted.m("emptydir"))
    for p, name in (("w2", "trusted.overlay.redirect"), ("emptydir", "trusted.overlay.opaque"),
                    ("opq", "trusted.overlay.opaque")):
        assert name not in os.listxattr(mounted.m(p)), p
        assert errno_of(lambda: os.getxattr(mounted.m(p), name)) != 0, p
    assert xattr(mounted.u("w2"), "trusted.overlay.redirect") is not None


def test_overlay_xattrs_not_settable(mounted):
    p = mounted.m("merged")
    assert errno_of(lambda: os.setxattr(p, "trusted.overlay.opaque", b"y")) != 0
    assert set(os.listdir(p)) == {"t1.txt", "m1.txt", "o1.txt", "b1.txt"}
    assert not os.path.lexists(mounted.u("merged")) or \
        xattr(mounted.u("merged"), "trusted.overlay.opaque") is None
    assert errno_of(lambda: os.setxattr(mounted.m("dir/a.txt"), "trusted.overlay.x", b"1")) != 0
    assert errno_of(lambda: os.removexattr(mounted.m("opq"), "trusted.overlay.opaque")) != 0
    assert os.listdir(mounted.m("opq")) == ["new.txt"]


def test_unionfs_xattrs_hidden(mounted):
    os.chmod(mounted.m("dir/a.txt"), 0o600)   # copied up: may carry trusted.unionfs.*
    p = mounted.m("dir/a.txt")
    own = ("trusted.unionfs.", "trusted.overlay.")
    private = [n for n in os.listxattr(mounted.u("dir/a.txt")) if n.startswith(own)]
    assert not [n for n in os.listxattr(p) if n.startswith(own)]
    for name in private + ["trusted.unionfs.ino", "trusted.overlay.unionfs.ino"]:
        assert errno_of(lambda: os.getxattr(p, name)) != 0, name
    ino = os.lstat(p).st_ino
    saved = {n: xattr(mounted.u("dir/a.txt"), n) for n in private}
    for name in private + ["trusted.unionfs.ino", "trusted.overlay.unionfs.ino"]:
        assert errno_of(lambda: os.setxattr(p, name, b"12345")) != 0, name
        assert errno_of(lambda: os.removexattr(p, name)) != 0, name
    assert {n: xattr(mounted.u("dir/a.txt"), n) for n in private} == saved
    assert os.lstat(p).st_ino == ino


def test_overlay_xattrs_hidden_like_kernel(pair):
    """Neither side shows the upper's own trusted.overlay.* xattrs through the mount."""
    for L in (pair.uf, pair.k):
        os.rename(L.m("wdir"), L.m("w2"))
        assert xattr(L.u("w2"), "trusted.overlay.redirect") is not None
        assert "trusted.overlay.redirect" not in os.listxattr(L.m("w2"))
        assert "trusted.overlay.opaque" not in os.listxattr(L.m("opq"))
        assert errno_of(lambda: os.getxattr(L.m("w2"), "trusted.overlay.redirect")) != 0
        assert errno_of(lambda: os.getxattr(L.m("opq"), "trusted.overlay.opaque")) != 0


def test_posix_acl_roundtrip(mounted):
    p = mounted.m("rootfile.txt")
    subprocess.run(["setfacl", "-m", "u:1000:rw,g:1000:r", p], check=True)
    out = subprocess.run(["getfacl", "-cpn", p], capture_output=True, text=True, check=True).stdout
    assert "user:1000:rw-" in out and "group:1000:r--" in out
    assert xattr(mounted.u("rootfile.txt"), "system.posix_acl_access") is not None
    subprocess.run(["setfacl", "-b", p], check=True)
    out = subprocess.run(["getfacl", "-cpn", p], capture_output=True, text=True, check=True).stdout
    assert "user:1000" not in out


def test_default_acl_on_dir_inherited(mounted):
    d = mounted.m("dir/acldir")
    os.mkdir(d)
    subprocess.run(["setfacl", "-d", "-m", "u:1000:rwx", d], check=True)
    write(d + "/f", b"x")
    out = subprocess.run(["getfacl", "-cpn", d + "/f"], capture_output=True, text=True, check=True).stdout
    assert "user:1000:rw" in out


# -- data operations ----------------------------------------------------------------------

def test_truncate_grow_and_ftruncate(mounted):
    os.truncate(mounted.m("dir/a.txt"), 100)
    data = read(mounted.m("dir/a.txt"))
    assert data == b"bottom-a\n" + b"\0" * 91
    with open(mounted.m("dir/b.txt"), "r+b") as f:
        os.ftruncate(f.fileno(), 3)
    assert read(mounted.m("dir/b.txt")) == b"mid"


def test_posix_fallocate_falls_back_to_writing(mounted):
    """There is no fallocate handler (see test_fallocate_modes_like_kernel): fallocate(2)
    must say EOPNOTSUPP, the one errno on which glibc's posix_fallocate falls back to
    writing zeros, so that what programs call still works."""
    fd = os.open(mounted.m("dir/a.txt"), os.O_RDWR)
    try:
        assert errno_of(lambda: fallocate(fd, 0, 0, 1 << 20)) == errno.EOPNOTSUPP
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


# -- names and errors ---------------------------------------------------------------------

def test_name_too_long(mounted):
    long = "x" * 256
    assert errno_of(lambda: os.lstat(mounted.m(long))) == errno.ENAMETOOLONG
    assert errno_of(lambda: os.open(mounted.m(long), os.O_CREAT | os.O_WRONLY)) == errno.ENAMETOOLONG
    assert errno_of(lambda: os.mkdir(mounted.m("dir/" + long))) == errno.ENAMETOOLONG
    assert errno_of(lambda: os.symlink("t", mounted.m(long))) == errno.ENAMETOOLONG
    ok = "y" * 255
    write(mounted.m(ok), b"ok")
    assert read(mounted.m(ok)) == b"ok"
    assert ok in os.listdir(mounted.mnt)


def test_paths_near_path_max(mounted):
    comp = "d" * 200
    path = mounted.mnt
    while len(path) + 1 + 200 + 1 + 200 < 4095:
        path = os.path.join(path, comp)
        os.mkdir(path)
    leaf = "f" * (4095 - len(path) - 1)
    full = os.path.join(path, leaf)
    assert len(full) == 4095
    write(full, b"deep")
    assert read(full) == b"deep"
    assert errno_of(lambda: os.lstat(full + "x")) == errno.ENAMETOOLONG
    # the upper's copy, reached one component at a time (its full path is longer than PATH_MAX)
    fd = os.open(mounted.upper, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in os.path.relpath(path, mounted.mnt).split("/"):
            sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        ffd = os.open(leaf, os.O_RDONLY, dir_fd=fd)
        assert os.read(ffd, 10) == b"deep"
        os.close(ffd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("case", [
    "open_dir_for_write", "unlink_dir", "rmdir_file", "lookup_below_file", "mkdir_existing_dir",
    "mkdir_existing_file", "link_existing", "symlink_existing", "rmdir_nonempty",
    "rename_dir_over_nonempty", "rename_file_over_dir", "rename_dir_over_file", "link_dir",
    "rename_dir_into_itself", "rmdir_dot", "mknod_existing", "unlink_whiteouted",
    "rename_missing", "rmdir_root_file_via_slash", "open_file_slash", "mknod_whiteout",
    "rename_to_long_name", "link_to_long_name", "rename_from_long_name", "unlink_long_name",
    "rmdir_not_dir_in_lower", "rename_exchange_missing_dir", "rename_noreplace_existing_dir",
    "setxattr_replace_missing", "setxattr_create_existing_lower", "removexattr_missing_lower",
    "getxattr_missing", "user_xattr_on_fifo", "mkdir_in_whiteouted", "create_below_symlink_dir",
])
def test_errno_like_kernel(pair, case):
    def run(m):
        return {
            "open_dir_for_write": lambda: os.open(m("dir"), os.O_WRONLY),
            "unlink_dir": lambda: os.unlink(m("dir")),
            "rmdir_file": lambda: os.rmdir(m("shadow.txt")),
            "lookup_below_file": lambda: os.lstat(m("shadow.txt/x")),
            "mkdir_existing_dir": lambda: os.mkdir(m("merged")),
            "mkdir_existing_file": lambda: os.mkdir(m("shadow.txt")),
            "link_existing": lambda: os.link(m("dir/a.txt"), m("dir/b.txt")),
            "symlink_existing": lambda: os.symlink("x", m("dir/a.txt")),
            "rmdir_nonempty": lambda: os.rmdir(m("merged")),
            "rename_dir_over_nonempty": lambda: os.rename(m("wdir"), m("wdir2")),
            "rename_file_over_dir": lambda: os.rename(m("shadow.txt"), m("emptydir")),
            "rename_dir_over_file": lambda: os.rename(m("emptydir"), m("shadow.txt")),
            "link_dir": lambda: os.link(m("dir"), m("dirlink")),
            "rename_dir_into_itself": lambda: os.rename(m("wdir"), m("wdir/x/inside")),
            "rmdir_dot": lambda: os.rmdir(m("emptydir/.")),
            "mknod_existing": lambda: os.mkfifo(m("dir/a.txt")),
            "unlink_whiteouted": lambda: os.unlink(m("gone.txt")),
            "rename_missing": lambda: os.rename(m("nothing"), m("x")),
            "rmdir_root_file_via_slash": lambda: os.rmdir(m("shadow.txt/")),
            "open_file_slash": lambda: os.open(m("shadow.txt/"), os.O_RDONLY),
            "rename_to_long_name": lambda: os.rename(m("dir/a.txt"), m("dir/" + "x" * 256)),
            "link_to_long_name": lambda: os.link(m("dir/a.txt"), m("dir/" + "x" * 256)),
            "rename_from_long_name": lambda: os.rename(m("dir/" + "x" * 256), m("dir/y")),
            "unlink_long_name": lambda: os.unlink(m("x" * 256)),
            "rmdir_not_dir_in_lower": lambda: os.rmdir(m("dir/sub/deep.txt")),
            "rename_exchange_missing_dir": lambda: renameat2(m("wdir"), m("nodir"), RENAME_EXCHANGE),
            "rename_noreplace_existing_dir": lambda: renameat2(m("wdir"), m("wdir2"), RENAME_NOREPLACE),
            "setxattr_replace_missing": lambda: os.setxattr(m("xattr.txt"), "user.none", b"x", os.XATTR_REPLACE),
            "setxattr_create_existing_lower": lambda: os.setxattr(m("xattr.txt"), "user.color", b"x", os.XATTR_CREATE),
            "removexattr_missing_lower": lambda: os.removexattr(m("xattr.txt"), "user.none"),
            "getxattr_missing": lambda: os.getxattr(m("xattr.txt"), "user.none"),
            "user_xattr_on_fifo": lambda: os.setxattr(m("fifo"), "user.x", b"1"),
            "mkdir_in_whiteouted": lambda: os.mkdir(m("gone.txt/sub")),
            "create_below_symlink_dir": lambda: os.mkdir(m("sym_rel/x")),
            "mknod_whiteout": lambda: os.mknod(m("wh"), stat.S_IFCHR | 0o600, os.makedev(0, 0)),
        }[case]()

    got = errno_of(lambda: run(pair.uf.m))
    want = errno_of(lambda: run(pair.k.m))
    assert got == want, f"unionfs {errno.errorcode.get(got, got)}, kernel {errno.errorcode.get(want, want)}"
    assert want != 0


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


# -- other processes see changes at once --------------------------------------------------

def test_other_process_sees_rename_and_unlink(mounted):
    os.listdir(mounted.m("dir"))
    assert other_sees("stat", mounted.m("dir/a.txt")).returncode == 0
    os.rename(mounted.m("dir/a.txt"), mounted.m("dir/a-renamed"))
    assert other_sees("stat", mounted.m("dir/a-renamed")).returncode == 0
    assert other_sees("stat", mounted.m("dir/a.txt")).returncode != 0
    os.unlink(mounted.m("dir/b.txt"))
    assert other_sees("stat", mounted.m("dir/b.txt")).returncode != 0


def test_other_process_sees_copy_up_and_chmod(mounted):
    assert other_sees("cat", mounted.m("dir/a.txt")).stdout == "bottom-a\n"
    with open(mounted.m("dir/a.txt"), "w") as f:
        f.write("changed\n")
    assert other_sees("cat", mounted.m("dir/a.txt")).stdout == "changed\n"
    assert other_sees("stat", "-c", "%a", mounted.m("shadow.txt")).stdout.strip() == "644"
    os.chmod(mounted.m("shadow.txt"), 0o640)
    assert other_sees("stat", "-c", "%a", mounted.m("shadow.txt")).stdout.strip() == "640"


def test_other_process_sees_new_file_in_listed_dir(mounted):
    assert "new.txt" not in other_sees("ls", "-a", mounted.m("merged")).stdout.split()
    write(mounted.m("merged/new.txt"), b"n")
    assert "new.txt" in other_sees("ls", "-a", mounted.m("merged")).stdout.split()
    os.rmdir(mounted.m("emptydir"))
    assert "emptydir" not in other_sees("ls", "-a", mounted.mnt).stdout.split()


LISTING_CHANGES = {
    "create": lambda m: write(m("merged/new.txt"), b"n"),
    "unlink": lambda m: os.unlink(m("merged/t1.txt")),
    "rename_out": lambda m: os.rename(m("merged/b1.txt"), m("moved-out")),
    "rename_in": lambda m: os.rename(m("shadow.txt"), m("merged/moved-in")),
    "mkdir": lambda m: os.mkdir(m("merged/newdir")),
    "symlink": lambda m: os.symlink("t", m("merged/newlink")),
    "link": lambda m: os.link(m("times.txt"), m("merged/newhard")),
    "rename_dir_in": lambda m: os.rename(m("dir"), m("merged/dir-in")),
}


def test_kernel_listing_cache_follows_every_change(mounted):
    """The kernel keeps listings (cache_readdir); each change through the mount must show in
    the next listing another process makes of the same directory."""
    def listing(path: str) -> set[str]:
        return set(other_sees("ls", "-a", path).stdout.split())

    for what, change in LISTING_CHANGES.items():
        before_merged, before_root = listing(mounted.m("merged")), listing(mounted.mnt)
        listing(mounted.m("merged"))  # served from the kernel's copy now
        change(mounted.m)
        expect_merged = set(os.listdir(mounted.m("merged"))) | {".", ".."}
        assert listing(mounted.m("merged")) == expect_merged, what
        assert listing(mounted.mnt) == set(os.listdir(mounted.mnt)) | {".", ".."}, what
        assert (before_merged, before_root) != (expect_merged, listing(mounted.mnt)), what


def test_symlink_target_cache_follows_replacement(mounted):
    assert other_sees("readlink", mounted.m("sym_rel")).stdout.strip() == os.readlink(mounted.m("sym_rel"))
    os.unlink(mounted.m("sym_rel"))
    os.symlink("elsewhere", mounted.m("sym_rel"))
    assert other_sees("readlink", mounted.m("sym_rel")).stdout.strip() == "elsewhere"


@pytest.mark.skipif("cache_readdir" not in binding.load().fast_paths,
                    reason="the kernel caches listings only where the binding can ask it to "
                    "(FOPEN_CACHE_DIR: the built-in binding)")
def test_kernel_answers_repeated_listings_and_acls(layers):
    """The caching levers are in force: once listed, an unchanged directory is answered by
    the kernel, and so are its entries' POSIX ACLs (the daemon's --debug log counts requests).
    Exempt: the root, whose inode the kernel makes before FUSE_POSIX_ACL is agreed and so
    never caches ACLs for, and the listed directory, whose attributes (and with them its
    cached ACLs) the kernel refreshes after reading it."""
    def requests() -> tuple[int, collections.Counter]:
        with open(os.path.join(layers.work, "unionfs.log"), "rb") as f:
            log = f.read()
        acls = collections.Counter(int(m) for m in re.findall(rb"getxattr\((\d+), b'system\.posix_acl_", log))
        return log.count(b"readdir("), acls

    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work, options=("debug",)):
        out = other_sees("ls", "-la", layers.m("merged")).stdout
        first = requests()
        for _ in range(2):
            assert other_sees("ls", "-la", layers.m("merged")).stdout == out
        again = requests()
        write(layers.m("merged/new.txt"), b"n")
        assert "new.txt" in other_sees("ls", "-la", layers.m("merged")).stdout
        changed = requests()
        exempt = {1, os.stat(layers.m("merged")).st_ino}
    assert first[0] >= 1 and len(first[1]) >= 4, first
    assert again[0] == first[0], f"READDIR requests after 1 listing {first[0]}, after 3 {again[0]}"
    assert changed[0] > again[0], "a changed directory must be listed anew"
    refetched = {ino: n for ino, n in changed[1].items() if ino not in exempt and n > 2}
    assert not refetched, f"ACLs asked again for {refetched}"
    assert {ino: n for ino, n in again[1].items() if ino not in exempt} == \
        {ino: n for ino, n in first[1].items() if ino not in exempt}


# -- permissions as a non-root user -------------------------------------------------------

def test_user_cannot_write_root_file(mounted_other):
    L = mounted_other
    assert run_as(lambda: os.open("rootfile.txt", os.O_WRONLY), cwd=L.mnt) == errno.EACCES
    assert run_as(lambda: os.truncate("rootfile.txt", 0), cwd=L.mnt) == errno.EACCES
    assert run_as(lambda: os.chmod("rootfile.txt", 0o666), cwd=L.mnt) == errno.EPERM
    assert run_as(lambda: read("rootfile.txt"), cwd=L.mnt) == 0
    assert not os.path.lexists(L.u("rootfile.txt"))


def test_user_cannot_create_in_root_dir(mounted_other):
    assert run_as(lambda: write("dir/mine", b"x"), cwd=mounted_other.mnt) == errno.EACCES
    assert enoent(mounted_other.m("dir/mine"))


def test_user_sticky_dir(mounted_other):
    L = mounted_other
    assert run_as(lambda: os.unlink("tmp/rootfile"), cwd=L.mnt) == errno.EPERM
    assert os.path.exists(L.m("tmp/rootfile"))
    assert run_as(lambda: os.rename("tmp/rootfile", "tmp/stolen"), cwd=L.mnt) == errno.EPERM
    assert run_as(lambda: os.unlink("tmp/userfile"), cwd=L.mnt) == 0
    assert enoent(L.m("tmp/userfile"))
    assert run_as(lambda: write("tmp/newfile", b"x"), cwd=L.mnt) == 0
    st = os.lstat(L.u("tmp/newfile"))
    assert (st.st_uid, st.st_gid) == (1000, 1000)


def test_user_own_dir(mounted_other):
    L = mounted_other
    assert run_as(lambda: os.unlink("userdir/rootowned"), cwd=L.mnt) == 0
    assert enoent(L.m("userdir/rootowned"))
    assert run_as(lambda: os.mkdir("userdir/sub"), cwd=L.mnt) == 0
    st = os.lstat(L.u("userdir/sub"))
    assert (st.st_uid, st.st_gid) == (1000, 1000)


def test_user_private_file(mounted_other):
    L = mounted_other
    assert run_as(lambda: read("owned.txt"), cwd=L.mnt) == 0
    assert run_as(lambda: read("owned.txt"), cwd=L.mnt, uid=1001, gid=1001) == errno.EACCES
    assert run_as(lambda: os.chmod("owned.txt", 0o644), cwd=L.mnt) == 0
    assert stat.S_IMODE(os.lstat(L.u("owned.txt")).st_mode) == 0o644


def test_user_acl_grants_write(mounted_other):
    """A named-user ACL entry lets that user in where the mode bits alone would not
    (FUSE_POSIX_ACL: the kernel checks ACLs), and nobody else."""
    L = mounted_other
    os.chmod(L.m("rootfile.txt"), 0o640)
    assert run_as(lambda: write("rootfile.txt", b"acl\n", os.O_WRONLY | os.O_TRUNC), cwd=L.mnt) == errno.EACCES
    subprocess.run(["setfacl", "-m", "u:1000:rw", L.m("rootfile.txt")], check=True)
    assert run_as(lambda: write("rootfile.txt", b"acl\n", os.O_WRONLY | os.O_TRUNC), cwd=L.mnt) == 0
    assert read(L.m("rootfile.txt")) == b"acl\n"
    assert run_as(lambda: read("rootfile.txt"), cwd=L.mnt, uid=1001, gid=1001) == errno.EACCES


# -- more namespace cases -----------------------------------------------------------------

def test_rename_merged_dir_keeps_all_layers(mounted):
    before = set(os.listdir(mounted.m("dir")))
    os.rename(mounted.m("dir"), mounted.m("newdir"))
    assert set(os.listdir(mounted.m("newdir"))) == before
    assert enoent(mounted.m("newdir/hidden.txt")) and enoent(mounted.m("newdir/gone2.txt"))
    assert read(mounted.m("newdir/b.txt")) == b"mid-b\n"
    assert read(mounted.m("newdir/sub/deep.txt")) == b"deep\n"


def test_mkdir_at_old_name_of_renamed_dir_is_empty(mounted):
    os.rename(mounted.m("wdir"), mounted.m("w2"))
    os.mkdir(mounted.m("wdir"))
    assert os.listdir(mounted.m("wdir")) == []
    assert set(os.listdir(mounted.m("w2"))) == {"x", "z.txt"}


def test_nested_renames(mounted):
    os.rename(mounted.m("wdir"), mounted.m("a"))
    os.rename(mounted.m("a/x"), mounted.m("b"))
    assert os.listdir(mounted.m("b")) == ["y.txt"]
    assert os.listdir(mounted.m("a")) == ["z.txt"]
    os.rename(mounted.m("b"), mounted.m("a/x"))
    os.rename(mounted.m("a"), mounted.m("wdir"))
    assert set(os.listdir(mounted.m("wdir"))) == {"x", "z.txt"}
    assert read(mounted.m("wdir/x/y.txt")) == b"wdir-y\n"
    assert enoent(mounted.m("a")) and enoent(mounted.m("b"))


def test_write_below_renamed_dir_then_remount(layers):
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        os.rename(layers.m("wdir"), layers.m("w2"))
        write(layers.m("w2/x/y.txt"), b"new y\n")
        write(layers.m("w2/x/added"), b"added\n")
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        assert read(layers.m("w2/x/y.txt")) == b"new y\n"
        assert set(os.listdir(layers.m("w2/x"))) == {"y.txt", "added"}
        assert set(os.listdir(layers.m("w2"))) == {"x", "z.txt"}
        assert enoent(layers.m("wdir"))


def test_rm_rf_lower_tree_leaves_one_whiteout(mounted):
    subprocess.run(["rm", "-rf", mounted.m("wdir")], check=True)
    assert enoent(mounted.m("wdir"))
    assert is_whiteout(mounted.u("wdir"))
    assert os.listdir(os.path.join(mounted.work, "work")) == []


def test_mkdir_rmdir_new_name_leaves_nothing(mounted):
    os.mkdir(mounted.m("dir/tmpdir"))
    os.rmdir(mounted.m("dir/tmpdir"))
    assert not os.path.lexists(mounted.u("dir/tmpdir"))


def test_rename_file_over_lower_file(mounted):
    os.rename(mounted.m("dir/a.txt"), mounted.m("dir/b.txt"))
    assert read(mounted.m("dir/b.txt")) == b"bottom-a\n"
    assert enoent(mounted.m("dir/a.txt"))
    assert set(os.listdir(mounted.m("dir"))) == {"b.txt", "top.txt", "sub", "sym_out"}


def test_rename_onto_own_hard_link_is_noop(pair):
    res = []
    for L in (pair.uf, pair.k):
        os.rename(L.m("hl/one"), L.m("other/two"))
        res.append((os.path.exists(L.m("hl/one")), os.path.exists(L.m("other/two")),
                    os.lstat(L.m("other/two")).st_nlink))
    assert res[0] == res[1]


def test_rename_hard_linked_lower_file(mounted):
    os.rename(mounted.m("hl/one"), mounted.m("hl/moved"))
    names = ("hl/moved", "other/two", "other/sub/three")
    assert len({os.lstat(mounted.m(p)).st_ino for p in names}) == 1
    assert all(os.lstat(mounted.m(p)).st_nlink == 3 for p in names)
    write(mounted.m("other/two"), b"x\n")
    assert read(mounted.m("hl/moved")) == b"x\n"


def test_link_to_lower_hard_linked_file(mounted):
    os.link(mounted.m("hl/one"), mounted.m("dir/four"))
    names = HL + ("dir/four",)
    assert len({os.lstat(mounted.m(p)).st_ino for p in names}) == 1
    assert all(os.lstat(mounted.m(p)).st_nlink == 4 for p in names)


def test_hard_link_copy_up_keeps_dir_times(layers):
    """Copying one name of a lower hard link up is no change to the other names' dirs
    (checked after a remount too: the kernel's attribute cache would hide it)."""
    dirs = ("hl", "other", "other/sub")
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        before = {d: os.lstat(layers.m(d)).st_mtime_ns for d in dirs}
        os.chmod(layers.m("hl/one"), 0o600)
        assert {d: os.lstat(layers.m(d)).st_mtime_ns for d in dirs} == before
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        assert {d: os.lstat(layers.m(d)).st_mtime_ns for d in dirs} == before


def test_copy_up_keeps_parent_times(mounted):
    before = os.lstat(mounted.m("wdir")).st_mtime_ns
    os.chmod(mounted.m("wdir/x/y.txt"), 0o600)
    assert os.lstat(mounted.m("wdir")).st_mtime_ns == before


def test_exchange_dir_and_file(pair):
    views = []
    for L in (pair.uf, pair.k):
        renameat2(L.m("wdir"), L.m("shadow.txt"), RENAME_EXCHANGE)
        views.append((read(L.m("wdir")), sorted(os.listdir(L.m("shadow.txt"))),
                      read(L.m("shadow.txt/x/y.txt"))))
    assert views[0] == views[1]


def test_exchange_new_dir_with_merged_dir(pair):
    views = []
    for L in (pair.uf, pair.k):
        os.mkdir(L.m("newd"))
        write(L.m("newd/f"), b"f")
        renameat2(L.m("newd"), L.m("merged"), RENAME_EXCHANGE)
        views.append((sorted(os.listdir(L.m("merged"))), sorted(os.listdir(L.m("newd")))))
    assert views[0] == views[1]
    assert views[0][0] == ["f"]


def test_rename_new_dir_over_emptied_merged_dir(pair):
    views = []
    for L in (pair.uf, pair.k):
        for n in os.listdir(L.m("merged")):
            os.unlink(L.m("merged/" + n))
        os.mkdir(L.m("newd"))
        write(L.m("newd/f"), b"f")
        os.rename(L.m("newd"), L.m("merged"))
        views.append(sorted(os.listdir(L.m("merged"))))
    assert views[0] == views[1] == ["f"]


def test_merged_dir_nlink(mounted):
    """Kernel overlayfs reports 1 for merged dirs; anything else must count the view's subdirs."""
    st = os.lstat(mounted.m("dir"))
    subdirs = [n for n in os.listdir(mounted.m("dir")) if stat.S_ISDIR(os.lstat(mounted.m("dir/" + n)).st_mode)]
    assert st.st_nlink in (1, 2 + len(subdirs))


def test_large_directory_listing(layers):
    big = os.path.join(layers.bottom, "bigdir")
    os.mkdir(big)
    for i in range(3000):
        open(os.path.join(big, f"f{i:05d}-{'x' * 40}"), "w").close()
    os.makedirs(os.path.join(layers.top, "bigdir"))
    for i in range(0, 3000, 3):
        open(os.path.join(layers.top, "bigdir", f"f{i:05d}-{'x' * 40}"), "w").close()
    for i in range(500):
        open(os.path.join(layers.top, "bigdir", f"t{i:05d}"), "w").close()
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        ents = raw_readdir(layers.m("bigdir"))
        assert len(ents) == 3500 + 2
        for i in range(0, 3000, 7):
            os.unlink(layers.m(f"bigdir/f{i:05d}-{'x' * 40}"))
        names = os.listdir(layers.m("bigdir"))
        assert len(names) == len(set(names)) == 3500 - len(range(0, 3000, 7))


def test_odd_names(mounted):
    for name in (b"\xff\xfe bytes", b"new\nline", b"back\\slash", b" lead space", b"-dash"):
        p = os.path.join(os.fsencode(mounted.mnt), b"dir", name)
        with open(p, "wb") as f:
            f.write(name)
        assert name in os.listdir(os.fsencode(mounted.m("dir")))
        with open(p, "rb") as f:
            assert f.read() == name
        os.rename(p, p + b".2")
        os.unlink(p + b".2")
        assert name + b".2" not in os.listdir(os.fsencode(mounted.m("dir")))


def test_lutimes_on_symlink(mounted):
    t = (1_111_111_111_000_000_001, 1_222_222_222_000_000_002)
    os.utime(mounted.m("sym_rel"), ns=t, follow_symlinks=False)
    st = os.lstat(mounted.m("sym_rel"))
    assert (st.st_atime_ns, st.st_mtime_ns) == t
    assert os.readlink(mounted.m("sym_rel")) == "dir/a.txt"
    assert os.lstat(mounted.m("dir/a.txt")).st_mtime_ns != t[1]


def test_read_only_fd_sees_data_after_copy_up(mounted):
    fd1 = os.open(mounted.m("dir/a.txt"), os.O_RDONLY)
    try:
        assert os.pread(fd1, 100, 0) == b"bottom-a\n"
        with open(mounted.m("dir/a.txt"), "r+b") as f:
            f.write(b"UPPER-A\n!")
        assert os.pread(fd1, 100, 0) == b"UPPER-A\n!"
    finally:
        os.close(fd1)


def test_unlink_open_lower_file_keeps_data(mounted):
    fd = os.open(mounted.m("dir/b.txt"), os.O_RDONLY)
    try:
        os.unlink(mounted.m("dir/b.txt"))
        assert os.pread(fd, 100, 0) == b"mid-b\n"
        os.fstat(fd)
    finally:
        assert errno_of(lambda: os.close(fd)) == 0, "close() failed"
    assert enoent(mounted.m("dir/b.txt"))


def test_view_equals_kernel_after_ops(pair):
    """The same small script on both sides gives the same tree (names, types, data, modes)."""
    def script(m):
        os.rename(m("wdir"), m("dir/sub/w"))
        write(m("dir/sub/w/x/new"), b"new")
        os.unlink(m("dir/a.txt"))
        os.mkdir(m("merged/nd"))
        os.chmod(m("merged/t1.txt"), 0o600)
        os.link(m("hl/p1"), m("hl/p3"))
        os.symlink("hl/p1", m("sl"))
        for n in os.listdir(m("emptydir")):
            os.unlink(m("emptydir/" + n))
        os.rmdir(m("emptydir"))
        os.mkdir(m("emptydir"))
        os.rename(m("shadow.txt"), m("gone.txt"))

    def view(mnt):
        out = {}
        for dirpath, dirnames, filenames in os.walk(mnt):
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                st = os.lstat(p)
                data = read(p) if stat.S_ISREG(st.st_mode) else (
                    os.readlink(p) if stat.S_ISLNK(st.st_mode) else None)
                out[os.path.relpath(p, mnt)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                                st.st_uid, st.st_gid, st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                                                st.st_nlink if not stat.S_ISDIR(st.st_mode) else 0, data)
        return out

    for L in (pair.uf, pair.k):
        script(L.m)
    a, b = view(pair.uf.mnt), view(pair.k.mnt)
    diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    # OCI files do not exist in these layers; everything must agree
    assert diff == {}


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


@pytest.mark.xfail(strict=True, reason="FUSE_CAP_DONT_MASK not used: the kernel applies the umask despite a default ACL, and the daemon's chmod after create rewrites the inherited ACL mask/other")
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


@pytest.mark.xfail(strict=True, reason="no fallocate handler (pyfuse3 has none): preallocation, punch-hole and KEEP_SIZE give EOPNOTSUPP")
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
    out = {}
    for dirpath, dirnames, filenames in os.walk(mnt):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            data = read(p) if stat.S_ISREG(st.st_mode) else (
                os.readlink(p) if stat.S_ISLNK(st.st_mode) else None)
            out[os.path.relpath(p, mnt)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                            st.st_uid, st.st_gid, data,
                                            st.st_nlink if stat.S_ISREG(st.st_mode) else 0)
    return out


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


@pytest.mark.xfail(strict=True, reason="no lseek handler (pyfuse3 has none): SEEK_HOLE/SEEK_DATA do not see holes")
@pytest.mark.kernel
def test_seek_data_hole_like_kernel(tmp_path):
    from conftest import make_layers
    res = []
    for kind in ("uf", "k"):
        L = make_layers(str(tmp_path / kind))
        with open(os.path.join(L.bottom, "sparse2.bin"), "wb") as f:
            f.write(b"d" * 4096)
            f.seek(1 << 20)
            f.write(b"e" * 4096)
        cm = (unionfs_mount(L.kernel_lowers, L.upper, L.mnt, workdir=L.work) if kind == "uf"
              else kernel_overlay(L.kernel_lowers, L.upper, L.work, L.mnt))
        with cm:
            fd = os.open(L.m("sparse2.bin"), os.O_RDONLY)
            try:
                res.append((os.lseek(fd, 0, os.SEEK_HOLE), os.lseek(fd, 8192, os.SEEK_DATA)))
            finally:
                os.close(fd)
    assert res[1] == (4096, 1 << 20), "kernel reference"
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
