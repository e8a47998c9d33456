"""`unionfs diff` and `unionfs mark`: the command-line side of unionfs/diff.py.

Only argparse, the standard library and the small format and config modules are
imported at module level, so the CLI stays quick to start for its other commands.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Iterator

from . import format, runstate
from .config import FSTYPE, ConfigError, default_workdir, privileged, split_lowers
from .format import Format
from .workdir import CHANGES_CLEAN, path_of, recorded_format, recorded_lowers

MARK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# -- arguments ----------------------------------------------------------------------

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", metavar="DIR",
                   help="work directory of an unmounted union (default: .UPPER.unionfs-work beside UPPER)")
    p.add_argument("--lower", metavar="L1:L2",
                   help="lower layers, top-most first (default: those the last mount recorded)")


def add_diff(p: argparse.ArgumentParser) -> None:
    p.usage = ("unionfs diff [--json] [--stat] [--since MARK] [--rescan] [--lower L1:L2] "
               "[--workdir DIR] MOUNTPOINT|UPPER [PATH...]")
    p.add_argument("target", metavar="MOUNTPOINT|UPPER")
    p.add_argument("paths", nargs="*", metavar="PATH", help="only changes in these subtrees (view paths)")
    p.add_argument("--json", action="store_true", help="one JSON object per change, one per line")
    p.add_argument("--stat", action="store_true", help="counts and bytes by kind instead of the list")
    p.add_argument("--since", metavar="MARK", help="only what changed after `unionfs mark ... MARK`")
    p.add_argument("--rescan", action="store_true",
                   help="rebuild the changes log from the upper directory and diff from that")
    _common(p)


def add_mark(p: argparse.ArgumentParser) -> None:
    p.usage = "unionfs mark [--force] [--lower L1:L2] [--workdir DIR] MOUNTPOINT|UPPER [NAME]"
    p.add_argument("target", metavar="MOUNTPOINT|UPPER")
    p.add_argument("name", nargs="?", metavar="NAME", help="the mark to set (without: list the marks)")
    p.add_argument("--force", action="store_true", help="replace an existing mark of that name")
    _common(p)


# -- finding the union ----------------------------------------------------------------

@dataclass
class Target:
    upper: str
    workdir: str | None         # None: no workdir exists (never mounted)
    lowers: list[str]
    mounted: bool               # a live daemon holds the workdir
    lock_fd: int | None = None  # our lock on the workdir while it is not mounted
    mountpoint: str | None = None
    # the upper's format (format.py): as its mounts noted it in the workdir, else the one a
    # mount by this user would choose
    fmt: Format = format.OVERLAY

    def close(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def _mount_state(path: str) -> runstate.PidFile | None:
    """The pid file of the unionfs mounted at *path*, if one is."""
    entry = runstate.top_mount(path)
    if entry is None or entry.fstype != FSTYPE:
        return None
    state = runstate.read_pidfile(entry.devno)
    if state is None or state.upper is None:
        raise ConfigError(f"'{path}' is a unionfs mount but its daemon's state is missing; "
                          "give its UPPER (and --workdir) instead")
    if not state.upper:
        raise ConfigError(f"'{path}' is a read-only unionfs mount (no upper layer): nothing changes")
    return state


def locate(target: str, workdir: str | None, lower: str | None) -> Target:
    path = os.path.realpath(target)
    if not os.path.isdir(path):
        raise ConfigError(f"'{target}' is not a directory (give a MOUNTPOINT or an UPPER)")
    state = _mount_state(path)
    if state is not None:
        upper, work = state.upper, state.workdir or None
        if workdir and work and os.path.realpath(workdir) != work:
            raise ConfigError(f"'{target}' is mounted with workdir '{work}', not '{workdir}'")
    else:
        upper = path
        work = os.path.realpath(workdir) if workdir else default_workdir(path)
        if workdir and not os.path.isdir(work):
            raise ConfigError(f"workdir '{workdir}' is not a directory")
    if work is not None and not os.path.isdir(work):
        work = None
    if lower is not None:
        lowers = split_lowers(lower)
    elif work is not None and (recorded := recorded_lowers(work)) is not None:
        lowers = recorded
    else:
        raise ConfigError(f"no lower layers recorded for '{upper}' (never mounted?): give --lower L1:L2")
    for lw in lowers:
        if not os.path.isdir(lw):
            raise ConfigError(f"lower layer '{lw}' is not a directory")
    lowers = [os.path.realpath(lw) for lw in lowers]
    lock_fd = None
    mounted = False
    if work is not None:
        lock_fd = runstate.lock_dir(work)
        mounted = lock_fd is None
    recorded = recorded_format(work) if work is not None else None
    userxattr = recorded == format.USER if recorded is not None else not privileged()
    t = Target(upper, work, lowers, mounted, lock_fd, fmt=format.for_mount(userxattr, privileged()))
    if mounted:
        t.mountpoint = path if state is not None else _mountpoint_of(work)
        _flush(t.mountpoint)
    return t


def _mountpoint_of(workdir: str) -> str | None:
    """The mountpoint of the live mount using *workdir*, from the daemons' pid files."""
    state = runstate.find_pidfile(workdir)
    return state.mountpoint if state is not None else None


def _flush(mountpoint: str | None) -> None:
    """syncfs(2) the mount: with the kernel's writeback cache, written data and times may
    still be in the kernel; this sends them to the daemon, and so to the upper we read."""
    if mountpoint is None:
        return
    from . import syscalls

    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            syscalls.syncfs(fd)
    finally:
        os.close(fd)


# -- the log ------------------------------------------------------------------------------

@dataclass
class Candidates:
    paths: list[bytes]
    note: str | None      # why we had to rescan, if we had to


def candidates(t: Target, rescan: bool) -> Candidates:
    """Paths to look at: the log's, or (rescan) the upper's. A log that is missing, damaged
    or left by an unclean stop is rebuilt from the upper, and the note says so."""
    from . import changes
    from .diff import upper_candidates

    records = None
    note = None
    if t.workdir is None:
        note = "there is no changes log (no workdir)"
    else:
        try:
            records = changes.read_log(t.workdir)
            if records is None:
                note = "there is no changes log"
            elif not t.mounted and not changes.is_clean(t.workdir):
                note = "the last stop of the mount was not clean"
        except changes.LogDamaged as e:
            note = f"the changes log is damaged ({e})"
    if not rescan and note is None:
        assert records is not None
        paths = [r.path for r in records if r.path != changes.UNKNOWN_PATH]
        if len(paths) != len(records):  # a change at a path the daemon could not name
            paths += upper_candidates(t.upper, t.fmt)
        return Candidates(paths, None)
    paths = upper_candidates(t.upper, t.fmt)
    if t.workdir is not None:
        _write_back(t, records)
    return Candidates(paths, note)


def _write_back(t: Target, records) -> None:
    """Store what a rescan found: rewrite the log if no daemon owns it, else append to it."""
    from . import changes

    assert t.workdir is not None
    try:
        if not t.mounted:
            with changes.log_lock(t.workdir):
                changes.write_log(t.workdir, changes.rebuild(t.workdir, t.upper, t.fmt, records or ()))
                with open(path_of(t.workdir, CHANGES_CLEAN), "w") as f:
                    f.write("rebuilt by unionfs diff --rescan\n")
                changes.fsync_dir(t.workdir)
        elif records is not None:
            # the daemon owns the file: only add what it does not name yet (so repeated
            # rescans do not make it grow); its next compaction folds them in
            known = {r.path for r in records}
            changes.append_records(t.workdir, ((k, p) for k, p in changes.scan_upper(t.upper, t.fmt)
                                               if p not in known))
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        print(f"unionfs: warning: cannot update the changes log: {e.strerror}", file=sys.stderr)


@contextlib.contextmanager
def opened(args: argparse.Namespace) -> Iterator[Target]:
    t = locate(args.target, args.workdir, args.lower)
    try:
        yield t
    finally:
        t.close()


def open_layers(t: Target):
    from .diff import Layers

    try:
        return Layers(t.upper, t.lowers, t.fmt)
    except OSError as e:
        raise ConfigError(f"cannot open the layers: {e.filename or ''} {e.strerror}") from None


# -- output -------------------------------------------------------------------------------

def show_path(path: bytes) -> bytes:
    """Paths as they are, but control characters and backslash as \\xHH (one line each)."""
    if not any(b < 0x20 or b in (0x5C, 0x7F) for b in path):
        return path
    return b"".join(b"\\x%02x" % b if b < 0x20 or b in (0x5C, 0x7F) else bytes([b]) for b in path)


def stat_summary(changes) -> dict:
    out = {k: {"count": 0, "bytes": 0} for k in ("A", "C", "D", "total")}
    for c in changes:
        size = c.obj.report_size()
        for k in (c.kind, "total"):
            out[k]["count"] += 1
            out[k]["bytes"] += size
    return out


def run_diff(args: argparse.Namespace) -> int:
    from .diff import compute, load_mark, make_filter

    try:
        relevant, inside = make_filter(os.fsencode(p) for p in args.paths)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    with opened(args) as t:
        since = None
        if args.since is not None:
            if t.workdir is None or not MARK_NAME.match(args.since):
                raise ConfigError(f"no mark named '{args.since}'")
            try:
                since = load_mark(t.workdir, args.since)
            except FileNotFoundError:
                raise ConfigError(f"no mark named '{args.since}'") from None
            except (OSError, ValueError, KeyError) as e:
                raise ConfigError(f"mark '{args.since}' is damaged ({e})") from None
        cand = candidates(t, args.rescan)
        if cand.note:
            print(f"unionfs: note: {cand.note}; rebuilt it from the upper directory", file=sys.stderr)
        layers = open_layers(t)
        try:
            result = [c for c in compute(layers, cand.paths, relevant, since) if inside(c.path)]
        finally:
            layers.close()
    out = sys.stdout.buffer
    if args.stat:
        summary = stat_summary(result)
        if args.json:
            out.write(json.dumps(summary).encode() + b"\n")
        else:
            for k, label in (("A", "added"), ("C", "changed"), ("D", "deleted"), ("total", "total")):
                s = summary[k]
                out.write(b"%-8s %8d paths %14d bytes\n" % (label.encode(), s["count"], s["bytes"]))
    elif args.json:
        for c in result:
            out.write(json.dumps(c.to_json()).encode() + b"\n")
    else:
        for c in result:
            out.write(c.kind.encode() + b" " + show_path(c.path) + b"\n")
    out.flush()
    return 0


def run_mark(args: argparse.Namespace) -> int:
    from .diff import compute, list_marks, mark_path, save_mark

    if args.name is not None and not MARK_NAME.match(args.name):
        raise ConfigError(f"bad mark name '{args.name}' (letters, digits, '.', '_', '-'; "
                          "not starting with '.' or '-')")
    with opened(args) as t:
        if t.workdir is None:
            raise ConfigError(f"'{t.upper}' has no workdir (never mounted): nothing to mark")
        if args.name is None:
            import time
            for name, when, n in list_marks(t.workdir):
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
                print(f"{name}\t{stamp}\t{n} changes")
            return 0
        if os.path.exists(mark_path(t.workdir, args.name)) and not args.force:
            raise ConfigError(f"mark '{args.name}' exists (use --force to replace it)")
        cand = candidates(t, False)
        if cand.note:
            print(f"unionfs: note: {cand.note}; rebuilt it from the upper directory", file=sys.stderr)
        layers = open_layers(t)
        try:
            result = compute(layers, cand.paths)
            save_mark(t.workdir, args.name, result)
        finally:
            layers.close()
    return 0
