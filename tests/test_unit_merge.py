"""Resolution rules and namespace operations of unionfs.union.Union, without FUSE.

Each test builds a Union over the fixture layers (see conftest.py) and calls
its methods directly: lookup/list_dir for the view, and unlink, rmdir, mkdir,
rename (under trio.run) for what they leave in the upper, which must be in
kernel overlayfs format.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess

import pytest

from helpers.mounting import force_unmount
from helpers.unit_helpers import do, is_whiteout, read, walk, xattr
from unionfs.union import Caller

pytestmark = [pytest.mark.unit]


# -- helpers ------------------------------------------------------------------------------

def exists(u, path: str) -> bool:
    try:
        walk(u, path)
        return True
    except FileNotFoundError:
        return False


def ls(u, path: str = "") -> set[str]:
    out = [n.decode() for n in u.list_dir(walk(u, path))]
    assert len(out) == len(set(out)), f"duplicate names in {path!r}: {out}"
    return set(out)


def split(u, path: str):
    parent, _, name = path.rpartition("/")
    return walk(u, parent), name.encode()


def rename(u, old: str, new: str, flags: int = 0) -> None:
    p1, n1 = split(u, old)
    p2, n2 = split(u, new)
    do(u.rename, p1, n1, p2, n2, flags)


def work_leftovers(layers) -> list[str]:
    return os.listdir(os.path.join(layers.work, "work"))


ROOT = Caller(0, 0)


# -- lookup and readdir -------------------------------------------------------------------

def test_root_lists_merged_names(union):
    names = ls(union)
    expected = {"dir", "shadow.txt", "opq", "ociopq", "merged", "hl", "other", "sym_rel",
                "sym_abs", "sym_dangling", "fifo", "null", "xattr.txt", "owned.txt", "suid.bin",
                "rootfile.txt", "times.txt", "big.bin", "tmp", "userdir", "emptydir", "wdir",
                "wdir2"}
    assert names == expected


def test_shadowing_top_most_wins(union):
    assert read(union, "shadow.txt") == b"top-shadow\n"
    assert read(union, "dir/b.txt") == b"mid-b\n"
    assert read(union, "dir/a.txt") == b"bottom-a\n"


def test_upper_shadows_lowers(layers, make_union):
    os.makedirs(layers.u("dir"))
    with open(layers.u("dir/a.txt"), "w") as f:
        f.write("upper-a\n")
    u = make_union()
    assert read(u, "dir/a.txt") == b"upper-a\n"
    assert "a.txt" in ls(u, "dir") and "top.txt" in ls(u, "dir")


def test_merged_dir_combines_all_layers(union):
    assert ls(union, "merged") == {"t1.txt", "m1.txt", "o1.txt", "b1.txt"}
    assert ls(union, "dir") == {"a.txt", "b.txt", "top.txt", "sub", "sym_out"}


def test_kernel_whiteout_in_lower_hides(union):
    assert not exists(union, "gone.txt")
    assert not exists(union, "dir/gone2.txt")
    assert "gone.txt" not in ls(union)
    assert "gone2.txt" not in ls(union, "dir")


def test_oci_whiteout_in_lower_hides(union):
    assert not exists(union, "ocigone.txt")
    assert not exists(union, "dir/hidden.txt")
    assert "ocigone.txt" not in ls(union)


def test_oci_markers_never_listed_nor_found(union):
    for d in ("", "dir", "ociopq", "merged"):
        assert not any(n.startswith(".wh.") for n in ls(union, d)), d
    assert not exists(union, ".wh.ocigone.txt")
    assert not exists(union, "ociopq/.wh..wh..opq")
    assert not exists(union, "dir/.wh.hidden.txt")


def test_kernel_opaque_dir_in_lower(union):
    assert ls(union, "opq") == {"new.txt"}
    assert not exists(union, "opq/old.txt")
    assert read(union, "opq/new.txt") == b"mid-opq-new\n"


def test_oci_opaque_dir_in_lower(union):
    assert ls(union, "ociopq") == {"new.txt"}
    assert not exists(union, "ociopq/old.txt")


def test_whiteout_in_upper_hides(layers, make_union):
    os.mknod(layers.u("shadow.txt"), stat.S_IFCHR, os.makedev(0, 0))
    os.makedirs(layers.u("dir"))
    os.mknod(layers.u("dir/a.txt"), stat.S_IFCHR, os.makedev(0, 0))
    u = make_union()
    assert not exists(u, "shadow.txt")
    assert "shadow.txt" not in ls(u)
    assert not exists(u, "dir/a.txt")
    assert "a.txt" not in ls(u, "dir")


def test_opaque_dir_in_upper(layers, make_union):
    os.makedirs(layers.u("merged"))
    os.setxattr(layers.u("merged"), "trusted.overlay.opaque", b"y")
    with open(layers.u("merged/u.txt"), "w") as f:
        f.write("u\n")
    u = make_union()
    assert ls(u, "merged") == {"u.txt"}
    assert not exists(u, "merged/b1.txt")


def test_opaque_upper_root(layers, make_union):
    os.setxattr(layers.upper, "trusted.overlay.opaque", b"y")
    u = make_union()
    assert ls(u) == set()


def test_redirect_absolute(layers, make_union):
    """A renamed lower dir: the new name carries redirect=/old, the old name a whiteout."""
    os.makedirs(layers.u("sub"))
    os.makedirs(layers.u("sub/moved"))
    os.setxattr(layers.u("sub/moved"), "trusted.overlay.redirect", b"/wdir")
    os.mknod(layers.u("wdir"), stat.S_IFCHR, os.makedev(0, 0))
    u = make_union()
    assert not exists(u, "wdir")
    assert ls(u, "sub/moved") == {"x", "z.txt"}
    assert read(u, "sub/moved/x/y.txt") == b"wdir-y\n"


def test_redirect_relative(layers, make_union):
    os.makedirs(layers.u("wdir-renamed"))
    os.setxattr(layers.u("wdir-renamed"), "trusted.overlay.redirect", b"wdir")
    os.mknod(layers.u("wdir"), stat.S_IFCHR, os.makedev(0, 0))
    u = make_union()
    assert ls(u, "wdir-renamed") == {"x", "z.txt"}
    assert read(u, "wdir-renamed/z.txt") == b"wdir-z\n"


def test_redirect_to_merged_dir_keeps_all_lower_layers(layers, make_union):
    os.makedirs(layers.u("m2"))
    os.setxattr(layers.u("m2"), "trusted.overlay.redirect", b"/merged")
    u = make_union()
    assert ls(u, "m2") == {"t1.txt", "m1.txt", "o1.txt", "b1.txt"}


def test_invalid_redirect_ignored(layers, make_union):
    os.makedirs(layers.u("dir"))
    os.setxattr(layers.u("dir"), "trusted.overlay.redirect", b"../../etc")
    u = make_union()
    assert ls(u, "dir") == {"a.txt", "b.txt", "top.txt", "sub", "sym_out"}


def test_upper_file_over_lower_dir_stops_merge(layers, make_union):
    with open(layers.u("merged"), "w") as f:
        f.write("file now\n")
    u = make_union()
    node = walk(u, "merged")
    assert not node.is_dir
    assert read(u, "merged") == b"file now\n"


def test_lookup_dot_and_dotdot(union):
    d = walk(union, "dir/sub")
    node, _ = union.lookup(d, b".")
    assert node is d
    node, _ = union.lookup(d, b"..")
    assert node.id == walk(union, "dir").id


def test_lookup_name_too_long(union):
    with pytest.raises(OSError) as ei:
        union.lookup(union.root, b"x" * 256)
    assert ei.value.errno == errno.ENAMETOOLONG
    node, st = union.lookup(union.root, b"x" * 255)
    assert node is None and st is None


def test_inode_numbers_distinct_and_stable(layers, make_union):
    u1 = make_union()
    ids = {p: walk(u1, p).id for p in ("dir", "dir/a.txt", "dir/b.txt", "shadow.txt",
                                       "merged/t1.txt", "merged/b1.txt", "hl/one", "other/two")}
    # hard links: one inode
    assert ids["hl/one"] == ids["other/two"]
    others = [v for k, v in ids.items() if k != "other/two"]
    assert len(set(others)) == len(others)
    u2 = make_union()
    assert {p: walk(u2, p).id for p in ids} == ids


def test_no_upper_is_read_only(make_union):
    u = make_union(upper=False)
    assert read(u, "shadow.txt") == b"top-shadow\n"
    with pytest.raises(OSError) as ei:
        do(u.ensure_upper, walk(u, "dir/a.txt"))
    assert ei.value.errno == errno.EROFS
    with pytest.raises(OSError) as ei:
        do(u.mkdir, u.root, b"new", 0o755, ROOT)
    assert ei.value.errno == errno.EROFS
    with pytest.raises(OSError) as ei:
        do(u.unlink, walk(u, "dir"), b"a.txt")
    assert ei.value.errno == errno.EROFS


def test_readonly_with_upper(layers, make_union):
    u = make_union(readonly=True)
    for call in (lambda: do(u.mkdir, u.root, b"new", 0o755, ROOT),
                 lambda: do(u.unlink, walk(u, "dir"), b"a.txt"),
                 lambda: do(u.rmdir, u.root, b"emptydir"),
                 lambda: do(u.ensure_upper, walk(u, "dir/a.txt")),
                 lambda: rename(u, "shadow.txt", "s2")):
        with pytest.raises(OSError) as ei:
            call()
        assert ei.value.errno == errno.EROFS
    assert os.listdir(layers.upper) == []


# -- removing names -----------------------------------------------------------------------

def test_unlink_lower_file_leaves_kernel_whiteout(layers, union):
    do(union.unlink, walk(union, "dir"), b"a.txt")
    assert is_whiteout(layers.u("dir/a.txt"))
    assert not exists(union, "dir/a.txt")
    assert "a.txt" not in ls(union, "dir")
    assert work_leftovers(layers) == []


def test_unlink_upper_only_file_leaves_nothing(layers, union):
    node, fh = do(union.create, union.root, b"new.txt", 0o644, os.O_WRONLY, ROOT)
    union.release(fh)
    do(union.unlink, union.root, b"new.txt")
    assert not os.path.lexists(layers.u("new.txt"))


def test_unlink_copied_up_file_leaves_whiteout(layers, union):
    do(union.ensure_upper, walk(union, "shadow.txt"))
    do(union.unlink, union.root, b"shadow.txt")
    assert is_whiteout(layers.u("shadow.txt"))
    assert not exists(union, "shadow.txt")
    assert work_leftovers(layers) == []


def test_unlink_directory_is_eisdir(union):
    with pytest.raises(OSError) as ei:
        do(union.unlink, union.root, b"dir")
    assert ei.value.errno == errno.EISDIR


def test_unlink_missing_is_enoent(union):
    for name in (b"nothing", b"gone.txt", b"ocigone.txt"):
        with pytest.raises(OSError) as ei:
            do(union.unlink, union.root, name)
        assert ei.value.errno == errno.ENOENT


def test_rmdir_merged_nonempty(union):
    with pytest.raises(OSError) as ei:
        do(union.rmdir, union.root, b"merged")
    assert ei.value.errno == errno.ENOTEMPTY


def test_rmdir_not_a_dir(union):
    with pytest.raises(OSError) as ei:
        do(union.rmdir, union.root, b"shadow.txt")
    assert ei.value.errno == errno.ENOTDIR


def test_rmdir_lower_empty_dir_leaves_whiteout(layers, union):
    do(union.rmdir, union.root, b"emptydir")
    assert is_whiteout(layers.u("emptydir"))
    assert not exists(union, "emptydir")


def test_rmdir_dir_emptied_through_whiteouts(layers, union):
    """A dir that only holds whiteouts is empty in the view; rmdir works and leaves a whiteout."""
    do(union.unlink, walk(union, "merged"), b"t1.txt")
    do(union.unlink, walk(union, "merged"), b"m1.txt")
    do(union.unlink, walk(union, "merged"), b"o1.txt")
    do(union.unlink, walk(union, "merged"), b"b1.txt")
    assert ls(union, "merged") == set()
    do(union.rmdir, union.root, b"merged")
    assert is_whiteout(layers.u("merged"))
    assert work_leftovers(layers) == []


def test_rmdir_then_mkdir_is_empty_and_opaque(layers, union):
    wdir = walk(union, "wdir2")
    do(union.unlink, wdir, b"q.txt")
    do(union.rmdir, union.root, b"wdir2")
    node = do(union.mkdir, union.root, b"wdir2", 0o750, ROOT)
    assert node.opaque
    assert xattr(layers.u("wdir2"), "trusted.overlay.opaque") == b"y"
    assert stat.S_IMODE(os.lstat(layers.u("wdir2")).st_mode) == 0o750
    assert ls(union, "wdir2") == set()
    assert os.listdir(layers.u("wdir2")) == []
    assert work_leftovers(layers) == []


def test_mkdir_over_whiteout_in_lower_is_opaque(layers, union):
    """gone.txt is whited out in a lower: a new dir there must not merge anything below."""
    do(union.mkdir, union.root, b"gone.txt", 0o755, ROOT)
    assert stat.S_ISDIR(os.lstat(layers.u("gone.txt")).st_mode)
    assert ls(union, "gone.txt") == set()


def test_mkdir_fresh_name_not_opaque(layers, union):
    do(union.mkdir, union.root, b"brandnew", 0o755, ROOT)
    assert xattr(layers.u("brandnew"), "trusted.overlay.opaque") is None


def test_mkdir_existing_eexist(union):
    for name in (b"dir", b"shadow.txt", b"merged"):
        with pytest.raises(OSError) as ei:
            do(union.mkdir, union.root, name, 0o755, ROOT)
        assert ei.value.errno == errno.EEXIST


def test_mkdir_owner_is_caller(layers, union):
    do(union.mkdir, walk(union, "tmp"), b"mine", 0o700, Caller(1000, 1000))
    st = os.lstat(layers.u("tmp/mine"))
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    # the parent was copied up with its own metadata
    pst = os.lstat(layers.u("tmp"))
    assert stat.S_IMODE(pst.st_mode) == 0o1777


def test_mknod_whiteout_device_refused(union):
    with pytest.raises(OSError) as ei:
        do(union.mknod, union.root, b"wh", stat.S_IFCHR | 0o644, 0, ROOT)
    assert ei.value.errno == errno.EPERM


def test_create_over_lower_whiteout(layers, union):
    node, fh = do(union.create, union.root, b"gone.txt", 0o644, os.O_WRONLY, ROOT)
    union.release(fh)
    assert exists(union, "gone.txt")
    assert read(union, "gone.txt") == b""
    assert stat.S_ISREG(os.lstat(layers.u("gone.txt")).st_mode)


# -- rename -------------------------------------------------------------------------------

def test_rename_lower_file(layers, union):
    rename(union, "dir/a.txt", "dir/a2.txt")
    assert read(union, "dir/a2.txt") == b"bottom-a\n"
    assert not exists(union, "dir/a.txt")
    assert is_whiteout(layers.u("dir/a.txt"))
    with open(layers.u("dir/a2.txt"), "rb") as f:
        assert f.read() == b"bottom-a\n"
    assert work_leftovers(layers) == []


def test_lookups_after_a_listing_resolve_as_lookups_alone(layers, make_union):
    """A listing of a lower directory spares the lookups that follow it the layers a name is
    not in (Resolver._listed): every name of the view, and a name each layer lacks, resolves
    the same as through a union that never lists, whiteouts and OCI markers included."""
    listing, alone = make_union(), make_union()

    def seen(u, node, name):
        child, st = u.lookup(node, name)
        if child is None:
            return None
        return (child.id, child.kind, st.st_size, child.upper, child.opaque,
                [(layer.index, path) for layer, path in child.lowers])

    checked = 0
    pending = [("", listing.root, alone.root)]
    while pending:
        path, a, b = pending.pop()
        names = set(listing.list_dir(a)) | {b"absent", b".wh.absent"}
        for layer in layers.lowers:   # and the names whiteouts and markers hide
            d = os.path.join(layer, path.lstrip("/"))
            if os.path.isdir(d) and not os.path.islink(d):
                names.update(n.removeprefix(b".wh.") for n in os.listdir(os.fsencode(d)))
        for name in sorted(names):
            got = seen(listing, a, name)
            assert got == seen(alone, b, name), (path, name)
            checked += 1
            if got is not None and stat.S_ISDIR(got[1]):
                ca, _ = listing.lookup(a, name)
                cb, _ = alone.lookup(b, name)
                pending.append((f"{path}/{name.decode()}", listing.nodes.ref(ca), alone.nodes.ref(cb)))
    assert checked > 50


@contextlib.contextmanager
def private_ext4(path: str):
    """A new ext4 of its own at *path*: the lowest free inode number of a group is the next
    one given, with nothing else on the machine taking it first."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a loop mount)")
    img = path + ".img"
    subprocess.run(["truncate", "-s", "32M", img], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", img], check=True, capture_output=True)
    os.makedirs(path)
    subprocess.run(["mount", "-o", "loop", img, path], check=True)
    try:
        yield path
    finally:
        force_unmount(path)
        os.unlink(img)


def test_a_new_file_never_takes_the_identity_of_a_deleted_copy(layers, tmp_path):
    """Without redirects (userxattr) a renamed directory is copied, and a copied symlink,
    which cannot carry the identity xattr, is known by its upper inode number. Once it is
    deleted, the upper's filesystem gives that number to a new file: the file keeps the
    inode number it was created with, as kernel overlayfs' does."""
    from unionfs import format
    from unionfs.config import MountConfig
    from unionfs.union import Union
    os.makedirs(os.path.join(layers.bottom, "sdir"))
    os.symlink("target", os.path.join(layers.bottom, "sdir", "link"))
    with private_ext4(str(tmp_path / "fs")) as fs:
        upper, work = os.path.join(fs, "upper"), os.path.join(fs, "work")
        os.makedirs(upper)
        os.makedirs(work)
        u = Union(MountConfig(lowers=list(layers.lowers), upper=upper, workdir=work,
                              mountpoint=layers.mnt),
                  fmt=format.for_mount(userxattr=True, privileged=True))
        try:
            rename(u, "sdir", "sdir2")
            freed = os.lstat(os.path.join(upper, "sdir2", "link")).st_ino
            assert freed in u.r.unmarked   # what makes the case: the copy known by its number
            do(u.unlink, walk(u, "sdir2"), b"link")
            for i in range(64):   # the numbers freed before it are given first
                node, fh = do(u.create, walk(u, "sdir2"), b"f%d" % i, 0o644, os.O_WRONLY, ROOT)
                u.release(fh)
                again, _st = u.lookup(walk(u, "sdir2"), b"f%d" % i)
                assert again.id == node.id, f"f{i}: {again.id:#x} != {node.id:#x}"
                if os.lstat(os.path.join(upper, "sdir2", f"f{i}")).st_ino == freed:
                    break
            else:
                pytest.fail("the new ext4 never gave the freed inode number again")
        finally:
            u.close()


def test_rename_lower_dir_sets_redirect(layers, union):
    rename(union, "wdir", "wdir-moved")
    assert ls(union, "wdir-moved") == {"x", "z.txt"}
    assert read(union, "wdir-moved/x/y.txt") == b"wdir-y\n"
    assert not exists(union, "wdir")
    assert is_whiteout(layers.u("wdir"))
    rd = xattr(layers.u("wdir-moved"), "trusted.overlay.redirect")
    assert rd in (b"/wdir", b"wdir")


def test_rename_lower_dir_into_other_dir(layers, union):
    rename(union, "wdir", "dir/sub/deeper")
    assert ls(union, "dir/sub/deeper") == {"x", "z.txt"}
    assert xattr(layers.u("dir/sub/deeper"), "trusted.overlay.redirect") == b"/wdir"


def test_rename_renamed_dir_again_keeps_contents(layers, make_union):
    u = make_union()
    rename(u, "wdir", "w1")
    rename(u, "w1", "dir/w2")
    assert ls(u, "dir/w2") == {"x", "z.txt"}
    assert not exists(u, "w1") and not exists(u, "wdir")
    u2 = make_union()   # what is on disk alone says the same
    assert ls(u2, "dir/w2") == {"x", "z.txt"}
    assert not exists(u2, "w1") and not exists(u2, "wdir")


def test_rename_dir_over_empty_lower_dir(layers, union):
    rename(union, "wdir", "emptydir")
    assert ls(union, "emptydir") == {"x", "z.txt"}
    assert not exists(union, "wdir")


def test_rename_dir_over_nonempty_dir_enotempty(union):
    with pytest.raises(OSError) as ei:
        rename(union, "wdir", "wdir2")
    assert ei.value.errno == errno.ENOTEMPTY


def test_rename_file_over_dir_eisdir_and_reverse_enotdir(union):
    with pytest.raises(OSError) as ei:
        rename(union, "shadow.txt", "emptydir")
    assert ei.value.errno == errno.EISDIR
    with pytest.raises(OSError) as ei:
        rename(union, "emptydir", "shadow.txt")
    assert ei.value.errno == errno.ENOTDIR


def test_rename_noreplace(union):
    with pytest.raises(OSError) as ei:
        rename(union, "dir/a.txt", "dir/b.txt", 1)
    assert ei.value.errno == errno.EEXIST
    rename(union, "dir/a.txt", "dir/c.txt", 1)
    assert read(union, "dir/c.txt") == b"bottom-a\n"


def test_rename_exchange(layers, union):
    rename(union, "dir/a.txt", "shadow.txt", 2)
    assert read(union, "dir/a.txt") == b"top-shadow\n"
    assert read(union, "shadow.txt") == b"bottom-a\n"


def test_rename_exchange_missing_enoent(union):
    with pytest.raises(OSError) as ei:
        rename(union, "dir/a.txt", "dir/none", 2)
    assert ei.value.errno == errno.ENOENT


def test_rename_to_whiteout_name(layers, union):
    rename(union, "shadow.txt", "gone.txt")
    assert read(union, "gone.txt") == b"top-shadow\n"
    assert not exists(union, "shadow.txt")


def test_rename_keeps_inode_number(union):
    ino = walk(union, "dir/a.txt").id
    rename(union, "dir/a.txt", "merged/a.txt")
    assert walk(union, "merged/a.txt").id == ino
    dino = walk(union, "wdir").id
    rename(union, "wdir", "wd")
    assert walk(union, "wd").id == dino


def _lower_redirect(layers):
    """mid holds a renamed copy of bottom's wdir: redirect=/wdir, plus a whiteout at wdir."""
    os.makedirs(os.path.join(layers.mid, "renamed"))
    os.setxattr(os.path.join(layers.mid, "renamed"), "trusted.overlay.redirect", b"/wdir")
    with open(os.path.join(layers.mid, "renamed", "added.txt"), "w") as f:
        f.write("added\n")
    os.mknod(os.path.join(layers.mid, "wdir"), stat.S_IFCHR, os.makedev(0, 0))


def test_redirect_in_lower_layer(layers, make_union):
    _lower_redirect(layers)
    u = make_union()
    assert not exists(u, "wdir")
    assert ls(u, "renamed") == {"x", "z.txt", "added.txt"}
    assert read(u, "renamed/x/y.txt") == b"wdir-y\n"


def test_oci_whiteout_does_not_hide_its_own_layer(layers, make_union):
    """OCI image spec: a whiteout applies to lower layers only; a file in the same layer
    stays visible (and readdir and lookup must agree about it)."""
    with open(os.path.join(layers.oci, "dir", "same.txt"), "w") as f:
        f.write("same layer\n")
    with open(os.path.join(layers.oci, "dir", ".wh.same.txt"), "w") as f:
        pass
    with open(os.path.join(layers.bottom, "dir", "same.txt"), "w") as f:
        f.write("bottom\n")
    u = make_union()
    listed = "same.txt" in ls(u, "dir")
    found = exists(u, "dir/same.txt")
    assert listed == found, "readdir and lookup disagree"
    assert found and read(u, "dir/same.txt") == b"same layer\n"


def test_a_name_absent_from_the_lowers_is_probed_there_once(union, monkeypatch):
    """Lower layers never change under a mount: a name a LOOKUP missed is not looked
    for in them again by the CREATE (or MKDIR, RENAME) that follows; the upper still is."""
    from unionfs import syscalls
    probed = []
    real = syscalls.lstat_at
    monkeypatch.setattr(syscalls, "lstat_at", lambda fd, name: (probed.append(name), real(fd, name))[1])
    parent = walk(union, "dir")
    assert union.lookup(parent, b"newname")[0] is None
    first = len(probed)
    assert first >= 2  # the lower layers that have dir/
    assert union.lookup(parent, b"newname")[0] is None
    assert len(probed) - first <= 1  # the upper only, if dir/ is there
    node = union.mkdir(parent, b"newname", 0o755, Caller(0, 0))
    assert union.lookup(parent, b"newname")[0].id == node.id


def test_a_lower_name_found_once_is_not_probed_again(union, monkeypatch):
    """What a LOOKUP found in the lower layers is remembered, so the RENAME or UNLINK
    that follows resolves the name without probing them again, and sees the same."""
    from unionfs import syscalls
    probed = []
    real = syscalls.lstat_at
    monkeypatch.setattr(syscalls, "lstat_at", lambda fd, name: (probed.append(name), real(fd, name))[1])
    parent = walk(union, "dir")
    first = union.r.resolve(parent, b"b.txt")
    assert first.st is not None and first.lowers and probed.count(b"b.txt") >= 2
    before = len(probed)
    again = union.r.resolve(parent, b"b.txt")
    assert len(probed) - before <= 1  # the upper only, if dir/ is there
    assert (again.st, again.ino, again.lowers, again.upper) == \
        (first.st, first.ino, first.lowers, first.upper)
    assert again.lowers is not first.lowers  # each Entry gets a list of its own
    # a merged directory: resolved under its upper copy, the lowers still merge in
    merged = union.r.resolve(union.root, b"merged")
    listed = ls(union, "merged")
    assert len(listed) >= 3
    do(union.ensure_upper, walk(union, "merged"))
    up = union.r.resolve(union.root, b"merged")
    assert up.upper and up.lowers == merged.lowers and up.origin == merged.ino
    assert ls(union, "merged") == listed


@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "before-openat2"])
def test_exists_below_stays_in_the_directory(tmp_path, monkeypatch, openat2):
    """The OCI opaque check looks two components down in one call (syscalls.exists_below;
    three calls where openat2 is missing): a symlink on the way is never followed; a marker
    that is itself a symlink still counts."""
    from unionfs import syscalls
    monkeypatch.setattr(syscalls, "_openat2_available", openat2)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".wh..wh..opq").touch()
    layer = tmp_path / "layer"
    (layer / "plain").mkdir(parents=True)
    (layer / "marked").mkdir()
    (layer / "marked" / ".wh..wh..opq").touch()
    (layer / "linkmarked").mkdir()
    os.symlink("nowhere", layer / "linkmarked" / ".wh..wh..opq")
    os.symlink(outside, layer / "escape")
    fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found = {name: syscalls.exists_below(fd, name.encode(), b".wh..wh..opq")
                 for name in ("plain", "marked", "linkmarked", "escape", "absent")}
    finally:
        os.close(fd)
    assert found == {"plain": False, "marked": True, "linkmarked": True, "escape": False,
                     "absent": False}
