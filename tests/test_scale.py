"""What must not grow with use: nodes the kernel forgot are freed (issue 5's scale rule).

The daemon's SIGUSR1 stats line (in WORKDIR/unionfs.log) says how many nodes it holds.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from helpers.mounting import daemon_pid, unionfs_mount

pytestmark = [pytest.mark.mount, pytest.mark.slow]


def _stats(pid: int, log: str, seen: int) -> tuple[dict[str, int], int]:
    """Ask for a stats line and wait (bounded) for the new one."""
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(log) as f:
            lines = [line for line in f if " stats: " in line]
        if len(lines) > seen:
            pairs = re.findall(r"(\w+)=(\d+)", lines[-1].split(" stats: ", 1)[1])
            return {k: int(v) for k, v in pairs}, len(lines)
        time.sleep(0.05)
    raise AssertionError("no stats line after SIGUSR1")


def _union(tmp_path, dirs: int, files: int, name: str) -> tuple[str, str, str, str, str]:
    """A lower of *dirs* directories of *files* empty files each; (lower, upper, work,
    mnt, the daemon's log)."""
    lower, upper, work, mnt = (str(tmp_path / n) for n in ("lower", "upper", "work", "mnt"))
    for d in range(dirs):
        os.makedirs(os.path.join(lower, f"d{d}"))
        for f in range(files):
            open(os.path.join(lower, f"d{d}", f"{name}{f}"), "w").close()
    for p in (upper, work, mnt):
        os.mkdir(p)
    return lower, upper, work, mnt, os.path.join(work, "unionfs.log")


def test_forgotten_nodes_are_freed(tmp_path):
    lower, upper, work, mnt, log = _union(tmp_path, 20, 100, "f")
    with unionfs_mount([lower], upper, mnt, workdir=work):
        pid = daemon_pid(mnt)
        before, seen = _stats(pid, log, 0)
        subprocess.run(["find", mnt, "-printf", ""], check=True)
        walked, seen = _stats(pid, log, seen)
        assert walked["nodes"] >= 2020, walked
        # Python's cyclic collector stays out of the way (mount._tune_gc): with its
        # default thresholds this walk of 2,000 names made 11 passes
        assert walked["gc_passes"] - before["gc_passes"] <= 2, (before["gc_passes"], walked["gc_passes"])
        subprocess.run(["sync"])
        deadline = time.monotonic() + 20
        while True:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2\n")  # the kernel drops unused dentries and inodes: FORGET
            after, seen = _stats(pid, log, seen)
            if after["nodes"] <= before["nodes"] + 1 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert after["nodes"] <= before["nodes"] + 1, (before, walked, after)
        assert after["handles"] == 0 and after["listings"] == 0, after


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_forget_gives_the_memory_back(tmp_path):
    """The daemon runs on the C allocator (launch.py restarts `mount` with PYTHONMALLOC=malloc),
    so what a walk took goes back to the system once the kernel forgets the nodes; with
    CPython's own allocator over 90% of it stayed."""
    lower, upper, work, mnt, log = _union(tmp_path, 60, 500, "file-with-a-longer-name-")
    with unionfs_mount([lower], upper, mnt, workdir=work):
        pid = daemon_pid(mnt)
        with open(f"/proc/{pid}/environ", "rb") as f:
            assert b"PYTHONMALLOC=malloc" in f.read().split(b"\0")
        start = _rss_kib(pid)
        subprocess.run(["find", mnt, "-printf", ""], check=True)
        peak = _rss_kib(pid)
        subprocess.run(["sync"])
        seen = 0
        deadline = time.monotonic() + 20
        while True:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2\n")
            after, seen = _stats(pid, log, seen)
            if after["nodes"] <= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        end = _rss_kib(pid)
        assert peak - start > 10_000, (start, peak)  # the walk did take memory
        assert end - start < (peak - start) / 2, (start, peak, end)
