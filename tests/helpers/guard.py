"""Watching that a daemon stays inside its layers: a canary tree and a secret file.

The canary and the secret sit next to the layers. inotify on them sees every
open, read, write, attribute change, creation or removal, whoever does it; a
snapshot (contents, modes, owners, times, xattrs, read with O_NOATIME) sees
what inotify could miss.

Callers of a mount resolve symlinks themselves (in their own process), so a
caller following a symlink that leads to the canary would touch it without the
daemon's doing. `in_decoy` runs a function in a child with a private mount
namespace in which decoys are bind-mounted over the canary and the secret: every
path the caller resolves to them, absolute or relative, reaches the decoy, while
the daemon (in the test's namespace) still sees the real ones. So any event on
the real canary or secret is the daemon's.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import stat
import struct
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from helpers.libc import CLONE_NEWNS, MS_BIND, MS_PRIVATE, MS_REC, check, libc
from helpers.snapshot import listdir, read_bytes, snapshot


IN_ACCESS, IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x1, 0x2, 0x4, 0x8
IN_OPEN, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE = 0x20, 0x40, 0x80, 0x100
IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x200, 0x400, 0x800
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
WATCH = (IN_ACCESS | IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_OPEN | IN_MOVED_FROM | IN_MOVED_TO
         | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF)

#: how long a child given to in_decoy may run; generous (its attempts take seconds)
CHILD_TIMEOUT = 300.0

SECRET = b"SECRET-7f3a-daemon-side-only\n"
DECOY = b"decoy seen by callers\n"


class Inotify:
    """Every inotify event on the watched paths, as (path, mask, name)."""

    def __init__(self, paths: list[str]) -> None:
        self.fd = check(libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")
        self.wd: dict[int, str] = {}
        for p in paths:
            wd = check(libc.inotify_add_watch(self.fd, os.fsencode(p), WATCH), "inotify_add_watch")
            self.wd[wd] = p

    def events(self) -> list[tuple[str, int, str]]:
        out = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            off = 0
            while off < len(buf):
                wd, mask, _cookie, length = struct.unpack_from("iIII", buf, off)
                name = buf[off + 16:off + 16 + length].rstrip(b"\0").decode(errors="replace")
                out.append((self.wd.get(wd, "?"), mask, name))
                off += 16 + length

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Guard:
    """The daemon-side canary tree and secret, and their caller-side decoys."""

    canary: str
    secret: str
    decoy_canary: str
    decoy_secret: str

    @classmethod
    def make(cls, where: str, decoys: str) -> "Guard":
        g = cls(os.path.join(where, "canary"), os.path.join(where, "secret.txt"),
                os.path.join(decoys, "decoy-canary"), os.path.join(decoys, "decoy-secret.txt"))
        for top, data in ((g.canary, SECRET), (g.decoy_canary, DECOY)):
            os.makedirs(os.path.join(top, "sub"))
            for rel in ("f.txt", "sub/g.txt"):
                with open(os.path.join(top, rel), "wb") as f:
                    f.write(data)
            os.setxattr(os.path.join(top, "f.txt"), "user.canary", b"1")
            os.chmod(os.path.join(top, "f.txt"), 0o640)
            os.utime(os.path.join(top, "f.txt"), ns=(1_000_000_000_000_000_000, 1_000_000_001_000_000_000))
        for path, data in ((g.secret, SECRET), (g.decoy_secret, DECOY)):
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o600)
        return g

    def watch(self) -> Inotify:
        return Inotify([self.canary, os.path.join(self.canary, "sub"), self.secret])

    def snapshot(self) -> dict[str, tuple]:
        """Everything about the canary and the secret, read without changing atimes."""
        def describe(path: str, st: os.stat_result) -> tuple:
            xattrs = tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False))
                                  for n in os.listxattr(path, follow_symlinks=False)))
            data: Any = None
            if stat.S_ISREG(st.st_mode):
                data = read_bytes(path, noatime=True)
            elif stat.S_ISDIR(st.st_mode):
                data = tuple(sorted(listdir(path, noatime=True)))
            return (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_ino, st.st_atime_ns,
                    st.st_mtime_ns, st.st_ctime_ns, xattrs, data)

        out: dict[str, tuple] = {}
        for top in (self.canary, self.secret):
            for rel, entry in snapshot(top, describe, include_root=True, noatime=True).items():
                out[os.path.normpath(os.path.join(top, rel))] = entry
        return out

    def reset_decoys(self) -> None:
        """Callers may have written through symlinks into the decoys: rebuild nothing, just
        make sure they still exist for the next child's bind mounts."""
        os.makedirs(self.decoy_canary, exist_ok=True)
        if not os.path.exists(self.decoy_secret):
            with open(self.decoy_secret, "wb") as f:
                f.write(DECOY)


def in_decoy(guard: Guard, fn: Callable[[], Any]) -> Any:
    """Run fn() in a forked child whose view has the decoys over the canary and the secret;
    return what it returned (pickled back), or raise what it raised as an AssertionError."""
    guard.reset_decoys()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            check(libc.unshare(CLONE_NEWNS), "unshare")
            check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate")
            for src, dst in ((guard.decoy_canary, guard.canary), (guard.decoy_secret, guard.secret)):
                check(libc.mount(os.fsencode(src), os.fsencode(dst), None, MS_BIND, None), "bind")
            result: Any = ("ok", fn())
        except BaseException:  # noqa: BLE001 - reported to the parent
            result = ("error", traceback.format_exc())
        try:
            with os.fdopen(w, "wb") as f:
                pickle.dump(result, f)
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    done = False
    end = time.monotonic() + CHILD_TIMEOUT
    try:
        while True:
            left = end - time.monotonic()
            ready, _, _ = select.select([r], [], [], max(left, 0))
            if not ready:
                raise AssertionError(f"the child ran {CHILD_TIMEOUT:.0f}s without finishing "
                                     f"(stuck in a request to the mount?); killed it")
            chunk = os.read(r, 1 << 16)
            if not chunk:
                done = True
                break
            data += chunk
    finally:
        os.close(r)
        if not done:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    kind, value = pickle.loads(data) if data else ("error", "the child died without a word")
    if kind != "ok":
        raise AssertionError(f"child failed:\n{value}")
    return value
