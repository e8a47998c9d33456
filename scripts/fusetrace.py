#!/usr/bin/env python3
"""Run a command and report every FUSE request the kernel sent meanwhile, per opcode:
how many, and how long each took from the kernel's send to the daemon's reply.

    sudo scripts/fusetrace.py -- find /mnt/x -printf '%s\\n'
    sudo scripts/fusetrace.py --json out.json -- chmod -R go-w /mnt/x

It reads the kernel's fuse:fuse_request_send and fuse:fuse_request_end tracepoints
(Linux 6.15+, tracefs), so it sees any FUSE daemon alike: unionfs, fuse-overlayfs,
others. Run the same command over two mounts to see which requests make the
difference, rather than guessing from wall time. Requests of every FUSE mount on
the machine are counted, unless --mount names the one to count.
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


def _write(inst: str, name: str, value: str) -> None:
    with open(os.path.join(inst, name), "w") as f:
        f.write(value)


def _setup() -> None:
    if not os.path.isdir(os.path.join(TRACEFS, "events")):
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], check=False,
                       stderr=subprocess.DEVNULL)
    if not os.path.isdir(os.path.join(TRACEFS, "events", "fuse")):
        sys.exit("fusetrace: no fuse tracepoints in this kernel (Linux 6.15+ has them)")


def connection(path: str) -> int:
    """The connection number the tracepoints give a FUSE mount: its device number as the
    kernel encodes it (major << 20 | minor), which stat's st_dev encodes otherwise."""
    dev = os.stat(path).st_dev
    return os.major(dev) << 20 | os.minor(dev)


def parse(lines, conn: int | None = None) -> tuple[dict[str, list[float]], dict[str, int]]:
    """From tracefs text: latencies in µs by opcode name (requests answered), and the
    count of requests sent by opcode (FORGET and BATCH_FORGET get no answer); of one
    connection only if *conn* is given."""
    sent: dict[tuple[str, str], tuple[float, str]] = {}
    out: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    want = None if conn is None else str(conn)
    for line in lines:
        m = _LINE.search(line)
        if not m or (want is not None and m.group(3) != want):
            continue
        t, kind, key = float(m.group(1)), m.group(2), (m.group(3), m.group(4))
        if kind == "send":
            op = m.group(5)
            sent[key] = (t, op)
            counts[op] = counts.get(op, 0) + 1
        elif key in sent:
            t0, op = sent.pop(key)
            out.setdefault(op, []).append((t - t0) * 1e6)
    return out, counts


def start(buffer_kb: int = 65536, conn: int | None = None) -> str:
    """Start recording FUSE requests (of connection *conn* only, if given) in a tracefs
    instance of this process's own, so that another trace running meanwhile neither
    clears nor fills its buffer. Returns the instance for stop()."""
    _setup()
    inst = os.path.join(TRACEFS, "instances", f"fusetrace-{os.getpid()}")
    os.mkdir(inst)
    try:
        _write(inst, "buffer_size_kb", str(buffer_kb))
        if conn is not None:
            _write(inst, "events/fuse/filter", f"connection == {conn}")
        _write(inst, "events/fuse/enable", "1")
        _write(inst, "tracing_on", "1")
    except BaseException:
        os.rmdir(inst)
        raise
    return inst


def stop(inst: str) -> list[str]:
    """Stop recording; the recorded lines; the instance removed."""
    try:
        _write(inst, "tracing_on", "0")
        with open(os.path.join(inst, "trace")) as f:
            return f.readlines()
    finally:
        os.rmdir(inst)


def overflowed(lines: list[str]) -> bool:
    """True if the buffer lost events (the header counts those in it and those written)."""
    for line in lines[:5]:
        m = re.search(r"entries-in-buffer/entries-written: (\d+)/(\d+)", line)
        if m:
            return m.group(1) != m.group(2)
    return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write {opcode: [latencies in µs]} here")
    ap.add_argument("--buffer-kb", type=int, default=65536, help="trace buffer per CPU")
    ap.add_argument("--mount", metavar="PATH",
                    help="count only the requests of the FUSE mount PATH is on (default: all)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("a command to run is needed, after --")
    if os.geteuid() != 0:
        sys.exit("fusetrace: must run as root (tracefs)")
    conn = connection(args.mount) if args.mount else None
    inst = start(args.buffer_kb, conn)
    try:
        t0 = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        wall = time.perf_counter() - t0
    finally:
        lines = stop(inst)
    if overflowed(lines):
        print("fusetrace: the trace buffer overflowed: raise --buffer-kb", file=sys.stderr)
    lat, counts = parse(lines, conn)
    total = sum(sum(v) for v in lat.values()) / 1e6
    print(f"wall {wall:.3f} s, in the daemon (send to reply, summed) {total:.3f} s")
    print(f"  {'request':22} {'count':>7} {'mean µs':>9} {'median µs':>10} {'sum s':>8}")
    for op, v in sorted(lat.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {op:22} {len(v):7d} {statistics.fmean(v):9.1f} "
              f"{statistics.median(v):10.1f} {sum(v) / 1e6:8.3f}")
    for op in sorted(set(counts) - set(lat)):  # never answered: FORGET, BATCH_FORGET
        print(f"  {op:22} {counts[op]:7d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(lat, f)
    return rc


if __name__ == "__main__":
    sys.exit(main())
