"""Malformed layers: every odd on-disk state gives a clear error or is ignored, never a crash.

Junk and forged xattrs of the format (opaque, redirect, the inode number unionfs
keeps), whiteouts that are not 0/0, OCI markers in odd shapes, lowers that
vanish or become unreadable under a live mount, layers that are symlinks. Where
kernel overlayfs can mount the same layers it is the reference, per path.
After each case the daemon must still be the one serving the mount, and its log
must hold no internal error.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import subprocess

import pytest

from helpers.snapshot import snapshot
from helpers.mounting import daemon_pids, kernel_overlay, unionfs_cmd, unionfs_mount

pytestmark = [pytest.mark.mount, pytest.mark.kernel]

OWN_INO = "trusted.overlay.unionfs.ino"


def _w(path: str, data: bytes = b"x\n") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def view(top: str) -> dict[str, object]:
    """Path → what the mount shows there: (type, size, content digest, rdev) or an errno,
    for every name reachable by listing (symlinks not followed)."""
    def errname(e: OSError) -> object:
        return errno.errorcode.get(e.errno or 0, e.errno)

    def describe(p: str, st: os.stat_result) -> tuple:
        digest = None
        if stat.S_ISREG(st.st_mode):
            try:
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()[:12]
            except OSError as e:
                digest = errname(e)
        elif stat.S_ISLNK(st.st_mode):
            digest = os.readlink(p)
        return (stat.S_IFMT(st.st_mode), st.st_size if not stat.S_ISDIR(st.st_mode) else 0, digest,
                st.st_rdev)

    return snapshot(top, describe,
                    on_error=lambda rel, op, e: (rel + "/" if op == "list" else rel, errname(e)))


def alive(work: str, mnt: str, pid: int) -> None:
    """The same daemon still serves the mount and logged no internal error."""
    os.kill(pid, 0)
    assert daemon_pids(mnt) == [pid]
    os.listdir(mnt)
    log = open(os.path.join(work, "unionfs.log")).read()
    assert "internal error" not in log and "Traceback" not in log, log


def both(tmp_path, build, kernel: bool = True):
    """Build the same layers twice (build(l1, l2, l3, upper)); return the unionfs view and
    the kernel overlay view (None without kernel)."""
    views = []
    for side in ("uf", "k") if kernel else ("uf",):
        root = tmp_path / side
        paths = [str(root / d) for d in ("l1", "l2", "l3", "upper", "work", "mnt")]
        for p in paths:
            os.makedirs(p)
        l1, l2, l3, up, work, mnt = paths
        build(l1, l2, l3, up)
        if side == "uf":
            with unionfs_mount([l1, l2, l3], up, mnt, workdir=work) as m:
                (pid,) = daemon_pids(m)
                views.append(view(m))
                alive(work, m, pid)
        else:
            with kernel_overlay([l1, l2, l3], up, work, mnt, extra="redirect_dir=on"):
                views.append(view(mnt))
    return views[0], (views[1] if kernel else None)


# -- the inode number unionfs keeps in the upper -------------------------------------------

def _forged_inos(l1: str, l2: str, l3: str, up: str) -> None:
    _w(os.path.join(l1, "d/f"), b"lower d/f\n")
    for name, value in (("zero", b"0"), ("one", b"1"), ("huge", b"9" * 30), ("neg", b"-5"),
                        ("junk", b"abc"), ("empty", b""), ("small", str((1 << 48) - 1).encode()),
                        ("max", str((1 << 64) - 1).encode())):
        _w(os.path.join(up, name), name.encode() + b"\n")
        os.setxattr(os.path.join(up, name), OWN_INO, value)
    # a file and a directory claiming the number of the lower directory d
    d_ino = (2 << 48) | os.lstat(os.path.join(l1, "d")).st_ino
    _w(os.path.join(up, "claims_d"), b"a file\n")
    os.setxattr(os.path.join(up, "claims_d"), OWN_INO, str(d_ino).encode())
    _w(os.path.join(up, "dclaims_d/own"), b"own\n")
    os.setxattr(os.path.join(up, "dclaims_d"), OWN_INO, str(d_ino).encode())


def test_forged_inode_numbers_like_kernel(tmp_path):
    """0 would read as a negative entry, 1 is the root, > 64 bits cannot be sent, and a claim
    of another object's number would show that object: all ignored, as the kernel (which does
    not know the xattr) ignores them."""
    uf, k = both(tmp_path, _forged_inos)
    assert uf == k
    assert set(uf) >= {"zero", "one", "huge", "claims_d", "dclaims_d/own", "d/f"}
    assert "dclaims_d/f" not in uf


def test_forged_inode_numbers_in_any_lookup_order(tmp_path):
    """Whichever of claimant and rightful owner the kernel meets first, both show as
    themselves with numbers of their own."""
    for order in (["d", "claims_d", "dclaims_d"], ["claims_d", "dclaims_d", "d"]):
        root = tmp_path / order[0]
        l1, l2, l3, up, work, mnt = (str(root / d) for d in ("l1", "l2", "l3", "upper", "work", "mnt"))
        for p in (l1, l2, l3, up, work, mnt):
            os.makedirs(p)
        _forged_inos(l1, l2, l3, up)
        with unionfs_mount([l1], up, mnt, workdir=work):
            (pid,) = daemon_pids(mnt)
            seen = {name: os.lstat(os.path.join(mnt, name)) for name in order}
            assert stat.S_ISREG(seen["claims_d"].st_mode)
            assert sorted(os.listdir(os.path.join(mnt, "dclaims_d"))) == ["own"]
            assert len({st.st_ino for st in seen.values()}) == len(seen)
            assert os.listdir(os.path.join(mnt, "d")) == ["f"]
            with open(os.path.join(mnt, "claims_d"), "ab") as f:   # copy-up-free write works
                f.write(b"more\n")
            alive(work, mnt, pid)


# -- opaque, redirect, whiteout and OCI oddities -------------------------------------------

def _format_junk(l1: str, l2: str, l3: str, up: str) -> None:
    # opaque with a junk value is not opaque (only "y" is), in a lower and in the upper
    _w(os.path.join(l1, "jo/top"))
    _w(os.path.join(l2, "jo/below"))
    os.setxattr(os.path.join(l1, "jo"), "trusted.overlay.opaque", b"junk")
    _w(os.path.join(up, "ujo/up"))
    _w(os.path.join(l1, "ujo/low"))
    os.setxattr(os.path.join(up, "ujo"), "trusted.overlay.opaque", b"yes")
    # a character device that is not 0/0 is an ordinary device node, not a whiteout
    os.mknod(os.path.join(l1, "dev13"), stat.S_IFCHR | 0o644, os.makedev(1, 3))
    _w(os.path.join(l2, "dev13"), b"hidden by the device\n")
    os.mknod(os.path.join(up, "udev13"), stat.S_IFCHR | 0o644, os.makedev(1, 3))
    _w(os.path.join(l1, "udev13"), b"hidden by the upper device\n")
    # redirects: two upper dirs pointing at each other's lower dirs, valid absolute ones
    for d in ("a", "b"):
        _w(os.path.join(l2, f"{d}/in_{d}"))
    for name, target in (("ra", b"/b"), ("rb", b"/a")):
        os.makedirs(os.path.join(up, name))
        os.setxattr(os.path.join(up, name), "trusted.overlay.redirect", target)
    # and one to a missing directory
    _w(os.path.join(up, "rmiss/own"))
    os.setxattr(os.path.join(up, "rmiss"), "trusted.overlay.redirect", b"/no/such/dir")
    # a loop through the lowers: l1/la -> /lb, l2/lb -> /la
    _w(os.path.join(l1, "la/one"))
    os.setxattr(os.path.join(l1, "la"), "trusted.overlay.redirect", b"/lb")
    _w(os.path.join(l2, "lb/two"))
    os.setxattr(os.path.join(l2, "lb"), "trusted.overlay.redirect", b"/la")
    _w(os.path.join(l3, "la/three"))
    _w(os.path.join(l3, "lb/four"))


def test_junk_opaque_redirect_loop_and_device_whiteout_like_kernel(tmp_path):
    uf, k = both(tmp_path, _format_junk)
    # two upper dirs redirected at lower dirs that show at their own names as well: the
    # kernel (index=off) refuses them (ESTALE); unionfs shows each with its lower contents
    assert (k.pop("ra"), k.pop("rb")) == ("ESTALE", "ESTALE")
    assert (uf.pop("ra/in_b"), uf.pop("rb/in_a")) == (uf["a/in_a"], uf["b/in_b"])
    assert uf.pop("ra")[0] == uf.pop("rb")[0] == stat.S_IFDIR
    assert uf == k
    assert sorted(p for p in uf if p.startswith("la/")) == ["la/one", "la/three", "la/two"]
    assert uf["dev13"][0] == stat.S_IFCHR and uf["dev13"][3] == os.makedev(1, 3)
    assert {"jo/top", "jo/below", "ujo/up", "ujo/low", "rmiss/own"} <= set(uf)


def _escaping_redirects(l1: str, l2: str, l3: str, up: str) -> None:
    _w(os.path.join(l1, "etc/passwd"), b"a layer's passwd\n")
    for name, target in (("up1", b"../../etc"), ("up2", b"../etc"), ("up3", b"/../../etc"),
                         ("up4", b"/etc/../../.."), ("up5", b"a//b"), ("up6", b"/"),
                         ("up7", b"."), ("up8", b"x\0y")):
        _w(os.path.join(up, name, "own"))
        try:
            os.setxattr(os.path.join(up, name), "trusted.overlay.redirect", target)
        except OSError:
            pass
    _w(os.path.join(l1, "lo1/own"))
    os.setxattr(os.path.join(l1, "lo1"), "trusted.overlay.redirect", b"../../../etc")


def test_redirects_out_of_the_layers_are_ignored(tmp_path):
    """A redirect with `..` (or empty, `.`) components is not a layer path: unionfs ignores
    it and shows the directory's own contents. (The kernel refuses some of these lookups
    outright; either way nothing outside the layers is reached.)"""
    uf, k = both(tmp_path, _escaping_redirects)
    for name in ("up1", "up2", "up3", "up4", "up5", "up6", "up7", "up8"):
        assert uf[name][0] == stat.S_IFDIR and f"{name}/own" in uf, name
        assert not any(p.startswith(f"{name}/passwd") for p in uf), name
    assert sorted(p for p in uf if p.startswith("lo1/")) == ["lo1/own"]
    # where the kernel shows the directory too, it shows the same
    for path, what in k.items():
        if isinstance(what, tuple):
            assert uf.get(path) == what, path
    print("\nkernel on escaping redirects:", {p: v for p, v in k.items() if not isinstance(v, tuple)})


def test_odd_oci_markers(tmp_path):
    """OCI markers that are directories, empty, nested or as long as a name can be: hidden,
    and hiding only what their name says; kernel overlayfs has no OCI rule to compare with."""
    def build(l1: str, l2: str, l3: str, up: str) -> None:
        os.makedirs(os.path.join(l1, ".wh.gone/inside"))         # a directory as a whiteout
        _w(os.path.join(l2, "gone"), b"hidden\n")
        _w(os.path.join(l1, ".wh."), b"")                       # whiteout of the empty name
        _w(os.path.join(l1, ".wh..wh."), b"")                   # whiteout of ".wh."
        os.makedirs(os.path.join(l1, "odq/.wh..wh..opq/x"))      # opaque marker as a dir
        _w(os.path.join(l1, "odq/mine"))
        _w(os.path.join(l2, "odq/below"))
        long = "n" * 251
        _w(os.path.join(l1, ".wh." + long), b"")                 # 255 bytes: the longest
        _w(os.path.join(l2, long), b"hidden too\n")
        _w(os.path.join(l2, "n" * 255), b"no marker fits its name\n")
        _w(os.path.join(l1, "sub/.wh..wh..wh.x"), b"")             # hides ".wh..wh.x" only
        _w(os.path.join(l2, "sub/.wh.x"), b"an OCI marker in l2\n")
        _w(os.path.join(l2, "sub/x"), b"beside l2's marker: shown\n")  # the OCI rule
        _w(os.path.join(l3, "sub/x"), b"below l2's marker: hidden\n")
        _w(os.path.join(l3, "sub/y"), b"y\n")
        _w(os.path.join(l3, "keep/.wh.."), b"")                  # whiteout of ".."
        _w(os.path.join(l3, "keep/file"))
    uf, _ = both(tmp_path, build, kernel=False)
    assert not [p for p in uf if os.path.basename(p.rstrip("/")).startswith(".wh.")], uf
    assert "gone" not in uf and "n" * 251 not in uf
    assert "n" * 255 in uf
    assert sorted(p for p in uf if p.startswith("sub/")) == ["sub/x", "sub/y"]
    assert uf["sub/x"][1] == len(b"beside l2's marker: shown\n")
    # a marker is a marker whatever its type: an opaque marker that is a directory too
    assert sorted(p for p in uf if p.startswith("odq/")) == ["odq/mine"]
    assert "keep/file" in uf


# -- lowers that change under a live mount -------------------------------------------------

def test_lower_vanishes_or_becomes_unreadable_while_mounted(tmp_path):
    """Overlayfs calls changing a lower under a mount undefined, short of a crash. Here: every
    request gets an answer (data, or a clean errno), and the daemon stays."""
    l1, l2, up, work, mnt = (str(tmp_path / d) for d in ("l1", "l2", "upper", "work", "mnt"))
    for p in (up, work, mnt):
        os.makedirs(p)
    for i in range(5):
        _w(os.path.join(l1, f"gone/f{i}"), b"gone %d\n" % i)
        _w(os.path.join(l2, f"gone/g{i}"), b"below %d\n" % i)
        _w(os.path.join(l1, f"locked/f{i}"), b"locked %d\n" % i)
        _w(os.path.join(l2, f"whole/w{i}"), b"whole %d\n" % i)
    _w(os.path.join(l1, "keep.txt"), b"keep\n")
    outcomes: dict[str, str] = {}

    def attempt(what: str, fn) -> None:
        try:
            fn()
            outcomes[what] = "ok"
        except OSError as e:
            outcomes[what] = errno.errorcode.get(e.errno or 0, str(e.errno))

    # without these capabilities a mode of 0 refuses the (root) daemon as it would anyone
    no_dac = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    with unionfs_mount([l1, l2], up, mnt, workdir=work, wrapper=no_dac) as m:
        (pid,) = daemon_pids(m)
        with open(f"/proc/{pid}/status") as f:
            eff = int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)
        assert not eff & (1 << 1 | 1 << 2), f"the daemon can still override modes: {eff:x}"
        before = view(m)
        shutil.rmtree(os.path.join(l1, "gone"))
        os.chmod(os.path.join(l1, "locked"), 0)
        for name in os.listdir(os.path.join(l1, "locked")):
            os.chmod(os.path.join(l1, "locked", name), 0)
        shutil.rmtree(l2)                                           # a whole lower layer
        for rel in ("gone", "locked", "whole"):
            attempt(f"list {rel}", lambda: os.listdir(os.path.join(m, rel)))
            for name in ("f0", "g0", "w0", "new"):
                p = os.path.join(m, rel, name)
                attempt(f"read {rel}/{name}", lambda: open(p, "rb").read())
                attempt(f"write {rel}/{name}", lambda: open(p, "ab").write(b"+\n"))
                attempt(f"chmod {rel}/{name}", lambda: os.chmod(p, 0o600))
                attempt(f"unlink {rel}/{name}", lambda: os.unlink(p))
            attempt(f"rename {rel}", lambda: os.rename(os.path.join(m, rel), os.path.join(m, rel + ".mv")))
            attempt(f"rm -r {rel}", lambda: shutil.rmtree(os.path.join(m, rel + ".mv")))
        after = view(m)
        with open(os.path.join(m, "keep.txt"), "rb") as f:
            assert f.read() == b"keep\n"
        alive(work, m, pid)
    print("\nvanished/unreadable lowers:", outcomes, "\nview after:", after)
    assert after["keep.txt"] == before["keep.txt"]
    assert outcomes["read locked/f0"] == "EACCES", outcomes
    # the listing of locked/ is refused by the daemon, unless the kernel still holds the one it
    # read before the chmod (page cache, which memory pressure may reclaim at any time): then
    # the entry in it is refused
    refused = after["locked/f0"] if "locked/f0" in after else after.get("locked/")
    assert refused == "EACCES", after
    errnos = set(outcomes.values()) - {"ok"}
    assert errnos <= {"ENOENT", "ESTALE", "EIO", "ENOTDIR", "EACCES", "ENOTEMPTY", "EXDEV"}, outcomes


# -- layers that are symlinks ---------------------------------------------------------------

def test_layers_given_as_symlinks_like_kernel(tmp_path):
    """mount(8) and overlayfs follow a symlink given as a layer path; so does unionfs, and
    its checks see through it (a symlink to the upper given as a lower is the upper twice)."""
    res = []
    for side in ("uf", "k"):
        root = tmp_path / side
        real_l, real_u = str(root / "real-lower"), str(root / "real-upper")
        _w(os.path.join(real_l, "f"), b"lower\n")
        os.makedirs(real_u)
        os.makedirs(root / "work")
        os.makedirs(root / "mnt")
        os.symlink("real-lower", root / "lower")
        os.symlink(real_u, root / "upper")
        if side == "uf":
            with unionfs_mount([str(root / "lower")], str(root / "upper"), str(root / "mnt"),
                               workdir=str(root / "work")) as m:
                _w(os.path.join(m, "new"), b"new\n")
                res.append(view(m))
        else:
            with kernel_overlay([str(root / "lower")], str(root / "upper"), str(root / "work"),
                                str(root / "mnt"), extra=""):
                _w(os.path.join(root / "mnt", "new"), b"new\n")
                res.append(view(str(root / "mnt")))
        assert os.path.exists(os.path.join(real_u, "new"))
    assert res[0] == res[1]
    root = tmp_path / "uf"
    os.symlink(str(root / "real-upper"), root / "upper-again")
    proc = subprocess.run(unionfs_cmd("mount", f"{root}/lower:{root}/upper-again", str(root / "upper"),
                                      str(root / "mnt")), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "used twice" in proc.stderr, proc.stderr
