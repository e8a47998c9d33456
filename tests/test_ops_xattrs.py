"""Behaviour through a real unionfs mount, one focused test per behaviour:
Xattrs.

Fixtures are in conftest.py (`mounted`, `pair`, `layers`, ...); every mount is unmounted by
the helpers in helpers/mounting.py, even on failure."""
from __future__ import annotations

import errno
import os
import subprocess

import pytest

from helpers.ops import errno_of, write
from helpers.mounting import kernel_overlay, unionfs_mount
from helpers.unit_helpers import xattr

pytestmark = [pytest.mark.mount]


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
