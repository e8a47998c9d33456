#!/usr/bin/env python3
"""Time `unionfs diff` of 100 changes over a lower layer of 1M files.

    scripts/bench_diff.py CACHE_DIR [--files N] [--changes N] [--runs N]

Builds (once; cached in CACHE_DIR/lower-N, reused while its .complete marker
is there) a lower layer of N empty files in N/1000 directories, mounts a
union over it with a fresh upper, makes the changes through the mount (a
mix of appends, new files, deletions, chmods and new directories), and
times `unionfs diff MOUNTPOINT` as a command (wall clock, best and median of
--runs), plus `--rescan`, then unmounts. Needs root and /dev/fuse.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

PER_DIR = 1000


def unionfs(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unionfs", *args], capture_output=True, text=True,
                          check=True, **kw)


def build_lower(path: str, files: int) -> None:
    marker = os.path.join(path, ".complete")
    if os.path.exists(marker):
        return
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    t0 = time.monotonic()
    dirs = max(1, files // PER_DIR)
    for d in range(dirs):
        dpath = os.path.join(path, f"d{d:04d}")
        os.mkdir(dpath)
        dfd = os.open(dpath, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for f in range(min(PER_DIR, files - d * PER_DIR)):
                os.close(os.open(f"f{f:04d}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd))
        finally:
            os.close(dfd)
        if d % 100 == 99:
            print(f"  {(d + 1) * PER_DIR} files ({time.monotonic() - t0:.0f}s)", file=sys.stderr)
    with open(marker, "w") as f:
        f.write(f"{files}\n")
    print(f"built {files} files in {time.monotonic() - t0:.0f}s", file=sys.stderr)


KINDS = ("append", "new", "delete", "chmod", "mkdir")


def one_change(kind: str, f: str, d: str, i: int) -> None:
    """One change through the mount: to file *f*, or new entry number *i* in directory *d*."""
    try:
        if kind == "append":
            with open(f, "a") as fh:
                fh.write("changed\n")
        elif kind == "new":
            with open(os.path.join(d, f"new{i}"), "w") as fh:
                fh.write("new\n")
        elif kind == "delete":
            os.unlink(f)
        elif kind == "chmod":
            os.chmod(f, 0o600)
        else:
            os.mkdir(os.path.join(d, f"dir{i}"))
    except FileNotFoundError:
        pass  # picked one twice


def make_changes(mnt: str, dirs: int, n: int, rng: random.Random) -> None:
    for i in range(n):
        d = os.path.join(mnt, f"d{rng.randrange(dirs):04d}")
        f = os.path.join(d, f"f{rng.randrange(PER_DIR):04d}")
        one_change(KINDS[i % len(KINDS)], f, d, i)


def timed(cmd: list[str], runs: int) -> tuple[list[float], str]:
    times, out = [], ""
    for _ in range(runs):
        t0 = time.monotonic()
        out = unionfs(*cmd).stdout
        times.append(time.monotonic() - t0)
    return times, out


def in_process(mnt: str, runs: int) -> list[float]:
    """The diff's own work: locate the union, read the log, compare, format (no output)."""
    import io
    from unionfs import diffcmd

    ns = argparse.Namespace(target=mnt, paths=[], json=False, stat=False, since=None, rescan=False,
                            workdir=None, lower=None)
    times = []
    for _ in range(runs):
        saved = sys.stdout
        sys.stdout = io.TextIOWrapper(io.BytesIO())
        try:
            t0 = time.monotonic()
            diffcmd.run_diff(ns)
            times.append(time.monotonic() - t0)
        finally:
            sys.stdout = saved
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache", help="directory for the (cached) lower layer and the runs")
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--changes", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    cache = os.path.abspath(args.cache)
    lower = os.path.join(cache, f"lower-{args.files}")
    build_lower(lower, args.files)
    run = os.path.join(cache, f"run-{os.getpid()}")
    upper, mnt = os.path.join(run, "upper"), os.path.join(run, "mnt")
    os.makedirs(upper)
    os.makedirs(mnt)
    unionfs("mount", lower, upper, mnt)
    try:
        make_changes(mnt, max(1, args.files // PER_DIR), args.changes, random.Random(1))
        times, out = timed(["diff", mnt], args.runs)
        rescan, out2 = timed(["diff", "--rescan", mnt], args.runs)
        assert out == out2, "log diff and --rescan diff disagree"
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", "import unionfs.cli"], check=True)
        startup = time.monotonic() - t0
        inproc = in_process(mnt, args.runs)
    finally:
        unionfs("umount", mnt)
        shutil.rmtree(run, ignore_errors=True)
    lines = out.splitlines()
    print(f"lower: {args.files} files; changes made: {args.changes}; diff lines: {len(lines)} "
          f"({sum(1 for x in lines if x[0] == 'A')} A, {sum(1 for x in lines if x[0] == 'C')} C, "
          f"{sum(1 for x in lines if x[0] == 'D')} D)")
    print(f"unionfs diff MNT:          best {min(times) * 1000:.0f} ms, "
          f"median {statistics.median(times) * 1000:.0f} ms (of {args.runs})")
    print(f"unionfs diff --rescan MNT: best {min(rescan) * 1000:.0f} ms, "
          f"median {statistics.median(rescan) * 1000:.0f} ms")
    print(f"in-process (no interpreter start): best {min(inproc) * 1000:.0f} ms, "
          f"median {statistics.median(inproc) * 1000:.0f} ms")
    print(f"(python start + import alone: {startup * 1000:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
