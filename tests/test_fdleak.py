"""No descriptor leaks in the daemon, and many files open at once.

The daemon's open fds (/proc/PID/fd) are counted right after mounting, and
again after a workload (open/close, copy-ups, renames of files and directories,
unlinks of open files, hard links, readdir, mkdir/rmdir) once the kernel has
released everything: all client fds closed (RELEASE is asynchronous, so the
count is polled, with a deadline that fails the test) and the dentry cache
dropped (drop_caches=2 makes the kernel FORGET every unused inode).

Allowed slack, and why: the daemon keeps an O_PATH fd per *lower* directory it
has walked, in an LRU (layers.FdCache, at most 4096) that lives as long as the
mount, since lower layers never change. Upper directory fds in the same cache
are dropped when the kernel forgets their node. So after the workload the count
may exceed the baseline by at most the number of lower directories, and must
not grow when the same workload runs again.
"""
from __future__ import annotations

import contextlib
import os
import resource
import time

import pytest

from helpers.mounting import daemon_pid, pid_gone, unionfs_mount

pytestmark = [pytest.mark.mount]

NDIRS, NFILES = 8, 25
MANY = 5000


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_listing(pid: int) -> str:
    out = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        with contextlib.suppress(OSError):
            out.append(f"{fd} -> {os.readlink(f'/proc/{pid}/fd/{fd}')}")
    return "\n".join(out)


def settle(pid: int, limit: int, deadline: float = 60.0) -> int:
    """Drop the kernel's dentries and inodes, and wait (bounded) until the daemon holds at
    most *limit* fds; return the count (the caller asserts on it)."""
    end = time.monotonic() + deadline
    while True:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")
        n = fd_count(pid)
        if n <= limit or time.monotonic() > end:
            return n
        time.sleep(0.2)


@contextlib.contextmanager
def nofile_soft(limit: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def build(lower: str) -> int:
    """The lower tree; returns how many directories it has (the root included)."""
    for d in range(NDIRS):
        os.makedirs(os.path.join(lower, f"d{d}", "sub"))
        for i in range(NFILES):
            with open(os.path.join(lower, f"d{d}", f"f{i}"), "wb") as f:
                f.write(b"%d/%d\n" % (d, i) * 100)
        os.link(os.path.join(lower, f"d{d}", "f0"), os.path.join(lower, f"d{d}", "hl"))
    os.makedirs(os.path.join(lower, "many"))
    for i in range(MANY):
        with open(os.path.join(lower, "many", f"m{i}"), "wb") as f:
            f.write(b"%d" % i)
    return 1 + NDIRS * 2 + 1


def workload(mnt: str, rnd: int) -> None:
    for d in range(NDIRS):
        base = os.path.join(mnt, f"d{d}")
        os.listdir(base)
        for i in range(NFILES - 2):   # (the last two are unlinked, one per round)
            with open(os.path.join(base, f"f{i}"), "rb") as f:
                f.read()
        # copy-ups (one of a hard-linked pair too) and in-place changes
        for i in range(0, NFILES, 3):
            with open(os.path.join(base, f"f{i}"), "ab") as f:
                f.write(b"r%d" % rnd)
        os.chmod(os.path.join(base, "f1"), 0o600)
        # renames of files and a directory, back and forth
        os.rename(os.path.join(base, "f2"), os.path.join(base, "f2.mv"))
        os.rename(os.path.join(base, "f2.mv"), os.path.join(base, "f2"))
        os.rename(os.path.join(base, "sub"), os.path.join(base, "sub.mv"))
        os.listdir(os.path.join(base, "sub.mv"))
        os.rename(os.path.join(base, "sub.mv"), os.path.join(base, "sub"))
        # unlink of open files (a lower one and a new one), used after the unlink
        new = os.path.join(base, f"new{rnd}")
        with open(new, "wb") as f:
            f.write(b"new")
        for victim in (os.path.join(base, f"f{NFILES - 1 - rnd}"), new):
            fd = os.open(victim, os.O_RDWR)
            try:
                os.unlink(victim)
                os.pwrite(fd, b"after unlink", 0)
                assert os.pread(fd, 12, 0) == b"after unlink"
                os.fstat(fd)
            finally:
                os.close(fd)
        os.link(os.path.join(base, "f3"), os.path.join(base, f"link{rnd}"))
        os.unlink(os.path.join(base, f"link{rnd}"))
        os.mkdir(os.path.join(base, f"newdir{rnd}"))
        with open(os.path.join(base, f"newdir{rnd}", "x"), "w") as f:
            f.write("x")
        os.unlink(os.path.join(base, f"newdir{rnd}", "x"))
        os.rmdir(os.path.join(base, f"newdir{rnd}"))
        for _ in os.walk(base):
            pass


def test_no_fd_leaks(tmp_path):
    lower, upper, work, mnt = (str(tmp_path / n) for n in ("lower", "upper", "work", "mnt"))
    for d in (upper, work, mnt):
        os.makedirs(d)
    lower_dirs = build(lower)
    # a low soft limit in the mounting process: the daemon must raise its own to the hard one
    with nofile_soft(1024) as hard:
        with unionfs_mount([lower], upper, mnt, workdir=work):
            pid = daemon_pid(mnt)
            with open(f"/proc/{pid}/limits") as f:
                line = next(ln for ln in f if ln.startswith("Max open files"))
            assert line.split()[3:5] == [str(hard), str(hard)], line
            base = settle(pid, 0, deadline=0)
            workload(mnt, 0)
            after1 = settle(pid, base + lower_dirs)
            assert after1 <= base + lower_dirs, \
                f"{after1} fds after the workload, baseline {base}:\n{fd_listing(pid)}"
            workload(mnt, 1)
            after2 = settle(pid, after1)
            assert after2 <= after1, f"fds grew from {after1} to {after2}:\n{fd_listing(pid)}"

            # thousands of files open at once through the mount: most only read (lower
            # fds), every tenth opened for writing (copied up: each copy-up fdatasyncs)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            fds = []
            try:
                for i in range(MANY):
                    path = os.path.join(mnt, "many", f"m{i}")
                    fds.append(os.open(path, os.O_RDWR if i % 10 == 0 else os.O_RDONLY))
                assert fd_count(pid) >= base + MANY
                for i, fd in enumerate(fds):
                    assert os.pread(fd, 10, 0) == b"%d" % i
                    if i % 10 == 0:
                        os.pwrite(fd, b"w", 10)
            finally:
                for fd in fds:
                    os.close(fd)
            after3 = settle(pid, after2 + 1)   # + the fd of lower directory many/
            assert after3 <= after2 + 1, f"{after3} fds after closing {MANY} files:\n{fd_listing(pid)}"
            assert not pid_gone(pid)
            assert sum(1 for n in os.listdir(os.path.join(upper, "many"))) == MANY // 10
    print(f"daemon fds: baseline {base}, after workload {after1}, again {after2}, "
          f"after {MANY} open files {after3} (lower dirs {lower_dirs}); RLIMIT_NOFILE {hard}")
