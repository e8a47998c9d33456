"""Behaviour through a real unionfs mount, one focused test per behaviour:
Names and errors; more namespace cases.

Fixtures are in conftest.py (`mounted`, `pair`, `layers`, ...); every mount is unmounted by
the helpers in helpers/mounting.py, even on failure."""
from __future__ import annotations

import errno
import os
import stat
import subprocess

import pytest

from helpers.libc import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2
from helpers.ops import HL, enoent, errno_of, raw_readdir, read, write
from helpers.mounting import unionfs_mount
from helpers.unit_helpers import is_whiteout

pytestmark = [pytest.mark.mount]


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
