"""A full upper: the upper and workdir on an 8 MiB tmpfs.

* Copy-up of a lower file bigger than the space fails with ENOSPC to the
  caller (open for writing, chmod, setxattr: every way that copies data up),
  the file still reads as the lower one, and nothing is left behind: no half
  file in the upper, nothing in WORKDIR/work, the space is free again.
* Writing a new file until the upper is full gets ENOSPC. With the kernel's
  writeback cache (unionfs asks for it), write(2) fills the page cache and the
  upper's ENOSPC comes back at the first point that waits for the data:
  fsync(2) or close(2), so the test accepts it from write, fsync or close
  (README Limits). An O_DIRECT write bypasses the cache and gets it at once.
* After freeing space, copy-up and writes work again; the daemon lives on.
"""
from __future__ import annotations

import contextlib
import errno
import mmap
import os
import subprocess
import time

import pytest

from helpers.mounting import daemon_pid, force_unmount, pid_gone, unionfs_mount
from helpers.unit_helpers import seeded

pytestmark = [pytest.mark.mount]

MiB = 1 << 20


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@contextlib.contextmanager
def small_tmpfs(path: str, size: str = "8M"):
    os.makedirs(path)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path], check=True)
    try:
        yield path
    finally:
        force_unmount(path)


def used(path: str) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def wait_free(fs: str, blocks: int) -> None:
    """Wait (bounded) until *fs* has *blocks* free again after a file was removed through
    the mount: the daemon closes its fd on RELEASE, which the kernel sends after close(2)
    returned, and only then is the space given back."""
    deadline = time.monotonic() + 30
    while os.statvfs(fs).f_bavail < blocks:
        assert time.monotonic() < deadline, "the space of a removed file never came back"
        time.sleep(0.05)


def fill(path: str, direct: bool = False) -> tuple[int, str]:
    """Write 1 MiB blocks to a new file until ENOSPC; return (bytes accepted, where it failed)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o644)
    buf = mmap.mmap(-1, MiB)   # page-aligned, as O_DIRECT wants
    buf.write(seeded("fill", MiB))
    written = 0
    where = ""
    try:
        for _ in range(64):
            try:
                written += os.write(fd, buf)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                where = "write"
                break
        if not where:
            try:
                os.fsync(fd)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                where = "fsync"
    finally:
        try:
            os.close(fd)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            where = where or "close"
    return written, where


def test_enospc_copy_up_and_write(tmp_path):
    lower, mnt = str(tmp_path / "lower"), str(tmp_path / "mnt")
    os.makedirs(os.path.join(lower, "d"))
    os.makedirs(mnt)
    big, medium = seeded("big", 12 * MiB), seeded("medium", 2 * MiB)
    for name, data in (("big", big), ("medium", medium), ("small", b"small\n")):
        with open(os.path.join(lower, "d", name), "wb") as f:
            f.write(data)
    with small_tmpfs(str(tmp_path / "small")) as small:
        upper, work = os.path.join(small, "upper"), os.path.join(small, "work")
        os.makedirs(upper)
        os.makedirs(work)
        with unionfs_mount([lower], upper, mnt, workdir=work):
            pid = daemon_pid(mnt)
            view = os.path.join(mnt, "d", "big")
            base = used(small)
            os.stat(view)
            fds = len(os.listdir(f"/proc/{pid}/fd"))

            def no_leftovers(what: str) -> None:
                assert read(view) == big, f"{what}: the view of the lower file changed"
                assert not os.path.exists(os.path.join(upper, "d", "big")), f"{what}: half file in upper"
                assert os.listdir(os.path.join(work, "work")) == [], f"{what}: leftover in work/"
                assert used(small) <= base + 64 * 1024, f"{what}: space not given back"
                assert not pid_gone(pid)
                # (the read above closed its file; the kernel sends RELEASE after close returned)
                deadline = time.monotonic() + 30
                while len(os.listdir(f"/proc/{pid}/fd")) > fds:
                    assert time.monotonic() < deadline, f"{what}: the daemon leaked an fd"
                    time.sleep(0.05)

            # every way to copy the big file up runs out of space, and leaves nothing behind
            for what, call in (("open O_RDWR", lambda: os.close(os.open(view, os.O_RDWR))),
                               ("open O_APPEND", lambda: os.close(os.open(view, os.O_WRONLY | os.O_APPEND))),
                               ("chmod", lambda: os.chmod(view, 0o600)),
                               ("setxattr", lambda: os.setxattr(view, "user.x", b"1")),
                               ("truncate up", lambda: os.truncate(view, 13 * MiB))):
                with pytest.raises(OSError) as e:
                    call()
                assert e.value.errno == errno.ENOSPC, f"{what}: {e.value}"
                no_leftovers(what)
            assert os.stat(view).st_mode & 0o777 == 0o644 and os.stat(view).st_size == len(big)
            # truncating to 0 needs no data: that copy-up fits
            with open(os.path.join(mnt, "d", "small"), "r+b") as f:
                f.truncate(0)

            # fill the upper with a new file through the page cache, then with O_DIRECT
            written, where = fill(os.path.join(mnt, "filler"))
            assert where, f"{written} bytes went into an 8 MiB upper without ENOSPC"
            assert not pid_gone(pid)
            os.unlink(os.path.join(mnt, "filler"))
            wait_free(small, 6 * MiB // 4096)
            written_direct, where_direct = fill(os.path.join(mnt, "filler2"), direct=True)
            assert where_direct == "write" and written_direct < 8 * MiB, (written_direct, where_direct)
            assert os.path.getsize(os.path.join(upper, "filler2")) == written_direct
            # the daemon still answers while the upper is full; reads and lookups work
            assert read(os.path.join(mnt, "d", "medium")) == medium
            with pytest.raises(OSError) as e:
                os.close(os.open(os.path.join(mnt, "d", "medium"), os.O_RDWR))
            assert e.value.errno == errno.ENOSPC

            # free the space: copy-up and writes work again
            os.unlink(os.path.join(mnt, "filler2"))
            wait_free(small, 6 * MiB // 4096)
            assert os.listdir(os.path.join(work, "work")) == []
            with open(os.path.join(mnt, "d", "medium"), "ab") as f:
                f.write(b"appended")
                os.fsync(f.fileno())
            assert read(os.path.join(upper, "d", "medium")) == medium + b"appended"
            data = seeded("after", 3 * MiB)
            with open(os.path.join(mnt, "after"), "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
            assert read(os.path.join(upper, "after")) == data
            assert read(view) == big
            assert not pid_gone(pid)
        print(f"page-cache fill: {written} bytes accepted, ENOSPC at {where}; "
              f"O_DIRECT fill: {written_direct} bytes, ENOSPC at {where_direct}")


@pytest.mark.parametrize("passthrough", ["auto", "off"])
def test_a_file_that_just_does_not_fit_is_never_reported_written(tmp_path, passthrough):
    """Files a few KiB bigger or smaller than the free space, written in one write(2):
    either fsync and close succeed and the upper holds every byte write(2) said it wrote,
    or one of them says ENOSPC. With passthrough=off the write goes through the writeback
    cache (the daemon used to answer a short pwrite with its count, which the kernel's
    writeback took as done: fsync said OK and the tail was gone); with passthrough (where
    the machine has it) the kernel writes the upper file itself and, like the upper's
    own filesystem, may say a short count."""
    lower, mnt = str(tmp_path / "lower"), str(tmp_path / "mnt")
    os.makedirs(lower)
    os.makedirs(mnt)
    with small_tmpfs(str(tmp_path / "small")) as small:
        upper, work = os.path.join(small, "upper"), os.path.join(small, "work")
        os.makedirs(upper)
        os.makedirs(work)
        outcomes = []
        with unionfs_mount([lower], upper, mnt, workdir=work,
                           options=[f"passthrough={passthrough}"]):
            free_blocks = os.statvfs(small).f_bavail
            for extra in range(-8192, 16384, 2048):
                st = os.statvfs(small)
                size = st.f_bavail * st.f_frsize + extra
                data = seeded(f"fit{extra}", size)
                path = os.path.join(mnt, "f")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                error = None
                written = 0
                try:
                    written = os.write(fd, data)
                    assert 0 < written <= size
                    os.fsync(fd)
                except OSError as e:
                    error = e.errno
                finally:
                    try:
                        os.close(fd)
                    except OSError as e:
                        error = error or e.errno
                if error is None:
                    assert read(os.path.join(upper, "f")) == data[:written], \
                        f"{size} bytes ({extra:+d} over the free space): fsync and close said OK, " \
                        f"the upper holds {os.path.getsize(os.path.join(upper, 'f'))}"
                else:
                    assert error == errno.ENOSPC, os.strerror(error)
                outcomes.append("ENOSPC" if error is not None else "ok" if written == size
                                else "short")
                os.unlink(path)
                wait_free(small, free_blocks - 16)
        assert "ok" in outcomes and ("ENOSPC" in outcomes or "short" in outcomes), outcomes
