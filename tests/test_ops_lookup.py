"""Behaviour through a real unionfs mount, one focused test per behaviour:
Lookup and readdir; identity.

Fixtures are in conftest.py (`mounted`, `pair`, `layers`, ...); every mount is unmounted by
the helpers in helpers/mounting.py, even on failure."""
from __future__ import annotations

import os
import stat

import pytest

from helpers.ops import ROOT_NAMES, all_names, enoent, raw_readdir, read, write
from helpers.mounting import unionfs_mount
from helpers.unit_helpers import is_whiteout

pytestmark = [pytest.mark.mount]


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
