"""FUSE passthrough (passthrough=auto|on|off, docs/design.md): the kernel reads and writes
open upper files, and reads open lower files, itself. That the data path really left the daemon is seen in its --debug
log (every request a Python handler serves is a line there; WRITE would be `write(...)`),
against the same steps with passthrough=off. What the files then hold and what stat shows
is compared with kernel overlayfs doing the same steps, around copy-up with fds open.

Needs root (backing files need CAP_SYS_ADMIN) and Linux 6.9+; the fallback without them is
in test_rootless.py (the daemon log's `passthrough: off (...)` line) and below."""
from __future__ import annotations

import mmap
import os
import re
import stat
import subprocess
import time

import pytest

from conftest import make_layers
from helpers.mounting import daemon_pid, fuse_overlayfs, is_mounted, kernel_overlay, unionfs_cmd, unionfs_mount

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


def _copy_ups_under_readers(L, mapped: bool) -> tuple[list, list]:
    """Each way a file is copied up (open for writing, open with O_TRUNC, truncate(2),
    chmod(2), link(2), rename(2), setxattr), each on a lower file that a read-only fd
    (and, if *mapped*, a private mapping) opened before has read: what a new open of the
    name, fstat and stat show afterwards, and whether st_ino stayed; and apart from that,
    what the fd and the mapping read."""
    seen, readers = [], []
    steps = [  # (name, the copy-up, the name afterwards)
        ("dir/a.txt", lambda p: os.close(os.open(p, os.O_WRONLY)), "dir/a.txt"),
        ("shadow.txt", lambda p: os.close(os.open(p, os.O_WRONLY | os.O_TRUNC)), "shadow.txt"),
        ("big.bin", lambda p: os.truncate(p, 5000), "big.bin"),
        ("dir/b.txt", lambda p: os.chmod(p, 0o600), "dir/b.txt"),
        ("hl/p1", lambda p: os.link(p, L.m("hl/p3")), "hl/p3"),
        ("merged/t1.txt", lambda p: os.rename(p, L.m("merged/t1.moved")), "merged/t1.moved"),
        ("dir/top.txt", lambda p: os.setxattr(p, "user.x", b"1"), "dir/top.txt"),
    ]
    for rel, step, rel_after in steps:
        path, after = L.m(rel), L.m(rel_after)
        reader = os.open(path, os.O_RDONLY)
        first = os.pread(reader, 64, 0)
        ino = os.fstat(reader).st_ino
        mapping = mmap.mmap(reader, 0, mmap.MAP_PRIVATE, mmap.PROT_READ) if mapped else None
        step(path)
        with open(after, "rb") as f:
            late = f.read(64)
        st = os.stat(after)
        seen.append((rel, first, late, os.fstat(reader).st_size, st.st_size,
                     stat.S_IMODE(st.st_mode), st.st_ino == ino, os.fstat(reader).st_ino == ino))
        readers.append((first, os.pread(reader, 64, 0), mapping[:64] if mapping else None))
        if mapping:
            mapping.close()
        os.close(reader)
        # and the name opened for writing after all: the new file is what it writes
        with open(after, "ab") as f:
            f.write(b"+")
        with open(after, "rb") as f:
            seen.append((rel, f.read()[-1:]))
    return seen, readers


def test_copy_ups_under_lower_readers_with_passthrough_all(tmp_path) -> None:
    """passthrough=all: a file copied up while a read-only fd and a private mapping of the
    lower file are open. Those stay on the lower file (the kernel inode keeps its lower
    backing file), as fuse-overlayfs's fds and kernel overlayfs's mappings do (kernel
    overlayfs's fds move to the upper copy: the next test); the file gets a new kernel
    inode for what comes after, under the same st_ino. Everything else is compared with
    kernel overlayfs doing the same."""
    if _why_no_passthrough():
        pytest.skip(_why_no_passthrough())
    a, b = make_layers(str(tmp_path / "uf")), make_layers(str(tmp_path / "k"))
    for L in (a, b):
        _grow(L)
    with kernel_overlay(b.kernel_lowers, b.upper, b.work, b.mnt), \
            unionfs_mount(a.kernel_lowers, a.upper, a.mnt, workdir=a.work,
                          options=["passthrough=all"]):
        seen, readers = _copy_ups_under_readers(a, mapped=True)
        k_seen, k_readers = _copy_ups_under_readers(b, mapped=True)
    assert seen == k_seen
    assert [m for _, _, m in readers] == [m for _, _, m in k_readers]  # mappings: the lower file
    assert all(after == first for first, after, _ in readers)
    assert "and lower files read" in _log(a)


def _grow(L) -> None:
    """The files _copy_ups_under_readers copies up, made big enough to pass through
    (files.LOWER_PASSTHROUGH_MIN; smaller ones are read by the daemon)."""
    from unionfs.files import LOWER_PASSTHROUGH_MIN
    for rel in ("dir/a.txt", "shadow.txt", "big.bin", "dir/b.txt", "hl/p1", "merged/t1.txt",
                "dir/top.txt"):
        path = next(p for p in (os.path.join(d, rel) for d in L.kernel_lowers) if os.path.exists(p))
        with open(path, "ab") as f:
            f.write(b"\n" * max(0, LOWER_PASSTHROUGH_MIN - os.path.getsize(path)))


def test_readers_follow_a_copy_up_by_default_as_on_kernel_overlayfs(pair) -> None:
    """By default lower files of a writable mount are read by the daemon, and a read-only
    fd opened on one before a copy-up reads the upper copy afterwards, as on kernel
    overlayfs (whose private mappings are not compared: on FUSE's page cache one past a
    truncation faults)."""
    assert _copy_ups_under_readers(pair.uf, mapped=False) == \
        _copy_ups_under_readers(pair.k, mapped=False)
    assert "lower files read" not in _log(pair.uf)


def test_with_passthrough_all_a_reader_stays_on_the_lower_file_as_on_fuse_overlayfs(tmp_path) -> None:
    """The peer that keeps a read-only fd on the lower file after a copy-up, compared."""
    if _why_no_passthrough():
        pytest.skip(_why_no_passthrough())
    got = []
    for name, mount in (("uf", lambda L: unionfs_mount(L.kernel_lowers, L.upper, L.mnt, workdir=L.work,
                                                       options=["passthrough=all"])),
                        ("fo", lambda L: fuse_overlayfs(L.kernel_lowers, L.upper, L.work, L.mnt))):
        L = make_layers(str(tmp_path / name))
        with mount(L):
            reader = os.open(L.m("big.bin"), os.O_RDONLY)
            before = os.pread(reader, 8, 4096)
            with open(L.m("big.bin"), "r+b") as f:
                f.seek(4096)
                f.write(b"upper!!!")
            os.posix_fadvise(reader, 0, 0, os.POSIX_FADV_DONTNEED)
            got.append((before, os.pread(reader, 8, 4096)))
            os.close(reader)
            if name == "uf":  # (fuse-overlayfs's next open may read its stale page cache)
                with open(L.m("big.bin"), "rb") as f:
                    assert f.read(4104)[4096:] == b"upper!!!"
    assert got[0] == got[1] and got[0][0] == got[0][1]


@pytest.mark.parametrize("writable, mode, passes", [
    (True, "all", True),      # chosen
    (False, "auto", True),    # a read-only mount: nothing copies a lower file up
    (True, "auto", False),    # a writable one: the daemon reads lower files
])
def test_lower_reads_pass_through_and_leave_lower_atimes(layers, writable, mode, passes) -> None:
    """Where a read-only open of a lower file passes through, the daemon reads none of it
    (its read bytes, /proc/PID/io; where it does not, they are at least the file's size),
    and either way the reads leave the lower file's access time as it was: the daemon
    opens with O_NOATIME, and the kernel's backing file is on a noatime mount of the layer."""
    if _why_no_passthrough():
        pytest.skip(_why_no_passthrough())
    lower = os.path.join(layers.bottom, "big.bin")  # 3 MiB: past LOWER_PASSTHROUGH_MIN
    os.utime(lower, ns=(10**9, os.stat(lower).st_mtime_ns))  # relatime would update it
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work,
                       options=[f"passthrough={mode}"] + ([] if writable else ["ro"])):
        pid = daemon_pid(layers.mnt)
        before = _rchar(pid)
        with open(layers.m("big.bin"), "rb") as f:
            assert f.read() == layers.big
        with open(layers.m("big.bin"), "rb") as f, \
                mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            assert m[-10:] == layers.big[-10:]
        read_by_daemon = _rchar(pid) - before
    assert os.stat(lower).st_atime_ns == 10**9
    assert ("lower files read" in _log(layers)) == passes
    if passes:
        assert read_by_daemon < len(layers.big) // 4, read_by_daemon
    else:
        assert read_by_daemon >= len(layers.big), read_by_daemon
    assert not os.listdir(layers.upper)


def _rchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


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
        "unionfs: error: passthrough must be auto, on, all or off, not 'yes'"


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
