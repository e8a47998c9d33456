"""Behaviour through a real unionfs mount, one focused test per behaviour:
Whiteouts, opaque dirs, redirects in the upper.

Fixtures are in conftest.py (`mounted`, `pair`, `layers`, ...); every mount is unmounted by
the helpers in helpers/mounting.py, even on failure."""
from __future__ import annotations

import errno
import json
import os
import stat
import subprocess

import pytest

from helpers import nomknod
from helpers.libc import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2
from helpers.ops import all_names, enoent, errno_of, read, write
from helpers.mounting import kernel_overlay, kernel_view, unionfs_cmd, unionfs_mount
from helpers.snapshot import snapshot
from helpers.unit_helpers import is_whiteout, xattr

pytestmark = [pytest.mark.mount]


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


# -- whiteouts in overlayfs's xattr form (where a 0/0 device cannot be made) ---------------

def _view(root: str) -> dict:
    def describe(path: str, st: os.stat_result):
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                return ("file", stat.S_IMODE(st.st_mode), f.read())
        return (stat.filemode(st.st_mode)[0], stat.S_IMODE(st.st_mode))
    return snapshot(root, describe)


XWH_OPS = """
set -e
rm {m}/d/a {m}/top
rm -r {m}/d/sub
mv {m}/d/b {m}/d/b2
mkdir {m}/d/sub && echo new > {m}/d/sub/new
mv {m}/d/b2 {m}/d/gone-again && rm {m}/d/gone-again
mv {m}/d2/f {m}/d/f-moved
"""


@pytest.mark.kernel
def test_xattr_whiteouts_where_mknod_is_refused(tmp_path):
    """A daemon that may make no 0/0 device nor RENAME_WHITEOUT (a seccomp filter:
    helpers.nomknod) writes overlayfs's xattr whiteouts: a zero-size file with
    trusted.overlay.whiteout in a directory marked trusted.overlay.opaque="x" (which is not
    opaque). The view, the remount, `unionfs diff` and kernel overlayfs (reading the upper as
    a lower layer; as an upper, its lookups) all agree with a daemon that makes devices."""
    lower = tmp_path / "lower"
    for rel, data in (("d/a", "a\n"), ("d/b", "b\n"), ("d/keep", "keep\n"),
                      ("d/sub/k", "k\n"), ("top", "top\n"), ("d2/f", "f\n")):
        (lower / rel).parent.mkdir(parents=True, exist_ok=True)
        (lower / rel).write_text(data)
    views, diffs = {}, {}
    for kind, wrapper in (("mknod", []), ("xattr", nomknod.argv([]))):
        upper, mnt = tmp_path / f"u-{kind}", tmp_path / f"m-{kind}"
        upper.mkdir(), mnt.mkdir()
        with unionfs_mount([str(lower)], str(upper), str(mnt), wrapper=wrapper):
            subprocess.run(["sh", "-c", XWH_OPS.format(m=mnt)], check=True)
            views[kind] = _view(str(mnt))
            if kind == "xattr":
                d = str(mnt / "d")
                assert "keep" in os.listdir(d)          # "x" does not make d opaque
                for name in ("trusted.overlay.opaque", "trusted.overlay.whiteout"):
                    assert name not in os.listxattr(d)
                    assert errno_of(lambda: os.getxattr(d, name)) in (errno.ENODATA, errno.EOPNOTSUPP)
                    assert errno_of(lambda: os.setxattr(str(mnt / "d/keep"), name, b"")) == errno.EOPNOTSUPP
        with unionfs_mount([str(lower)], str(upper), str(mnt)):   # remount, no filter
            assert _view(str(mnt)) == views[kind]
        diffs[kind] = subprocess.run(unionfs_cmd("diff", str(upper)), capture_output=True,
                                     text=True, check=True).stdout
    assert views["xattr"] == views["mknod"]
    assert diffs["xattr"] == diffs["mknod"] and "D /d/a" in diffs["xattr"].replace("\t", " ")
    ux = tmp_path / "u-xattr"
    devices = [p for p in ux.rglob("*") if stat.S_ISCHR(os.lstat(p).st_mode)]
    assert devices == []
    for rel in ("top", "d/a", "d/b", "d2/f"):
        assert os.lstat(ux / rel).st_size == 0
        assert os.getxattr(ux / rel, "trusted.overlay.whiteout") == b""
    assert os.getxattr(ux / "d", "trusted.overlay.opaque") == b"x"
    assert os.getxattr(ux / "d/sub", "trusted.overlay.opaque") == b"y"
    kmnt = tmp_path / "k"
    kmnt.mkdir()
    with kernel_view([str(ux), str(lower)], str(kmnt)):
        assert _view(str(kmnt)) == views["mknod"]
    work = tmp_path / "kwork"
    work.mkdir()
    with kernel_overlay([str(lower)], str(ux), str(work), str(kmnt), "redirect_dir=on"):
        for rel in ("top", "d/a", "d/b", "d2/f"):
            assert enoent(str(kmnt / rel))
        assert read(str(kmnt / "d/f-moved")) == b"f\n"


@pytest.mark.kernel
def test_xattr_whiteouts_in_lower_layers_both_prefixes(tmp_path):
    """A lower layer's xattr whiteouts (trusted.overlay.* or user.overlay.*) hide what is
    below them, in lookups and listings, as kernel overlayfs (with or without userxattr)
    reads them; an empty file beside them, and the "x"-marked directory, show; `unionfs
    inspect` counts them as removals, `unionfs diff` of an upper over them sees nothing."""
    bottom = tmp_path / "bottom"
    (bottom / "d").mkdir(parents=True)
    for name in ("a", "b", "c"):
        (bottom / "d" / name).write_text(name + "\n")
    for prefix in ("trusted.overlay.", "user.overlay."):
        top = tmp_path / prefix.split(".")[0]
        (top / "d").mkdir(parents=True)
        (top / "d" / "a").touch()
        os.setxattr(top / "d" / "a", prefix + "whiteout", b"")
        os.setxattr(top / "d", prefix + "opaque", b"x")
        (top / "d" / "empty").touch()
    layers = [str(tmp_path / "trusted"), str(tmp_path / "user"), str(bottom)]
    upper, mnt = tmp_path / "u", tmp_path / "m"
    upper.mkdir(), mnt.mkdir()
    with unionfs_mount(layers, str(upper), str(mnt)):
        view = _view(str(mnt))
        assert enoent(str(mnt / "d/a"))
        os.unlink(mnt / "d/c")
        os.mkdir(mnt / "d/new")
    assert sorted(view) == ["d", "d/b", "d/c", "d/empty"]
    assert view["d/empty"][2] == b""
    kmnt = tmp_path / "k"
    kmnt.mkdir()
    for top, opts in ((layers[0], "ro"), (layers[1], "ro,userxattr")):
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"{opts},lowerdir={top}:{bottom}", str(kmnt)], check=True)
        try:
            assert _view(str(kmnt)) == view
        finally:
            subprocess.run(["umount", str(kmnt)], check=True)
    assert "trusted.overlay.opaque" not in os.listxattr(upper / "d")   # not copied up
    diff = subprocess.run(unionfs_cmd("diff", str(upper)), capture_output=True, text=True,
                          check=True).stdout.split("\n")
    assert [line.split()[-1] for line in diff if line] == ["/d", "/d/c", "/d/new"]
    proc = subprocess.run(unionfs_cmd("inspect", "--json", ":".join(layers)), capture_output=True,
                          text=True, check=True)
    report = json.loads(proc.stdout)["layers"]
    # the top one's whiteout hides what the layers below it show already: no removal
    assert [lr["removed"] for lr in report[:2]] == [0, 1] and report[0]["files"] == 1
