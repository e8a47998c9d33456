"""The changes log: which view paths a mount has changed, for `unionfs diff`.

Format (an interface: other tools may read it; see docs/format.md)
------------------------------------------------------------------------
``WORKDIR/changes.log`` is a text file. The first line is the header
``# unionfs changes log v1``; every other line is one record::

    <kind> <time> <path>

* kind: ``A`` a name was made (nothing was there in the view just before),
  ``T`` like A, and everything below it is new too (a directory moved there),
  ``C`` an object changed in place (data, mode, owner, times, xattrs) or was
  exchanged, ``D`` a name was removed, ``?`` something changed at a path the
  daemon could not name (e.g. through a hard link whose other name it had
  forgotten); the path is then ``-`` and a reader must rescan the upper.
* time: when, as Unix seconds with 6 decimals (``1732390000.123456``).
* path: the absolute view path; bytes ``\\``, space, control and non-ASCII
  are written ``\\xHH`` (so a record never contains a space in its path and
  always fits one line).

Records are appended (one write(2) on an O_APPEND fd) after the change is made
and before the request is answered, so a SIGKILLed daemon loses none. A record
that repeats the daemon's previous one (same kind and path: a write open's C,
then the C of the writeback cache's time flush at close) is not written again;
a path's history is a set, so the repeat would say nothing new.

Compaction: the log is a *set of touched paths*. At mount and whenever it
has grown fourfold (plus SLACK lines) since the last compaction, it is
rewritten (to a temporary, then rename(2)) with one record per path, sorted by
path, whose kind sums up its history: ``A``/``T`` if the first record was A/T (the path
is new), else ``D`` if the last was D, else ``C``; its time is the last
record's. A path that was made and then removed again (first A/T, last D)
and has nothing at it in the upper is dropped, so a file rewritten a million
times is one record, and so is (none at all) a directory made and removed a
million times.

Crash safety: at unmount the log is fsynced and the marker
``WORKDIR/changes.clean`` is created (not compacted: the layers' filesystem
stays busy until the daemon lets go, so that waits for the next mount, which
also names what ``?`` records stood for); at mount it is removed (durably)
before anything can change. A mount that finds no marker, no log, or a log
that does not parse, knows the last stop was unclean (a change may have
reached the upper without its record) and reconciles: it adds a record for
every path in the upper directory (whiteouts as D, everything else as C, and
the old path of every redirected directory) and compacts. `unionfs diff`
does the same for an unmounted union, and says so.

The log only says *where* to look; *what* changed is decided by comparing the
upper with the lowers at those paths (unionfs/diff.py), so the upper stays
the truth and the log can never disagree with it.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from . import format
from .format import Format
from .layers import walk_tree
from .workdir import CHANGES_CLEAN, CHANGES_LOCK, CHANGES_LOG, path_of

log = logging.getLogger("unionfs")

HEADER = b"# unionfs changes log v1\n"
KINDS = b"ACDT?"
UNKNOWN_PATH = b"-"

# Compact when the log has more than GROWTH * (records at the last compaction) + SLACK lines.
# A compaction re-reads and parses the whole log, so with growth k every record
# is read k/(k-1) times on average: 2x at k=2, 1.33x at k=4, for a log at most 4x its
# compacted size; SLACK spares a small log (a few thousand paths) any rewrite at all.
GROWTH = 4
SLACK = 4096

_RECORD = re.compile(rb"^([ACDT?]) (\d+\.\d{6}) (/\S*|-)$")


_PLAIN = re.compile(rb"[\x21-\x5b\x5d-\x7e]*\Z")


def escape(path: bytes) -> bytes:
    if _PLAIN.match(path):
        return path  # nothing to escape: the common case, without a loop over the bytes
    out = bytearray()
    for b in path:
        if b == 0x5C or b < 0x21 or b > 0x7E:
            out += b"\\x%02x" % b
        else:
            out.append(b)
    return bytes(out)


def unescape(text: bytes) -> bytes:
    """Inverse of escape(); raises ValueError on a malformed escape."""
    if b"\\" not in text:
        return text
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] == 0x5C:
            if text[i + 1:i + 2] != b"x" or len(text) < i + 4:
                raise ValueError("bad escape")
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return bytes(out)


def now_stamp() -> bytes:
    ns = time.time_ns()
    return b"%d.%06d" % (ns // 1_000_000_000, ns // 1000 % 1_000_000)


def format_record(kind: bytes, path: bytes, stamp: bytes | None = None) -> bytes:
    return b"%s %s %s\n" % (kind, stamp or now_stamp(), escape(path) if path != UNKNOWN_PATH else path)


@dataclass
class Record:
    kind: bytes      # one of A C D T ?
    time: bytes      # seconds.micro as written
    path: bytes      # unescaped view path, or UNKNOWN_PATH


class LogDamaged(Exception):
    """The log exists but does not parse (a line, or the header, is wrong)."""


def parse(data: bytes) -> list[Record]:
    """Records of a log file's content. A last line without its newline is a write cut short
    by a crash (or one being appended right now): it is ignored, not an error."""
    if not data.startswith(HEADER):
        raise LogDamaged("missing header")
    lines = data[len(HEADER):].split(b"\n")
    lines.pop()  # after the last newline: empty, or a partial record
    out = []
    for n, line in enumerate(lines, 2):
        if not line or line.startswith(b"#"):
            continue
        m = _RECORD.match(line)
        if m is None:
            raise LogDamaged(f"line {n} does not parse")
        kind, stamp, path = m.groups()
        if path != UNKNOWN_PATH:
            try:
                path = unescape(path)
            except ValueError:
                raise LogDamaged(f"line {n}: bad escape") from None
            if path != b"/" and (path.endswith(b"/") or b"//" in path):
                raise LogDamaged(f"line {n}: bad path")
        out.append(Record(kind, stamp, path))
    return out


def read_log(workdir: str) -> list[Record] | None:
    """The records of WORKDIR/changes.log; None if there is none; LogDamaged if it is bad."""
    try:
        with open(path_of(workdir, CHANGES_LOG), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return parse(data)


def is_clean(workdir: str) -> bool:
    return os.path.exists(path_of(workdir, CHANGES_CLEAN))


# --------------------------------------------------------------------------
# Scanning the upper directory (the truth) into records
# --------------------------------------------------------------------------

def scan_upper(upper: str, fmt: Format) -> Iterator[tuple[bytes, bytes]]:
    """(kind, path) for every object in the upper directory: whiteouts are D, everything else
    C; a redirected directory also names its old path (D), where its lower contents came from."""
    try:
        root = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        for fd, rel, _name, de in walk_tree(root):
            path = b"/" + rel
            if de.is_dir(follow_symlinks=False):
                yield b"C", path
                try:
                    rd = fmt.raw_redirect(fd, os.fsencode(de.name))
                except OSError:  # gone meanwhile (a live mount's upper)
                    rd = None
                if rd:
                    yield b"D", format.redirect_target(path, rd)
                continue
            try:
                st = de.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield (b"D" if fmt.whiteout_at(fd, os.fsencode(de.name), st) else b"C"), path
    finally:
        os.close(root)


def _in_upper(upper_fd: int | None, path: bytes) -> bool:
    """Is there anything (an object or a whiteout) at view path *path* in the upper?"""
    if upper_fd is None:
        return True  # cannot tell: keep the record
    parts = [p for p in path.split(b"/") if p]
    if not parts:
        return True
    fd = upper_fd
    opened: list[int] = []
    try:
        for part in parts[:-1]:
            try:
                fd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                return False
            opened.append(fd)
        try:
            os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
            return True
        except OSError:
            return False
    finally:
        for o in opened:
            os.close(o)


def compact(records: Iterable[Record], upper_fd: int | None = None) -> list[Record]:
    """One record per path (see the module doc), sorted by path."""
    first: dict[bytes, bytes] = {}
    last: dict[bytes, Record] = {}
    unknown: Record | None = None
    for r in records:
        if r.path == UNKNOWN_PATH:
            unknown = r
            continue
        first.setdefault(r.path, r.kind)
        last[r.path] = r
    out = []
    for path in sorted(last):
        f, lr = first[path], last[path]
        if f in b"AT":
            if lr.kind == b"D" and not _in_upper(upper_fd, path):
                continue
            kind = f
        else:
            kind = b"D" if lr.kind == b"D" else b"C"
        out.append(Record(kind, lr.time, path))
    if unknown is not None:
        out.append(unknown)
    return out


def write_log(workdir: str, records: Iterable[Record], sync: bool = True) -> int:
    """Atomically replace WORKDIR/changes.log; returns the number of records."""
    path = path_of(workdir, CHANGES_LOG)
    tmp = path + ".tmp"
    buf = [HEADER]
    n = 0
    for r in records:
        buf.append(format_record(r.kind, r.path, r.time))
        n += 1
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        data = b"".join(buf)
        view = memoryview(data)
        while view:
            # not view[os.write(fd, view):]: mypyc (2.4) evaluates a slice's start twice
            written = os.write(fd, view)
            view = view[written:]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync:
        fsync_dir(workdir)
    return n


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def log_lock(workdir: str) -> Iterator[None]:
    """Serialises rewrites of the log with appends by other processes (`diff --rescan`)."""
    fd = os.open(path_of(workdir, CHANGES_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def rebuild(workdir: str, upper: str, fmt: Format, keep: Iterable[Record] = ()) -> list[Record]:
    """Reconcile: the records to keep plus one for every path in the upper, compacted."""
    stamp = now_stamp()
    records = list(keep) + [Record(k, stamp, p) for k, p in scan_upper(upper, fmt)]
    records = [r for r in records if r.path != UNKNOWN_PATH]
    ufd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return compact(records, ufd)
    finally:
        os.close(ufd)


def append_records(workdir: str, pairs: Iterable[tuple[bytes, bytes]]) -> None:
    """Append records from another process than the daemon (under the log lock)."""
    stamp = now_stamp()
    with log_lock(workdir):
        fd = os.open(path_of(workdir, CHANGES_LOG), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            chunk: list[bytes] = []
            for kind, path in pairs:
                chunk.append(format_record(kind, path, stamp))
                if len(chunk) >= 4096:
                    os.write(fd, b"".join(chunk))
                    chunk = []
            if chunk:
                os.write(fd, b"".join(chunk))
        finally:
            os.close(fd)


# --------------------------------------------------------------------------
# The daemon's side
# --------------------------------------------------------------------------

class Journal:
    """Appends change records; a no-op without a workdir (read-only mounts).

    Opening reconciles the log with *upper* if the last stop was unclean (or
    the log is missing or damaged), compacts it, and clears the clean marker.
    """

    def __init__(self, workdir: str | None, upper: str | None = None,
                 fmt: Format = format.OVERLAY, durable: bool = True) -> None:
        self.fd: int | None = None
        self.fmt = fmt
        self.durable = durable  # False (volatile): never fsynced, the stop not recorded
        self._last: tuple[bytes, bytes, bool] | None = None  # the last record written
        self.workdir = workdir
        self.upper = upper
        self.upper_fd: int | None = None
        if not workdir:
            return
        if upper:
            self.upper_fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        with log_lock(workdir):
            reason = None
            try:
                records = read_log(workdir)
            except LogDamaged as e:
                records, reason = None, f"the changes log is damaged ({e})"
            if reason is None and records is None:
                reason = "there is no changes log"
            elif reason is None and not is_clean(workdir):
                reason = "the last unmount was not clean"
            elif records and any(r.path == UNKNOWN_PATH for r in records):
                reason = "a change at an unknown path was recorded"
            if reason is not None and upper:
                log.info("%s: rebuilding it from the upper directory", reason)
                compacted = rebuild(workdir, upper, fmt, records or ())
            else:
                compacted = compact(records or (), self.upper_fd)
            self.base = write_log(workdir, compacted)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path_of(workdir, CHANGES_CLEAN))
            if durable:
                fsync_dir(workdir)
            self._open()
        self.lines = self.base

    def _open(self) -> None:
        assert self.workdir is not None
        self.fd = os.open(path_of(self.workdir, CHANGES_LOG),
                          os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def record(self, kind: bytes, path: bytes, tree: bool = False) -> None:
        self.records((kind, path, tree))

    def records(self, *changes: tuple[bytes, bytes, bool]) -> None:
        """Append (kind, path, tree) records in one write: a rename's two records cost
        one syscall, and a crash keeps both or neither."""
        if self.fd is None or (len(changes) == 1 and changes[0] == self._last):
            return
        out = []
        for kind, path, tree in changes:
            if tree and kind == b"A":
                kind = b"T"
            if not path:
                kind, path = b"?", UNKNOWN_PATH
            out.append(format_record(kind, path))
        os.write(self.fd, b"".join(out))
        self._last = changes[-1]
        self.lines += len(out)
        if self.lines > GROWTH * self.base + SLACK:
            self.compact()

    def compact(self) -> None:
        """Rewrite the log compacted (re-reading it: other processes may have appended)."""
        assert self.workdir is not None and self.fd is not None
        with log_lock(self.workdir):
            try:
                records = read_log(self.workdir)
            except LogDamaged:
                records = None
            if records is None and self.upper:
                log.warning("the changes log went missing or was damaged: rebuilding it")
                compacted = rebuild(self.workdir, self.upper, self.fmt)
            else:
                compacted = compact(records or (), self.upper_fd)
            os.close(self.fd)
            self.fd = None
            self.base = self.lines = write_log(self.workdir, compacted, sync=False)
            self._open()

    def close(self) -> None:
        """At unmount: every record on disk, then the clean marker (see the module doc)."""
        if self.fd is not None and not self.durable:
            # volatile: the stop is not recorded (no clean marker), so no name is made in
            # the workdir after the unmount, when an engine is already removing it; a later
            # mount of this upper rebuilds the log from the upper
            os.close(self.fd)
            self.fd = None
        if self.fd is not None:
            assert self.workdir is not None
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
            fd = os.open(path_of(self.workdir, CHANGES_CLEAN),
                         os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, b"clean unmount at %s\n"
                         % time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()).encode())
            finally:
                os.close(fd)
            fsync_dir(self.workdir)   # the marker's name: only it says "clean"
        if self.upper_fd is not None:
            os.close(self.upper_fd)
            self.upper_fd = None
