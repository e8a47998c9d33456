#!/usr/bin/env python3
"""Time and size `unionfs export` and `unionfs inspect` on the benchmark's tree.

    scripts/bench_layers.py [--cache-dir DIR] [--scale S] [--changes N] [--runs N] [--big]

Uses scripts/bench_data.py's layers (built once, cached: at scale 1 ~30,000 files in
~1,500 directories plus a 1 GiB file in bottom/, and top/ over it), mounts a union
over them with a fresh upper, makes N changes through the mount (appends, new files,
deletions, chmods, new directories, a renamed directory) and runs, as commands:

* `unionfs export -o FILE MNT` (best and median wall clock of --runs, peak RSS);
* `unionfs export --rescan` (walks the upper instead of reading the changes log);
* `unionfs inspect --json MNT` over the whole stack (upper, top, bottom);
* with --big, one export after a chmod of the 1 GiB file (its copy-up is made first,
  outside the timing): the file streams through, the RSS must not grow with it;

and, for scale, the peak RSS of a bare `python -c "import unionfs.cli"`. Peak RSS is
the child's own (wait4's ru_maxrss). Needs root and /dev/fuse.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_data  # noqa: E402
from bench_diff import KINDS, one_change  # noqa: E402


def unionfs(*args: str) -> list[str]:
    return [sys.executable, "-m", "unionfs", *args]


def measured(cmd: list[str]) -> tuple[float, int, bytes]:
    """(wall seconds, peak RSS in KiB, stdout) of one run of *cmd*."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    elapsed = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{cmd} failed: {err.decode(errors='replace')}")
    return elapsed, usage.ru_maxrss, out


def series(cmd: list[str], runs: int) -> tuple[list[float], int, bytes]:
    times, rss, out = [], 0, b""
    for _ in range(runs):
        t, r, out = measured(cmd)
        times.append(t)
        rss = max(rss, r)
    return times, rss, out


def show(label: str, times: list[float], rss: int) -> None:
    print(f"{label:<34} best {min(times) * 1000:7.0f} ms  median {statistics.median(times) * 1000:7.0f} ms"
          f"  peak RSS {rss / 1024:6.1f} MiB  (of {len(times)})")


def make_changes(mnt: str, manifest: dict, n: int, rng: random.Random) -> None:
    files = sorted(manifest["mix"])         # files the union shows (bench_data's picks)
    dirs = sorted({os.path.dirname(p) for p in files if os.path.dirname(p)})
    # one renamed directory (a leaf one: its whole tree goes into the layer)
    leaf = max(dirs, key=lambda d: (d.count("/"), d))
    os.rename(os.path.join(mnt, leaf), os.path.join(mnt, leaf + ".renamed"))
    dirs.remove(leaf)
    for i in range(n - 1):
        # under the renamed directory a file is gone: one_change lets that pass
        one_change(KINDS[i % len(KINDS)], os.path.join(mnt, rng.choice(files)),
                   os.path.join(mnt, rng.choice(dirs)), i)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/unionfs-bench"))
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--changes", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--big", action="store_true", help="also export a copied-up 1 GiB file")
    args = ap.parse_args()
    data = bench_data.build(args.cache_dir, args.scale)
    with open(os.path.join(data, "manifest.json")) as f:
        manifest = json.load(f)
    run = os.path.join(args.cache_dir, f"layers-run-{os.getpid()}")
    upper, mnt, out = (os.path.join(run, x) for x in ("upper", "mnt", "layer.tar"))
    os.makedirs(upper)
    os.makedirs(mnt)
    lowers = f"{data}/top:{data}/bottom"
    subprocess.run(unionfs("mount", lowers, upper, mnt), check=True)
    try:
        make_changes(mnt, manifest, args.changes, random.Random(1))
        base = series([sys.executable, "-c", "import unionfs.cli"], args.runs)
        exp = series(unionfs("export", "-o", out, mnt), args.runs)
        entries = int(subprocess.run(["tar", "tf", out], capture_output=True, check=True)
                      .stdout.count(b"\n"))
        resc = series(unionfs("export", "--rescan", "-o", out, mnt), args.runs)
        insp = series(unionfs("inspect", "--json", mnt), args.runs)
        report = json.loads(insp[2])
        files = sum(lr["files"] for lr in report["layers"])
        print(f"scale {args.scale:g}: {files} files in the stack; {args.changes} changes made; "
              f"the layer holds {entries} entries, {os.path.getsize(out)} bytes")
        show("python -c 'import unionfs.cli'", base[0], base[1])
        show("unionfs export MNT", exp[0], exp[1])
        show("unionfs export --rescan MNT", resc[0], resc[1])
        show("unionfs inspect --json MNT", insp[0], insp[1])
        if args.big:
            os.chmod(os.path.join(mnt, "big", "big.bin"), 0o600)   # the copy-up, not timed
            big = series(unionfs("export", "-o", out, mnt), 1)
            show("unionfs export MNT (+1 GiB file)", big[0], big[1])
            print(f"  layer: {os.path.getsize(out)} bytes")
    finally:
        subprocess.run(unionfs("umount", mnt), check=False)
        shutil.rmtree(run, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
