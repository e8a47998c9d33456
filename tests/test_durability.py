"""Durability: what fsync, fdatasync, O_SYNC, O_DSYNC, msync and fsync of a directory
promise through the mount reaches the upper layer.

After each, the bytes are in the upper file read directly (not through the
mount), and strace on the daemon shows it calling fsync/fdatasync on that very
upper file (strace -y prints the path behind each fd, so a sync of the wrong
file, of the work/ temporary, or none at all fails the test).

syncfs(2) is different: the kernel sends FUSE filesystems on /dev/fuse no
SYNCFS request (only virtiofs gets one), so the daemon cannot know. The test
checks what syncfs does give: the kernel's writeback cache is flushed into the
upper file; and it checks that the daemon was not asked (so that the day a
kernel starts sending it, this test says so). README Limits has it.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import re
import shutil
import signal
import select
import subprocess
import time
from typing import Iterator

import pytest

from helpers.mounting import daemon_pid, pid_gone, unionfs_mount
from helpers import libc
from unionfs import durable
from unionfs.format import OVERLAY

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (scripts/setup)"),
]

SYNC_CALL = re.compile(r"^(fsync|fdatasync|syncfs)\((\d+)<([^>]*)>\)\s+= 0\b")
UNFINISHED = " <unfinished ...>"
RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
ATTACH_TIMEOUT = 30.0   # strace attaching to a busy machine's daemon; generous, never hit


def sync_calls(raw: str) -> list[tuple[str, str]]:
    """(call, path) of each successful sync call in an `strace -f -y` log. Calls of two threads
    that overlap are printed split (`fsync(3</p> <unfinished ...>`, later `<... fsync
    resumed>) = 0`): each thread's halves are joined back first."""
    pending: dict[str, str] = {}
    calls = []
    for line in raw.splitlines():
        tid, _, rest = line.partition(" ")
        rest = rest.strip()
        if rest.endswith(UNFINISHED):
            pending[tid] = rest[:-len(UNFINISHED)]
            continue
        resumed = RESUMED.match(rest)
        if resumed:
            head = pending.pop(tid, "")
            if not head.startswith(resumed.group(1) + "("):
                continue  # its start was before the trace began
            rest = head + resumed.group(2)
        m = SYNC_CALL.match(rest)
        if m:
            calls.append((m.group(1), m.group(3)))
    return calls


class Trace:
    """What `traced` saw: the parsed calls, and the raw log for failure messages."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.raw = ""

    def __contains__(self, call: tuple[str, str]) -> bool:
        return call in self.calls

    def __repr__(self) -> str:
        return f"{self.calls}; raw trace:\n{self.raw}"


@contextlib.contextmanager
def traced(pid: int, out: str) -> Iterator[Trace]:
    """strace the daemon's sync calls while the body runs; the Trace gets them after.
    strace is detached (killed, if SIGINT does not do it) whatever happens."""
    trace = Trace()
    proc = subprocess.Popen(["strace", "-f", "-y", "-p", str(pid), "-o", out,
                             "-e", "trace=fsync,fdatasync,syncfs"],
                            stderr=subprocess.PIPE, text=True)
    try:
        # strace says "Process PID attached" once it has the main thread
        said = ""
        end = time.monotonic() + ATTACH_TIMEOUT
        while f"Process {pid} attached" not in said:
            left = end - time.monotonic()
            ready, _, _ = select.select([proc.stderr], [], [], max(left, 0))
            line = proc.stderr.readline() if ready else ""
            assert line, f"strace did not attach to {pid}: {said!r}"
            said += line
        yield trace
    finally:
        proc.send_signal(signal.SIGINT)   # detaches, after writing all it saw
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()   # a tracer's death detaches it too
            proc.communicate()
    with open(out) as f:
        trace.raw = f.read()
    trace.calls = sync_calls(trace.raw)


@contextlib.contextmanager
def copied_up(view: str, upper_file: str, work: str, flags: int = 0) -> Iterator[int]:
    """An fd opened read-write on *view* (which copies it up to *upper_file*), once the
    deferred syncer has synced that copy-up's batch: its syncfs cannot land in a trace begun
    inside. Closed at the end."""
    fd = os.open(view, os.O_RDWR | flags)
    try:
        copy_up_synced(upper_file, work)
        yield fd
    finally:
        os.close(fd)


def copy_up_synced(upper_file: str, work: str) -> None:
    """Wait until the deferred syncer has synced the batch of *upper_file*'s copy-up."""
    tag = durable.parse_tag(os.getxattr(upper_file, os.fsdecode(OVERLAY.ino_key)))
    assert tag is not None, f"{upper_file} carries no copy-up tag"
    end = time.monotonic() + 60
    while True:
        fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
        try:
            synced = durable.read_synced(fd)
        finally:
            os.close(fd)
        if synced >= tag.batch:
            return
        assert time.monotonic() < end, f"copy-up batch {tag.batch} never synced (record: {synced})"
        time.sleep(0.01)


def upper_bytes(path: str, off: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, off)
    finally:
        os.close(fd)


@pytest.fixture
def union(tmp_path):
    lower, upper, work, mnt = (str(tmp_path / n) for n in ("lower", "upper", "work", "mnt"))
    for d in (upper, work, mnt, os.path.join(lower, "d")):
        os.makedirs(d)
    for name in ("fsync", "fdatasync", "osync", "odsync", "msync", "syncfs"):
        with open(os.path.join(lower, "d", name), "wb") as f:
            f.write(b"L" * 100_000)
    with unionfs_mount([lower], upper, mnt, workdir=work):
        yield lower, upper, work, mnt, daemon_pid(mnt)


def test_sync_calls_reach_the_upper(union, tmp_path):
    lower, upper, work, mnt, pid = union
    # (name, open flags, how the data is synced, the daemon call that must show)
    cases = [("fsync", 0, os.fsync, "fsync"),
             ("fdatasync", 0, os.fdatasync, "fdatasync"),
             ("osync", os.O_SYNC, None, "fsync"),
             ("odsync", os.O_DSYNC, None, "fdatasync")]
    for n, (name, flags, sync, want) in enumerate(cases):
        view, up = os.path.join(mnt, "d", name), os.path.join(upper, "d", name)
        data = f"<{name} reached the upper>".encode()
        off = 4096 * 7 + 11
        with (copied_up(view, up, work, flags) as fd,
              traced(pid, str(tmp_path / f"strace{n}")) as calls):
            os.pwrite(fd, data, off)
            if sync is not None:
                sync(fd)
            assert upper_bytes(up, off, len(data)) == data, f"{name}: bytes not in the upper"
        assert (want, up) in calls, f"{name}: daemon did not {want} {up}; it did {calls}"
        assert not pid_gone(pid)


def test_msync_and_directory_fsync_reach_the_upper(union, tmp_path):
    lower, upper, work, mnt, pid = union
    view, up = os.path.join(mnt, "d", "msync"), os.path.join(upper, "d", "msync")
    with copied_up(view, up, work) as fd:
        m = mmap.mmap(fd, 100_000)
        try:
            with traced(pid, str(tmp_path / "strace-msync")) as calls:
                m[50_000:50_010] = b"mmapped!!!"
                m.flush()   # msync(MS_SYNC)
                assert upper_bytes(up, 50_000, 10) == b"mmapped!!!"
        finally:
            m.close()
    assert ("fdatasync", up) in calls or ("fsync", up) in calls, calls

    # a new name made durable by fsync of its directory: the upper directory is synced
    with open(os.path.join(mnt, "d", "new"), "wb") as f:
        f.write(b"new")
    dfd = os.open(os.path.join(mnt, "d"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        with traced(pid, str(tmp_path / "strace-dir")) as calls:
            os.fsync(dfd)
    finally:
        os.close(dfd)
    assert ("fsync", os.path.join(upper, "d")) in calls, calls


def test_syncfs_flushes_the_writeback_cache_into_the_upper(union, tmp_path):
    lower, upper, work, mnt, pid = union
    view, up = os.path.join(mnt, "d", "syncfs"), os.path.join(upper, "d", "syncfs")
    with copied_up(view, up, work) as fd, traced(pid, str(tmp_path / "strace-syncfs")) as calls:
        os.pwrite(fd, b"syncfs data", 60_000)
        libc.syncfs(fd)
        assert upper_bytes(up, 60_000, 11) == b"syncfs data"
    # the kernel sent nothing the daemon could sync on (if this fails, FUSE_SYNCFS reaches
    # FUSE daemons now: handle it and sync the upper's filesystem)
    assert [c for c in calls.calls if c[1] == up] == [], calls
