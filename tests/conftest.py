"""Fixtures for the unit tests and the mount tests: layers built in tmp_path.

Fixtures only (helpers that tests share live here too, as plain functions).

Layers (top-most first, as lowerdir= wants them):

  top     shadows shadow.txt, adds merged/t1.txt and dir/top.txt
  mid     kernel-format whiteouts (char device 0/0) over gone.txt and
          dir/gone2.txt; an opaque dir (trusted.overlay.opaque=y) opq/;
          shadows dir/b.txt and shadow.txt; adds merged/m1.txt
  oci     OCI whiteouts: .wh.ocigone.txt, dir/.wh.hidden.txt, and an OCI
          opaque dir ociopq/ (with .wh..wh..opq); adds merged/o1.txt
  bottom  the bulk: nested dirs, a 3-name hard-link group in three dirs and
          a 2-name pair, symlinks (relative, escaping the layer, absolute,
          dangling), a fifo, a char device (1,3), user.* and trusted.*
          xattrs, other owners (1000:1000), modes 0600 / 04755, a sticky
          01777 dir, a dir owned by uid 1000, a 3 MiB file, fixed times

Kernel overlayfs does not understand OCI whiteouts, so comparisons with a
kernel overlay use `kernel_lowers` (top, mid, bottom) only.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from dataclasses import dataclass, field
from typing import Iterator

import pytest

from helpers.mounting import is_mounted, kernel_overlay, unionfs_mount

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TIMES_NS = (1_000_000_123_456_789, 1_100_000_987_654_321)   # (atime, mtime) of times.txt
HL_DATA = b"hard-linked data\n"
OTHER_UID = 1000


def blob(tag: str, size: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(tag.encode() + counter.to_bytes(8, "little")).digest() * 128
        counter += 1
    return bytes(out[:size])


BIG = blob("big", 3 * 1024 * 1024 + 17)


# -- building layers ----------------------------------------------------------------------

def _write(root: str, rel: str, data: bytes | str, mode: int = 0o644, uid: int = 0, gid: int = 0,
           xattrs: dict[str, bytes] | None = None) -> str:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    for k, v in (xattrs or {}).items():
        os.setxattr(path, k, v)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def _mkdir(root: str, rel: str, mode: int = 0o755) -> str:
    path = os.path.join(root, rel)
    os.makedirs(path, exist_ok=True)
    os.chmod(path, mode)
    return path


def _whiteout(root: str, rel: str) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def build_bottom(d: str) -> None:
    _write(d, "dir/a.txt", "bottom-a\n")
    _write(d, "dir/b.txt", "bottom-b\n")
    _write(d, "dir/hidden.txt", "bottom-hidden\n")
    _write(d, "dir/gone2.txt", "bottom-gone2\n")
    _write(d, "dir/sub/deep.txt", "deep\n")
    os.setxattr(os.path.join(d, "dir"), "user.dirattr", b"d1")
    _write(d, "shadow.txt", "bottom-shadow\n")
    _write(d, "gone.txt", "bottom-gone\n")
    _write(d, "ocigone.txt", "bottom-ocigone\n")
    _write(d, "opq/old.txt", "bottom-opq-old\n")
    _write(d, "ociopq/old.txt", "bottom-ociopq-old\n")
    _write(d, "merged/b1.txt", "b1\n")
    # hard links: one group of three names in three dirs, one pair in one dir
    _write(d, "hl/one", HL_DATA)
    _mkdir(d, "other/sub")
    os.link(os.path.join(d, "hl/one"), os.path.join(d, "other/two"))
    os.link(os.path.join(d, "hl/one"), os.path.join(d, "other/sub/three"))
    _write(d, "hl/p1", "pair\n")
    os.link(os.path.join(d, "hl/p1"), os.path.join(d, "hl/p2"))
    # symlinks
    os.symlink("dir/a.txt", os.path.join(d, "sym_rel"))
    os.symlink("../../etc/passwd", os.path.join(d, "dir/sym_out"))
    os.symlink("/etc/hostname", os.path.join(d, "sym_abs"))
    os.symlink("does/not/exist", os.path.join(d, "sym_dangling"))
    os.lchown(os.path.join(d, "sym_rel"), OTHER_UID, OTHER_UID)
    # special files
    os.mkfifo(os.path.join(d, "fifo"), 0o644)
    os.mknod(os.path.join(d, "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(os.path.join(d, "null"), 0o666)
    # xattrs, owners, modes, times
    _write(d, "xattr.txt", "xattrs\n", xattrs={"user.color": b"blue", "trusted.secret": b"s3"})
    _write(d, "owned.txt", "owned by 1000\n", mode=0o600, uid=OTHER_UID, gid=OTHER_UID)
    _write(d, "suid.bin", "#!/bin/sh\n", mode=0o4755)
    _write(d, "rootfile.txt", "root's\n", mode=0o644)
    _write(d, "times.txt", "times\n")
    os.utime(os.path.join(d, "times.txt"), ns=TIMES_NS)
    _write(d, "big.bin", BIG)
    _write(d, "tmp/rootfile", "root in sticky\n")
    _write(d, "tmp/userfile", "user in sticky\n", uid=OTHER_UID, gid=OTHER_UID)
    _mkdir(d, "tmp", 0o1777)
    _write(d, "userdir/rootowned", "root's file in 1000's dir\n")
    os.chown(os.path.join(d, "userdir"), OTHER_UID, OTHER_UID)
    _mkdir(d, "emptydir")
    _write(d, "wdir/x/y.txt", "wdir-y\n")
    _write(d, "wdir/z.txt", "wdir-z\n")
    _write(d, "wdir2/q.txt", "wdir2-q\n")
    # directory times last (writing into them changed them)
    for rel in ("dir", "wdir", "hl", "other", "other/sub"):
        os.utime(os.path.join(d, rel), ns=(1_200_000_000_000_000_001, 1_300_000_000_000_000_002))


def build_oci(d: str) -> None:
    os.makedirs(d)
    _write(d, ".wh.ocigone.txt", "")
    _write(d, "dir/.wh.hidden.txt", "")
    _write(d, "ociopq/.wh..wh..opq", "")
    _write(d, "ociopq/new.txt", "oci-new\n")
    _write(d, "merged/o1.txt", "o1\n")


def build_mid(d: str) -> None:
    os.makedirs(d)
    _whiteout(d, "gone.txt")
    _whiteout(d, "dir/gone2.txt")
    _write(d, "opq/new.txt", "mid-opq-new\n")
    os.setxattr(os.path.join(d, "opq"), "trusted.overlay.opaque", b"y")
    _write(d, "merged/m1.txt", "m1\n")
    _write(d, "dir/b.txt", "mid-b\n")
    _write(d, "shadow.txt", "mid-shadow\n")


def build_top(d: str) -> None:
    os.makedirs(d)
    _write(d, "shadow.txt", "top-shadow\n")
    _write(d, "merged/t1.txt", "t1\n")
    _write(d, "dir/top.txt", "top\n")


@dataclass
class Layers:
    root: str
    top: str
    mid: str
    oci: str
    bottom: str
    upper: str
    work: str
    mnt: str
    lowers: list[str] = field(default_factory=list)
    kernel_lowers: list[str] = field(default_factory=list)
    # what some files hold, for the tests' expectations
    big = BIG
    hl_data = HL_DATA
    times_ns = TIMES_NS
    other_uid = OTHER_UID

    def u(self, rel: str = "") -> str:
        return os.path.join(self.upper, rel) if rel else self.upper

    def m(self, rel: str = "") -> str:
        return os.path.join(self.mnt, rel) if rel else self.mnt


def make_layers(root: str) -> Layers:
    """Build the four lowers plus empty upper, workdir and mountpoint under *root*."""
    lay = os.path.join(root, "layers")
    os.makedirs(lay)
    L = Layers(root=root, top=os.path.join(lay, "top"), mid=os.path.join(lay, "mid"),
               oci=os.path.join(lay, "oci"), bottom=os.path.join(lay, "bottom"),
               upper=os.path.join(root, "upper"), work=os.path.join(root, "work"),
               mnt=os.path.join(root, "mnt"))
    build_bottom(L.bottom)
    build_oci(L.oci)
    build_mid(L.mid)
    build_top(L.top)
    for p in (L.upper, L.work, L.mnt):
        os.makedirs(p)
    L.lowers = [L.top, L.mid, L.oci, L.bottom]
    L.kernel_lowers = [L.top, L.mid, L.bottom]
    # what a symlink escaping the layers resolves to, on either side
    _write(root, "etc/passwd", "caller-side passwd\n")
    _write(lay, "etc/passwd", "daemon-side passwd\n")
    return L


@pytest.fixture
def layers(tmp_path) -> Layers:
    return make_layers(str(tmp_path))


@pytest.fixture(scope="session", autouse=True)
def _importable_checkout():
    """The CLI runs as `python -m unionfs`: make sure this checkout is what it imports."""
    pp = os.environ.get("PYTHONPATH", "")
    if REPO not in pp.split(os.pathsep):
        os.environ["PYTHONPATH"] = REPO + (os.pathsep + pp if pp else "")
    yield


@pytest.fixture
def mounted(layers) -> Iterator[Layers]:
    """A live unionfs mount over the four lowers, with an upper and an explicit workdir."""
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        yield layers
    assert not is_mounted(layers.mnt)


@pytest.fixture
def mounted_other(layers) -> Iterator[Layers]:
    """The same, with allow_other, for tests that act as uid 1000."""
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work,
                       options=("allow_other",)):
        yield layers


@dataclass
class Pair:
    """A unionfs mount and a kernel overlay mount over two copies of the same layers."""

    uf: Layers
    k: Layers


@pytest.fixture
def pair(tmp_path) -> Iterator[Pair]:
    a = make_layers(str(tmp_path / "uf"))
    b = make_layers(str(tmp_path / "k"))
    with kernel_overlay(b.kernel_lowers, b.upper, b.work, b.mnt):
        with unionfs_mount(a.kernel_lowers, a.upper, a.mnt, workdir=a.work):
            yield Pair(a, b)


# -- Union without FUSE -------------------------------------------------------------------

@pytest.fixture
def make_union(layers):
    """Factory: a unionfs.union.Union over the layers, closed at teardown."""
    from unionfs.config import MountConfig
    from unionfs.union import Union

    made = []

    def make(upper: bool = True, readonly: bool = False, lowers: list[str] | None = None):
        cfg = MountConfig(lowers=list(lowers or layers.lowers),
                          upper=layers.upper if upper else None,
                          workdir=layers.work if upper else None,
                          mountpoint=layers.mnt, readonly=readonly)
        u = Union(cfg)
        made.append(u)
        return u

    yield make
    for u in made:
        with contextlib.suppress(Exception):
            u.close()


@pytest.fixture
def union(make_union):
    return make_union()


def pytest_collection_modifyitems(items):
    """A test that runs unionfs beside kernel overlayfs (the `pair` fixture) is in the kernel
    tier, wherever it is; modules mark their own tiers (tests/README.md)."""
    for item in items:
        if "pair" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(autouse=True)
def _no_mount_left_behind(tmp_path):
    """Whatever a test did, nothing stays mounted below its tmp_path."""
    yield
    from helpers.mounting import force_unmount
    root = os.path.realpath(str(tmp_path))
    with open("/proc/self/mountinfo") as f:
        left = [line.split()[4] for line in f if line.split()[4].startswith(root + "/")]
    for path in reversed(left):
        force_unmount(path)
    assert not left, f"mounts left behind: {left}"
