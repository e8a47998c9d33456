"""Benchmark data for scripts/bench.py: two overlayfs-format lower layers, built once and cached.

Layout of CACHE/scale-S-vN/:

    bottom/        ~30,000 small files (0-16 KiB) in ~1,500 directories up to 6 deep,
                   plus big/big.bin (1 GiB)
    top/           rewrites 10% of bottom's files, adds 2,000, whites out 1,000
                   (char device 0/0) and makes a few directories opaque
                   (trusted.overlay.opaque=y)
    untar.tar      5,000 small files for the untar workload
    manifest.json  what the union shows, for the workloads to pick targets from
    DONE           written last; a cache without it is rebuilt

All counts and the big file's size are multiplied by the scale. Everything is
deterministic (seeded), so two caches of one scale hold the same tree.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import stat
import subprocess
import tarfile
import time

VERSION = 1
GiB = 1 << 30


def cache_path(cache_dir: str, scale: float) -> str:
    return os.path.join(cache_dir, f"scale-{scale:g}-v{VERSION}")


def n(count: int, scale: float) -> int:
    return max(1, round(count * scale))


def _content(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def build(cache_dir: str, scale: float, log=print) -> str:
    """Build (or find) the data for *scale*; returns its directory."""
    root = cache_path(cache_dir, scale)
    if os.path.exists(os.path.join(root, "DONE")):
        return root
    if os.path.exists(root):
        shutil.rmtree(root)
    t0 = time.monotonic()
    log(f"building benchmark data in {root} (once) ...")
    tmp = root + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    bottom = os.path.join(tmp, "bottom")
    top = os.path.join(tmp, "top")
    os.makedirs(bottom)
    os.makedirs(top)
    rng = random.Random(20261123)

    # -- bottom: directory tree (random recursive tree, depth <= 6) ------------------------
    ndirs = n(1500, scale)
    dirs = [""]          # relative paths; "" is the root
    depth = {"": 0}
    while len(dirs) < ndirs + 1:
        parent = rng.choice(dirs)
        if depth[parent] >= 6:
            continue
        d = os.path.join(parent, f"d{len(dirs)}")
        dirs.append(d)
        depth[d] = depth[parent] + 1
        os.mkdir(os.path.join(bottom, d))
    files: list[str] = []
    for i in range(n(30000, scale)):
        d = rng.choice(dirs)
        p = os.path.join(d, f"f{i}.dat")
        _write(os.path.join(bottom, p), _content(rng, rng.randint(0, 16384)))
        files.append(p)
    # the big file, in a directory of its own (the tar workload leaves it out)
    os.mkdir(os.path.join(bottom, "big"))
    big_size = max(1 << 20, int(GiB * scale)) // 4096 * 4096
    chunk = 8 << 20
    with open(os.path.join(bottom, "big", "big.bin"), "wb") as f:
        left = big_size
        while left:
            k = min(chunk, left)
            f.write(os.urandom(k))
            left -= k

    # -- top ---------------------------------------------------------------------------
    # opaque directories: a few smallish subtrees (not the root)
    subtree_files: dict[str, int] = {d: 0 for d in dirs}
    for p in files:
        d = os.path.dirname(p)
        while True:
            subtree_files[d] += 1
            if not d:
                break
            d = os.path.dirname(d)
    candidates = sorted(d for d in dirs if d and 5 <= subtree_files[d] <= 60)
    opaque = rng.sample(candidates, min(len(candidates), 4 if scale >= 0.5 else 2))

    def under_opaque(p: str) -> bool:
        return any(p == o or p.startswith(o + "/") for o in opaque)

    def top_dir(d: str) -> None:
        os.makedirs(os.path.join(top, d), exist_ok=True)

    for o in opaque:
        top_dir(o)
        os.setxattr(os.path.join(top, o), "trusted.overlay.opaque", b"y")
        for k in range(3):
            _write(os.path.join(top, o, f"o{k}.dat"), _content(rng, rng.randint(0, 16384)))

    eligible = [p for p in files if not under_opaque(p)]
    chosen = rng.sample(eligible, n(3000, scale) + n(1000, scale))
    rewritten, whited = chosen[:n(3000, scale)], chosen[n(3000, scale):]
    for p in rewritten:
        top_dir(os.path.dirname(p))
        _write(os.path.join(top, p), _content(rng, rng.randint(0, 16384)))
    for p in whited:
        top_dir(os.path.dirname(p))
        os.mknod(os.path.join(top, p), stat.S_IFCHR | 0o000, os.makedev(0, 0))
    visible_dirs = [d for d in dirs if not under_opaque(d)]
    added = []
    for i in range(n(2000, scale)):
        d = rng.choice(visible_dirs)
        p = os.path.join(d, f"n{i}.dat")
        top_dir(d)
        _write(os.path.join(top, p), _content(rng, rng.randint(0, 16384)))
        added.append(p)

    # -- what the union shows -------------------------------------------------------------
    whited_set = set(whited)
    visible = [p for p in files if p not in whited_set and not under_opaque(p)] + added
    visible += [os.path.join(o, f"o{k}.dat") for o in opaque for k in range(3)]
    visible.sort()
    vis_count: dict[str, int] = {d: 0 for d in visible_dirs}
    for o in opaque:
        vis_count[o] = 0
    for p in visible:
        d = os.path.dirname(p)
        while True:
            vis_count[d] = vis_count.get(d, 0) + 1
            if not d:
                break
            d = os.path.dirname(d)
    # rm -rf targets: disjoint subtrees adding up to ~5,000 files, largest first
    want = n(5000, scale)
    rm_dirs: list[str] = []
    got = 0
    for d in sorted((d for d in vis_count if d), key=lambda d: (-vis_count[d], d)):
        if got >= want * 0.95:
            break
        if vis_count[d] > want - got:
            continue
        if any(d.startswith(r + "/") or r.startswith(d + "/") for r in rm_dirs):
            continue
        rm_dirs.append(d)
        got += vis_count[d]
    rm_set = tuple(r + "/" for r in rm_dirs)
    rest = [p for p in visible if not p.startswith(rm_set)]
    # disjoint samples for the copy-up and mix workloads
    picks = rng.sample(rest, n(1000, scale) + n(1000, scale))
    manifest = {
        "version": VERSION,
        "scale": scale,
        "dirs": len(dirs) - 1,
        "bottom_files": len(files),
        "rewritten": len(rewritten),
        "added": len(added) + 3 * len(opaque),
        "whiteouts": len(whited),
        "opaque": opaque,
        "visible_files": len(visible),
        "big": "big/big.bin",
        "big_size": big_size,
        "rm_dirs": rm_dirs,
        "rm_files": got,
        "append": picks[:n(1000, scale)],
        "mix": picks[n(1000, scale):],
    }

    # -- untar source ---------------------------------------------------------------------
    src = os.path.join(tmp, "untar-src")
    os.mkdir(src)
    nt = n(5000, scale)
    for i in range(nt):
        d = os.path.join(src, f"t{i % 50}")
        os.makedirs(d, exist_ok=True)
        _write(os.path.join(d, f"u{i}.dat"), _content(rng, rng.randint(0, 16384)))
    with tarfile.open(os.path.join(tmp, "untar.tar"), "w") as t:
        t.add(src, arcname="untar")
    shutil.rmtree(src)
    manifest["untar_files"] = nt

    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    subprocess.run(["sync"], check=True)
    _write(os.path.join(tmp, "DONE"), b"")
    os.rename(tmp, root)
    log(f"built in {time.monotonic() - t0:.0f}s: {len(files)} files in {len(dirs) - 1} dirs, "
        f"big file {big_size >> 20} MiB; top: {len(rewritten)} rewritten, {manifest['added']} added, "
        f"{len(whited)} whiteouts, {len(opaque)} opaque dirs")
    return root
