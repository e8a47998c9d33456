#!/usr/bin/env python3
"""How often the layers' filesystem is still busy right after a union is unmounted.

Each round mounts a tmpfs, puts lower/, upper/ and work/ in it, mounts a union of
them, makes a few changes (a copy-up, a new file, a removal, a new directory), then
runs, in one shell, `UNMOUNT MNT && umount TMPFS`, as scripts and container engines
do. A round is busy when `umount TMPFS` fails with EBUSY: something (the union's
daemon) still held a file on it after the unmount command returned. The same loop
runs for unionfs, fuse-overlayfs and kernel overlayfs, with each way of unmounting
that applies to it, and prints the busy rounds side by side. Counts, not times: on
a loaded machine a daemon's exit takes longer, so compare rows of one run only.

Usage (as root): scripts/bench_umount.py [--rounds N] [--impl NAME ...] [--method NAME ...] [--json]

`umount` goes through /sbin/umount.fuse.unionfs (scripts/setup installs it), which runs
/usr/local/sbin/unionfs (umount(8) clears PATH for its helpers). So that both are this
checkout's, whatever the machine's point at, the loop runs in a mount namespace of its
own (unshare(1)) where this checkout's helper and a `unionfs` for this interpreter are
bind-mounted over them; the mounts it makes stay in there.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: how each way of unmounting is spelt; {mnt} is the union's mountpoint
METHODS = {
    "umount": "umount {mnt}",
    "unionfs umount": "unionfs umount {mnt}",
    "umount -i": "umount -i {mnt}",
    "fusermount3 -u": "fusermount3 -u {mnt}",
}
IMPLS = ("unionfs", "fuse-overlayfs", "kernel")
HELPER = "/sbin/umount.fuse.unionfs"
COMMAND = "/usr/local/sbin/unionfs"
PRIVATE_ENV = "BENCH_UMOUNT_PRIVATE"   # set inside the namespace


def applies(impl: str, method: str) -> bool:
    if method == "unionfs umount":
        return impl == "unionfs"
    if method == "fusermount3 -u":
        return impl != "kernel"
    return True


def unionfs_wrapper(directory: str, python: str = sys.executable) -> str:
    """A `unionfs` command for *python* in *directory* (to put first on PATH), so the
    umount helper runs the unionfs under test, whichever checkout /usr/local/sbin's is."""
    path = os.path.join(directory, "unionfs")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nexec '{python}' -m unionfs \"$@\"\n")
    os.chmod(path, 0o755)
    return path


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def _populate(lower: str) -> None:
    os.makedirs(os.path.join(lower, "dir"))
    for name in ("a", "b", "dir/c"):
        with open(os.path.join(lower, name), "w") as f:
            f.write(name * 100)


def _change(mnt: str) -> None:
    with open(os.path.join(mnt, "a"), "a") as f:   # a copy-up
        f.write("more\n")
    with open(os.path.join(mnt, "new"), "w") as f:
        f.write("new\n")
    os.unlink(os.path.join(mnt, "b"))              # a whiteout
    os.mkdir(os.path.join(mnt, "dir/sub"))          # a copied-up parent


def _mount(impl: str, t: str, mnt: str, env: dict[str, str]) -> None:
    lower, upper, work = (os.path.join(t, d) for d in ("lower", "upper", "work"))
    if impl == "unionfs":
        cmd = ["unionfs", "mount", "--workdir", work, lower, upper, mnt]
    elif impl == "fuse-overlayfs":
        cmd = ["fuse-overlayfs", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", mnt]
    else:
        cmd = ["mount", "-t", "overlay", "overlay", "-o",
               f"lowerdir={lower},upperdir={upper},workdir={work}", mnt]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # (fuse-overlayfs' stderr is noise otherwise: "unknown argument ...")
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")


def _settle(t: str, mnt: str) -> None:
    """After a busy round: unmount what is left once its daemon let go (bounded)."""
    deadline = time.monotonic() + 30
    while _mounted(mnt) or _mounted(t):
        for path in (mnt, t):
            if _mounted(path):
                subprocess.run(["umount", "-i", path], stderr=subprocess.DEVNULL)
        if time.monotonic() > deadline:
            subprocess.run(["umount", "-l", mnt], stderr=subprocess.DEVNULL)
            subprocess.run(["umount", "-l", t], stderr=subprocess.DEVNULL)
            raise RuntimeError(f"{t} stayed busy for 30 s")
        time.sleep(0.01)


@contextlib.contextmanager
def workspace() -> Iterator[tuple[str, dict[str, str]]]:
    """A scratch directory and the environment the loop runs in (our `unionfs` first)."""
    base = tempfile.mkdtemp(prefix="bench-umount-")
    try:
        bindir = os.path.join(base, "bin")
        os.mkdir(bindir)
        unionfs_wrapper(bindir)
        # PYTHONMALLOC set: each `unionfs mount` starts one interpreter, not two (unionfs/launch.py)
        env = dict(os.environ, PYTHONMALLOC="malloc", PATH=bindir + ":" + os.environ.get(
            "PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"))
        yield base, env
    finally:
        for sub in ("mnt", "t"):
            path = os.path.join(base, sub)
            if _mounted(path):
                subprocess.run(["umount", "-l", path], stderr=subprocess.DEVNULL)
        shutil.rmtree(base, ignore_errors=True)


def busy_rounds(impl: str, method: str, rounds: int, base: str, env: dict[str, str]) -> int:
    """Rounds of `METHOD MNT && umount TMPFS` where the tmpfs was still busy."""
    t, mnt = os.path.join(base, "t"), os.path.join(base, "mnt")
    os.makedirs(t, exist_ok=True)
    os.makedirs(mnt, exist_ok=True)
    busy = 0
    for _ in range(rounds):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", t], check=True)
        try:
            for d in ("upper", "work"):
                os.mkdir(os.path.join(t, d))
            _populate(os.path.join(t, "lower"))
            _mount(impl, t, mnt, env)
            _change(mnt)
        except BaseException:
            _settle(t, mnt)
            raise
        script = f"{METHODS[method].format(mnt=mnt)} && umount {t}"
        proc = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            if _mounted(mnt) or "busy" not in proc.stderr:
                _settle(t, mnt)
                raise RuntimeError(f"{impl}, {method}: {script!r} failed: {proc.stderr.strip()}")
            busy += 1
            _settle(t, mnt)
    return busy


def private_namespace(argv: list[str], binds: dict[str, str]) -> list[str]:
    """*argv* run in a new mount namespace (nothing mounted in it propagates out) where
    each of *binds* (target: source) is bind-mounted first."""
    script = "".join(f'mount --bind "{src}" "{dst}" && ' for dst, src in binds.items())
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            script + 'exec "$@"', "sh", *argv]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--impl", action="append", choices=IMPLS)
    parser.add_argument("--method", action="append", choices=list(METHODS))
    parser.add_argument("--json", action="store_true", help="print {impl: {method: busy}}")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_umount: must run as root (it mounts)", file=sys.stderr)
        return 1
    impls, methods = args.impl or list(IMPLS), args.method or list(METHODS)
    if "fuse-overlayfs" in impls and shutil.which("fuse-overlayfs") is None:
        impls.remove("fuse-overlayfs")
    with workspace() as (base, env):
        if PRIVATE_ENV not in os.environ:
            for path in (HELPER, COMMAND):
                if not os.path.exists(path):
                    print(f"bench_umount: {path} is missing (run scripts/setup)", file=sys.stderr)
                    return 1
            binds = {HELPER: os.path.join(REPO, "scripts", "umount.fuse.unionfs"),
                     COMMAND: os.path.join(base, "bin", "unionfs")}
            argv = private_namespace([sys.executable, os.path.abspath(__file__), *sys.argv[1:]], binds)
            return subprocess.run(argv, env=dict(os.environ, **{PRIVATE_ENV: "1"})).returncode
        counts: dict[str, dict[str, int]] = {}
        if not args.json:
            print(f"busy rounds of `UNMOUNT MNT && umount TMPFS`, of {args.rounds} each")
            print(f"{'implementation':<16}" + "".join(f"{m:>16}" for m in methods))
        for impl in impls:
            counts[impl] = {m: busy_rounds(impl, m, args.rounds, base, env)
                            for m in methods if applies(impl, m)}
            if not args.json:
                print(f"{impl:<16}" + "".join(f"{counts[impl].get(m, '-'):>16}" for m in methods),
                      flush=True)
    if args.json:
        print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
