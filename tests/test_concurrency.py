"""Concurrency through the mount: many processes at once on the same objects.

Every test runs its workers as forked processes that start together (a
barrier) and must all finish within a deadline: a deadlock fails the test
(with what each worker was doing), it is never waited out; nothing here
measures time. At the end the daemon must still be alive and the upper and
WORKDIR/work must hold exactly what they should.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import stat
import struct
import traceback
from typing import Callable

import pytest

from helpers import libc
from helpers.mounting import daemon_pid, pid_gone, unionfs_mount, wait_daemon_gone
from helpers.unit_helpers import seeded

pytestmark = [pytest.mark.mount]

DEADLINE = 180.0   # seconds for one batch of workers; only a hang gets near it
CTX = multiprocessing.get_context("fork")


def run_workers(workers: list[Callable[[], None]], errdir: str) -> None:
    """Run each callable in its own process, all released at once; fail on any error or hang."""
    barrier = CTX.Barrier(len(workers))

    def main(i: int, fn: Callable[[], None]) -> None:
        try:
            barrier.wait(timeout=60)
            fn()
        except BaseException:
            with open(os.path.join(errdir, f"err{i}"), "w") as f:
                f.write(traceback.format_exc())
            os._exit(1)
        os._exit(0)

    procs = [CTX.Process(target=main, args=(i, fn)) for i, fn in enumerate(workers)]
    for p in procs:
        p.start()
    hung = []
    for p in procs:
        p.join(DEADLINE if not hung else 1)
        if p.exitcode is None:
            hung.append(p.pid)
    for pid in hung:
        os.kill(pid, signal.SIGKILL)
    errors = []
    for i in range(len(workers)):
        path = os.path.join(errdir, f"err{i}")
        if os.path.exists(path):
            with open(path) as f:
                errors.append(f"worker {i}:\n{f.read()}")
            os.unlink(path)
    assert not hung, f"workers {hung} hung (deadlock?); stacks: " + "; ".join(
        open(f"/proc/{pid}/stack").read() if os.path.exists(f"/proc/{pid}/stack") else "?" for pid in hung)
    assert not errors, "\n".join(errors)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


@pytest.fixture
def env(tmp_path):
    lower, upper, work, mnt = (str(tmp_path / n) for n in ("lower", "upper", "work", "mnt"))
    for d in (upper, work, mnt):
        os.makedirs(d)
    os.makedirs(str(tmp_path / "errs"))

    class Env:
        pass
    e = Env()
    e.lower, e.upper, e.work, e.mnt, e.errs = lower, upper, work, mnt, str(tmp_path / "errs")
    e.m = lambda rel: os.path.join(mnt, rel)
    e.mount = lambda: unionfs_mount([lower], upper, mnt, workdir=work)
    return e


def lower_file(root: str, rel: str, data: bytes) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_many_processes_copy_up_one_file(env):
    """16 processes copy up the same 8 MiB lower file at once, by open for writing, chmod,
    setxattr and utimes; the writers each put a marker at their own offset."""
    data = seeded("big", 8 << 20)
    lower_file(env.lower, "d/big", data)
    mode = stat.S_IMODE(os.stat(os.path.join(env.lower, "d/big")).st_mode)
    n = 16

    def worker(i: int) -> Callable[[], None]:
        def run() -> None:
            path = env.m("d/big")
            kind = i % 4
            if kind == 0:
                fd = os.open(path, os.O_RDWR)
                try:
                    os.pwrite(fd, b"<writer %02d>" % i, i * 100_003)
                finally:
                    os.close(fd)
            elif kind == 1:
                os.chmod(path, mode)
            elif kind == 2:
                os.setxattr(path, f"user.p{i}", b"%d" % i)
            else:
                st = os.stat(path)
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            assert len(read(path)) == len(data)
        return run

    with env.mount():
        pid = daemon_pid(env.mnt)
        run_workers([worker(i) for i in range(n)], env.errs)
        want = bytearray(data)
        for i in range(0, n, 4):
            marker = b"<writer %02d>" % i
            want[i * 100_003:i * 100_003 + len(marker)] = marker
        # every process sees the same final content; so does the upper, in one file
        contents = CTX.Queue()
        readers = [CTX.Process(target=lambda: contents.put(hashlib.sha256(read(env.m("d/big"))).hexdigest()))
                   for _ in range(4)]
        for p in readers:
            p.start()
        got = {contents.get(timeout=DEADLINE) for _ in readers}
        for p in readers:
            p.join(DEADLINE)
        assert got == {hashlib.sha256(want).hexdigest()}
        assert read(os.path.join(env.upper, "d/big")) == want
        assert os.listdir(os.path.join(env.upper, "d")) == ["big"]
        assert os.stat(os.path.join(env.upper, "d/big")).st_nlink == 1
        assert os.listdir(os.path.join(env.work, "work")) == []
        for i in range(2, n, 4):
            assert os.getxattr(env.m("d/big"), f"user.p{i}") == b"%d" % i
        assert not pid_gone(pid)
    assert read(os.path.join(env.lower, "d/big")) == data


def test_hard_linked_names_copied_up_at_once(env):
    """Nine processes write through the three names of one hard-linked lower file at once:
    one copy-up, one upper inode with all three names, every write in it."""
    lower_file(env.lower, "h/a", seeded("linked", 4 << 20))
    for name in ("b", "c"):
        os.link(os.path.join(env.lower, "h/a"), os.path.join(env.lower, "h", name))

    def worker(i: int) -> Callable[[], None]:
        def run() -> None:
            fd = os.open(env.m("h/" + "abc"[i % 3]), os.O_RDWR)
            try:
                os.pwrite(fd, b"<%d>" % i, i * 1000)
            finally:
                os.close(fd)
        return run

    with env.mount():
        pid = daemon_pid(env.mnt)
        run_workers([worker(i) for i in range(9)], env.errs)
        sts = [os.stat(os.path.join(env.upper, "h", n)) for n in "abc"]
        assert len({st.st_ino for st in sts}) == 1 and sts[0].st_nlink == 3
        assert len({os.stat(env.m("h/" + n)).st_ino for n in "abc"}) == 1
        data = read(env.m("h/a"))
        assert all(b"<%d>" % i in data for i in range(9))
        assert os.listdir(os.path.join(env.work, "work")) == []
        assert not pid_gone(pid)


def test_rename_against_lookup_and_stat(env):
    """One process renames a lower file between two names (across directories) and a
    lower directory between two names; others stat, open and read by both names all the
    while. Every lookup either finds the object with its inode number and content, or
    ENOENT; nothing else."""
    fdata = seeded("moving file", 50_000)
    lower_file(env.lower, "a/f", fdata)
    lower_file(env.lower, "b/keep", b"keep")
    lower_file(env.lower, "dir1/inner", b"inner")
    rounds = 300

    with env.mount():
        pid = daemon_pid(env.mnt)
        ino_f = os.stat(env.m("a/f")).st_ino
        ino_d = os.stat(env.m("dir1")).st_ino

        def renamer() -> None:
            for i in range(rounds):
                src, dst = ("a/f", "b/g") if i % 2 == 0 else ("b/g", "a/f")
                os.rename(env.m(src), env.m(dst))
                dsrc, ddst = ("dir1", "dir2") if i % 2 == 0 else ("dir2", "dir1")
                os.rename(env.m(dsrc), env.m(ddst))

        def watcher(k: int) -> Callable[[], None]:
            def run() -> None:
                found = 0
                for i in range(rounds * 3):
                    for rel, ino, content in (("a/f", ino_f, fdata), ("b/g", ino_f, fdata),
                                              ("dir1/inner", None, b"inner"), ("dir2/inner", None, b"inner")):
                        try:
                            st = os.stat(env.m(rel))
                            if ino is not None:
                                assert st.st_ino == ino, f"{rel}: st_ino {st.st_ino} != {ino}"
                            if (i + k) % 5 == 0:
                                assert read(env.m(rel)) == content, f"{rel}: wrong content"
                            found += 1
                        except FileNotFoundError:
                            pass
                    for rel in ("dir1", "dir2"):
                        try:
                            assert os.stat(env.m(rel)).st_ino == ino_d
                        except FileNotFoundError:
                            pass
                assert found > 0
            return run

        run_workers([renamer] + [watcher(k) for k in range(4)], env.errs)
        assert read(env.m("a/f")) == fdata and not os.path.exists(env.m("b/g"))
        assert read(env.m("dir1/inner")) == b"inner" and not os.path.exists(env.m("dir2"))
        assert sorted(os.listdir(env.m("b"))) == ["keep"]
        assert os.listdir(os.path.join(env.work, "work")) == []
        assert not pid_gone(pid)


def test_readdir_while_creating_and_deleting(env):
    """Listing a merged directory while others create and delete names in it: stable
    names (lower ones, and upper ones made before) are always listed, none twice."""
    for i in range(160):
        lower_file(env.lower, f"d/lower{i:03d}", b"l")
    lower_file(env.lower, "d/gone", b"removed through the mount before the test")
    rounds = 200
    with env.mount():
        pid = daemon_pid(env.mnt)
        os.unlink(env.m("d/gone"))
        for i in range(50):
            with open(env.m(f"d/upper{i:02d}"), "w") as f:
                f.write("u")
        stable = {f"lower{i:03d}" for i in range(100)} | {f"upper{i:02d}" for i in range(50)}

        def churner(k: int) -> Callable[[], None]:
            def run() -> None:
                for i in range(rounds):
                    name = env.m(f"d/tmp{k}.{i % 7}")
                    with open(name, "w") as f:
                        f.write("t")
                    if i % 3 == 0:
                        os.rename(name, env.m(f"d/moved{k}"))
                    else:
                        os.unlink(name)
                    if i % 10 == 0:
                        os.unlink(env.m(f"d/lower{100 + k * 20 + i // 10:03d}"))   # never a stable one
            return run

        def lister() -> None:
            for _ in range(rounds // 2):
                names = os.listdir(env.m("d"))
                dups = {n for n in names if names.count(n) > 1}
                assert not dups, f"listed twice: {dups}"
                missing = stable - set(names)
                assert not missing, f"stable names missing: {sorted(missing)[:10]}"
                assert "gone" not in names
                with os.scandir(env.m("d")) as it:
                    for de in it:
                        de.name  # noqa: B018  (scandir's own batches, via readdirplus)

        # (the churners remove the lower names 100..159 as they go: those are not stable)
        run_workers([churner(k) for k in range(3)] + [lister, lister], env.errs)
        names = os.listdir(env.m("d"))
        assert len(names) == len(set(names))
        assert stable <= set(names)
        assert os.listdir(os.path.join(env.work, "work")) == []
        assert not pid_gone(pid)


def getdents(fd: int, size: int = 1024) -> list[bytes]:
    """One getdents64(2) call with a small buffer: the names it returned."""
    n, buf = libc.getdents(fd, size)
    names, pos = [], 0
    while pos < n:
        _ino, _off, reclen, _type = struct.unpack_from("QqHB", buf.raw, pos)
        names.append(buf.raw[pos + 19:pos + reclen].split(b"\0", 1)[0])
        pos += reclen
    return names


def test_two_readers_of_one_directory_interleaved(env):
    """Reader A lists part of a directory, a name is added, reader B lists it all, then A
    goes on: A must not continue in B's newer listing (it used to, through the one listing
    kept per directory inode, and listed a name twice)."""
    stable = {b"lower_file_with_a_longish_name_%03d" % i for i in range(300)}
    for name in stable:
        lower_file(env.lower, "d/" + name.decode(), b"")
    with env.mount():
        a = os.open(env.m("d"), os.O_RDONLY | os.O_DIRECTORY)
        try:
            first = getdents(a)
            assert 0 < len(first) < 300
            with open(env.m("d/inserted"), "w"):
                pass
            b = os.open(env.m("d"), os.O_RDONLY | os.O_DIRECTORY)
            try:
                listed_b = []
                while batch := getdents(b):
                    listed_b += batch
            finally:
                os.close(b)
            listed_a = list(first)
            while batch := getdents(a):
                listed_a += batch
        finally:
            os.close(a)
        for who, names in (("A", listed_a), ("B", listed_b)):
            assert len(names) == len(set(names)), f"{who} listed twice: " \
                f"{sorted({n for n in names if names.count(n) > 1})}"
            assert stable <= set(names), f"{who} missed names"
        assert b"inserted" in listed_b


def test_first_of_many_part_way_readers_goes_on(env):
    """Twenty readers each list part of a directory, a name being added after each (so each
    starts a listing of its own in the daemon rather than in the kernel's readdir cache);
    then the first goes on from its offset. The daemon keeps only so many listings per
    directory, and a reader whose listing was dropped used to go on by index in a newer one:
    it listed names twice. Every reader must list no name twice and miss none that stayed."""
    stable = {b"lower_file_with_a_longish_name_%03d" % i for i in range(300)}
    for name in stable:
        lower_file(env.lower, "d/" + name.decode(), b"")
    with env.mount():
        fds, listed = [], []
        try:
            for i in range(20):
                fds.append(os.open(env.m("d"), os.O_RDONLY | os.O_DIRECTORY))
                listed.append(getdents(fds[-1]))
                assert 0 < len(listed[-1]) < 300
                with open(env.m(f"d/inserted{i:02d}"), "w"):
                    pass
            for fd, names in zip(fds, listed):
                while batch := getdents(fd):
                    names += batch
        finally:
            for fd in fds:
                os.close(fd)
        for i, names in enumerate(listed):
            assert len(names) == len(set(names)), f"reader {i} listed twice: " \
                f"{sorted({n for n in names if names.count(n) > 1})[:5]}"
            assert stable <= set(names), f"reader {i} missed {sorted(stable - set(names))[:5]}"


def test_writes_through_two_fds(env):
    """Two processes write interleaved blocks of one lower file through their own fds, and
    two others append records to another through O_APPEND fds: no block is lost or torn."""
    block, nblocks = 4096, 256
    lower_file(env.lower, "d/blocks", seeded("orig", block * nblocks))
    lower_file(env.lower, "d/log", b"")
    rec, nrec = 512, 300

    def blocks(parity: int) -> Callable[[], None]:
        def run() -> None:
            fd = os.open(env.m("d/blocks"), os.O_RDWR)
            try:
                order = [b for b in range(nblocks) if b % 2 == parity]
                for rnd in range(3):
                    for b in (order if rnd % 2 == 0 else reversed(order)):
                        os.pwrite(fd, seeded(f"b{b}.{rnd}", block), b * block)
                    os.fsync(fd)
            finally:
                os.close(fd)
        return run

    def appender(k: int) -> Callable[[], None]:
        def run() -> None:
            fd = os.open(env.m("d/log"), os.O_WRONLY | os.O_APPEND)
            try:
                for i in range(nrec):
                    r = (b"[%d:%05d]" % (k, i)).ljust(rec - 1, b"." if k else b"-") + b"\n"
                    assert os.write(fd, r) == rec
            finally:
                os.close(fd)
        return run

    with env.mount():
        pid = daemon_pid(env.mnt)
        run_workers([blocks(0), blocks(1), appender(0), appender(1)], env.errs)
        want = b"".join(seeded(f"b{b}.2", block) for b in range(nblocks))
        assert read(env.m("d/blocks")) == want
        log = read(env.m("d/log"))
        assert len(log) == 2 * nrec * rec
        recs = [log[i:i + rec] for i in range(0, len(log), rec)]
        for k in (0, 1):
            mine = [r for r in recs if r.startswith(b"[%d:" % k)]
            assert mine == [(b"[%d:%05d]" % (k, i)).ljust(rec - 1, b"." if k else b"-") + b"\n"
                            for i in range(nrec)], f"appender {k}: records torn, lost or reordered"
        assert not pid_gone(pid)
    wait_daemon_gone(pid)
    with env.mount():
        assert read(env.m("d/blocks")) == want
        assert read(os.path.join(env.upper, "d/log")) == log
