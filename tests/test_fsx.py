"""An fsx-style data checker: random I/O through the mount against an in-memory model.

Per seed, five files: three start in a lower layer (so they are first read
through read-only fds and mappings of the lower file, and the first write open
copies them up in the middle of the sequence, under those open fds), two are
made new through the mount. Each file has up to two fds at a time. The
operations: pread, pwrite (also past the end: a hole), O_APPEND write, ftruncate
(shrink and extend), fallocate (preallocate, also past the end with and without
KEEP_SIZE, punch a hole, zero a range), reading and writing through a shared
mmap, fsync, fdatasync, close and reopen. After every operation the file's size (fstat) and
whole content (pread through one of its fds) must equal the model. At the end:
the upper file read directly equals the model, the lower files are unchanged,
and after unmount and mount again every file reads as the model.

UNIONFS_FSX_SEEDS (comma-separated) and UNIONFS_FSX_OPS set a long run, e.g.
UNIONFS_FSX_SEEDS=$(seq -s, 1 50) UNIONFS_FSX_OPS=20000 pytest -s tests/test_fsx.py
"""
from __future__ import annotations

import mmap
import os
import random

import pytest

from helpers.libc import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallocate
from helpers.mounting import daemon_pid, unionfs_mount, wait_daemon_gone
from helpers.unit_helpers import seeded
from unionfs import binding

pytestmark = [pytest.mark.mount, pytest.mark.slow]

SEEDS = [int(s) for s in os.environ.get("UNIONFS_FSX_SEEDS", "1,2,3,4").split(",")]
OPS = int(os.environ.get("UNIONFS_FSX_OPS", "3000"))
MAX_SIZE = 300 * 1024
#: fallocate(2) reaches the daemon only through a binding with the handler
FALLOCATE = "fallocate" in binding.load().fast_paths
LOWER_NAMES = ["lower0", "lower1", "lower2"]
NEW_NAMES = ["new0", "new1"]


class FsxFile:
    """One file under test: its model and its open fds (fd -> writable)."""

    def __init__(self, path: str, model: bytearray) -> None:
        self.path = path
        self.model = model
        self.fds: dict[int, bool] = {}
        self.written = False   # a writable fd was opened (a lower file is copied up then)

    def close_all(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


class Fsx:
    def __init__(self, rng: random.Random, files: dict[str, FsxFile]) -> None:
        self.rng = rng
        self.files = files
        self.counts: dict[str, int] = {}
        self.log: list[str] = []

    def fd(self, f: FsxFile, writable: bool) -> int:
        """An open fd of *f*: a writable one opens O_RDWR (copying a lower file up)."""
        mine = [fd for fd, w in f.fds.items() if w or not writable]
        if mine and (len(f.fds) >= 2 or self.rng.random() < 0.8):
            return self.rng.choice(mine)
        if len(f.fds) >= 2:   # make room: close one
            old = self.rng.choice(list(f.fds))
            os.close(old)
            del f.fds[old]
        if writable and not f.written and f.fds:
            self.counts["copy-up under open fds"] = self.counts.get("copy-up under open fds", 0) + 1
        f.written = f.written or writable
        fd = os.open(f.path, os.O_RDWR if writable else os.O_RDONLY)
        f.fds[fd] = writable
        return fd

    def step(self, n: int) -> None:
        rng = self.rng
        name = rng.choice(list(self.files))
        f = self.files[name]
        size = len(f.model)
        op = rng.choices(["read", "write", "append", "truncate", "mapread", "mapwrite",
                          "fsync", "fdatasync", "reopen", "fallocate"],
                         weights=[20, 25, 5, 8, 10, 10, 4, 3, 5, 8 if FALLOCATE else 0])[0]
        if op in ("mapread", "mapwrite") and size == 0:
            op = "write"
        self.counts[op] = self.counts.get(op, 0) + 1
        if op == "read":
            fd = self.fd(f, False)
            off = rng.randrange(0, size + 4096)
            ln = rng.randrange(0, 65536)
            got = os.pread(fd, ln, off)
            self.log.append(f"{n} {name} read {off}+{ln}")
            assert got == bytes(f.model[off:off + ln]), self.fail(f, f"read {off}+{ln}")
        elif op == "write":
            fd = self.fd(f, True)
            off = rng.randrange(0, min(MAX_SIZE, size + 65536))
            ln = rng.randrange(1, 65536)
            ln = min(ln, MAX_SIZE - off) or 1
            data = seeded(f"w{n}", ln)
            self.log.append(f"{n} {name} write {off}+{ln}")
            assert os.pwrite(fd, data, off) == ln
            if off > size:
                f.model += bytes(off - size)
            f.model[off:off + ln] = data
        elif op == "append":
            ln = rng.randrange(1, 20000)
            data = seeded(f"a{n}", ln)
            self.log.append(f"{n} {name} append {ln}")
            fd = os.open(f.path, os.O_WRONLY | os.O_APPEND)
            try:
                assert os.write(fd, data) == ln
            finally:
                os.close(fd)
            f.model += data
        elif op == "truncate":
            fd = self.fd(f, True)
            new = rng.choice([0, rng.randrange(0, size + 1), rng.randrange(0, MAX_SIZE)])
            self.log.append(f"{n} {name} truncate {new}")
            os.ftruncate(fd, new)
            if new < size:
                del f.model[new:]
            else:
                f.model += bytes(new - size)
        elif op == "fallocate":
            fd = self.fd(f, True)
            mode = rng.choice([0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                               FALLOC_FL_ZERO_RANGE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE])
            off = rng.randrange(0, min(MAX_SIZE - 1, size + 65536))
            ln = min(rng.randrange(1, 65536), MAX_SIZE - off)
            self.log.append(f"{n} {name} fallocate mode={mode:#x} {off}+{ln}")
            fallocate(fd, mode, off, ln)
            end = off + ln if not mode & FALLOC_FL_KEEP_SIZE else min(off + ln, size)
            if end > size:
                f.model += bytes(end - size)
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                f.model[off:end] = bytes(max(0, end - off))
        elif op in ("mapread", "mapwrite"):
            writing = op == "mapwrite"
            fd = self.fd(f, writing)
            off = rng.randrange(0, size)
            ln = rng.randrange(1, min(size - off, 65536) + 1)
            self.log.append(f"{n} {name} {op} {off}+{ln}")
            m = mmap.mmap(fd, size, mmap.MAP_SHARED,
                          mmap.PROT_READ | (mmap.PROT_WRITE if writing else 0))
            try:
                if writing:
                    data = seeded(f"m{n}", ln)
                    m[off:off + ln] = data
                    f.model[off:off + ln] = data
                    if rng.random() < 0.3:
                        m.flush()
                else:
                    assert m[off:off + ln] == bytes(f.model[off:off + ln]), self.fail(f, f"mapread {off}+{ln}")
            finally:
                m.close()
        elif op in ("fsync", "fdatasync"):
            fd = self.fd(f, rng.random() < 0.5)
            self.log.append(f"{n} {name} {op}")
            (os.fsync if op == "fsync" else os.fdatasync)(fd)
        else:
            self.log.append(f"{n} {name} reopen")
            f.close_all()
        self.check(f)

    def check(self, f: FsxFile) -> None:
        fd = self.fd(f, False) if f.fds else os.open(f.path, os.O_RDONLY)
        try:
            assert os.fstat(fd).st_size == len(f.model), self.fail(f, "size")
            assert os.pread(fd, MAX_SIZE + 65536 * 2, 0) == bytes(f.model), self.fail(f, "content")
        finally:
            if fd not in f.fds:
                os.close(fd)

    def fail(self, f: FsxFile, what: str) -> str:
        return f"{f.path}: {what} differs from the model; last ops:\n" + "\n".join(self.log[-15:])


def read_file(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


@pytest.mark.parametrize("seed", SEEDS)
def test_fsx(tmp_path, seed):
    rng = random.Random(seed)
    lower, upper, work, mnt = (str(tmp_path / n) for n in ("lower", "upper", "work", "mnt"))
    for d in (upper, work, mnt, os.path.join(lower, "d")):
        os.makedirs(d)
    originals = {}
    for name in LOWER_NAMES:
        data = seeded(f"{seed}:{name}", rng.randrange(0, MAX_SIZE))
        with open(os.path.join(lower, "d", name), "wb") as fh:
            fh.write(data)
        originals[name] = data
    with unionfs_mount([lower], upper, mnt, workdir=work):
        pid = daemon_pid(mnt)
        files = {name: FsxFile(os.path.join(mnt, "d", name), bytearray(originals[name]))
                 for name in LOWER_NAMES}
        for f in files.values():   # a read-only fd on the lower file: copy-up happens under it
            f.fds[os.open(f.path, os.O_RDONLY)] = False
        for name in NEW_NAMES:
            os.close(os.open(os.path.join(mnt, "d", name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644))
            files[name] = FsxFile(os.path.join(mnt, "d", name), bytearray())
            files[name].written = True
        fsx = Fsx(rng, files)
        try:
            for n in range(OPS):
                fsx.step(n)
        finally:
            for f in files.values():
                f.close_all()
        os.sync()
        for name, f in files.items():
            up = os.path.join(upper, "d", name)
            if os.path.exists(up):
                assert read_file(up) == bytes(f.model), f"upper {name} differs from the model"
            else:
                assert name in LOWER_NAMES and bytes(f.model) == originals[name], \
                    f"{name} changed but is not in the upper"
    wait_daemon_gone(pid)
    for name in LOWER_NAMES:
        assert read_file(os.path.join(lower, "d", name)) == originals[name], f"lower {name} changed"
    with unionfs_mount([lower], upper, mnt, workdir=work):
        for name, f in files.items():
            assert read_file(f.path) == bytes(f.model), f"{name} after remount differs from the model"
    print(f"fsx seed {seed}: {OPS} ops ({', '.join(f'{k} {v}' for k, v in sorted(fsx.counts.items()))})")
