#!/usr/bin/env python3
"""Run a command and report every FUSE request the kernel sent meanwhile, per opcode:
how many, and how long each took from the kernel's send to the daemon's reply.

    sudo scripts/fusetrace.py -- find /mnt/x -printf '%s\\n'
    sudo scripts/fusetrace.py --json out.json -- chmod -R go-w /mnt/x

It reads the kernel's fuse:fuse_request_send and fuse:fuse_request_end tracepoints
(Linux 6.15+, tracefs), so it sees any FUSE daemon alike: unionfs, fuse-overlayfs,
others. Run the same command over two mounts to see which requests make the
difference, rather than guessing from wall time. Requests of every FUSE mount on
the machine are counted; keep other FUSE traffic away while it runs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

TRACEFS = "/sys/kernel/tracing"
_LINE = re.compile(r"\s(\d+\.\d+): fuse_request_(send|end): connection (\d+) req (\d+)"
                   r"(?: opcode \d+ \((\w+)\))?")


def _write(name: str, value: str) -> None:
    with open(os.path.join(TRACEFS, name), "w") as f:
        f.write(value)


def _setup() -> None:
    if not os.path.isdir(os.path.join(TRACEFS, "events")):
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], check=False,
                       stderr=subprocess.DEVNULL)
    if not os.path.isdir(os.path.join(TRACEFS, "events", "fuse")):
        sys.exit("fusetrace: no fuse tracepoints in this kernel (Linux 6.15+ has them)")


def parse(lines) -> dict[str, list[float]]:
    """Latencies in µs by opcode name, from tracefs text."""
    sent: dict[tuple[str, str], tuple[float, str]] = {}
    out: dict[str, list[float]] = {}
    for line in lines:
        m = _LINE.search(line)
        if not m:
            continue
        t, kind, key = float(m.group(1)), m.group(2), (m.group(3), m.group(4))
        if kind == "send":
            sent[key] = (t, m.group(5))
        elif key in sent:
            t0, op = sent.pop(key)
            out.setdefault(op, []).append((t - t0) * 1e6)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write {opcode: [latencies in µs]} here")
    ap.add_argument("--buffer-kb", type=int, default=65536, help="trace buffer per CPU")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("a command to run is needed, after --")
    if os.geteuid() != 0:
        sys.exit("fusetrace: must run as root (tracefs)")
    _setup()
    _write("tracing_on", "0")
    _write("buffer_size_kb", str(args.buffer_kb))
    _write("trace", "")
    _write("events/fuse/enable", "1")
    try:
        _write("tracing_on", "1")
        t0 = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        wall = time.perf_counter() - t0
        _write("tracing_on", "0")
        with open(os.path.join(TRACEFS, "trace")) as f:
            lat = parse(f)
    finally:
        _write("tracing_on", "0")
        _write("events/fuse/enable", "0")
        _write("trace", "")
    total = sum(sum(v) for v in lat.values()) / 1e6
    print(f"wall {wall:.3f} s, in the daemon (send to reply, summed) {total:.3f} s")
    print(f"  {'request':22} {'count':>7} {'mean µs':>9} {'median µs':>10} {'sum s':>8}")
    for op, v in sorted(lat.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {op:22} {len(v):7d} {statistics.fmean(v):9.1f} "
              f"{statistics.median(v):10.1f} {sum(v) / 1e6:8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(lat, f)
    return rc


if __name__ == "__main__":
    sys.exit(main())
