"""Behaviour through a real unionfs mount, one focused test per behaviour:
Whiteouts, opaque dirs, redirects in the upper.

Fixtures are in conftest.py (`mounted`, `pair`, `layers`, ...); every mount is unmounted by
the helpers in helpers/mounting.py, even on failure."""
from __future__ import annotations

import errno
import os
import subprocess

import pytest

from helpers.libc import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2
from helpers.ops import all_names, enoent, errno_of, read, write
from helpers.mounting import kernel_overlay, unionfs_mount
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
