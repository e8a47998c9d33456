#!/usr/bin/env python3
"""Benchmark unionfs against kernel overlayfs and fuse-overlayfs.

Run as root (mounts, drop_caches). Builds its data once (scripts/bench_data.py,
cached under --cache-dir), then for every workload, mode (cold/warm),
repetition and implementation mounts the same read-only lower layers with a
fresh upper and workdir, times the workload and unmounts. Implementations are
interleaved (in a rotating order) so that drift on the machine hits them all.

    cold: fresh mount, sync, echo 3 > /proc/sys/vm/drop_caches, time
    warm: fresh mount, run once (or, for workloads that change the tree, read
          what they will touch), sync, time

Examples:

    sudo .venv/bin/python scripts/bench.py --scale 0.1
    sudo .venv/bin/python scripts/bench.py --repeat 3 --json /tmp/bench.json
    sudo .venv/bin/python scripts/bench.py --only find,tar --impl unionfs --profile /tmp/prof

Two unionfs installs side by side (each --unionfs-as adds an implementation
unionfs@NAME run by COMMAND, compared in the table with the first of them):

    sudo .venv/bin/python scripts/bench.py --impl fuse-overlayfs \
        --unionfs-as setup=".venv/bin/python -m unionfs" --unionfs-as pip="/tmp/v/bin/unionfs"

The same unionfs with mount options (each --unionfs-with adds unionfs@NAME, mounted with
-o OPTIONS):

    sudo .venv/bin/python scripts/bench.py --unionfs-with all=passthrough=all

Everything it mounted is unmounted on exit, Ctrl-C and errors included.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_data  # noqa: E402
import fusetrace  # noqa: E402

IMPLS = ("kernel", "fuse-overlayfs", "unionfs")
SHORT = {"kernel": "kernel", "fuse-overlayfs": "fuse-ovl", "unionfs": "unionfs"}


def is_unionfs(impl: str) -> bool:
    """unionfs itself or a named install of it (unionfs@NAME, --unionfs-as)."""
    return impl == "unionfs" or impl.startswith("unionfs@")


def sh(*cmd: str, quiet: bool = True) -> None:
    """Run a workload command in its own process group, all of which dies if we are interrupted."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL if quiet else None, start_new_session=True)
    try:
        rc = p.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise
    if rc:
        raise subprocess.CalledProcessError(rc, cmd)


def sh_quiet(*cmd: str, env: dict | None = None) -> None:
    """Run a (u)mount command; its stderr is shown only if it fails."""
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    if p.returncode:
        sys.stderr.write(p.stderr)
        raise subprocess.CalledProcessError(p.returncode, cmd)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# -- mounts ---------------------------------------------------------------------------------

def mountpoints() -> set[str]:
    out = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            out.add(mp.encode().decode("unicode_escape"))
    return out


@dataclass
class Impl:
    name: str
    unionfs_cmd: list[str]
    rundir: str  # UNIONFS_RUNDIR for our unionfs daemons, away from other mounts' pid files
    options: str = ""  # mount options for unionfs (-o), from --unionfs-with

    @property
    def env(self) -> dict:
        return dict(os.environ, UNIONFS_RUNDIR=self.rundir)

    def mount(self, lowers: list[str], upper: str, work: str, mnt: str) -> None:
        low = ":".join(lowers)
        if self.name == "kernel":
            sh_quiet("mount", "-t", "overlay", "overlay", "-o",
                     f"lowerdir={low},upperdir={upper},workdir={work}", mnt)
        elif self.name == "fuse-overlayfs":
            sh_quiet("fuse-overlayfs", "-o", f"lowerdir={low},upperdir={upper},workdir={work}", mnt)
        else:
            opts = ["-o", self.options] if self.options else []
            sh_quiet(*self.unionfs_cmd, "mount", "--workdir", work, *opts, low, upper, mnt, env=self.env)
        if mnt not in mountpoints():
            raise RuntimeError(f"{self.name}: {mnt} is not mounted")

    def umount(self, mnt: str) -> None:
        if self.name == "kernel":
            sh_quiet("umount", mnt)
        elif self.name == "fuse-overlayfs":
            sh_quiet("fusermount3", "-u", mnt)
        else:
            sh_quiet(*self.unionfs_cmd, "umount", mnt, env=self.env)

    def daemon_pid(self, mnt: str) -> int | None:
        """The unionfs daemon serving *mnt* (from its pid file), for CPU accounting and profiling."""
        if not is_unionfs(self.name):
            return None
        st = os.stat(mnt)
        try:
            with open(os.path.join(self.rundir, f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}.pid")) as f:
                return int(f.readline().split()[0])
        except (OSError, ValueError, IndexError):
            return None


def cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class Mounts:
    """Every mount made here, so that all of them go away whatever happens."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.live: dict[str, Impl] = {}

    def mount(self, impl: Impl, lowers: list[str], upper: str, work: str, mnt: str) -> None:
        self.live[mnt] = impl
        impl.mount(lowers, upper, work, mnt)

    def umount(self, mnt: str) -> None:
        impl = self.live.pop(mnt)
        if mnt not in mountpoints():
            return
        for attempt in range(20):
            try:
                impl.umount(mnt)
                return
            except subprocess.CalledProcessError:
                time.sleep(0.25)
        subprocess.run(["umount", "-l", mnt])

    def cleanup(self) -> None:
        for mnt in list(self.live):
            with contextlib.suppress(Exception):
                self.umount(mnt)
        # anything under our run directory still in the mount table (e.g. a mount
        # that failed half-way) is detached lazily
        for mp in sorted(mountpoints(), reverse=True):
            if mp.startswith(self.root + "/"):
                subprocess.run(["umount", "-l", mp], stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def fresh_fs(mnt: str, size_gib: int):
    """A new ext4 (journal and all, as mkfs makes it) mounted at *mnt* for the run's uppers.

    The host's filesystem carries every earlier run's deletions: here (ext4 without a
    journal) mass deletes slowed later inode allocation several-fold between runs, and
    the drift swamped the ratios. The image is sparse, on the host filesystem, attached
    with direct I/O so its pages are not cached twice; it goes away with the run."""
    img = mnt + ".img"
    with open(img, "wb") as f:
        f.truncate(size_gib << 30)
    dev = None
    try:
        dev = subprocess.run(["losetup", "--direct-io=on", "--find", "--show", img], check=True,
                             capture_output=True, text=True).stdout.strip()
        sh_quiet("mkfs.ext4", "-q", "-F", dev)
        os.makedirs(mnt, exist_ok=True)
        sh_quiet("mount", dev, mnt)
        yield
    finally:
        if mnt in mountpoints():
            if subprocess.run(["umount", mnt], stderr=subprocess.DEVNULL).returncode:
                subprocess.run(["umount", "-l", mnt])
        if dev:
            subprocess.run(["losetup", "-d", dev], stderr=subprocess.DEVNULL)
        os.unlink(img)


# -- workloads ---------------------------------------------------------------------------------

@dataclass
class Ctx:
    data: str
    manifest: dict
    scale: float


@dataclass
class Workload:
    name: str
    desc: str
    run: Callable[[str, Ctx, int], None]          # (mnt, ctx, variant)
    warm: Callable[[str, Ctx], None] | None = None  # None: run(variant 0) warms
    changes: bool = False


def w_find(mnt: str, c: Ctx, v: int) -> None:
    sh("find", mnt, "-printf", "%s\n")


def w_ls(mnt: str, c: Ctx, v: int) -> None:
    sh("ls", "-laR", mnt)


def w_tar(mnt: str, c: Ctx, v: int) -> None:
    # to a pipe: GNU tar writing to /dev/null itself would not read the files
    sh("bash", "-c", 'set -o pipefail; tar -C "$1" -cf - --exclude=./big . | cat >/dev/null', "-", mnt)


def w_seqread(mnt: str, c: Ctx, v: int) -> None:
    sh("dd", f"if={mnt}/{c.manifest['big']}", "of=/dev/null", "bs=1M", "status=none")


def w_randread(mnt: str, c: Ctx, v: int) -> None:
    rng = random.Random(4096)  # the same blocks every time: warm means they are cached
    blocks = c.manifest["big_size"] // 4096
    fd = os.open(f"{mnt}/{c.manifest['big']}", os.O_RDONLY)
    try:
        for _ in range(bench_data.n(20000, c.scale)):
            os.pread(fd, 4096, rng.randrange(blocks) * 4096)
    finally:
        os.close(fd)


def w_create(mnt: str, c: Ctx, v: int) -> None:
    buf = b"c" * 4096
    top = f"{mnt}/created{v}"
    os.mkdir(top)
    total = bench_data.n(10000, c.scale)
    for i in range(total):
        d = f"{top}/s{i // 100}"
        if i % 100 == 0:
            os.mkdir(d)
        with open(f"{d}/c{i}", "wb") as f:
            f.write(buf)


def _read_all(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass


def w_append(mnt: str, c: Ctx, v: int) -> None:
    for p in c.manifest["append"]:
        with open(f"{mnt}/{p}", "ab") as f:
            f.write(b"x")


def warm_append(mnt: str, c: Ctx) -> None:
    _read_all([f"{mnt}/{p}" for p in c.manifest["append"]])


def w_bigappend(mnt: str, c: Ctx, v: int) -> None:
    with open(f"{mnt}/{c.manifest['big']}", "ab") as f:
        f.write(b"x")


def warm_big(mnt: str, c: Ctx) -> None:
    w_seqread(mnt, c, 0)


def w_rm(mnt: str, c: Ctx, v: int) -> None:
    sh("rm", "-rf", *[f"{mnt}/{d}" for d in c.manifest["rm_dirs"]])


def warm_rm(mnt: str, c: Ctx) -> None:
    sh("find", *[f"{mnt}/{d}" for d in c.manifest["rm_dirs"]], "-printf", "%s\n")


def w_untar(mnt: str, c: Ctx, v: int) -> None:
    d = f"{mnt}/untar{v}"
    os.mkdir(d)
    sh("tar", "-C", d, "-xf", f"{c.data}/untar.tar")


def w_mix(mnt: str, c: Ctx, v: int) -> None:
    paths = c.manifest["mix"]
    k = len(paths) // 5 or 1
    for p in paths[0:k]:
        os.chmod(f"{mnt}/{p}", 0o600)
    for p in paths[k:2 * k]:
        os.chown(f"{mnt}/{p}", 1000, 1000)
    for p in paths[2 * k:3 * k]:
        os.rename(f"{mnt}/{p}", f"{mnt}/{p}.renamed")
    for p in paths[3 * k:4 * k]:
        os.symlink(os.path.basename(p), f"{mnt}/{p}.sym")
    for p in paths[4 * k:]:
        os.link(f"{mnt}/{p}", f"{mnt}/{p}.link")


def warm_mix(mnt: str, c: Ctx) -> None:
    _read_all([f"{mnt}/{p}" for p in c.manifest["mix"]])


WORKLOADS = [
    Workload("find", "find -printf '%s' over the whole tree", w_find),
    Workload("ls-laR", "ls -laR over the whole tree", w_ls),
    Workload("tar", "tar c of all small files to a pipe", w_tar),
    Workload("seqread", "sequential read of the big file (dd bs=1M)", w_seqread),
    Workload("randread", "20,000 random 4 KiB preads in the big file", w_randread),
    Workload("create", "create 10,000 4 KiB files (100 dirs)", w_create, changes=True),
    Workload("append", "append 1 byte to 1,000 lower files (copy-up)", w_append, warm_append, True),
    Workload("bigappend", "append 1 byte to the big lower file (copy-up)", w_bigappend, warm_big, True),
    Workload("rm", "rm -rf of ~5,000 lower files", w_rm, warm_rm, True),
    Workload("untar", "tar x of 5,000 files", w_untar, changes=True),
    Workload("mix", "chmod/chown/rename/symlink/link, 1,000 lower files", w_mix, warm_mix, True),
]


# -- running ----------------------------------------------------------------------------------

@dataclass
class Runner:
    ctx: Ctx
    mounts: Mounts
    run_root: str
    profile_dir: str | None
    profile_args: list[str] = field(default_factory=list)
    lowers: list[str] = field(default_factory=list)
    seq: int = 0
    trace: bool = False  # --requests: count the FUSE requests of each timed run
    requests: dict[str, int] | None = None  # those of the last run

    def _fresh(self, impl: Impl) -> tuple[str, str, str]:
        self.seq += 1
        base = f"{self.run_root}/{impl.name}-{self.seq}"
        upper, work, mnt = f"{base}/upper", f"{base}/work", f"{base}/mnt"
        for d in (upper, work, mnt):
            os.makedirs(d)
        return base, upper, work, mnt

    @contextlib.contextmanager
    def mounted(self, impl: Impl, defer_rm: bool = True):
        """A fresh upper, mounted. Its removal waits for the end of the run unless it is
        big (*defer_rm* False): on ext4 the inode allocator skips recently freed inodes
        at a cost, so deleting thousands of files just before the next run's creates
        would slow that run down (more for some implementations than for others)."""
        base, upper, work, mnt = self._fresh(impl)
        try:
            self.mounts.mount(impl, self.lowers, upper, work, mnt)
            yield mnt
        finally:
            if mnt in self.mounts.live:
                self.mounts.umount(mnt)
            if not defer_rm:
                shutil.rmtree(base, ignore_errors=True)

    def once(self, impl: Impl, wl: Workload, mode: str, tag: str) -> tuple[float, float | None]:
        with self.mounted(impl, defer_rm=wl.name != "bigappend") as mnt:
            if mode == "warm":
                if wl.warm:
                    wl.warm(mnt, self.ctx)
                else:
                    wl.run(mnt, self.ctx, 0)
                os.sync()
            else:
                drop_caches()
            pid = impl.daemon_pid(mnt)
            prof = None
            if self.profile_dir and pid:
                prof = subprocess.Popen(
                    ["py-spy", "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--idle",
                     "-o", f"{self.profile_dir}/{wl.name}-{mode}-{tag}.txt", *self.profile_args],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)  # let it attach
            inst = fusetrace.start(conn=fusetrace.connection(mnt)) if self.trace and impl.name != "kernel" else None
            cpu0 = cpu_seconds(pid)
            t0 = time.perf_counter()
            try:
                wl.run(mnt, self.ctx, 1)
            finally:
                dt = time.perf_counter() - t0
                cpu1 = cpu_seconds(pid)
                if inst:
                    lines = fusetrace.stop(inst)
                    if fusetrace.overflowed(lines):
                        print(f"WARNING: {wl.name} {mode} {impl.name}: the trace buffer overflowed",
                              file=sys.stderr)
                    self.requests = fusetrace.parse(lines)[1]
                if prof:
                    prof.send_signal(signal.SIGINT)
                    prof.wait()
            cpu = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None
            return dt, cpu

    def reference_copy(self, mode: str) -> float:
        """cp --reflink=auto of the big file on the filesystem the uppers live on."""
        src = f"{self.ctx.data}/bottom/{self.ctx.manifest['big']}"
        dst = f"{self.run_root}/refcopy.bin"
        try:
            if mode == "warm":
                sh("cat", src)
                os.sync()
            else:
                drop_caches()
            t0 = time.perf_counter()
            sh("cp", "--reflink=auto", src, dst)
            return time.perf_counter() - t0
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dst)

    def listing(self, impl: Impl) -> list[str]:
        with self.mounted(impl) as mnt:
            out = subprocess.run(["find", mnt, "-printf", "%P %y %s %m\n"], check=True,
                                 capture_output=True, text=True).stdout
        return sorted(out.splitlines())


def fmt(t: float | None) -> str:
    if t is None:
        return "-"
    if t >= 100:
        return f"{t:.0f}"
    if t >= 10:
        return f"{t:.1f}"
    if t >= 1:
        return f"{t:.2f}"
    return f"{t:.3f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "-"
    r = a / b
    return f"{r:.0f}x" if r >= 100 else f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def table(res: dict, impls: list[str], cpu: dict, ref: dict) -> str:
    cols = ["workload", "mode"] + [f"{SHORT.get(i, i)} s" for i in impls]
    have_k, have_f, have_u = "kernel" in impls, "fuse-overlayfs" in impls, "unionfs" in impls
    installs = [i for i in impls if i.startswith("unionfs@")]
    if not have_u and installs:  # the first named install stands for unionfs in the ratios
        have_u = True
    first = "unionfs" if "unionfs" in impls else installs[0] if installs else None
    others = [i for i in impls if is_unionfs(i) and i != first]
    if have_k and have_f:
        cols.append("fuse-ovl/kernel")
    if have_u and have_k:
        cols.append(f"{first}/kernel")
    if have_u and have_f:
        cols.append(f"{first}/fuse-ovl")
    for i in others:
        cols.append(f"{i}/{first}")
    for i in impls:
        if is_unionfs(i):
            cols.append(f"{i} daemon CPU")
    rows = []
    for wl in res:
        for mode in res[wl]:
            med = {i: statistics.median(res[wl][mode][i]) if res[wl][mode].get(i) else None for i in impls}
            if all(v is None for v in med.values()):
                continue
            row = [wl, mode] + [fmt(med[i]) for i in impls]
            if have_k and have_f:
                row.append(ratio(med["fuse-overlayfs"], med["kernel"]))
            if have_u and have_k:
                row.append(ratio(med[first], med["kernel"]))
            if have_u and have_f:
                row.append(ratio(med[first], med["fuse-overlayfs"]))
            for i in others:
                row.append(ratio(med[i], med[first]))
            for i in impls:
                if is_unionfs(i):
                    c = cpu.get(wl, {}).get(mode, {}).get(i)
                    row.append(f"{100 * statistics.median(c):.0f}%" if c else "-")
            rows.append(row)
    for mode, ts in ref.items():
        rows.append(["ref: cp --reflink=auto big file", mode] + [fmt(statistics.median(ts))] +
                    ["" for _ in cols[3:]])
    widths = [max(len(str(r[k])) for r in rows + [cols]) for k in range(len(cols))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c).ljust(w) if k < 2 else str(c).rjust(w)
                                        for k, (c, w) in enumerate(zip(r, widths))) + " |")
    return "\n".join(lines)


def request_table(reqs: dict, impls: list[str]) -> str:
    """Per workload and mode: each implementation's requests in all, and by opcode (the
    opcodes any of them got, most first), medians over the runs."""
    def med(runs: list[dict[str, int]], op: str | None) -> int:
        return round(statistics.median(sum(r.values()) if op is None else r.get(op, 0) for r in runs))
    cols = ["workload", "mode"] + [f"{SHORT.get(i, i)} requests" for i in impls]
    cols += [f"{SHORT.get(i, i)}/{SHORT.get(impls[0], impls[0])}" for i in impls[1:]]
    cols.append("by opcode (" + " / ".join(SHORT.get(i, i) for i in impls) + ")")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if k < 2 else "---:" if k < len(cols) - 1
                                                           else "---" for k in range(len(cols))) + "|"]
    for wl, modes in reqs.items():
        for mode, by_impl in modes.items():
            if not all(by_impl.get(i) for i in impls):
                continue
            ops: dict[str, int] = {}
            for i in impls:
                for op in set().union(*by_impl[i]):
                    ops[op] = max(ops.get(op, 0), med(by_impl[i], op))
            totals = [med(by_impl[i], None) for i in impls]
            row = [wl, mode] + [f"{t:,}" for t in totals]
            row += [f"{t / totals[0]:.2f}x" if totals[0] else "-" for t in totals[1:]]
            row.append(", ".join(f"{op.removeprefix('FUSE_')} " + "/".join(f"{med(by_impl[i], op):,}" for i in impls)
                                 for op in sorted(ops, key=lambda o: -ops[o])))
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def machine() -> dict:
    mem = ""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    fo = subprocess.run(["fuse-overlayfs", "--version"], capture_output=True, text=True)
    return {"nproc": os.cpu_count(), "memory": mem, "kernel": platform.release(), "cpu": cpu,
            "python": platform.python_version(),
            "fuse-overlayfs": next((l for l in (fo.stdout + fo.stderr).splitlines() if l.startswith("fuse-overlayfs")), "?")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/unionfs-bench"))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply file counts and big file size")
    ap.add_argument("--repeat", type=int, default=1, help="repetitions (medians are reported)")
    ap.add_argument("--only", help="comma-separated workloads: " + ",".join(w.name for w in WORKLOADS))
    ap.add_argument("--impl", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    ap.add_argument("--mode", default="cold,warm", help="cold, warm or both")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--no-check", action="store_true", help="skip comparing the mounted trees first")
    ap.add_argument("--no-reference", action="store_true", help="skip the cp --reflink reference")
    ap.add_argument("--profile", metavar="DIR",
                    help="record py-spy (raw/collapsed) profiles of the unionfs daemon's timed runs")
    ap.add_argument("--profile-args", default="", help="extra py-spy record arguments, e.g. --native")
    ap.add_argument("--unionfs", default=None, help="command for unionfs (default: this python -m unionfs)")
    ap.add_argument("--unionfs-as", action="append", default=[], metavar="NAME=COMMAND",
                    help="also run the unionfs install COMMAND as implementation unionfs@NAME "
                         "(repeatable: installs side by side, interleaved like the others)")
    ap.add_argument("--unionfs-with", action="append", default=[], metavar="NAME=OPTIONS",
                    help="also run unionfs mounted with -o OPTIONS as implementation unionfs@NAME "
                         "(repeatable), e.g. all=passthrough=all")
    ap.add_argument("--requests", action="store_true",
                    help="also count the FUSE requests of each timed run (fusetrace) and print "
                         "them per workload, unionfs against fuse-overlayfs")
    ap.add_argument("--upper-fs", choices=("fresh", "host"), default="fresh",
                    help="fresh: uppers on a new ext4 made for the run (default); host: on --cache-dir's filesystem")
    args = ap.parse_args()

    if os.geteuid() != 0:
        ap.error("must run as root")
    impls = [i for i in args.impl.split(",") if i]
    for i in impls:
        if i not in IMPLS:
            ap.error(f"unknown implementation {i!r}")
    installs: dict[str, list[str]] = {}
    for spec in args.unionfs_as:
        name, sep, command = spec.partition("=")
        if not sep or not name or not command.split():
            ap.error(f"--unionfs-as wants NAME=COMMAND, not {spec!r}")
        installs[f"unionfs@{name}"] = command.split()
    options: dict[str, str] = {}
    for spec in args.unionfs_with:
        name, sep, opts = spec.partition("=")
        if not sep or not name or not opts:
            ap.error(f"--unionfs-with wants NAME=OPTIONS, not {spec!r}")
        options[f"unionfs@{name}"] = opts
    impls += list(installs) + [i for i in options if i not in installs]
    wls = WORKLOADS
    if args.only:
        names = args.only.split(",")
        bad = [x for x in names if x not in {w.name for w in WORKLOADS}]
        if bad:
            ap.error(f"unknown workload(s) {bad}")
        wls = [w for w in WORKLOADS if w.name in names]
    modes = [m for m in args.mode.split(",") if m]
    unionfs_cmd = args.unionfs.split() if args.unionfs else [sys.executable, "-m", "unionfs"]

    data = bench_data.build(args.cache_dir, args.scale)
    with open(f"{data}/manifest.json") as f:
        manifest = json.load(f)
    run_root = os.path.join(args.cache_dir, f"run-{os.getpid()}")
    os.makedirs(run_root)
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, run_root, True)
        if args.upper_fs == "fresh":
            # sized for bigappend's copies (deleted at once) and the small uppers kept to the end
            stack.enter_context(fresh_fs(run_root, 64))
        return run(args, wls, impls, modes, unionfs_cmd, installs, options, data, manifest, run_root)


def run(args: argparse.Namespace, wls: list[Workload], impls: list[str], modes: list[str],
        unionfs_cmd: list[str], installs: dict[str, list[str]], options: dict[str, str], data: str,
        manifest: dict, run_root: str) -> int:
    """Every repetition, workload, mode and implementation, then the table (and JSON)."""
    ctx = Ctx(data, manifest, args.scale)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    mounts = Mounts(run_root)
    runner = Runner(ctx, mounts, run_root, args.profile, args.profile_args.split(),
                    lowers=[f"{data}/top", f"{data}/bottom"], trace=args.requests)
    if args.requests:
        fusetrace._setup()
    def interrupt(*_a) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
    interrupted = False
    os.makedirs(f"{run_root}/rundir")
    objs = {i: Impl(i, installs.get(i, unionfs_cmd), f"{run_root}/rundir", options.get(i, ""))
            for i in impls}
    res: dict = {w.name: {m: {i: [] for i in impls} for m in modes} for w in wls}
    cpu: dict = {w.name: {m: {i: [] for i in impls} for m in modes} for w in wls}
    reqs: dict = {w.name: {m: {i: [] for i in impls} for m in modes} for w in wls}
    ref: dict = {}
    mach = machine()
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"# {started:%Y-%m-%d %H:%M} UTC, nproc {mach['nproc']}, {mach['memory']}, "
          f"kernel {mach['kernel']}, {mach['fuse-overlayfs']}")
    for i in impls:
        if is_unionfs(i):
            version = subprocess.run([*objs[i].unionfs_cmd, "--version"], capture_output=True,
                                     text=True, env=objs[i].env).stdout.strip().replace("\n", "; ")
            print(f"# {i}: {' '.join(objs[i].unionfs_cmd)}: {version}")
    print(f"# data {data}: {manifest['bottom_files']} files in {manifest['dirs']} dirs + "
          f"{manifest['big_size'] >> 20} MiB; union shows {manifest['visible_files']} small files")
    try:
        if not args.no_check:
            views = {i: runner.listing(objs[i]) for i in impls}
            base = views[impls[0]]
            nfiles = sum(1 for line in base if " f " in line and not line.startswith("big/"))
            print(f"# check: {impls[0]} shows {len(base)} entries, {nfiles} small files "
                  f"(expected {manifest['visible_files']})")
            for i in impls[1:]:
                diff = set(views[i]) ^ set(base)
                print(f"# check: {i} vs {impls[0]}: {len(diff)} differing entries"
                      + (f", e.g. {sorted(diff)[:4]}" if diff else ""))
        for rep in range(args.repeat):
            order = impls[rep % len(impls):] + impls[:rep % len(impls)]
            for wl in wls:
                for mode in modes:
                    for i in order:
                        runner.requests = None
                        dt, c = runner.once(objs[i], wl, mode, f"r{rep}")
                        res[wl.name][mode][i].append(dt)
                        if runner.requests is not None:
                            reqs[wl.name][mode][i].append(runner.requests)
                        if c is not None:
                            cpu[wl.name][mode][i].append(c / dt)
                        print(f"rep {rep + 1}/{args.repeat} {wl.name:10} {mode:4} {i:15} {dt:8.3f}s"
                              + (f"  (daemon CPU {c:.2f}s)" if c is not None else ""), flush=True)
                if wl.name == "bigappend" and not args.no_reference:
                    for mode in modes:
                        dt = runner.reference_copy(mode)
                        ref.setdefault(mode, []).append(dt)
                        print(f"rep {rep + 1}/{args.repeat} {'cp-reflink':10} {mode:4} {'reference':15} "
                              f"{dt:8.3f}s", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: unmounting, then the results so far", file=sys.stderr)
    finally:
        mounts.cleanup()
        left = [m for m in mountpoints() if m.startswith(run_root + "/")]
        if left:
            print(f"WARNING: still mounted: {left}", file=sys.stderr)

    print()
    print(("PARTIAL (interrupted) " if interrupted else "") + f"Medians of {args.repeat} run(s), seconds; scale {args.scale:g}; "
          f"{started:%Y-%m-%d} UTC; nproc {mach['nproc']}, {mach['memory']}, kernel {mach['kernel']}")
    print()
    print(table(res, impls, cpu, ref))
    if args.requests:
        print()
        print(f"FUSE requests per timed run (medians of {args.repeat}), by opcode")
        print()
        print(request_table(reqs, [i for i in impls if i != "kernel"]))
    if args.json:
        out = {"date": started.isoformat(), "interrupted": interrupted, "machine": mach, "scale": args.scale, "repeat": args.repeat,
               "manifest": {k: v for k, v in manifest.items() if not isinstance(v, list)},
               "workloads": {w.name: w.desc for w in wls},
               "times": res, "unionfs_daemon_cpu_fraction": cpu, "requests": reqs, "reference_cp_reflink": ref,
               "medians": {w: {m: {i: statistics.median(v) if v else None for i, v in d.items()}
                               for m, d in md.items()} for w, md in res.items()}}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"\nwrote {args.json}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
