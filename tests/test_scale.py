"""What must not grow with use: nodes the kernel forgot are freed (issue 5's scale rule).

The daemon's SIGUSR1 stats line (in WORKDIR/unionfs.log) says how many nodes it holds.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

from mounting import daemon_pid, unionfs_mount


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


def test_forgotten_nodes_are_freed(tmp_path):
    lower, upper, work, mnt = (str(tmp_path / n) for n in ("lower", "upper", "work", "mnt"))
    for d in range(20):
        os.makedirs(os.path.join(lower, f"d{d}"))
        for f in range(100):
            open(os.path.join(lower, f"d{d}", f"f{f}"), "w").close()
    for p in (upper, work, mnt):
        os.mkdir(p)
    log = os.path.join(work, "unionfs.log")
    with unionfs_mount([lower], upper, mnt, workdir=work):
        pid = daemon_pid(mnt)
        before, seen = _stats(pid, log, 0)
        subprocess.run(["find", mnt, "-printf", ""], check=True)
        walked, seen = _stats(pid, log, seen)
        assert walked["nodes"] >= 2020, walked
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
