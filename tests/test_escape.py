"""The daemon never reads or writes outside its layers, whatever the layers hold.

Symlinks in every layer (lower and upper; relative with `..`, absolute; to a
file and to a directory; a symlink over a directory and under one), names made
of dots, and a race that swaps a directory of the upper for a symlink to the
outside while other processes create, write, chmod, copy up and rename below
it through the mount. A canary tree and a secret file lie beside the layers
(guard.py): inotify and a snapshot must show that nothing touched them, and the
secret's content must never come out of the mount. Callers run in a mount
namespace where decoys cover the canary and the secret, so what they reach by
following a symlink themselves is never mistaken for the daemon's doing.

UNIONFS_ESCAPE_ROUNDS scales the race (default 1: about 1,500 operations).
"""
from __future__ import annotations

import errno
import os
import random
import stat
import time
from collections import Counter

import pytest

from helpers.guard import SECRET, Guard, in_decoy
from helpers.libc import RENAME_EXCHANGE, libc
from helpers.mounting import daemon_pids, unionfs_mount
from helpers.unit_helpers import xattr

pytestmark = [pytest.mark.mount]


def _layout(root: str) -> dict[str, str]:
    """Layers, workdir and mountpoint as siblings of the canary and the secret, so a relative
    symlink resolves to the same place from a layer's root and from the mount's root."""
    top = os.path.join(root, "layers")
    paths = {k: os.path.join(top, k) for k in ("l1", "l2", "upper", "work", "mnt")}
    for p in paths.values():
        os.makedirs(p)
    paths["top"] = top
    return paths


def _sym(target: str, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.symlink(target, path)


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _never_secret(top: str) -> int:
    """Read every regular file under *top* without following symlinks; return how many.
    None may hold the secret."""
    count = 0
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames:
            p = os.path.join(dirpath, name)
            try:
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    assert SECRET not in os.read(fd, 1 << 20), p
                    count += 1
            finally:
                os.close(fd)
    return count


# -- symlinks and dot names in every layer -------------------------------------------------

FILE_LINKS = ["lrel", "d/lrel2", "labs", "l2rel", "urel", "uabs", "d/urel2"]
DIR_LINKS = ["ldir", "ldir_abs", "d/ldir2", "l2dir", "smd", "udir", "ld"]


def _build_links(p: dict[str, str], g: Guard) -> None:
    l1, l2, up = p["l1"], p["l2"], p["upper"]
    _write(os.path.join(l1, "d/plain.txt"), b"plain\n")
    _sym("../secret.txt", os.path.join(l1, "lrel"))
    _sym("../../secret.txt", os.path.join(l1, "d/lrel2"))
    _sym(g.secret, os.path.join(l1, "labs"))
    _sym("../canary", os.path.join(l1, "ldir"))
    _sym(g.canary, os.path.join(l1, "ldir_abs"))
    _sym("../../canary/sub", os.path.join(l1, "d/ldir2"))
    _sym("../secret.txt", os.path.join(l2, "l2rel"))
    _sym("../canary", os.path.join(l2, "l2dir"))
    # a real dir on top of a symlinked one: the merge stops at the symlink
    _write(os.path.join(l1, "md/top.txt"), b"top\n")
    _sym("../canary", os.path.join(l2, "md"))
    # a symlink on top of a real dir: it hides the dir
    _sym("../canary", os.path.join(l1, "smd"))
    _write(os.path.join(l2, "smd/below.txt"), b"below\n")
    # the upper: links to the outside, one over a lower dir, one inside a merged dir
    _sym("../secret.txt", os.path.join(up, "urel"))
    _sym(g.secret, os.path.join(up, "uabs"))
    _sym("../canary", os.path.join(up, "udir"))
    _write(os.path.join(l2, "ld/x.txt"), b"x\n")
    _sym("../canary", os.path.join(up, "ld"))
    _sym("../../secret.txt", os.path.join(up, "d/urel2"))


def _attempts_on_links() -> Counter:
    """Every operation a caller can aim at a symlink name through the mount (cwd: the mount).
    Returns outcome counts; raises if the secret ever comes back."""
    out: Counter = Counter()

    def attempt(kind: str, fn) -> object:
        out["attempts"] += 1
        try:
            res = fn()
        except OSError as e:
            out[f"{kind}:{errno.errorcode.get(e.errno or 0, e.errno)}"] += 1
            return None
        out[f"{kind}:ok"] += 1
        return res

    def read_follow(p: str) -> bytes:
        with open(p, "rb") as f:
            return f.read()

    def append(p: str) -> None:
        fd = os.open(p, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"appended by a caller\n")
        finally:
            os.close(fd)

    for name in FILE_LINKS + DIR_LINKS:
        assert stat.S_ISLNK(os.lstat(name).st_mode), name
        attempt("readlink", lambda: os.readlink(name))
        data = attempt("read", lambda: read_follow(name))
        assert data is None or SECRET not in data, name
        nofollow = attempt("open-nofollow", lambda: os.close(os.open(name, os.O_RDONLY | os.O_NOFOLLOW)))
        assert nofollow is None
        attempt("open-path", lambda: os.close(os.open(name, os.O_PATH | os.O_NOFOLLOW)))
        attempt("lchown", lambda: os.lchown(name, 1000, 1000))
        attempt("lutimes", lambda: os.utime(name, ns=(7, 8), follow_symlinks=False))
        attempt("lsetxattr", lambda: os.setxattr(name, "trusted.esc", b"1", follow_symlinks=False))
        attempt("lsetxattr-user", lambda: os.setxattr(name, "user.esc", b"1", follow_symlinks=False))
        attempt("lgetxattr", lambda: os.getxattr(name, "trusted.esc", follow_symlinks=False))
        attempt("llistxattr", lambda: os.listxattr(name, follow_symlinks=False))
        attempt("lremovexattr", lambda: os.removexattr(name, "trusted.esc", follow_symlinks=False))
        attempt("chmod", lambda: os.chmod(name, 0o600))
        attempt("append", lambda: append(name))
        attempt("link", lambda: os.link(name, name + ".ln", follow_symlinks=False))
        attempt("unlink-link", lambda: os.unlink(name + ".ln"))
        attempt("rename", lambda: os.rename(name, name + ".mv"))
        attempt("rename-back", lambda: os.rename(name + ".mv", name))
        attempt("create-excl", lambda: os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)))
        attempt("mkdir-over", lambda: os.mkdir(name))
    for name in DIR_LINKS:
        attempt("listdir", lambda: os.listdir(name))
        attempt("create-below", lambda: os.close(os.open(name + "/new.txt", os.O_CREAT | os.O_WRONLY)))
        attempt("mkdir-below", lambda: os.mkdir(name + "/newdir"))
        attempt("chmod-below", lambda: os.chmod(name + "/f.txt", 0o600))
        data = attempt("read-below", lambda: read_follow(name + "/f.txt"))
        assert data is None or SECRET not in data, name
        attempt("rename-below", lambda: os.rename(name + "/f.txt", name + "/f2.txt"))
        attempt("rename-below-back", lambda: os.rename(name + "/f2.txt", name + "/f.txt"))
    # names made of dots, and paths that climb with ..
    for name in ("...", "..a", ".. ", "d/...", "d/.. x"):
        attempt("dots-create", lambda: os.close(os.open(name, os.O_CREAT | os.O_WRONLY)))
        attempt("dots-write", lambda: append(name))
        attempt("dots-rename", lambda: os.rename(name, name + "2"))
        attempt("dots-unlink", lambda: os.unlink(name + "2"))
    for path in ("d/..", "d/../d/..", "d/../../..", "../mnt/d/../lrel", "md/../ldir/sub"):
        attempt("dotdot-stat", lambda: os.stat(path))
        attempt("dotdot-list", lambda: os.listdir(path) if os.path.isdir(path) else None)
    assert sorted(os.listdir("md")) == ["top.txt"], "the merge went through a symlink"
    assert "below.txt" not in (attempt("list-smd", lambda: os.listdir("smd")) or [])
    return out


def test_symlinks_in_every_layer_never_lead_out(tmp_path):
    p = _layout(str(tmp_path))
    g = Guard.make(p["top"], str(tmp_path))
    _build_links(p, g)
    before = g.snapshot()
    watch = g.watch()
    try:
        with unionfs_mount([p["l1"], p["l2"]], p["upper"], p["mnt"], workdir=p["work"],
                           options=("allow_other",)):
            def run() -> Counter:
                os.chdir(p["mnt"])
                return _attempts_on_links()
            outcomes = in_decoy(g, run)
            for name in FILE_LINKS + DIR_LINKS:   # what the mount keeps is the links themselves
                assert stat.S_ISLNK(os.lstat(os.path.join(p["mnt"], name)).st_mode), name
            assert _never_secret(p["mnt"]) > 0
        events = watch.events()
    finally:
        watch.close()
    assert events == [], events
    assert g.snapshot() == before
    # the copied-up links are links, owned as asked, and carry the xattr on themselves
    st = os.lstat(os.path.join(p["upper"], "lrel"))
    assert stat.S_ISLNK(st.st_mode) and st.st_uid == 1000
    assert xattr(os.path.join(p["upper"], "lrel"), "trusted.esc") is None  # removed again
    # the upper holds directories and the links themselves: no copy-up took a link's target
    # (which would be a regular file here, the secret's or the canary's data in it)
    kinds = {rel: stat.S_IFMT(os.lstat(os.path.join(dirpath, n)).st_mode)
             for dirpath, dirnames, filenames in os.walk(p["upper"]) for n in dirnames + filenames
             for rel in [os.path.relpath(os.path.join(dirpath, n), p["upper"])]}
    assert kinds and set(kinds.values()) <= {stat.S_IFDIR, stat.S_IFLNK}, kinds
    log = open(os.path.join(p["work"], "unionfs.log")).read()
    assert "internal error" not in log and "Traceback" not in log, log
    print(f"\nescape attempts through symlinks and dot names: {outcomes['attempts']} "
          f"({len([k for k in outcomes if k != 'attempts'])} distinct outcomes)")
    assert outcomes["attempts"] >= 300


# -- a directory of the upper swapped for a symlink while busy -----------------------------

def _swapper(upper: str, pairs: list[tuple[str, str, str]], stop_fd: int, count_fd: int) -> None:
    """Exchange each directory with its symlink twin (both in the same directory, reached by
    an fd held from the start, so the swapper itself never walks through a symlink), again
    and again, until told to stop."""
    fds = {d: os.open(os.path.join(upper, d), os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
           for d, _a, _b in pairs}
    swaps = 0
    os.set_blocking(stop_fd, False)
    while True:
        try:
            os.read(stop_fd, 1)
            break           # told to stop, or the test is gone (end of file)
        except BlockingIOError:
            pass
        for d, a, b in pairs:
            if libc.renameat2(fds[d], a.encode(), fds[d], b.encode(), RENAME_EXCHANGE) == 0:
                swaps += 1
        time.sleep(0.001)  # pacing only: let operations complete between swaps too
    os.write(count_fd, str(swaps).encode())


def _busy_worker(seed: int, ops: int) -> Counter:
    """Creates, writes, chmods, copy-ups, renames, links, xattrs and reads below the swapped
    directories (cwd: the mount). Errors are expected and counted; the secret never shows."""
    rnd = random.Random(seed)
    out: Counter = Counter()
    dirs = ["rd", "ld", "rd/sub", "ld/sub", "rd.x", "ld.x", "ld/sub.x", "rd.x/sub", "ld.x/sub"]
    for _ in range(ops):
        d = rnd.choice(dirs)
        f = f"{d}/f{rnd.randrange(8)}"
        op = rnd.choice(["create", "write", "chmod", "chown", "utime", "rename", "link", "unlink",
                         "mkdir", "rmdir", "xattr", "read", "list", "symlink", "truncate",
                         "fsync-dir"])
        out["ops"] += 1
        try:
            if op == "create":
                os.close(os.open(f, os.O_CREAT | os.O_WRONLY, 0o644))
            elif op == "write":
                fd = os.open(f, os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, b"w%d\n" % seed)
                finally:
                    os.close(fd)
            elif op == "chmod":
                os.chmod(f, rnd.choice([0o600, 0o644, 0o4755]))
            elif op == "chown":
                os.lchown(f, rnd.choice([0, 1000]), 1000)
            elif op == "utime":
                os.utime(f, ns=(rnd.randrange(1 << 40), rnd.randrange(1 << 40)), follow_symlinks=False)
            elif op == "rename":
                os.rename(f, f"{rnd.choice(dirs)}/f{rnd.randrange(8)}")
            elif op == "link":
                os.link(f, f"{rnd.choice(dirs)}/l{rnd.randrange(8)}", follow_symlinks=False)
            elif op == "unlink":
                os.unlink(f)
            elif op == "mkdir":
                os.mkdir(f"{d}/n{rnd.randrange(4)}")
            elif op == "rmdir":
                os.rmdir(f"{d}/n{rnd.randrange(4)}")
            elif op == "xattr":
                os.setxattr(f, "user.k", b"v", follow_symlinks=False)
            elif op == "read":
                fd = os.open(f, os.O_RDONLY | os.O_NONBLOCK)
                try:
                    assert SECRET not in os.read(fd, 1 << 16), f
                finally:
                    os.close(fd)
            elif op == "list":
                os.listdir(d)
            elif op == "symlink":
                os.symlink("../../canary/f.txt", f"{d}/s{rnd.randrange(4)}")
            elif op == "truncate":
                os.truncate(f, rnd.randrange(64))
            elif op == "fsync-dir":
                fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            out[f"{op}:ok"] += 1
        except OSError as e:
            out[f"{op}:{errno.errorcode.get(e.errno or 0, e.errno)}"] += 1
    return out


def test_upper_dir_swapped_for_symlink_while_busy(tmp_path):
    rounds = int(os.environ.get("UNIONFS_ESCAPE_ROUNDS", "1"))
    p = _layout(str(tmp_path))
    g = Guard.make(p["top"], str(tmp_path))
    up, l1 = p["upper"], p["l1"]
    for i in range(8):
        _write(os.path.join(up, f"rd/f{i}"), b"upper %d\n" % i)
        _write(os.path.join(l1, f"ld/f{i}"), b"lower %d\n" % i)   # copied up during the race
        _write(os.path.join(l1, f"rd/f{i}"), b"lower rd %d\n" % i)
    for d in ("rd/sub", "ld/sub"):
        os.makedirs(os.path.join(l1, d))
    _sym("../canary", os.path.join(up, "rd.x"))          # relative, out of the upper
    _sym(g.canary, os.path.join(up, "ld.x"))             # absolute
    before = g.snapshot()
    watch = g.watch()
    totals: Counter = Counter()
    swaps = 0
    try:
        with unionfs_mount([l1], up, p["mnt"], workdir=p["work"], options=("allow_other",)) as mnt:
            (daemon,) = daemon_pids(mnt)
            os.listdir(os.path.join(mnt, "ld"))
            os.chmod(os.path.join(mnt, "ld/sub"), 0o755)   # ld and ld/sub now exist in the upper
            _sym("../../canary/sub", os.path.join(up, "ld/sub.x"))
            for r in range(rounds):
                stop_r, stop_w = os.pipe()
                cnt_r, cnt_w = os.pipe()
                pairs = [("", "rd", "rd.x"), ("", "ld", "ld.x"), ("ld", "sub", "sub.x")]
                swapper = os.fork()
                if swapper == 0:
                    try:
                        os.close(stop_w)
                        os.close(cnt_r)
                        _swapper(up, pairs, stop_r, cnt_w)
                    finally:
                        os._exit(0)
                os.close(stop_r)
                os.close(cnt_w)
                try:
                    for seed in range(3):
                        def run(seed: int = seed + 10 * r) -> Counter:
                            os.chdir(mnt)
                            return _busy_worker(seed, 500)
                        totals += in_decoy(g, run)
                finally:
                    os.write(stop_w, b"x")
                    os.close(stop_w)
                    with os.fdopen(cnt_r) as f:
                        swaps += int(f.read() or 0)
                    os.waitpid(swapper, 0)
            # the daemon is alive and serving, and nothing of the outside came in
            os.kill(daemon, 0)
            assert os.listdir(mnt)
            assert _never_secret(mnt) > 0
        events = watch.events()
    finally:
        watch.close()
    assert events == [], events[:20]
    assert g.snapshot() == before
    assert _never_secret(up) > 0
    assert os.listdir(os.path.join(p["work"], "work")) == []
    log = open(os.path.join(p["work"], "unionfs.log")).read()
    assert "internal error" not in log and "Traceback" not in log, log
    ok = sum(v for k, v in totals.items() if k.endswith(":ok"))
    print(f"\nswap race: {totals['ops']} operations ({ok} succeeded) during {swaps} swaps; "
          f"errors: {sorted((k, v) for k, v in totals.items() if not k.endswith(':ok') and k != 'ops')}")
    assert totals["ops"] == 1500 * rounds and swaps > 0
