"""What the test_ops_* modules share: reading and writing through the mount, errnos, and
running a check as another user."""
from __future__ import annotations

import errno
import os
import subprocess
from typing import Callable, Sequence

from helpers.libc import check, libc


def raw_readdir(path: str) -> dict[str, tuple[int, int]]:
    """name -> (d_ino, d_type) for every entry, '.' and '..' included."""
    d = libc.opendir(os.fsencode(path))
    if not d:
        check(-1, "opendir", path)
    out: dict[str, tuple[int, int]] = {}
    try:
        while True:
            ent = libc.readdir(d)
            if not ent:
                break
            name = os.fsdecode(ent.contents.d_name)
            assert name not in out, f"{name!r} listed twice in {path}"
            out[name] = (ent.contents.d_ino, ent.contents.d_type)
    finally:
        libc.closedir(d)
    return out


def errno_of(fn: Callable[[], object]) -> int:
    """0 if fn() succeeds, else the errno of the OSError it raises."""
    try:
        fn()
    except OSError as e:
        return e.errno or -1
    return 0


def run_as(fn: Callable[[], object], cwd: str, uid: int = 1000, gid: int = 1000,
           groups: Sequence[int] = ()) -> int:
    """Run fn in a forked child as uid:gid (and supplementary *groups*) with cwd (entered
    while still root, since the tmp_path ancestors are 0700); 0 if it returned, else the
    errno it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            os.chdir(cwd)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            fn()
        except OSError as e:
            code = e.errno or 255
        except BaseException:
            code = 254
        os.write(w, str(code).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return int(out) if out else 253


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write(path: str, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def enoent(path: str) -> bool:
    return errno_of(lambda: os.lstat(path)) == errno.ENOENT


def all_names(top: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        out += dirnames + filenames
    return out


def other_sees(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30)


ROOT_NAMES = {"dir", "shadow.txt", "opq", "ociopq", "merged", "hl", "other", "sym_rel", "sym_abs",
              "sym_dangling", "fifo", "null", "xattr.txt", "owned.txt", "suid.bin", "rootfile.txt",
              "times.txt", "big.bin", "tmp", "userdir", "emptydir", "wdir", "wdir2"}


HL = ("hl/one", "other/two", "other/sub/three")
