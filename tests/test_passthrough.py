"""FUSE passthrough (passthrough=auto|on|off, docs/design.md): the kernel reads and writes
open upper files itself. That the data path really left the daemon is seen in its --debug
log (every request a Python handler serves is a line there; WRITE would be `write(...)`),
against the same steps with passthrough=off. What the files then hold and what stat shows
is compared with kernel overlayfs doing the same steps, around copy-up with fds open.

Needs root (backing files need CAP_SYS_ADMIN) and Linux 6.9+; the fallback without them is
in test_rootless.py (the daemon log's `passthrough: off (...)` line) and below."""
from __future__ import annotations

import mmap
import os
import re
import subprocess
import time

import pytest

from helpers.mounting import is_mounted, unionfs_cmd, unionfs_mount

pytestmark = [pytest.mark.mount]


def _kernel_has_passthrough() -> bool:
    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", os.uname().release).groups())
    return (major, minor) >= (6, 9)


def _why_no_passthrough() -> str:
    from unionfs import binding
    if "passthrough" not in binding.load().fast_paths:
        return "the FUSE binding has no passthrough (a stock pyfuse3)"
    if os.geteuid() != 0:
        return "backing files need CAP_SYS_ADMIN (root)"
    return "" if _kernel_has_passthrough() else "FUSE passthrough is Linux 6.9+"


def _log(layers) -> str:
    with open(os.path.join(layers.work, "unionfs.log")) as f:
        return f.read()


def _write_steps(root: str) -> None:
    """Writes through fds of every kind: a copy-up at open, O_APPEND, a new file, pwrite
    past the end, ftruncate while open, mmap. The open that copies up is served by the
    daemon: the copy-up is not durable yet, and a sync the daemon never saw could not
    settle it (durable.py). Its fsync does; the next opens pass through."""
    fd = os.open(os.path.join(root, "dir/a.txt"), os.O_WRONLY)  # copies up
    os.pwrite(fd, b"B", 0)
    os.fsync(fd)
    os.close(fd)
    fd = os.open(os.path.join(root, "dir/a.txt"), os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"appended\n")
    os.close(fd)
    fd = os.open(os.path.join(root, "new.bin"), os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, b"x" * 10000, 0)
    os.pwrite(fd, b"end", 20000)
    os.ftruncate(fd, 15000)
    os.fsync(fd)
    os.close(fd)
    fd = os.open(os.path.join(root, "new.bin"), os.O_RDWR)
    with mmap.mmap(fd, 4096) as m:
        m[0:6] = b"mapped"
        m.flush()
    os.close(fd)


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_writes_bypass_the_daemon_only_with_passthrough(layers, mode) -> None:
    if mode == "auto" and _why_no_passthrough():
        pytest.skip(_why_no_passthrough())
    options = ["debug", f"passthrough={mode}"] + (["writeback=0"] if mode == "off" else [])
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work,
                       options=options):
        _write_steps(layers.mnt)
        seen = {name: os.stat(layers.m(name)) for name in ("dir/a.txt", "new.bin")}
        with open(layers.m("new.bin"), "rb") as f:
            data = f.read()
    log = _log(layers)
    writes = len(re.findall(r" DEBUG: write\(", log))
    if mode == "auto":
        assert "passthrough: on" in log
        assert writes == 1, "WRITE requests of passthrough opens reached the daemon"
    else:
        assert "passthrough: off (-o passthrough=off" in log
        assert writes >= 4
    assert data == b"mapped" + b"x" * 9994 + b"\0" * 5000
    with open(layers.u("dir/a.txt"), "rb") as f:
        assert f.read() == b"Bottom-a\nappended\n"
    for name, st in seen.items():
        upper = os.stat(layers.u(name))
        assert (st.st_size, st.st_mtime_ns) == (upper.st_size, upper.st_mtime_ns), name


def test_passthrough_writes_match_kernel_overlayfs(pair) -> None:
    """The same writes, and the same interleaving of fds around a copy-up, through unionfs
    (passthrough on where the machine allows it: the test suite's default) and through
    kernel overlayfs: the same bytes and sizes."""
    for L in (pair.uf, pair.k):
        _write_steps(L.mnt)
        big = L.m("big.bin")
        reader = os.open(big, os.O_RDONLY)            # before the copy-up: on the lower file
        first = os.pread(reader, 8, 4096)
        writer = os.open(big, os.O_RDWR)              # copies up
        os.pwrite(writer, b"upper!!!", 4096)
        late = os.open(big, os.O_RDONLY)              # after it: on the upper copy
        L.late_read = os.pread(late, 8, 4096)
        appender = os.open(big, os.O_WRONLY | os.O_APPEND)
        os.write(appender, b"tail")
        os.write(writer, b"w")                         # writer's offset: 0, then 1
        L.sizes = (os.fstat(reader).st_size, os.fstat(writer).st_size, os.stat(big).st_size)
        for fd in (reader, writer, late, appender):
            os.close(fd)
        L.first = first
    for name in ("dir/a.txt", "new.bin", "big.bin"):
        with open(pair.uf.m(name), "rb") as a, open(pair.k.m(name), "rb") as b:
            assert a.read() == b.read(), name
        assert os.stat(pair.uf.m(name)).st_size == os.stat(pair.k.m(name)).st_size, name
    assert (pair.uf.first, pair.uf.late_read, pair.uf.sizes) == \
        (pair.k.first, pair.k.late_read, pair.k.sizes)
    assert pair.uf.late_read == b"upper!!!"


def _mount_fails(layers, *options: str) -> str:
    proc = subprocess.run(unionfs_cmd("mount", "-o", ",".join(options), ":".join(layers.lowers),
                                      layers.upper, layers.mnt),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert not is_mounted(layers.mnt)
    assert os.listdir(layers.upper) == []
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_passthrough_takes_auto_on_or_off(layers) -> None:
    assert _mount_fails(layers, "passthrough=yes") == \
        "unionfs: error: passthrough must be auto, on or off, not 'yes'"


def test_passthrough_on_and_writeback_exclude_each_other(layers) -> None:
    assert "exclude each other" in _mount_fails(layers, "passthrough=on", "writeback=1")


def test_writeback_given_means_no_passthrough(layers) -> None:
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work,
                       options=["writeback=1"]):
        with open(layers.m("dir/a.txt"), "a") as f:
            f.write("x")
    assert "passthrough: off (-o passthrough=off, or writeback=1)" in _log(layers)


def test_a_copied_up_file_passes_through_once_its_copy_up_is_durable(layers) -> None:
    """No fsync: the deferred syncer settles the copy-up by itself (one more syncfs after a
    batch when no copy-up follows), and from then on opens of the file pass through. Each
    round appends one byte and looks at the daemon's log for a WRITE; until the syncer
    has settled the batch (a background thread: polled, with a deadline) they are served
    by the daemon."""
    if _why_no_passthrough():
        pytest.skip(_why_no_passthrough())
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work,
                       options=["debug"]):
        path = layers.m("dir/a.txt")
        deadline = time.monotonic() + 60
        rounds = 0
        while True:
            before = len(re.findall(r" DEBUG: write\(", _log(layers)))
            with open(path, "ab", buffering=0) as f:
                f.write(b"+")
            rounds += 1
            if len(re.findall(r" DEBUG: write\(", _log(layers))) == before:
                break
            assert time.monotonic() < deadline, "the copy-up never settled"
            time.sleep(0.02)
        with open(path, "rb") as f:
            assert f.read() == b"bottom-a\n" + b"+" * rounds
    assert rounds >= 2  # the copy-up's own open was the daemon's
