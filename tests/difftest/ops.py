"""Random filesystem operations: a seeded generator and an executor.

An operation is a plain, printable value (`Op`). The executor runs it on a
mountpoint with os.* calls and returns its *outcome*: a normalized value (the
result plus the state of the touched paths as lstat & co. see them) or the
errno name. Two filesystems agree on an op when the outcomes are equal.

Safety: ops run as root on real mounts whose fixture contains symlinks to
/etc/passwd and out of the tree, so no mutating call ever follows a symlink:
final components are opened with O_NOFOLLOW or used with *at(...NOFOLLOW)
calls, and an op whose path has a symlink (or anything not a directory) among
its parent components is not run at all.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable

from helpers.libc import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2

from .layers import blob
from .view import describe, errname


# Users for the unprivileged ops: (uid, gid); uid 1000 and 1001 own fixture files.
USERS = [(1000, 1000), (1001, 1001), (1000, 100), (65534, 65534)]


@dataclass(frozen=True)
class Op:
    kind: str
    path: str
    path2: str | None = None
    args: tuple = ()
    user: tuple[int, int] | None = None   # run in a child as (uid, gid)

    def __repr__(self) -> str:
        parts = [repr(self.path)]
        if self.path2 is not None:
            parts.append(repr(self.path2))
        parts += [repr(a) for a in self.args]
        s = f"{self.kind}({', '.join(parts)})"
        if self.user:
            s += f" as {self.user[0]}:{self.user[1]}"
        return s


def _data(tag: str, n: int) -> bytes:
    return blob("w" + tag, n)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:16]


def _open(path: str, flags: int, mode: int = 0o644) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)


def _is_lnk(path: str) -> bool:
    return stat.S_ISLNK(os.lstat(path).st_mode)


def _not_symlink_or_special(path: str) -> None:
    """Refuse (as a normal outcome) to open something that is not a regular file or dir."""
    st = os.lstat(path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise _Skip("not-regular:" + describe_type(st.st_mode))


def describe_type(mode: int) -> str:
    from .view import ftype
    return ftype(mode)


class _Skip(Exception):
    """A deterministic non-error outcome for an op we refuse to run."""


# --- primitives: (root-joined paths, op) -> result value; raise OSError on failure -------

def _p_create(a: str, b: str | None, args: tuple) -> Any:
    mode, = args
    os.close(_open(a, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
    return "ok"


def _p_creat_trunc(a, b, args):
    mode, tag, n = args
    try:
        _not_symlink_or_special(a)   # never open an existing device or fifo
    except FileNotFoundError:
        pass
    fd = _open(a, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, mode)
    try:
        return os.write(fd, _data(tag, n))
    finally:
        os.close(fd)


def _p_write(a, b, args):
    off, tag, n = args
    _not_symlink_or_special(a)
    fd = _open(a, os.O_WRONLY)
    try:
        return os.pwrite(fd, _data(tag, n), off)
    finally:
        os.close(fd)


def _p_append(a, b, args):
    tag, n = args
    _not_symlink_or_special(a)
    fd = _open(a, os.O_WRONLY | os.O_APPEND)
    try:
        return os.write(fd, _data(tag, n))
    finally:
        os.close(fd)


def _p_truncate(a, b, args):
    size, = args
    if _is_lnk(a):
        raise _Skip("symlink")
    os.truncate(a, size)
    return "ok"


def _p_ftruncate(a, b, args):
    size, = args
    _not_symlink_or_special(a)
    fd = _open(a, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return "ok"


def _p_read(a, b, args):
    off, n = args
    _not_symlink_or_special(a)
    fd = _open(a, os.O_RDONLY)
    try:
        data = os.pread(fd, n, off)
    finally:
        os.close(fd)
    return (len(data), _sha(data))


def _p_coherent(a, b, args):
    """Read fd opened before a write through another fd (copy-up in between)."""
    off, tag, n = args
    _not_symlink_or_special(a)
    rfd = _open(a, os.O_RDONLY)
    try:
        before = os.pread(rfd, 64, 0)
        wfd = _open(a, os.O_WRONLY)
        try:
            os.pwrite(wfd, _data(tag, n), off)
        finally:
            os.close(wfd)
        after = os.pread(rfd, n + 16, off)
        return (_sha(before), len(after), _sha(after), os.fstat(rfd).st_size)
    finally:
        os.close(rfd)


def _p_unlink_open(a, b, args):
    """Unlink a file that is open; the fd keeps working."""
    tag, n = args
    _not_symlink_or_special(a)
    fd = _open(a, os.O_RDWR)
    try:
        os.unlink(a)
        w = os.pwrite(fd, _data(tag, n), 0)
        st = os.fstat(fd)
        data = os.pread(fd, n + 64, 0)
        return (w, st.st_nlink, st.st_size, _sha(data))
    finally:
        os.close(fd)


def _p_rename_open(a, b, args):
    """Rename a file that is open for writing, write through the fd, read the new name."""
    tag, n = args
    _not_symlink_or_special(a)
    fd = _open(a, os.O_WRONLY)
    try:
        os.rename(a, b)
        w = os.pwrite(fd, _data(tag, n), 1)
    finally:
        os.close(fd)
    rfd = _open(b, os.O_RDONLY)
    try:
        data = os.pread(rfd, 1 << 22, 0)
    finally:
        os.close(rfd)
    return (w, len(data), _sha(data))


def _p_mkdir(a, b, args):
    mode, = args
    os.mkdir(a, mode)
    return "ok"


def _p_rmdir(a, b, args):
    os.rmdir(a)
    return "ok"


def _p_unlink(a, b, args):
    os.unlink(a)
    return "ok"


def _p_rename(a, b, args):
    flags, = args
    if flags:
        renameat2(a, b, flags)
    else:
        os.rename(a, b)
    return "ok"


def _p_link(a, b, args):
    os.link(a, b, follow_symlinks=False)
    return "ok"


def _p_symlink(a, b, args):
    target, = args
    os.symlink(target, a)
    return "ok"


def _p_chmod(a, b, args):
    mode, = args
    if _is_lnk(a):
        raise _Skip("symlink")
    fd = os.open(a, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            raise _Skip("symlink")
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)
    return "ok"


def _p_chown(a, b, args):
    uid, gid = args
    os.chown(a, uid, gid, follow_symlinks=False)
    return "ok"


def _p_utimens(a, b, args):
    times, = args
    if times is None:
        os.utime(a, None, follow_symlinks=False)
        return "ok-now"
    os.utime(a, ns=times, follow_symlinks=False)
    st = os.lstat(a)
    return ("ok", st.st_mtime_ns, st.st_atime_ns)


def _p_setxattr(a, b, args):
    name, value, flags = args
    os.setxattr(a, name, value, flags, follow_symlinks=False)
    return "ok"


def _p_removexattr(a, b, args):
    name, = args
    os.removexattr(a, name, follow_symlinks=False)
    return "ok"


def _p_getxattr(a, b, args):
    name, = args
    return (sorted(os.listxattr(a, follow_symlinks=False)),
            os.getxattr(a, name, follow_symlinks=False))


def _p_mknod(a, b, args):
    mode, major, minor = args
    os.mknod(a, stat.S_IFCHR | mode, os.makedev(major, minor))
    return "ok"


def _p_mkfifo(a, b, args):
    mode, = args
    os.mkfifo(a, mode)
    return "ok"


def _p_readdir(a, b, args):
    return sorted(os.listdir(a))


def _p_stat(a, b, args):
    return "ok"   # the outcome's post-state carries the lstat description


def _p_access(a, b, args):
    mode, = args
    return os.access(a, mode, follow_symlinks=False)


PRIMITIVES: dict[str, Callable[[str, str | None, tuple], Any]] = {
    "create": _p_create, "creat_trunc": _p_creat_trunc, "write": _p_write,
    "append": _p_append, "truncate": _p_truncate, "ftruncate": _p_ftruncate,
    "read": _p_read, "coherent": _p_coherent, "unlink_open": _p_unlink_open,
    "rename_open": _p_rename_open, "mkdir": _p_mkdir, "rmdir": _p_rmdir,
    "unlink": _p_unlink, "rename": _p_rename, "link": _p_link, "symlink": _p_symlink,
    "chmod": _p_chmod, "chown": _p_chown, "utimens": _p_utimens, "setxattr": _p_setxattr,
    "removexattr": _p_removexattr, "getxattr": _p_getxattr, "mknod": _p_mknod,
    "mkfifo": _p_mkfifo, "readdir": _p_readdir, "stat": _p_stat, "access": _p_access,
}

# Ops that can change the set of names (the generator re-reads the tree after them).
NAMESPACE_OPS = {"unlink_open", "rename_open", "create", "creat_trunc", "mkdir", "rmdir", "unlink", "rename", "link",
                 "symlink", "mknod", "mkfifo"}


def _parents_unsafe(root: str, rel: str) -> str | None:
    """Why *rel* must not be used under *root*: a parent that is a symlink."""
    parts = rel.split("/")[:-1]
    cur = root
    for part in parts:
        cur = os.path.join(cur, part)
        try:
            st = os.lstat(cur)
        except OSError:
            return None          # the op itself will fail with ENOENT / ENOTDIR
        if stat.S_ISLNK(st.st_mode):
            return "unsafe-symlink-parent"
        if not stat.S_ISDIR(st.st_mode):
            return None
    return None


def _primitive(root: str, op: Op) -> Any:
    a = os.path.join(root, op.path) if op.path else root
    b = os.path.join(root, op.path2) if op.path2 is not None else None
    try:
        return PRIMITIVES[op.kind](a, b, op.args)
    except _Skip as s:
        return "skip:" + str(s)
    except OSError as e:
        return "E:" + errname(e)


def _run_as(root: str, op: Op) -> Any:
    uid, gid = op.user
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            res = _primitive(root, op)
            data = pickle.dumps(res)
        except BaseException as e:  # noqa: BLE001 - report anything to the parent
            data = pickle.dumps(f"child-crash:{type(e).__name__}:{e}")
        try:
            os.write(w, data)
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while True:
        c = os.read(r, 65536)
        if not c:
            break
        chunks.append(c)
    os.close(r)
    os.waitpid(pid, 0)
    return pickle.loads(b"".join(chunks)) if chunks else "child-no-result"


def post_state(root: str, rel: str | None) -> Any:
    if rel is None:
        return None
    p = os.path.join(root, rel) if rel else root
    try:
        st = os.lstat(p)
    except OSError as e:
        return "E:" + errname(e)
    return describe(p, st)


def run_op(root: str, op: Op) -> Any:
    """Run *op* on the tree mounted at *root*; return its comparable outcome."""
    for rel in (op.path, op.path2):
        if rel:
            why = _parents_unsafe(root, rel)
            if why:
                return (why,)
    before = [_ino(root, op.path), _ino(root, op.path2)]
    res = _run_as(root, op) if op.user else _primitive(root, op)
    after = [_ino(root, op.path), _ino(root, op.path2)]
    # Inode identity, without the numbers: for each named path afterwards, which
    # named path (if any) had its inode number before. overlayfs keeps st_ino
    # across copy-up and rename.
    same = tuple(tuple(j for j, b in enumerate(before) if a is not None and a == b)
                 for a in after)
    # The state of every path the op named, as root sees it afterwards.
    return (res, post_state(root, op.path), post_state(root, op.path2), same)


def mv_fallback(root: str, op: Op, upper: str | None = None) -> Any:
    """What mv(1) does where a rename gives EXDEV (kernel overlayfs without redirects, for a
    directory with lower contents), as root so that everything is kept: the source copied
    to the destination by `cp -a` (data, owners, modes, times, xattrs), then removed; an
    exchange swaps two such copies. Then what a rename keeps and a copy would not: each
    copied directory gets its source's mode back (cp leaves a set-gid bit a directory
    inherits from its new parent), and each copied non-directory is one inode again with the names
    it shared an inode with, inside the tree and beyond it (unionfs's copy-up links them
    all). Which names are one inode is read in the kernel's *upper* where they are there
    (overlayfs without index gives the names of one upper inode different st_inos). The
    outcome is run_op's, without the inode identity (a copy is a new inode)."""
    flags, = op.args
    a, b = os.path.join(root, op.path), os.path.join(root, op.path2)

    def inode(path: str, st: os.stat_result) -> tuple:
        if upper is not None:
            up = os.path.join(upper, os.path.relpath(path, root))
            ust = os.lstat(up) if os.path.lexists(up) else None
            if ust is not None and not stat.S_ISDIR(ust.st_mode):
                return ("upper", ust.st_ino)
        return ("view", st.st_ino)

    def names_by_inode() -> dict[tuple, list[str]]:
        out: dict[tuple, list[str]] = {}
        for d, _dirs, files in os.walk(root):
            for n in files:
                path = os.path.join(d, n)
                out.setdefault(inode(path, os.lstat(path)), []).append(path)
        return out

    def plan(tree: str, groups: dict[tuple, list[str]]) -> tuple[dict[str, int], dict[str, str]]:
        """(dir modes, rel -> the name it is to be linked to) for *tree*."""
        modes: dict[str, int] = {}
        links: dict[str, str] = {}
        if not stat.S_ISDIR(os.lstat(tree).st_mode):
            return modes, links
        for d, _dirs, files in os.walk(tree):
            modes[os.path.relpath(d, tree)] = stat.S_IMODE(os.lstat(d).st_mode)
            for n in files:
                path = os.path.join(d, n)
                group = sorted(groups.get(inode(path, os.lstat(path)), [path]))
                # a name that stays where it is, if there is one, else the tree's first
                outside = [g for g in group if not (g + "/").startswith(tree + "/")]
                anchor = (outside or group)[0]
                if anchor != path:
                    links[os.path.relpath(path, tree)] = anchor
        return modes, links

    def settle(tree: str, src: str, dst: str, modes: dict[str, int], links: dict[str, str]) -> None:
        """Apply *plan*'s outcome to the copy of *src* now at *dst* (*tree*: where the
        names inside the source tree are now: the copy itself)."""
        for rel, mode in modes.items():
            os.chmod(os.path.normpath(os.path.join(dst, rel)), mode)
        for rel, other in links.items():
            if other == src or other.startswith(src + "/"):
                other = os.path.join(tree, os.path.relpath(other, src))
            tmp = os.path.join(dst, rel) + ".difftest-ln"
            os.link(other, tmp, follow_symlinks=False)
            os.rename(tmp, os.path.join(dst, rel))

    def cp(src: str, dst: str) -> None:
        proc = subprocess.run(["cp", "-a", "--no-target-directory", src, dst],
                              capture_output=True, text=True)
        if proc.returncode:
            raise OSError(0, f"cp -a failed: {proc.stderr.strip()}")

    def rm(path: str) -> None:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    try:
        groups = names_by_inode()
        if flags & RENAME_EXCHANGE:
            ta, tb = a + ".difftest-mv", b + ".difftest-mv"
            pa, pb = plan(a, groups), plan(b, groups)
            for src, tmp in ((a, ta), (b, tb)):
                if stat.S_ISDIR(os.lstat(src).st_mode):
                    cp(src, tmp)
                    rm(src)
                else:
                    os.rename(src, tmp)   # only a directory needs copying
            os.rename(ta, b)
            os.rename(tb, a)
            settle(b, a, b, *pa)
            settle(a, b, a, *pb)
        else:
            if os.path.lexists(b):
                os.rmdir(b)   # rename's rule: an empty directory is replaced
            pa = plan(a, groups)
            cp(a, b)
            rm(a)
            settle(b, a, b, *pa)
        res = "ok"
    except OSError as e:
        res = "E:" + errname(e)
    return (res, post_state(root, op.path), post_state(root, op.path2), None)


def _ino(root: str, rel: str | None) -> int | None:
    if rel is None:
        return None
    try:
        return os.lstat(os.path.join(root, rel) if rel else root).st_ino
    except OSError:
        return None


# --- the generator --------------------------------------------------------------------------

# Names that existed in some lower but are hidden by a whiteout or opaque dir, and
# names the fixture never had: both are good targets for creation.
GHOSTS = ["gone.txt", "gonedir", "gonedir/inside.txt", "merged/wo_by_mid.txt",
          "data/mid_only.txt", "etc/hosts", "opq/a.txt", "opq/olddir", "typeswap/under.txt",
          "merged/never_existed", "merged/opqsub/s1"]
FRESH_NAMES = ["new", "n1", "n2", "f.txt", "d", "sub", "x", "renamed", "gone.txt", "m1.txt",
               "common.txt", "a", "hl_b"]

USER_XATTRS = ["user.a", "user.b", "user.hl", "user.new", "user.dirattr", "user.origin",
               "user.layer", "user.x" + "y" * 40] * 6 + [
    # rarely: a plain trusted.* name (root may set it; it lands in the upper)
    "trusted.plain"]
# overlayfs's own names through the mount: since Linux 6.7 the kernel accepts
# and shows them, stored escaped (trusted.overlay.overlay.*) in the upper, for
# nested overlays. Beyond this test's brief (user.* names), so opt-in.
if os.environ.get("UNIONFS_DIFF_OVERLAY_XATTRS"):
    USER_XATTRS += ["trusted.overlay.opaque", "trusted.overlay.redirect"]

SIZES = [0, 1, 7, 100, 4095, 4096, 4097, 65536, 70001]
BIG_SIZES = [1 << 20, (3 << 20) // 2 + 3]


PROFILES: list[dict[str, float]] = [
    {},
    {"rename": 3, "mkdir": 2, "rmdir": 2, "readdir": 2},                  # directory moves
    {"link": 4, "unlink": 2, "write": 1.5, "setxattr": 2, "chown": 2},     # hard links, metadata
    {"user": 4, "chmod": 2},                                               # permissions
]


@dataclass
class Generator:
    """Chooses the next op from a seeded RNG and the tree as it currently is."""

    seed: int
    rng: random.Random = field(init=False)
    known: dict[str, str] = field(default_factory=dict)   # relpath -> type
    seen: set[str] = field(default_factory=set)            # every path ever known
    groups: list[list[str]] = field(default_factory=list)  # hard-link groups (by st_ino)
    counter: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def refresh(self, root: str) -> None:
        known: dict[str, str] = {}

        def walk(rel: str) -> None:
            full = os.path.join(root, rel) if rel else root
            try:
                entries = list(os.scandir(full))
            except OSError:
                return
            for e in entries:
                r = f"{rel}/{e.name}" if rel else e.name
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                t = describe_type(st.st_mode)
                known[r] = t
                if t != "dir":
                    inos.setdefault(st.st_ino, []).append(r)
                if t == "dir":
                    walk(r)

        inos: dict[int, list[str]] = {}
        walk("")
        self.groups = sorted(sorted(g) for g in inos.values() if len(g) > 1)
        self.known = known
        self.seen |= set(known)

    # path pickers
    def _existing(self, types: tuple[str, ...] | None = None) -> str:
        cands = sorted(p for p, t in self.known.items() if types is None or t in types)
        if not cands:
            return self._fresh()
        return self.rng.choice(cands)

    def _dir(self) -> str:
        dirs = [""] + sorted(p for p, t in self.known.items() if t == "dir")
        return self.rng.choice(dirs)

    def _fresh(self) -> str:
        r = self.rng.random()
        if r < 0.2:
            return self.rng.choice(GHOSTS)
        if r < 0.35:
            gone = sorted(self.seen - set(self.known))
            if gone:
                return self.rng.choice(gone)
        d = self._dir()
        name = self.rng.choice(FRESH_NAMES)
        return f"{d}/{name}" if d else name

    def _any(self) -> str:
        return self._fresh() if self.rng.random() < 0.12 else self._existing()

    def _file(self) -> str:
        return self._fresh() if self.rng.random() < 0.08 else self._existing(("file",))

    def _size(self) -> int:
        if self.rng.random() < 0.04:
            return self.rng.choice(BIG_SIZES)
        return self.rng.choice(SIZES)

    def _tag(self) -> str:
        self.counter += 1
        return f"{self.seed}.{self.counter}"

    def _mode(self, dir_: bool = False) -> int:
        if dir_:
            return self.rng.choice([0o755, 0o700, 0o1777, 0o2775, 0o555, 0o777, 0o3777])
        return self.rng.choice([0o644, 0o600, 0o755, 0o4755, 0o2755, 0o666, 0o444, 0o000, 0o1644,
                                0o6777, 0o4766])

    def next(self) -> Op:
        rng = self.rng
        kinds = [("stat", 8), ("read", 6), ("readdir", 6), ("create", 5), ("creat_trunc", 3),
                 ("write", 8), ("append", 5), ("truncate", 4), ("ftruncate", 2), ("mkdir", 5),
                 ("rmdir", 4), ("unlink", 6), ("rename", 10), ("link", 4), ("symlink", 3),
                 ("chmod", 4), ("chown", 3), ("utimens", 3), ("setxattr", 5),
                 ("removexattr", 3), ("getxattr", 2), ("mknod", 1), ("mkfifo", 1),
                 ("coherent", 2), ("unlink_open", 1), ("rename_open", 1.5), ("user", 6)]
        # Each seed gets a profile, so some seeds dwell on one area.
        boost = PROFILES[self.seed % len(PROFILES)]
        kind = rng.choices([k for k, _ in kinds], [w * boost.get(k, 1) for k, w in kinds])[0]
        if kind == "user":
            return self._user_op()
        return self._make(kind)

    def _make(self, kind: str, user: tuple[int, int] | None = None) -> Op:
        rng = self.rng
        if kind == "stat":
            return Op("stat", self._any(), user=user)
        if kind == "access":
            return Op("access", self._any(), args=(rng.choice([os.R_OK, os.W_OK, os.X_OK]),),
                      user=user)
        if kind == "read":
            return Op("read", self._file(), args=(rng.choice([0, 0, 1, 4096, 1 << 20]),
                                                  rng.choice([16, 4096, 1 << 21])), user=user)
        if kind == "readdir":
            p = self._existing(("dir",)) if rng.random() < 0.9 else self._any()
            return Op("readdir", p, user=user)
        if kind == "create":
            return Op("create", self._fresh() if rng.random() < 0.85 else self._any(),
                      args=(self._mode(),), user=user)
        if kind == "creat_trunc":
            return Op("creat_trunc", self._fresh() if rng.random() < 0.4 else self._file(),
                      args=(self._mode(), self._tag(), self._size()), user=user)
        if kind == "write":
            off = rng.choice([0, 0, 1, 100, 4095, 65536, 1 << 20, 3 << 20])
            return Op("write", self._file(), args=(off, self._tag(), self._size() or 1),
                      user=user)
        if kind == "append":
            return Op("append", self._file(), args=(self._tag(), self._size() or 1), user=user)
        if kind in ("truncate", "ftruncate"):
            size = rng.choice([0, 0, 1, 100, 4096, 5000, 1 << 20, 3 << 20])
            return Op(kind, self._file(), args=(size,), user=user)
        if kind == "coherent":
            return Op("coherent", self._file(), args=(rng.choice([0, 10, 4096]), self._tag(),
                                                      rng.choice([1, 100, 5000])), user=user)
        if kind == "unlink_open":
            return Op("unlink_open", self._file(), args=(self._tag(), rng.choice([1, 100, 5000])),
                      user=user)
        if kind == "rename_open":
            return Op("rename_open", self._file(), self._fresh() if rng.random() < 0.7
                      else self._existing(("file",)), args=(self._tag(), rng.choice([1, 5000])),
                      user=user)
        if kind == "mkdir":
            return Op("mkdir", self._fresh() if rng.random() < 0.85 else self._any(),
                      args=(self._mode(True),), user=user)
        if kind == "rmdir":
            p = self._existing(("dir",)) if rng.random() < 0.85 else self._any()
            return Op("rmdir", p, user=user)
        if kind == "unlink":
            return Op("unlink", self._any(), user=user)
        if kind == "rename":
            src = self._existing(("dir",)) if rng.random() < 0.35 else self._any()
            dst = self._fresh() if rng.random() < 0.55 else self._any()
            flags = rng.choices([0, RENAME_NOREPLACE, RENAME_EXCHANGE], [6, 2, 2])[0]
            if self.groups and rng.random() < 0.08:
                # Two names of one inode: rename(2) must do nothing and succeed.
                src, dst = rng.sample(rng.choice(self.groups), 2)
            elif rng.random() < 0.03:
                dst = src
            return Op("rename", src, dst, args=(flags,), user=user)
        if kind == "link":
            src = self._existing(("file", "symlink", "fifo", "chr")) if rng.random() < 0.9 \
                else self._any()
            return Op("link", src, self._fresh(), user=user)
        if kind == "symlink":
            target = rng.choice(["f.txt", "../data/small.txt", "/etc/passwd", "nowhere/x",
                                 "../../../../etc/passwd", ".", "gone.txt", "a" * 100])
            return Op("symlink", self._fresh(), args=(target,), user=user)
        if kind == "chmod":
            p = self._any()
            isdir = self.known.get(p) == "dir"
            return Op("chmod", p, args=(self._mode(isdir),), user=user)
        if kind == "chown":
            uid, gid = rng.choice([(0, 0), (1000, 1000), (1001, 100), (-1, 100), (1000, -1),
                                   (65534, 65534)])
            return Op("chown", self._any(), args=(uid, gid), user=user)
        if kind == "utimens":
            if rng.random() < 0.3:
                times = None
            else:
                times = (rng.choice([0, 10**9, 1234567890 * 10**9 + 123456789]),
                         rng.choice([5 * 10**8, 1600000000 * 10**9 + 1, 2**31 * 10**9]))
            return Op("utimens", self._any(), args=(times,), user=user)
        if kind == "setxattr":
            flags = rng.choice([0, 0, os.XATTR_CREATE, os.XATTR_REPLACE])
            value = rng.choice([b"", b"v", b"value-" + self._tag().encode(), bytes(range(256))])
            return Op("setxattr", self._any(), args=(rng.choice(USER_XATTRS), value, flags),
                      user=user)
        if kind == "removexattr":
            return Op("removexattr", self._any(), args=(rng.choice(USER_XATTRS),), user=user)
        if kind == "getxattr":
            return Op("getxattr", self._any(), args=(rng.choice(USER_XATTRS),), user=user)
        if kind == "mknod":
            major, minor = rng.choices([(1, 3), (0, 0), (5, 1)], [6, 2, 1])[0]
            return Op("mknod", self._fresh(), args=(rng.choice([0o644, 0o600]), major, minor),
                      user=user)
        if kind == "mkfifo":
            return Op("mkfifo", self._fresh(), args=(rng.choice([0o644, 0o600, 0o666]),),
                      user=user)
        raise AssertionError(kind)

    def _user_op(self) -> Op:
        user = self.rng.choice(USERS)
        kind = self.rng.choice(["create", "write", "append", "truncate", "unlink", "mkdir",
                                "rmdir", "rename", "chmod", "chown", "utimens", "setxattr",
                                "readdir", "read", "symlink", "link", "stat", "access",
                                "creat_trunc", "removexattr"])
        op = self._make(kind, user)
        if self.rng.random() < 0.6:
            # Aim at the places where unprivileged users own or may write things.
            p = self._user_path(op.kind in ("create", "mkdir", "symlink", "creat_trunc"))
            op = Op(op.kind, op.path if op.kind in ("link",) else p,
                    p if op.kind == "link" else op.path2, op.args, user)
        if kind == "chown":   # unprivileged chown: to yourself / your own group only
            op = Op("chown", op.path, args=self.rng.choice([(user[0], user[1]), (-1, user[1]),
                                                             (user[0], -1), (0, 0)]),
                    user=user)
        return op

    USER_AREAS = ("home1000", "toponly", "sticky", "group100", "private", "owned")

    def _user_path(self, fresh: bool) -> str:
        inside = sorted(p for p in self.known if p.split("/")[0] in self.USER_AREAS)
        if fresh or not inside:
            dirs = [p for p in inside if self.known[p] == "dir"] or ["sticky"]
            return f"{self.rng.choice(dirs)}/{self.rng.choice(FRESH_NAMES)}"
        return self.rng.choice(inside)

    def observe(self, op: Op, outcome: Any, root: str) -> None:
        """Update the picture of the tree after *op* ran on the reference side."""
        res = outcome[0] if isinstance(outcome, tuple) and outcome else outcome
        failed = isinstance(res, str) and (res.startswith("E:") or res.startswith("skip"))
        if op.kind in NAMESPACE_OPS and not failed:
            self.refresh(root)
