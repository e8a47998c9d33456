"""What a running mount leaves for other processes to find: its pid file, its entry in the
mount table, and the locks on its upper and workdir.

The daemon (mount.py) writes and removes these; `unionfs diff` and `unionfs mark`
(diffcmd.py) and `unionfs umount` read them. Only the standard library and config.py
are imported here, so a command that reads the run state never loads the daemon
(pyfuse3, trio).

Pid files are ``<rundir>/<major>:<minor>.pid``, keyed by the mount's device number,
so they work for read-only unions (no workdir) and stacked mounts alike::

    <pid> <starttime>        starttime from /proc/PID/stat ("-" if unknown)
    <mountpoint>
    upper=<upper>            (empty for a read-only union)
    workdir=<workdir>

A pid file is replaced atomically (rename(2)) and removed only by its owner: device
numbers get reused, so a file may already name another, newer mount.
"""
from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass

from .config import outer_uid, privileged

RUNDIR_ENV = "UNIONFS_RUNDIR"


# --------------------------------------------------------------------------
# The mount table
# --------------------------------------------------------------------------

@dataclass
class MountEntry:
    """One line of /proc/self/mountinfo (only the fields we use)."""

    devno: str        # "major:minor", unique among live mounts
    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_entries() -> list[MountEntry]:
    entries = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.rstrip("\n").partition(" - ")
            fields, tail = pre.split(), post.split()
            entries.append(MountEntry(fields[2], _unescape(fields[4]), tail[0], _unescape(tail[1])))
    return entries


def top_mount(path: str) -> MountEntry | None:
    """The mount visible at *path* (the last one stacked there), if any."""
    found = None
    for entry in mount_entries():
        if entry.mountpoint == path:
            found = entry
    return found


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------

#: (pid, starttime): a process, told apart from a later one given the same pid
Owner = tuple[int, "str | None"]


def _proc_state(pid: int) -> tuple[str, str] | None:
    """(state, starttime) of *pid*, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], fields[19]


def alive(pid: int, starttime: str | None) -> bool:
    """Running and the same process (start time guards against pid reuse); zombies count as gone."""
    state = _proc_state(pid)
    if state is None or state[0] in ("Z", "X"):
        return False
    return starttime is None or state[1] == starttime


def this_process() -> Owner:
    state = _proc_state(os.getpid())
    return os.getpid(), state[1] if state else None


# --------------------------------------------------------------------------
# Pid files
# --------------------------------------------------------------------------

def rundir() -> str:
    if RUNDIR_ENV in os.environ:
        return os.environ[RUNDIR_ENV]
    if privileged():
        return "/run/unionfs"
    return os.path.join(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/unionfs-{outer_uid()}", "unionfs")


def pidfile_path(devno: str) -> str:
    return os.path.join(rundir(), devno + ".pid")


@dataclass
class PidFile:
    """What a daemon's pid file says."""

    owner: Owner
    mountpoint: str
    upper: str | None = None      # None: not recorded (or a read-only union: "")
    workdir: str | None = None


def write_pidfile(devno: str, mountpoint: str, upper: str | None, workdir: str | None) -> str:
    """The pid file of this process, serving the mount *devno*; returns its path."""
    path = pidfile_path(devno)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    pid, start = this_process()
    tmp = f"{path}.{pid}"
    with open(tmp, "w") as f:
        f.write(f"{pid} {start or '-'}\n{mountpoint}\n")
        f.write(f"upper={upper or ''}\nworkdir={workdir or ''}\n")
    os.replace(tmp, path)
    return path


def _parse(text: str) -> PidFile:
    """ValueError (or IndexError) if *text* is not a pid file."""
    lines = text.splitlines()
    pid, start = lines[0].split()
    state = dict(line.split("=", 1) for line in lines[2:] if "=" in line)
    return PidFile((int(pid), None if start == "-" else start), lines[1] if len(lines) > 1 else "",
                   state.get("upper"), state.get("workdir"))


def _read(path: str) -> PidFile | None:
    try:
        with open(path) as f:
            return _parse(f.read())
    except (OSError, ValueError, IndexError):
        return None


def read_pidfile(devno: str) -> PidFile | None:
    """The pid file of mount *devno*, or None (none, or not readable)."""
    return _read(pidfile_path(devno))


def find_pidfile(workdir: str) -> PidFile | None:
    """The pid file of the live mount using *workdir*, if any."""
    try:
        names = os.listdir(rundir())
    except OSError:
        return None
    for name in names:
        pf = _read(os.path.join(rundir(), name))
        if pf is not None and pf.workdir == workdir:
            return pf
    return None


def remove_pidfile(devno: str, owner: Owner | None) -> None:
    """Remove mount *devno*'s pid file if *owner* wrote it (not a newer mount's); owner
    None: if it cannot be read."""
    pf = read_pidfile(devno)
    if (pf.owner if pf is not None else None) == owner:
        try:
            os.unlink(pidfile_path(devno))
        except OSError:
            pass


# --------------------------------------------------------------------------
# The in-use lock on the upper and the workdir
# --------------------------------------------------------------------------

def lock_dir(path: str, grace: float = 0.0) -> int | None:
    """An exclusive flock on directory *path*, held as long as the fd returned is open, the
    way kernel overlayfs refuses a second mount of a layer in use; None if another process
    holds it still after *grace* seconds."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    deadline = time.monotonic() + grace
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            os.close(fd)
            return None
