"""Deterministic fixture lower layers for the differential test.

Three lower directories, listed top-most first as overlayfs wants them:

  top     a few shadowing files, a whiteout over a middle file, a dir merged
          with the middle's opaque dir
  mid     kernel-format whiteouts (char device 0/0) and opaque directories
          (trusted.overlay.opaque=y), type changes (file over dir, dir over
          file), a hard-link pair, a big file
  bottom  the bulk: nested dirs, files of several sizes (some > 1 MiB), a
          hard-link group of three names in three dirs, symlinks (relative,
          absolute, dangling, escaping the layer), a fifo, a char device,
          user.* xattrs, other owners, setuid / sticky / 0700 modes

Only kernel-format whiteouts are used: kernel overlayfs does not understand
OCI `.wh.` files, so they have no place in a differential fixture.

Everything is built from fixed data (no randomness, no time), so two builds
are identical except for times and inode numbers.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from typing import Callable

LAYER_NAMES = ("top", "mid", "bottom")  # top-most first, as lowerdir=


def blob(tag: str, size: int) -> bytes:
    """Deterministic pseudo-random bytes: sha256 in counter mode."""
    out = bytearray()
    counter = 0
    seed = tag.encode()
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(8, "little")).digest() * 64
        counter += 1
    return bytes(out[:size])


class _Builder:
    def __init__(self, root: str, userxattr: bool = False) -> None:
        self.root = root
        # the userxattr format (built by the root of a user namespace): user.overlay.*
        # markers, no device nodes but whiteouts (mknod needs the host's CAP_MKNOD), and
        # no hard links (see link)
        self.userxattr = userxattr
        os.makedirs(root, exist_ok=True)
        # Directory metadata (mode, owner) is applied last: a 0555 or foreign
        # directory must still be writable while we fill it.
        self._dir_meta: list[tuple[str, int, int, int]] = []

    def p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def dir(self, rel: str, mode: int = 0o755, uid: int = 0, gid: int = 0,
            xattrs: dict[str, bytes] | None = None) -> None:
        path = self.p(rel)
        os.makedirs(path, exist_ok=True)
        for k, v in (xattrs or {}).items():
            os.setxattr(path, k, v)
        self._dir_meta.append((path, mode, uid, gid))

    def file(self, rel: str, data: bytes | str = b"", mode: int = 0o644, uid: int = 0,
             gid: int = 0, xattrs: dict[str, bytes] | None = None) -> None:
        path = self.p(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(data, str):
            data = data.encode()
        with open(path, "wb") as f:
            f.write(data)
        for k, v in (xattrs or {}).items():
            os.setxattr(path, k, v)
        os.chown(path, uid, gid)
        os.chmod(path, mode)  # after chown: chown clears setuid

    def link(self, existing: str, rel: str) -> None:
        os.makedirs(os.path.dirname(self.p(rel)), exist_ok=True)
        if self.userxattr:
            # overlayfs refuses index=on with userxattr, and without an index it breaks a
            # lower hard link at copy-up, where unionfs keeps it (README, Limits): separate
            # copies then, with the same data, owner, mode and xattrs
            subprocess.run(["cp", "-a", "--", self.p(existing), self.p(rel)], check=True)
            return
        os.link(self.p(existing), self.p(rel))

    def symlink(self, target: str, rel: str, uid: int = 0, gid: int = 0) -> None:
        os.makedirs(os.path.dirname(self.p(rel)), exist_ok=True)
        os.symlink(target, self.p(rel))
        os.chown(self.p(rel), uid, gid, follow_symlinks=False)

    def fifo(self, rel: str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        os.makedirs(os.path.dirname(self.p(rel)), exist_ok=True)
        os.mkfifo(self.p(rel))
        os.chown(self.p(rel), uid, gid)
        os.chmod(self.p(rel), mode)

    def chardev(self, rel: str, major: int, minor: int, mode: int = 0o666) -> None:
        if self.userxattr:
            return
        os.makedirs(os.path.dirname(self.p(rel)), exist_ok=True)
        os.mknod(self.p(rel), 0o020000 | mode, os.makedev(major, minor))
        os.chmod(self.p(rel), mode)

    def whiteout(self, rel: str) -> None:
        """Kernel overlayfs whiteout: a 0/0 character device."""
        os.makedirs(os.path.dirname(self.p(rel)), exist_ok=True)
        os.mknod(self.p(rel), 0o020000, os.makedev(0, 0))

    def opaque(self, rel: str) -> None:
        os.setxattr(self.p(rel), ("user" if self.userxattr else "trusted") + ".overlay.opaque", b"y")

    def finish(self) -> None:
        for path, mode, uid, gid in reversed(self._dir_meta):
            os.chown(path, uid, gid)
            os.chmod(path, mode)


def _bottom(b: _Builder) -> None:
    b.dir("etc")
    b.file("etc/config", "key=value\nother=1\n")
    b.file("etc/hosts", "127.0.0.1 localhost\n", xattrs={"user.origin": b"bottom"})
    b.dir("data", xattrs={"user.dirattr": b"on-a-dir", "user.second": b"2"})
    b.file("data/big1.bin", blob("big1", 1536 * 1024 + 17))
    b.file("data/medium.bin", blob("medium", 70000))
    b.file("data/small.txt", "small file in bottom\n")
    b.file("data/empty", b"")
    b.file("data/sub/deep/deeper/file.txt", "deep\n")
    b.dir("data/sub/deep/deeper")
    b.file("data/sub/sibling.txt", "sibling\n", xattrs={"user.a": b"1", "user.b": b"\x00\xffbin"})
    b.file("shadow.txt", "bottom version of shadow\n")
    b.file("shadow_big.bin", blob("shadow-bottom", 1100 * 1024))
    b.file("gone.txt", "whited out by mid\n")
    b.file("gone2.txt", "whited out by mid, recreated by top\n")
    b.dir("gonedir")
    b.file("gonedir/inside.txt", "hidden by a whiteout on the dir\n")
    b.dir("gonedir/nested")
    b.file("gonedir/nested/x", "x\n")
    b.dir("opq")
    b.file("opq/a.txt", "bottom a, hidden by opaque mid\n")
    b.file("opq/b.txt", "bottom b, hidden by opaque mid\n")
    b.dir("opq/olddir")
    b.dir("merged")
    b.file("merged/m1.txt", "m1 from bottom\n")
    b.file("merged/common.txt", "common from bottom\n")
    b.dir("merged/sub")
    b.file("merged/sub/s1", "s1 bottom\n")
    b.file("merged/wo_by_mid.txt", "whited out inside a merged dir\n")
    b.dir("typeswap")                       # mid puts a file here
    b.file("typeswap/under.txt", "never visible\n")
    b.file("fileswap", "a file that mid covers with a dir\n")
    # A hard-link group of three names in three directories, with an xattr.
    b.file("hl/a", "hard linked content\n", xattrs={"user.hl": b"group"})
    b.link("hl/a", "other/hl_b")
    b.link("hl/a", "other/sub/hl_c")
    b.dir("hl")
    b.dir("other")
    b.dir("other/sub")
    # Second group, big file
    b.file("hl/big", blob("hlbig", 1200 * 1024 + 3))
    b.link("hl/big", "data/big_alias")
    # Symlinks
    b.symlink("data/small.txt", "rel_link")
    b.symlink("../data/small.txt", "etc/rel_up_link")
    b.symlink("/etc/passwd", "abs_link")
    b.symlink("does/not/exist", "dangling")
    b.symlink("../../../etc/passwd", "escape_link")
    b.symlink("data", "dir_link")
    b.symlink("gone.txt", "link_to_whiteout")
    b.symlink("x" * 200, "long_link", uid=1000, gid=1000)
    # Special files
    b.fifo("special/fifo")
    b.chardev("special/null", 1, 3)
    b.fifo("special/fifo_1000", mode=0o600, uid=1000, gid=1000)
    b.dir("special")
    # Ownership and modes
    b.dir("owned", mode=0o755)
    b.file("owned/u1000", "owned by 1000\n", uid=1000, gid=1000)
    b.file("owned/g100", "group users\n", mode=0o640, uid=0, gid=100)
    b.file("owned/ro_1000", "read-only for its owner\n", mode=0o444, uid=1000, gid=1000)
    b.file("owned/world_rw", "anyone may write\n", mode=0o666)
    b.file("owned/setuid", blob("suid", 4000), mode=0o4755)
    b.file("owned/setgid", "sgid\n", mode=0o2755, gid=100)
    b.file("owned/setuid_1000", "suid 1000\n", mode=0o4775, uid=1000, gid=1000)
    b.dir("private", mode=0o700, uid=1000, gid=1000)
    b.file("private/secret", "secret\n", mode=0o600, uid=1000, gid=1000)
    b.dir("private/inner", mode=0o755, uid=1000, gid=1000)
    b.dir("sticky", mode=0o1777)
    b.file("sticky/root_file", "root's file in a sticky dir\n", mode=0o666)
    b.file("sticky/user_file", "1000's file in a sticky dir\n", uid=1000, gid=1000)
    b.dir("sticky/root_dir", mode=0o777)
    b.dir("home1000", mode=0o755, uid=1000, gid=1000)
    b.file("home1000/notes", "notes\n", uid=1000, gid=1000)
    b.dir("home1000/proj", mode=0o775, uid=1000, gid=1000)
    b.file("home1000/proj/main.c", "int main(){}\n", uid=1000, gid=1000)
    b.dir("group100", mode=0o2775, uid=0, gid=100)
    b.file("group100/shared", "shared\n", mode=0o664, gid=100)
    b.dir("readonly_dir", mode=0o555)
    b.file("readonly_dir/f", "in a 0555 dir\n")
    b.dir("emptydir")
    b.dir("emptydir2", mode=0o750, uid=0, gid=100)


def _mid(b: _Builder) -> None:
    b.whiteout("gone.txt")
    b.whiteout("gone2.txt")
    b.whiteout("gonedir")
    b.whiteout("merged/wo_by_mid.txt")
    b.dir("opq")
    b.opaque("opq")
    b.file("opq/c.txt", "mid c in opaque dir\n")
    b.dir("opq/newdir")
    b.file("opq/newdir/n", "n\n")
    b.dir("merged")
    b.file("merged/m2.txt", "m2 from mid\n")
    b.file("merged/common.txt", "common from mid (shadows bottom)\n")
    b.dir("merged/sub")
    b.file("merged/sub/s2", "s2 mid\n")
    b.dir("merged/opqsub")
    b.opaque("merged/opqsub")
    b.file("merged/opqsub/only_mid", "only mid\n")
    b.file("shadow.txt", "mid version of shadow\n", mode=0o600)
    b.file("shadow_big.bin", blob("shadow-mid", 1300 * 1024))
    b.file("typeswap", "a file over bottom's dir\n")
    b.dir("fileswap")
    b.file("fileswap/in_dir", "dir over bottom's file\n")
    b.file("data/big2.bin", blob("big2", 2 * 1024 * 1024 + 5))
    b.file("data/mid_only.txt", "mid only\n", uid=1000, gid=100)
    b.dir("data", xattrs={"user.dirattr": b"from-mid"})
    b.file("mid/h1", "mid hard link pair\n", mode=0o640, uid=0, gid=100)
    b.link("mid/h1", "mid/h2")
    b.dir("mid")
    b.dir("mid/empty")
    b.symlink("h1", "mid/h1_link")
    # A whiteout with nothing below it, in a dir that exists in mid only, would be
    # listed by kernel overlayfs's readdir (the dir is not merged, so it is read
    # as is) while lstat says ENOENT. Put it in a merged dir instead.
    b.whiteout("merged/never_existed")
    b.dir("sticky", mode=0o1777)
    b.file("sticky/mid_user_file", "mid, owner 1001\n", uid=1001, gid=1001)


def _top(b: _Builder) -> None:
    b.file("shadow.txt", "top version of shadow\n", xattrs={"user.layer": b"top"})
    b.file("gone2.txt", "recreated by top over mid's whiteout\n")
    b.dir("merged")
    b.file("merged/m3.txt", "m3 from top\n")
    b.dir("merged/sub")
    b.file("merged/sub/s3", "s3 top\n")
    b.dir("opq")
    b.file("opq/d.txt", "top d, merged with mid's opaque dir\n")
    b.whiteout("data/mid_only.txt")
    b.whiteout("etc/hosts")
    b.dir("data")
    b.dir("etc")
    b.dir("toponly", mode=0o775, uid=1000, gid=1000)
    b.file("toponly/t", "top only\n", uid=1000, gid=1000)
    b.dir("toponly/nested/more")
    b.file("toponly/nested/more/leaf", "leaf\n")
    b.file("data/sub/sibling.txt", "sibling from top\n", xattrs={"user.a": b"top"})
    b.dir("data/sub")


BUILDERS: dict[str, Callable[[_Builder], None]] = {"top": _top, "mid": _mid, "bottom": _bottom}


def build_layers(root: str, userxattr: bool = False) -> list[str]:
    """Build the fixture layers under *root*; return the lower dirs top-most first."""
    paths = []
    for name in LAYER_NAMES:
        b = _Builder(os.path.join(root, name), userxattr)
        BUILDERS[name](b)
        b.finish()
        paths.append(b.root)
    return paths


def copy_layers(pristine_root: str, dest_root: str) -> list[str]:
    """Copy a built fixture (one `cp -a`: xattrs incl. trusted.*, hard links, devices kept)."""
    os.makedirs(dest_root, exist_ok=True)
    subprocess.run(["cp", "-a", "--", *[os.path.join(pristine_root, n) for n in LAYER_NAMES],
                    dest_root], check=True)
    return [os.path.join(dest_root, n) for n in LAYER_NAMES]


def remove_tree(path: str) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path)
