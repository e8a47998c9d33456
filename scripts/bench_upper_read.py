#!/usr/bin/env python3
"""Reads of a big file that is already in the upper: kernel overlayfs, unionfs (with FUSE
passthrough where the machine has it, the default) and unionfs -o passthrough=off,
interleaved, three repetitions, medians (docs/benchmarks.md, FUSE passthrough). scripts/bench.py
reads a lower file, which never passes through; this is the row passthrough changes.

    sudo .venv/bin/python scripts/bench_upper_read.py [ROOT]

ROOT (default /tmp/unionfs-bench-upper-read) is made and removed; everything mounted is
unmounted, also on errors.
"""
import os, random, shutil, statistics, subprocess, sys, time
UF = [sys.executable, "-m", "unionfs"]
root = sys.argv[1] if len(sys.argv) > 1 else "/tmp/unionfs-bench-upper-read"
shutil.rmtree(root, ignore_errors=True)
os.makedirs(f"{root}/lower")
size = 300 << 20
big = os.urandom(1 << 20) * 300
def mk(name):
    d = f"{root}/{name}"
    for s in ("upper", "work", "mnt"): os.makedirs(f"{d}/{s}")
    with open(f"{d}/upper/big", "wb") as f: f.write(big)
    return d
def drop():
    os.sync(); open("/proc/sys/vm/drop_caches", "w").write("3")
def seq(p):
    subprocess.run(["dd", f"if={p}", "of=/dev/null", "bs=1M"], check=True, capture_output=True)
rng = random.Random(1); offs = [rng.randrange(0, size // 4096) * 4096 for _ in range(20000)]
def rnd(p):
    fd = os.open(p, os.O_RDONLY)
    for o in offs: os.pread(fd, 4096, o)
    os.close(fd)
impls = {"kernel": None, "unionfs": [], "unionfs-nopt": ["-o", "passthrough=off"]}
res = {}
for rep in range(3):
    for name, opts in impls.items():
        d = mk(f"{name}{rep}")
        if opts is None:
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={root}/lower,upperdir={d}/upper,workdir={d}/work", f"{d}/mnt"], check=True)
        else:
            subprocess.run(UF + ["mount", *opts, "--workdir", f"{d}/work", f"{root}/lower", f"{d}/upper", f"{d}/mnt"], check=True)
        try:
            for wl, fn in (("seqread", seq), ("randread", rnd)):
                for mode in ("cold", "warm"):
                    if mode == "cold": drop()
                    else: fn(f"{d}/mnt/big")
                    t = time.perf_counter(); fn(f"{d}/mnt/big"); dt = time.perf_counter() - t
                    res.setdefault((wl, mode, name), []).append(dt)
        finally:
            subprocess.run(UF + ["umount", f"{d}/mnt"] if opts is not None else ["umount", f"{d}/mnt"], check=True)
            shutil.rmtree(d)
shutil.rmtree(root)
print("| workload (upper file, 300 MiB) | mode | kernel s | unionfs passthrough s | unionfs passthrough=off s | passthrough/kernel | off/kernel |")
print("|---|---|---|---|---|---|---|")
for wl in ("seqread", "randread"):
    for mode in ("cold", "warm"):
        k, u, n = (statistics.median(res[(wl, mode, i)]) for i in impls)
        print(f"| {wl} | {mode} | {k:.3f} | {u:.3f} | {n:.3f} | {u/k:.2f}x | {n/k:.2f}x |")
