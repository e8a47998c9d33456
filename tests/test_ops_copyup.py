"""Behaviour through a real unionfs mount, one focused test per behaviour:
Copy-up triggers and what they leave in the upper; hard links.

Fixtures are in conftest.py (`mounted`, `pair`, `layers`, ...); every mount is unmounted by
the helpers in helpers/mounting.py, even on failure."""
from __future__ import annotations

import os
import stat
import subprocess
import time

import pytest

from helpers.libc import UTIME_OMIT, utimensat
from helpers.ops import HL, enoent, read, write
from helpers.unit_helpers import is_whiteout, xattr

pytestmark = [pytest.mark.mount]


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


# -- hard links ---------------------------------------------------------------------------

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
