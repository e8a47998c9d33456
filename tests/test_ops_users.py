"""Behaviour through a real unionfs mount, one focused test per behaviour:
Other processes see changes at once; permissions as a non-root user.

Fixtures are in conftest.py (`mounted`, `pair`, `layers`, ...); every mount is unmounted by
the helpers in helpers/mounting.py, even on failure."""
from __future__ import annotations

import collections
import errno
import os
import re
import stat
import subprocess

import pytest

from helpers.ops import enoent, other_sees, read, run_as, write
from helpers.mounting import unionfs_mount
from unionfs import binding

pytestmark = [pytest.mark.mount]


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
