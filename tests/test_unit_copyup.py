"""Copy-up through unionfs.union.Union, without FUSE.

What a copied-up object must look like in the upper (data, type, mode, owner,
times to the nanosecond, xattrs), that its parents come up with their own
metadata and unchanged times, that hard-linked lower files come up as one
upper inode under all their names, and that copy-up is atomic: nothing left
in WORKDIR/work, and a failure half-way leaves nothing in the upper.
"""
from __future__ import annotations

import errno
import os
import stat

import pytest
import trio

from unionfs import syscalls
from helpers.unit_helpers import do, read, walk
from unionfs.union import Caller, SetAttr

pytestmark = [pytest.mark.unit]


# -- helpers ------------------------------------------------------------------------------

def up(u, path: str):
    node = walk(u, path)
    do(u.ensure_upper, node)
    return node


def lower_of(layers, rel: str) -> str:
    for d in layers.lowers:
        if os.path.lexists(os.path.join(d, rel)):
            return os.path.join(d, rel)
    raise FileNotFoundError(rel)


def user_xattrs(path: str) -> dict[str, bytes]:
    out = {}
    for name in os.listxattr(path, follow_symlinks=False):
        if name.startswith(("trusted.overlay.", "trusted.unionfs.")):
            continue
        out[name] = os.getxattr(path, name, follow_symlinks=False)
    return out


def work_leftovers(layers) -> list[str]:
    return os.listdir(os.path.join(layers.work, "work"))


def same_meta(a: str, b: str, times: bool = True) -> None:
    sa, sb = os.lstat(a), os.lstat(b)
    assert stat.S_IFMT(sa.st_mode) == stat.S_IFMT(sb.st_mode)
    assert oct(stat.S_IMODE(sa.st_mode)) == oct(stat.S_IMODE(sb.st_mode)), (a, b)
    assert (sa.st_uid, sa.st_gid) == (sb.st_uid, sb.st_gid), (a, b)
    if times and not stat.S_ISLNK(sa.st_mode):
        assert sa.st_mtime_ns == sb.st_mtime_ns, (a, b)
    if stat.S_ISCHR(sa.st_mode) or stat.S_ISBLK(sa.st_mode):
        assert sa.st_rdev == sb.st_rdev


# -- regular files ------------------------------------------------------------------------

def test_copy_up_regular_file_data(layers, union):
    up(union, "big.bin")
    with open(layers.u("big.bin"), "rb") as f:
        assert f.read() == layers.big
    same_meta(layers.u("big.bin"), lower_of(layers, "big.bin"))
    assert work_leftovers(layers) == []


def test_copy_up_times_to_the_nanosecond(layers, union):
    up(union, "times.txt")
    st = os.lstat(layers.u("times.txt"))
    assert (st.st_atime_ns, st.st_mtime_ns) == layers.times_ns


def test_copy_up_owner_and_mode(layers, union):
    up(union, "owned.txt")
    st = os.lstat(layers.u("owned.txt"))
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert stat.S_IMODE(st.st_mode) == 0o600
    with open(layers.u("owned.txt")) as f:
        assert f.read() == "owned by 1000\n"


def test_copy_up_keeps_setuid(layers, union):
    up(union, "suid.bin")
    assert stat.S_IMODE(os.lstat(layers.u("suid.bin")).st_mode) == 0o4755


def test_copy_up_xattrs(layers, union):
    up(union, "xattr.txt")
    assert user_xattrs(layers.u("xattr.txt")) == {"user.color": b"blue", "trusted.secret": b"s3"}


def test_copy_up_does_not_copy_overlay_private_xattrs(layers, union):
    os.setxattr(os.path.join(layers.bottom, "rootfile.txt"), "trusted.overlay.origin", b"junk")
    up(union, "rootfile.txt")
    assert "trusted.overlay.origin" not in os.listxattr(layers.u("rootfile.txt"))


def test_copy_up_from_middle_layer_takes_top_most(layers, union):
    up(union, "dir/b.txt")
    with open(layers.u("dir/b.txt")) as f:
        assert f.read() == "mid-b\n"


def test_copy_up_keeps_view(layers, union):
    before = walk(union, "dir/a.txt").id
    node = up(union, "dir/a.txt")
    assert node.upper
    assert walk(union, "dir/a.txt").id == before
    assert read(union, "dir/a.txt") == b"bottom-a\n"


def test_copy_up_creates_parents_with_their_metadata(layers, union):
    up(union, "wdir/x/y.txt")
    for rel in ("wdir", "wdir/x"):
        assert stat.S_ISDIR(os.lstat(layers.u(rel)).st_mode)
        same_meta(layers.u(rel), os.path.join(layers.bottom, rel))
    # a copied-up dir is neither opaque nor redirected: its lower contents still merge
    for rel in ("wdir", "wdir/x"):
        names = os.listxattr(layers.u(rel))
        assert "trusted.overlay.opaque" not in names and "trusted.overlay.redirect" not in names
    assert sorted(n.decode() for n in union.list_dir(walk(union, "wdir"))) == ["x", "z.txt"]


def test_copy_up_keeps_parent_times(layers, union):
    """Bringing a child up is not a change to its directory: the parent's times stay."""
    up(union, "wdir/z.txt")
    assert os.lstat(layers.u("wdir")).st_mtime_ns == os.lstat(os.path.join(layers.bottom, "wdir")).st_mtime_ns
    up(union, "wdir/x/y.txt")
    assert os.lstat(layers.u("wdir")).st_mtime_ns == os.lstat(os.path.join(layers.bottom, "wdir")).st_mtime_ns


def test_copy_up_directory_metadata_only(layers, union):
    up(union, "tmp")
    st = os.lstat(layers.u("tmp"))
    assert stat.S_IMODE(st.st_mode) == 0o1777
    assert os.listdir(layers.u("tmp")) == []
    assert sorted(n.decode() for n in union.list_dir(walk(union, "tmp"))) == ["rootfile", "userfile"]


def test_copy_up_userdir_owner(layers, union):
    up(union, "userdir/rootowned")
    st = os.lstat(layers.u("userdir"))
    assert (st.st_uid, st.st_gid) == (1000, 1000)


def test_copy_up_chowns_only_when_the_new_object_lacks_the_origins_owner(layers, union,
                                                                         monkeypatch):
    """A root-owned origin needs no chown (the daemon makes objects as root); the
    uid 1000 one does, and so does every object of a set-gid work/, whose new
    objects get its group (WorkDir.owner is probed, not assumed)."""
    calls = []
    real = syscalls.chown_at
    monkeypatch.setattr(syscalls, "chown_at", lambda *a: (calls.append(a[2:]), real(*a)))
    up(union, "rootfile.txt")
    assert calls == []
    up(union, "owned.txt")
    assert calls == [(1000, 1000)]


def test_directory_copy_up_reads_its_origins_xattrs_through_the_fd(layers, union, monkeypatch):
    """Lower directories are held open for real, so a directory copy-up lists its origin's
    xattrs through that fd (no /proc/self/fd path for the kernel to resolve), and still
    copies them."""
    os.setxattr(os.path.join(layers.bottom, "wdir"), "user.tag", b"kept")
    node = walk(union, "wdir/z.txt")   # the lookups list a lower directory's xattrs by name
    listed = []
    real = os.listxattr
    monkeypatch.setattr(os, "listxattr", lambda p, **kw: (listed.append(p), real(p, **kw))[1])
    do(union.ensure_upper, node)
    assert os.getxattr(layers.u("wdir"), "user.tag") == b"kept"
    assert listed and all(isinstance(p, int) for p in listed), listed


def test_copy_up_into_set_gid_work_dir_keeps_the_origins_group(layers, make_union):
    work = os.path.join(layers.work, "work")
    os.makedirs(work, exist_ok=True)
    os.chown(work, 0, 4321)
    os.chmod(work, 0o2700)
    u = make_union()
    assert u.work.owner == (0, 4321)
    up(u, "wdir/z.txt")
    for rel in ("wdir", "wdir/z.txt"):
        st = os.lstat(layers.u(rel))
        assert (st.st_uid, st.st_gid) == (0, 0), rel


def test_copy_up_symlink(layers, union):
    up(union, "sym_rel")
    assert os.readlink(layers.u("sym_rel")) == "dir/a.txt"
    st = os.lstat(layers.u("sym_rel"))
    assert stat.S_ISLNK(st.st_mode) and (st.st_uid, st.st_gid) == (1000, 1000)
    up(union, "dir/sym_out")
    assert os.readlink(layers.u("dir/sym_out")) == "../../etc/passwd"


def test_copy_up_fifo_and_device(layers, union):
    up(union, "fifo")
    up(union, "null")
    assert stat.S_ISFIFO(os.lstat(layers.u("fifo")).st_mode)
    same_meta(layers.u("fifo"), os.path.join(layers.bottom, "fifo"))
    st = os.lstat(layers.u("null"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(st.st_mode) == 0o666


def test_copy_up_twice_is_noop(layers, union):
    node = up(union, "dir/a.txt")
    ino = os.lstat(layers.u("dir/a.txt")).st_ino
    do(union.ensure_upper, node)
    assert os.lstat(layers.u("dir/a.txt")).st_ino == ino


def test_concurrent_copy_ups_of_one_file(layers, union):
    node = walk(union, "big.bin")

    async def both():
        async with trio.open_nursery() as n:
            for _ in range(4):
                n.start_soon(union.ensure_upper, node)

    trio.run(both)
    with open(layers.u("big.bin"), "rb") as f:
        assert f.read() == layers.big
    assert work_leftovers(layers) == []


def _evict(path: str) -> None:
    """Drop a lower file's pages, so its copy-up would have to read the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert not syscalls.in_page_cache(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


@pytest.mark.parametrize("others", [0, 1])
def test_small_uncached_copy_up_stays_on_the_loop_only_when_alone(layers, union, others):
    """A small file whose data is not cached is copied on the trio loop when no other
    request is being served (a thread hop costs more than the read), and on a worker
    thread while another one is (so the two overlap); the data is right either way."""
    _evict(lower_of(layers, "dir/a.txt"))
    node = walk(union, "dir/a.txt")
    union.serving = 1 + others  # this request, and the others the adapter counts
    before = union.yields
    do(union.ensure_upper, node)
    assert union.yields - before == others  # a thread hop is counted as a yield
    with open(layers.u("dir/a.txt"), "rb") as f:
        assert f.read() == b"bottom-a\n"
    assert work_leftovers(layers) == []


@pytest.mark.parametrize("how", [syscalls.CLONE, syscalls.RANGE, syscalls.SENDFILE])
def test_copy_data_methods_keep_data_and_holes(tmp_path, how):
    """Every method copies the bytes and leaves the holes as holes (sendfile included:
    it writes at the file offset, which must follow each extent)."""
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    with open(src, "wb") as f:
        f.write(b"a" * 5000)
        f.seek(1 << 20)
        f.write(b"b" * 7000)
        f.truncate(3 << 20)  # a hole at the end too
    size = os.path.getsize(src)
    s = os.open(src, os.O_RDONLY)
    d = os.open(dst, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        done = syscalls.copy_data(s, d, size, how)
    finally:
        os.close(s)
        os.close(d)
    assert done >= how
    with open(src, "rb") as a, open(dst, "rb") as b:
        assert a.read() == b.read()
    assert os.stat(dst).st_blocks * 512 < 1 << 20


def test_copy_data_falls_back_to_sendfile_across_filesystems(tmp_path):
    """copy_file_range between two filesystems is refused (EXDEV): the data still comes
    across by sendfile, and the method returned says so, for the next copy to start there."""
    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the same filesystem as the test directory")
    data = os.urandom(200_000)
    s = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR, 0o600)
    d = os.open(str(tmp_path / "dst"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(s, data)
        assert syscalls.copy_data(s, d, len(data), syscalls.RANGE, sparse=False) == syscalls.SENDFILE
    finally:
        os.close(s)
        os.close(d)
    with open(tmp_path / "dst", "rb") as f:
        assert f.read() == data


# -- hard links ---------------------------------------------------------------------------

HL_NAMES = ("hl/one", "other/two", "other/sub/three")


def test_hard_links_copied_up_as_one_inode(layers, union):
    up(union, "other/two")
    sts = [os.lstat(layers.u(p)) for p in HL_NAMES]
    assert len({st.st_ino for st in sts}) == 1, "all names must be one upper inode"
    assert sts[0].st_nlink == 3
    for p in HL_NAMES:
        assert read(union, p) == layers.hl_data
    assert len({walk(union, p).id for p in HL_NAMES}) == 1
    assert work_leftovers(layers) == []


def test_hard_link_copy_up_keeps_alias_dir_times(layers, union):
    """Linking the other names in is part of the copy-up: their dirs' times must not change."""
    up(union, "hl/one")
    for rel in ("hl", "other", "other/sub"):
        assert os.lstat(layers.u(rel)).st_mtime_ns == \
            os.lstat(os.path.join(layers.bottom, rel)).st_mtime_ns, rel


def test_hard_link_copy_up_skips_whited_out_name(layers, union):
    do(union.unlink, walk(union, "other"), b"two")
    up(union, "hl/one")
    assert not os.path.lexists(layers.u("other/two")) or \
        stat.S_ISCHR(os.lstat(layers.u("other/two")).st_mode)
    assert os.lstat(layers.u("hl/one")).st_ino == os.lstat(layers.u("other/sub/three")).st_ino
    assert os.lstat(layers.u("hl/one")).st_nlink == 2
    assert "two" not in [n.decode() for n in union.list_dir(walk(union, "other"))]


def test_hard_link_pair_in_one_dir(layers, union):
    up(union, "hl/p2")
    assert os.lstat(layers.u("hl/p1")).st_ino == os.lstat(layers.u("hl/p2")).st_ino


def test_hard_link_alias_below_renamed_dir(layers, union):
    p1, p2 = walk(union, ""), walk(union, "")
    do(union.rename, p1, b"other", p2, b"other-moved", 0)
    up(union, "hl/one")
    assert os.lstat(layers.u("hl/one")).st_ino == os.lstat(layers.u("other-moved/two")).st_ino
    assert read(union, "other-moved/sub/three") == layers.hl_data
    assert walk(union, "other-moved/two").id == walk(union, "hl/one").id


# -- copy-up through the operations -------------------------------------------------------

def test_open_read_only_does_not_copy_up(layers, union):
    fh = do(union.open, walk(union, "dir/a.txt"), os.O_RDONLY)
    union.release(fh)
    assert not os.path.lexists(layers.u("dir/a.txt"))


def test_open_for_write_copies_up(layers, union):
    fh = do(union.open, walk(union, "dir/a.txt"), os.O_WRONLY)
    union.release(fh)
    with open(layers.u("dir/a.txt")) as f:
        assert f.read() == "bottom-a\n"


def test_open_trunc_copies_up_empty_with_metadata(layers, union):
    fh = do(union.open, walk(union, "owned.txt"), os.O_WRONLY | os.O_TRUNC)
    union.release(fh)
    st = os.lstat(layers.u("owned.txt"))
    assert st.st_size == 0 and (st.st_uid, st.st_gid) == (1000, 1000)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_setattr_chmod_copies_up_data(layers, union):
    do(union.setattr, walk(union, "big.bin"), SetAttr(mode=stat.S_IFREG | 0o600), None)
    with open(layers.u("big.bin"), "rb") as f:
        assert f.read() == layers.big
    assert stat.S_IMODE(os.lstat(layers.u("big.bin")).st_mode) == 0o600


def test_setattr_truncate_zero(layers, union):
    do(union.setattr, walk(union, "big.bin"), SetAttr(size=0), None)
    assert os.lstat(layers.u("big.bin")).st_size == 0


def test_setxattr_copies_up(layers, union):
    do(union.setxattr, walk(union, "xattr.txt"), b"user.new", b"v")
    assert user_xattrs(layers.u("xattr.txt")) == {"user.color": b"blue", "trusted.secret": b"s3",
                                                  "user.new": b"v"}


def test_link_copies_up_source(layers, union):
    do(union.link, walk(union, "dir/a.txt"), walk(union, "merged"), b"a-link")
    assert os.lstat(layers.u("dir/a.txt")).st_ino == os.lstat(layers.u("merged/a-link")).st_ino


def test_mkdir_in_lower_dir_copies_parent_up(layers, union):
    do(union.mkdir, walk(union, "wdir/x"), b"new", 0o755, Caller(0, 0))
    same_meta(layers.u("wdir"), os.path.join(layers.bottom, "wdir"))


# -- atomicity ----------------------------------------------------------------------------

def test_failure_in_data_copy_leaves_nothing(layers, union, monkeypatch):
    def boom(src, dst, size, how=0, sparse=True, fresh=False):
        os.write(dst, b"partial")
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(syscalls, "copy_data", boom)
    with pytest.raises(OSError) as ei:
        up(union, "big.bin")
    assert ei.value.errno == errno.EIO
    assert not os.path.lexists(layers.u("big.bin"))
    assert work_leftovers(layers) == []
    monkeypatch.undo()
    node = up(union, "big.bin")  # and a retry works
    assert node.upper
    with open(layers.u("big.bin"), "rb") as f:
        assert f.read() == layers.big


def test_failure_in_metadata_copy_leaves_nothing(layers, union, monkeypatch):
    def boom(*args):
        raise OSError(errno.EIO, "injected")

    node = walk(union, "wdir/x/y.txt")
    # copy_xattrs' first call (copyup's own functions call each other directly when compiled)
    monkeypatch.setattr(syscalls, "listxattr", boom)
    with pytest.raises(OSError):
        do(union.ensure_upper, node)
    assert not os.path.lexists(layers.u("wdir/x/y.txt"))
    assert work_leftovers(layers) == []


def test_failure_in_hard_link_copy_up_leaves_nothing(layers, union, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError(errno.ENOSPC, "injected")

    monkeypatch.setattr(syscalls, "copy_data", boom)
    with pytest.raises(OSError):
        up(union, "hl/one")
    for p in HL_NAMES:
        assert not os.path.lexists(layers.u(p))
    assert work_leftovers(layers) == []


def test_leftovers_of_crashed_mount_removed_at_start(layers, make_union):
    os.makedirs(os.path.join(layers.work, "work", "t999.1", "deep"))
    with open(os.path.join(layers.work, "work", "t999.2"), "w") as f:
        f.write("half a copy")
    make_union()
    assert work_leftovers(layers) == []


def test_copy_up_keeps_file_capability(layers, union):
    import struct
    cap = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)  # v2, effective, cap_net_bind_service
    os.setxattr(os.path.join(layers.bottom, "suid.bin"), "security.capability", cap)
    up(union, "suid.bin")
    assert os.getxattr(layers.u("suid.bin"), "security.capability") == cap


def test_copy_up_symlink_times(layers, union):
    t = (1_050_000_000_000_000_001, 1_060_000_000_000_000_002)
    os.utime(os.path.join(layers.bottom, "sym_dangling"), ns=t, follow_symlinks=False)
    up(union, "sym_dangling")
    st = os.lstat(layers.u("sym_dangling"))
    assert (st.st_atime_ns, st.st_mtime_ns) == t


def test_rename_noreplace_racing_a_create_of_its_target(layers, union):
    """A rename whose copy-up hops to a thread must look at its names again afterwards:
    another request may have created the target meanwhile, and RENAME_NOREPLACE must not
    replace it (nor may a plain rename replace an object it never resolved)."""
    root = walk(union, "")
    outcome: list[object] = []

    async def rename() -> None:
        try:
            await union.rename(root, b"big.bin", root, b"target", syscalls.RENAME_NOREPLACE)
            outcome.append("renamed")
        except OSError as e:
            outcome.append(e.errno)

    async def create_target(before: int) -> None:
        for _ in range(100_000):  # until the rename's copy-up is on its thread
            if union.yields != before:
                break
            await trio.sleep(0)
        else:
            raise AssertionError("the copy-up's thread hop was not counted in yields")
        _node, fh = union.create(root, b"target", 0o644, os.O_WRONLY, Caller(0, 0))
        union.write(fh, 0, b"mine")
        union.release(fh)

    async def both() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(create_target, union.yields)
            n.start_soon(rename)

    trio.run(both)
    assert outcome == [errno.EAGAIN]
    assert read(union, "target") == b"mine"
    assert read(union, "big.bin") == layers.big
