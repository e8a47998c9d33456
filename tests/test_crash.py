"""Crash safety: SIGKILL the daemon again and again during a write storm.

A lower layer holds four 64 MiB files and many small ones, all made from a
seeded pattern so every byte can be checked. Each round mounts, starts a
writer process (copy-ups by appending to lower files, renames, deletes,
creates, fsyncs; it journals every fsync that returned in a file outside the
mount), SIGKILLs the daemon after a seeded random delay, cleans the dead mount
with `unionfs umount`, and checks:

* the lower layer is byte-identical to what it was;
* no half-copied file in the upper: every regular file there that comes from
  a lower file (same path, or renamed by the writer to PATH.mvN) holds the
  whole original followed by a part of what the writer appended (pages the
  kernel never flushed may read as zeros), never a truncated prefix;
* nothing of WORKDIR/work is seen in the upper or in the view;
* the next mount succeeds and empties WORKDIR/work;
* every file whose fsync returned has its journalled content after remount.

UNIONFS_CRASH_SEED picks another seed, UNIONFS_CRASH_ROUNDS the number of kills,
UNIONFS_CRASH_VERBOSE=1 (with -s) tells what each kill interrupted.
"""
from __future__ import annotations

import errno
import hashlib
import json
import linecache
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from helpers.snapshot import snapshot
from helpers.mounting import daemon_pid, force_unmount, is_mounted, pid_gone, unionfs_cmd

pytestmark = [pytest.mark.mount, pytest.mark.slow, pytest.mark.crash]

BIG_SIZE = 64 * 1024 * 1024
BIG_NAMES = [f"big/b{i}" for i in range(4)]
SMALL_NAMES = [f"small/d{i // 100}/s{i:03d}" for i in range(400)]
PAGE = 4096
MV = re.compile(r"(\.mv\d+)+$")


def pattern(tag: str, size: int, start: int = 0) -> bytes:
    """Bytes [start, start+size) of an endless stream seeded by *tag* (4 KiB per sha256 block)."""
    first, last = start // PAGE, (start + size + PAGE - 1) // PAGE
    out = bytearray()
    for block in range(first, last):
        out += hashlib.sha256(f"{tag}:{block}".encode()).digest() * (PAGE // 32)
    off = start - first * PAGE
    return bytes(out[off:off + size])


def small_size(rel: str) -> int:
    return 1 + int(hashlib.sha256(rel.encode()).hexdigest()[:4], 16) % 20000


def lower_size(rel: str) -> int:
    return BIG_SIZE if rel.startswith("big/") else small_size(rel)


# --------------------------------------------------------------------------
# the writer (runs as `python test_crash.py writer MNT JOURNAL SEED`)
# --------------------------------------------------------------------------

def writer(mnt: str, journal_path: str, seed: int) -> None:
    rng = random.Random(seed)
    journal = open(journal_path, "a")
    frozen: set[str] = set()   # fsync'd files: never touched again, so their content stays known
    names = {}                 # origin -> current name in the view (None once deleted)
    for rel in BIG_NAMES + SMALL_NAMES:
        # a round that reuses the last round's upper starts from that round's changes:
        # what it renamed or removed is not there under its lower name any more
        names[rel] = rel if os.path.lexists(os.path.join(mnt, rel)) else None
    new_count = 0
    mv_count = 0

    def record(rel: str, offset: int, data: bytes) -> None:
        entry = {"path": rel, "size": offset + len(data), "offset": offset,
                 "sha": hashlib.sha256(data).hexdigest()}
        journal.write(json.dumps(entry) + "\n")
        journal.flush()
        os.fsync(journal.fileno())

    def append(origin: str, fsync: bool) -> None:
        cur = names[origin]
        fd = os.open(os.path.join(mnt, cur), os.O_WRONLY | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            start = size - lower_size(origin)
            chunk = pattern("app:" + origin, rng.choice([100, 5000, 70000, 300000]), start)
            os.write(fd, chunk)
            if fsync:
                os.fsync(fd)
                frozen.add(cur)
                record(cur, size, chunk)
        finally:
            os.close(fd)

    def step() -> None:
        nonlocal new_count, mv_count
        op = rng.random()
        live = [o for o, n in names.items() if n is not None and n not in frozen]
        origin = rng.choice(live) if live else None
        if op < 0.35 and origin:
            append(origin, fsync=rng.random() < 0.3)
        elif op < 0.5 and origin:
            mv_count += 1
            new = f"{names[origin]}.mv{mv_count}"
            os.rename(os.path.join(mnt, names[origin]), os.path.join(mnt, new))
            names[origin] = new
        elif op < 0.6 and origin and not origin.startswith("big/"):
            os.unlink(os.path.join(mnt, names[origin]))
            names[origin] = None
        else:
            new_count += 1
            rel = f"new/w{seed}.{new_count}"
            data = pattern("new:" + rel, rng.choice([10, 4096, 50000, 1 << 20]))
            fd = os.open(os.path.join(mnt, rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
                if rng.random() < 0.5:
                    os.fsync(fd)
                    record(rel, 0, data)
            finally:
                os.close(fd)

    print("go", flush=True)
    # copy-ups of the big files early, between other changes, so kills hit them mid-copy
    for origin in rng.sample(BIG_NAMES, len(BIG_NAMES)):
        if names[origin] is not None and names[origin] not in frozen:
            append(origin, fsync=rng.random() < 0.3)
        for _ in range(rng.randrange(1, 8)):
            step()
    while True:
        step()


def writer_main(mnt: str, journal_path: str, seed: int) -> None:
    """Run the writer until the mount fails under it; say which call failed, and how."""
    try:
        writer(mnt, journal_path, seed)
    except OSError as e:
        tb = e.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        call = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).strip()
        print(f"STOPPED {errno.errorcode.get(e.errno, e.errno)} in: {call}", file=sys.stderr)
        sys.exit(3)


# --------------------------------------------------------------------------
# building and checking
# --------------------------------------------------------------------------

def build_lower(lower: str) -> dict[str, str]:
    hashes = {}
    for rel in BIG_NAMES + SMALL_NAMES:
        path = os.path.join(lower, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = pattern("lower:" + rel, lower_size(rel))
        with open(path, "wb") as f:
            f.write(data)
        hashes[rel] = hashlib.sha256(data).hexdigest()
    os.makedirs(os.path.join(lower, "new"), exist_ok=True)
    return hashes


def tree_digest(root: str) -> dict[str, tuple]:
    def describe(path: str, st: os.stat_result) -> tuple:
        entry: tuple = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns)
        return entry + (file_sha(path),) if stat.S_ISREG(st.st_mode) else entry
    return snapshot(root, describe)


def file_sha(path: str, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = limit
        while left is None or left > 0:
            b = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not b:
                break
            h.update(b)
            if left is not None:
                left -= len(b)
    return h.hexdigest()


def suffix_ok(data: bytes, tag: str, start: int) -> bool:
    """data == pattern(tag)[start:...], page by page, except pages never flushed (zeros)."""
    want = pattern(tag, len(data), start)
    pos = 0
    while pos < len(data):
        end = min(len(data), (start + pos) // PAGE * PAGE + PAGE - start)
        got = data[pos:end]
        if got != want[pos:end] and got.count(0) != len(got):
            return False
        pos = end
    return True


def origin_of(rel: str) -> str:
    return MV.sub("", rel)


def check_tree(root: str, lower_hashes: dict[str, str], upper: bool) -> list[str]:
    """Problems with the regular files and names under *root* (the upper or the view)."""
    problems = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            origin = origin_of(rel)
            if stat.S_ISDIR(st.st_mode):
                if rel not in ("big", "small", "new") and not re.fullmatch(r"small/d\d", rel):
                    problems.append(f"{rel}: unexpected directory (work/ leak?)")
                continue
            if upper and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                if origin not in lower_hashes:
                    problems.append(f"{rel}: whiteout for a name that is not a lower file")
                continue
            if not stat.S_ISREG(st.st_mode):
                problems.append(f"{rel}: unexpected file type {oct(st.st_mode)}")
                continue
            if origin in lower_hashes:
                size = lower_size(origin)
                if st.st_size < size:
                    problems.append(f"{rel}: truncated copy-up ({st.st_size} < {size} bytes)")
                elif file_sha(path, size) != lower_hashes[origin]:
                    problems.append(f"{rel}: original content corrupted")
                else:
                    with open(path, "rb") as f:
                        f.seek(size)
                        if not suffix_ok(f.read(), "app:" + origin, 0):
                            problems.append(f"{rel}: appended data is not what was written")
            elif re.fullmatch(r"new/w\d+\.\d+", rel):
                with open(path, "rb") as f:
                    if not suffix_ok(f.read(), "new:" + rel, 0):
                        problems.append(f"{rel}: new file holds foreign data")
            else:
                problems.append(f"{rel}: unexpected name (work/ leak?)")
    return problems


def mount(lower: str, upper: str, work: str, mnt: str, *options: str) -> None:
    proc = subprocess.run(unionfs_cmd("mount", *options, "--workdir", work, lower, upper, mnt),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"mount failed: {proc.stderr.strip()}"


def umount(mnt: str) -> None:
    # EBUSY can be a passing reference from outside the test (another process walking
    # /tmp): try again briefly, and say who holds the mount if it stays busy
    for _ in range(5):
        proc = subprocess.run(unionfs_cmd("umount", mnt), capture_output=True, text=True, timeout=60)
        if proc.returncode == 0 or "busy" not in proc.stderr:
            break
        time.sleep(0.5)
    holders = subprocess.run(["fuser", "-vm", mnt], capture_output=True, text=True).stderr \
        if proc.returncode and shutil.which("fuser") else ""
    assert proc.returncode == 0, f"umount failed: {proc.stderr.strip()}\n{holders}"
    assert not is_mounted(mnt)


def kill(pid: int) -> None:
    """SIGKILL the daemon and wait until it is gone."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not pid_gone(pid):
        assert time.monotonic() < deadline, "daemon survived SIGKILL"
        time.sleep(0.01)


def clean_up(proc: subprocess.Popen | None, mnt: str) -> None:
    """Whatever a failed round left: the process changing the mount, the mount."""
    if proc is not None:
        proc.kill()
        proc.wait()
    if is_mounted(mnt):
        subprocess.run(unionfs_cmd("umount", mnt), capture_output=True, timeout=60)
        force_unmount(mnt)


# --------------------------------------------------------------------------
# the test
# --------------------------------------------------------------------------

def test_sigkill_during_write_storm(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse")
    seed = int(os.environ.get("UNIONFS_CRASH_SEED", "1"))
    rounds = int(os.environ.get("UNIONFS_CRASH_ROUNDS", "8"))
    rng = random.Random(seed)
    lower, mnt = str(tmp_path / "lower"), str(tmp_path / "mnt")
    os.makedirs(mnt)
    lower_hashes = build_lower(lower)
    lower_before = tree_digest(lower)
    writer_proc = None
    kills = 0
    try:
        for rnd in range(rounds):
            if rnd % 2 == 0:   # a fresh upper every other round: big copy-ups again
                upper, work = str(tmp_path / f"upper{rnd}"), str(tmp_path / f"work{rnd}")
                os.makedirs(upper)
                os.makedirs(work)
            journal = str(tmp_path / f"journal{rnd}")
            open(journal, "w").close()
            mount(lower, upper, work, mnt)
            pid = daemon_pid(mnt)
            writer_proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "writer", mnt, journal, str(seed * 1000 + rnd)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert writer_proc.stdout.readline().strip() == "go", writer_proc.stderr.read()
            time.sleep(rng.uniform(0, 0.3))
            kill(pid)
            kills += 1
            _, err = writer_proc.communicate(timeout=30)
            # the writer only ever stops because the mount went away under it: requests
            # fail with ENOTCONN/ECONNABORTED; dirty pages the kernel could no longer
            # write back are reported by close/fsync as EIO (mapping_set_error)
            stopped = re.search(r"STOPPED (\w+) in: (.*)", err)
            assert writer_proc.returncode == 3 and stopped, err
            code, call = stopped.groups()
            assert (code in ("ENOTCONN", "ECONNABORTED")
                    or (code == "EIO" and re.match(r"os\.(close|fsync)\(", call))), err
            writer_proc = None
            umount(mnt)

            assert tree_digest(lower) == lower_before, "the lower layer changed"
            problems = check_tree(upper, lower_hashes, upper=True)
            assert not problems, f"round {rnd}, upper after the kill:\n" + "\n".join(problems)

            if os.environ.get("UNIONFS_CRASH_VERBOSE"):
                print(f"round {rnd}: writer {code} in {call};"
                      f" leftovers in work/: {os.listdir(os.path.join(work, 'work'))},"
                      f" fsync'd: {sum(1 for _ in open(journal))}")
            mount(lower, upper, work, mnt)
            try:
                assert os.listdir(os.path.join(work, "work")) == [], "WORKDIR/work not cleaned"
                problems = check_tree(mnt, lower_hashes, upper=False)
                assert not problems, f"round {rnd}, view after remount:\n" + "\n".join(problems)
                with open(journal) as f:
                    synced = [json.loads(line) for line in f if line.endswith("\n")]
                for entry in synced:
                    path = os.path.join(mnt, entry["path"])
                    assert os.path.exists(path), f"fsync'd {entry['path']} is lost"
                    assert os.path.getsize(path) == entry["size"], f"fsync'd {entry['path']}: size"
                    with open(path, "rb") as f:
                        f.seek(entry["offset"])
                        data = f.read(entry["size"] - entry["offset"])
                    assert hashlib.sha256(data).hexdigest() == entry["sha"], f"fsync'd {entry['path']}: content"
            finally:
                umount(mnt)
        print(f"seed {seed}: survived {kills} kills")
    finally:
        clean_up(writer_proc, mnt)


# --------------------------------------------------------------------------
# a directory rename that copies (the userxattr format has no redirects)
# --------------------------------------------------------------------------

TREES = 4
TREE_FILES = ["big"] + [f"sub/s{j:02d}" for j in range(30)]


def tree_file_size(rel: str) -> int:
    return 48 * 1024 * 1024 if rel == "big" else small_size(rel)


def build_trees(lower: str) -> None:
    for i in range(TREES):
        for rel in TREE_FILES:
            path = os.path.join(lower, "trees", f"t{i}", rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(pattern(f"tree{i}:{rel}", tree_file_size(rel)))
        os.link(os.path.join(lower, "trees", f"t{i}", "sub", "s00"),
                os.path.join(lower, "trees", f"t{i}", "hard"))


def renamer_main(mnt: str) -> None:
    """Rename every tree again and again (t3 -> t3.1 -> t3.2 ...) until the mount fails:
    the first rename of each copies its tree up."""
    step = 0
    names = {i: f"t{i}" for i in range(TREES)}
    print("go", flush=True)
    try:
        while True:
            step += 1
            for i in range(TREES):
                new = f"t{i}.{step}"
                os.rename(os.path.join(mnt, "trees", names[i]), os.path.join(mnt, "trees", new))
                names[i] = new
    except OSError as e:
        print(f"STOPPED {errno.errorcode.get(e.errno, e.errno)}", file=sys.stderr)
        sys.exit(3)


def check_trees(mnt: str) -> list[str]:
    """Each tree shows whole, at one name: every file's bytes, the hard link one inode."""
    problems = []
    names = sorted(os.listdir(os.path.join(mnt, "trees")))
    for i in range(TREES):
        mine = [n for n in names if n == f"t{i}" or n.startswith(f"t{i}.")]
        if len(mine) != 1:
            problems.append(f"tree {i} shows at {mine}")
            continue
        root = os.path.join(mnt, "trees", mine[0])
        want = {"big", "sub", "hard", *TREE_FILES}
        got = {os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root)
               for n in dirs + files}
        if got != want:
            problems.append(f"{mine[0]}: holds {sorted(got ^ want)} wrongly")
            continue
        for rel in TREE_FILES + ["hard"]:
            with open(os.path.join(root, rel), "rb") as f:
                data = f.read()
            origin = "sub/s00" if rel == "hard" else rel
            if data != pattern(f"tree{i}:{origin}", tree_file_size(origin)):
                problems.append(f"{mine[0]}/{rel}: {len(data)} bytes, not the lower's")
        if os.lstat(os.path.join(root, "hard")).st_ino != os.lstat(os.path.join(root, "sub/s00")).st_ino:
            problems.append(f"{mine[0]}: hard and sub/s00 are two inodes")
    return problems + [f"stray name {n}" for n in names if not n.startswith("t")]


def test_sigkill_during_copying_directory_renames(tmp_path):
    """In the userxattr format a rename of a directory with lower contents copies its tree
    up in place and then moves it whole: SIGKILLed at any point, the remounted view shows
    every tree complete, at its old name or its new one, never both, never part."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    seed = int(os.environ.get("UNIONFS_CRASH_SEED", "1"))
    rng = random.Random(seed)
    lower, mnt = str(tmp_path / "lower"), str(tmp_path / "mnt")
    os.makedirs(mnt)
    build_trees(lower)
    renamer = None
    try:
        for rnd in range(int(os.environ.get("UNIONFS_CRASH_ROUNDS", "8")) // 2):
            upper, work = str(tmp_path / f"upper{rnd}"), str(tmp_path / f"work{rnd}")
            os.makedirs(upper)
            os.makedirs(work)
            mount(lower, upper, work, mnt, "-o", "userxattr")
            pid = daemon_pid(mnt)
            renamer = subprocess.Popen([sys.executable, os.path.abspath(__file__), "renamer", mnt],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert renamer.stdout.readline().strip() == "go", renamer.stderr.read()
            time.sleep(rng.uniform(0, 0.25))
            kill(pid)
            _, err = renamer.communicate(timeout=30)
            # it stops only because the mount went away under it
            assert renamer.returncode == 3 and re.search(r"STOPPED (ENOTCONN|ECONNABORTED)", err), err
            renamer = None
            umount(mnt)
            mount(lower, upper, work, mnt, "-o", "userxattr")
            try:
                problems = check_trees(mnt)
                if os.environ.get("UNIONFS_CRASH_VERBOSE"):
                    print(f"round {rnd}: {sorted(os.listdir(os.path.join(mnt, 'trees')))}")
                assert not problems, f"round {rnd}, after the kill:\n" + "\n".join(problems)
            finally:
                umount(mnt)
    finally:
        clean_up(renamer, mnt)


if __name__ == "__main__" and sys.argv[1:2] == ["renamer"]:
    renamer_main(sys.argv[2])

if __name__ == "__main__" and sys.argv[1:2] == ["writer"]:
    writer_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
