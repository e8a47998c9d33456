"""Mount helpers shared by the tests: real mounts, always cleaned up.

Every helper is a context manager whose exit unmounts even when the body
raised, falling back to a lazy unmount so a wedged FUSE daemon never leaves a
mount behind to hang later tests.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from typing import Iterator, Sequence


def is_mounted(path: str) -> bool:
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            if line.split()[4] == path:
                return True
    return False


def force_unmount(path: str) -> None:
    """Best-effort unmount of whatever is at *path* (FUSE or not)."""
    for cmd in (["fusermount3", "-u", "-q", path], ["umount", path], ["umount", "-l", path]):
        if not is_mounted(path):
            return
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while is_mounted(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def unionfs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "unionfs", *args]


@contextlib.contextmanager
def _overlay(opts: str, mnt: str) -> Iterator[str]:
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, mnt], check=True)
    try:
        yield mnt
    finally:
        force_unmount(mnt)


def kernel_overlay(lowers: Sequence[str], upper: str, work: str, mnt: str,
                   extra: str = "redirect_dir=on,index=on") -> contextlib.AbstractContextManager[str]:
    opts = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}"
    return _overlay(opts + "," + extra if extra else opts, mnt)


@contextlib.contextmanager
def fuse_overlayfs(lowers: Sequence[str], upper: str, work: str, mnt: str) -> Iterator[str]:
    """Debian's fuse-overlayfs over the same layers: the peer, where unionfs follows it
    rather than the kernel."""
    subprocess.run(["fuse-overlayfs", "-o", f"lowerdir={':'.join(lowers)},upperdir={upper},"
                    f"workdir={work}", mnt], check=True, capture_output=True, timeout=60)
    try:
        yield mnt
    finally:
        force_unmount(mnt)


def kernel_view(layers: Sequence[str], mnt: str) -> contextlib.AbstractContextManager[str]:
    """Kernel overlayfs's read-only view of *layers* (top-most first), e.g. a unionfs upper
    above its lowers: what the format means, read by the kernel rather than by unionfs.
    Mounted fresh on each use, so nothing the kernel cached predates the layers' state."""
    return _overlay(f"ro,lowerdir={':'.join(layers)},redirect_dir=follow", mnt)


@contextlib.contextmanager
def unionfs_mount(lowers: Sequence[str], upper: str | None, mnt: str, workdir: str | None = None,
                  options: Sequence[str] = (), wrapper: Sequence[str] = ()) -> Iterator[str]:
    """Mount with the real CLI (daemonising form) and unmount with `unionfs umount`.
    *wrapper* runs the mount (and so the daemon) under a command, e.g. setpriv."""
    args = ["mount"]
    if workdir:
        args += ["--workdir", workdir]
    if options:
        args += ["-o", ",".join(options)]
    args += [":".join(lowers)]
    if upper is not None:
        args += [upper]
    args += [mnt]
    proc = subprocess.run([*wrapper, *unionfs_cmd(*args)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        force_unmount(mnt)
        raise RuntimeError(f"unionfs mount failed ({proc.returncode}): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(unionfs_cmd("umount", mnt), capture_output=True, timeout=60)
        force_unmount(mnt)


def pid_gone(pid: int) -> bool:
    """True once *pid* has exited (a zombie nobody reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def daemon_pids(mnt: str) -> list[int]:
    """Live unionfs daemons serving *mnt*, found by command line (not by pid file)."""
    mnt = os.path.realpath(mnt)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = [os.fsdecode(a) for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if (any(os.path.basename(a) == "unionfs" for a in args) and "umount" not in args
                and any(a.startswith("/") and os.path.realpath(a) == mnt for a in args)
                and not pid_gone(int(entry))):
            pids.append(int(entry))
    return pids


def daemon_pid(mnt: str) -> int:
    """The daemon serving *mnt*, from its pid file (RUNDIR/MAJOR:MINOR.pid), checked against
    the live daemons found by command line."""
    from unionfs.runstate import rundir, top_mount
    entry = top_mount(os.path.realpath(mnt))
    assert entry is not None, f"{mnt} is not mounted"
    with open(os.path.join(rundir(), entry.devno + ".pid")) as f:
        pid = int(f.readline().split()[0])
    assert pid in daemon_pids(mnt), f"pid file says {pid}, daemons are {daemon_pids(mnt)}"
    return pid


def wait_daemon_gone(pid: int, deadline: float = 60.0) -> None:
    """After an unmount: fail (saying where the daemon is stuck) unless it exits in time.
    `unionfs umount` waits for it, but the helpers above ignore a failed umount."""
    end = time.monotonic() + deadline
    while not pid_gone(pid):
        if time.monotonic() > end:
            where = ""
            for name in ("wchan", "stack", "status"):
                try:
                    with open(f"/proc/{pid}/{name}") as f:
                        where += f"\n{name}: {f.read()[:2000]}"
                except OSError:
                    pass
            raise AssertionError(f"daemon {pid} still runs {deadline:.0f}s after its unmount:{where}")
        time.sleep(0.05)
