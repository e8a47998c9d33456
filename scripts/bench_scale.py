#!/usr/bin/env python3
"""Scale checks for unionfs (issue 5): what must not grow with the size of the layers.

    sudo .venv/bin/python scripts/bench_scale.py [--cache-dir DIR] [--files N] [--json OUT]

Needs root and /dev/fuse. Builds its layers once (cached in --cache-dir, default
~/.cache/unionfs-scale, plus the 1M-file lower of scripts/bench_diff.py) and prints:

  mount     time of `unionfs mount` (until the mount answers) over an empty lower, a
            30,000-file lower and a 1,000,000-file lower: flat means no scan at mount
  rss       the daemon's RSS before and after walking all 1,000,000 files (`find`),
            after the kernel forgets them (drop_caches 2 sends FORGET), and after a
            second walk and forget: flat means forget() frees what lookup made
  bigdir    cold `ls -f` of directories of 10,000, 30,000 and 100,000 entries:
            microseconds per entry stay flat when listing is linear
  openmany  10,000 files of the lower held open at once through the mount, one
            byte read from each, and the daemon's fd count while they are open

No timed assertion anywhere: these are figures, reported in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_diff import build_lower  # noqa: E402  (the 1M-file lower, shared cache)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unionfs.runstate import read_pidfile, top_mount  # noqa: E402


def unionfs(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "unionfs", *args], check=True, capture_output=True)


class Mounted:
    """A unionfs mount over *lowers* with a fresh upper, unmounted on exit whatever happens."""

    def __init__(self, lowers: list[str], scratch: str) -> None:
        self.base = tempfile.mkdtemp(dir=scratch)
        self.mnt = os.path.join(self.base, "mnt")
        self.upper = os.path.join(self.base, "upper")
        os.mkdir(self.mnt)
        os.mkdir(self.upper)
        self.lowers = lowers
        self.mount_s = 0.0

    def __enter__(self) -> "Mounted":
        t = time.perf_counter()
        unionfs("mount", ":".join(self.lowers), self.upper, self.mnt)
        os.stat(self.mnt)
        self.mount_s = time.perf_counter() - t
        entry = top_mount(self.mnt)
        state = read_pidfile(entry.devno) if entry else None
        self.pid = state.owner[0] if state else 0
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run([sys.executable, "-m", "unionfs", "umount", self.mnt], capture_output=True)
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)

    def rss_mib(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


def drop_caches(level: int) -> None:
    subprocess.run(["sync"])
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write(f"{level}\n")


def build_flat(path: str, counts: list[int]) -> None:
    """Directories big10000, big30000, big100000 of empty files (cached)."""
    marker = os.path.join(path, ".complete")
    if os.path.exists(marker):
        return
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    for n in counts:
        d = os.path.join(path, f"big{n}")
        os.mkdir(d)
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(n):
                os.close(os.open(f"entry-{i:06d}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd))
        finally:
            os.close(dfd)
    with open(marker, "w") as f:
        f.write("ok\n")


def bench_mount(layers: dict[str, str], scratch: str, runs: int) -> dict[str, float]:
    out = {}
    for label, lower in layers.items():
        times = []
        for _ in range(runs):
            drop_caches(3)
            with Mounted([lower], scratch) as m:
                times.append(m.mount_s)
        out[label] = statistics.median(times)
        print(f"mount     {label:>10} lower: {out[label] * 1000:7.0f} ms (median of {runs})")
    return out


def bench_rss(lower: str, scratch: str) -> dict[str, float]:
    out = {}
    with Mounted([lower], scratch) as m:
        out["start"] = m.rss_mib()
        for walk in (1, 2):
            t = time.perf_counter()
            subprocess.run(["find", m.mnt, "-printf", ""], check=True)
            out[f"walk{walk}_s"] = time.perf_counter() - t
            out[f"after_walk{walk}"] = m.rss_mib()
            drop_caches(2)
            time.sleep(2)  # FORGETs arrive asynchronously
            out[f"after_forget{walk}"] = m.rss_mib()
    print("rss       MiB: start {start:.0f}, after walk 1 {after_walk1:.0f}, after forget "
          "{after_forget1:.0f}, after walk 2 {after_walk2:.0f}, after forget {after_forget2:.0f} "
          "(walks {walk1_s:.1f}s, {walk2_s:.1f}s)".format(**out))
    return out


def bench_bigdir(lower: str, counts: list[int], scratch: str) -> dict[str, float]:
    out = {}
    with Mounted([lower], scratch) as m:
        for n in counts:
            drop_caches(3)
            t = time.perf_counter()
            listed = subprocess.run(["ls", "-f", os.path.join(m.mnt, f"big{n}")], check=True,
                                    capture_output=True).stdout.count(b"\n")
            dt = time.perf_counter() - t
            assert listed == n + 2, (listed, n)
            out[str(n)] = dt
            print(f"bigdir    {n:>7} entries: {dt * 1000:7.0f} ms cold, {dt / n * 1e6:5.1f} us/entry")
    return out


def bench_openmany(lower: str, scratch: str, count: int) -> dict[str, float]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with Mounted([lower], scratch) as m:
        base = m.fds()
        fds = []
        t = time.perf_counter()
        try:
            for i in range(count):
                d, f = divmod(i, 1000)
                fds.append(os.open(os.path.join(m.mnt, f"d{d:04d}", f"f{f:04d}"), os.O_RDONLY))
            for fd in fds:
                os.read(fd, 1)
            held = m.fds()
        finally:
            for fd in fds:
                os.close(fd)
        dt = time.perf_counter() - t
        time.sleep(0.5)
        after = m.fds()
    print(f"openmany  {len(fds)} files open at once in {dt:.1f}s; daemon fds: {base} before, "
          f"{held} while open, {after} after close")
    return {"opened": len(fds), "fds_before": base, "fds_open": held, "fds_after": after, "s": dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/unionfs-scale"))
    ap.add_argument("--diff-cache", default=os.path.expanduser("~/.cache/unionfs-diff-bench"),
                    help="where scripts/bench_diff.py keeps its 1M-file lower")
    ap.add_argument("--bench-cache", default=os.path.expanduser("~/.cache/unionfs-bench/scale-1-v1"),
                    help="scripts/bench.py's scale-1 data (its bottom layer is the 30,000-file lower)")
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_scale.py: must run as root (mounts, drop_caches)")
    os.makedirs(args.cache_dir, exist_ok=True)
    huge = os.path.join(args.diff_cache, f"lower-{args.files}")
    build_lower(huge, args.files)
    empty = os.path.join(args.cache_dir, "empty")
    os.makedirs(empty, exist_ok=True)
    counts = [10_000, 30_000, 100_000]
    flat = os.path.join(args.cache_dir, "bigdirs")
    build_flat(flat, counts)
    layers = {"empty": empty}
    bottom = os.path.join(args.bench_cache, "bottom")
    if os.path.isdir(bottom):
        layers["30k"] = bottom
    layers[f"{args.files // 1000}k"] = huge
    scratch = tempfile.mkdtemp(prefix="unionfs-scale-")
    try:
        results = {
            "mount_s": bench_mount(layers, scratch, args.runs),
            "rss_mib": bench_rss(huge, scratch),
            "bigdir_s": bench_bigdir(flat, counts, scratch),
            "openmany": bench_openmany(huge, scratch, 10_000),
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
