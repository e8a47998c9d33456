"""Deferred durability for copy-up: the same crash guarantee as an fsync per copy-up,
without a journal commit on the path of every first write, and without touching each
file again once its data is safe.

Kernel overlayfs fdatasyncs each copied-up file before linking it into place, so a
power loss can never leave a half-copied file under the name. That costs one
journal commit, a wait for the disk, inside the first write to every lower
file. We link first and sync later, in batches, and keep the guarantee:

* Batches are numbered. Before the link, the new file's identity xattr
  (format.py's ``<prefix>unionfs.ino``, which every copy-up writes anyway) gets a tag
  after the inode number: the batch, a short boot id and the origin's size
  (``"<ino> <batch> <boot> <size>"``). An xattr is metadata, and a journalling
  filesystem commits it no later than the link that follows, so a name that
  survives a power loss carries its tag. The value is short enough to stay inside
  an ext4 inode: the tag costs no syscall and no xattr block of its own.
* A background thread syncfs()es the upper's filesystem once a batch has gathered
  (50 ms), then writes the batch's number to ``WORKDIR/copyup.synced``. That write
  reaches the disk with the next batch's syncfs (or the fsync at unmount), and from
  then on every tag up to that number means "synced": tags are never removed one
  by one, so a batch costs one syncfs and one small write, whatever its size.
* When no copy-up follows a batch, the thread syncfs()es once more after the batch
  delay, so the record becomes durable and the batch's tags settled (a file with an
  unsettled tag is not opened in passthrough mode, files.py) without waiting for a
  next batch.
* fsync of a file through the mount whose tag is not yet known durable syncs its
  data, then drops the tag and syncs again: a repair must never undo data the
  user synced.
* Unmount syncs the last batch and fsyncs ``copyup.synced`` before the stop is
  marked clean. A mount removes the changes log's clean marker, durably, before it
  serves anything (changes.py), so a tag newer than ``copyup.synced`` can only
  outlive a stop that was not clean (or a batch that could not be synced: that one
  leaves ``WORKDIR/copyup.pending``, the hint).
  A mount that finds the last stop unclean, or the hint, walks the upper for such
  tags: one from this boot means only the daemon died (the page cache kept the
  data), so the file is synced; one from an earlier boot means the machine went
  down with the data perhaps unwritten. A lost writeback leaves a file shorter
  than it was (ext4, xfs and btrfs move the on-disk size only after the data), so a
  tagged file shorter than its origin gets its data copied again from the origin
  (found by its inode number in its layer: lower layers never change): what it held
  right after the copy-up. Writes made to it afterwards that were never fsynced are
  lost, as POSIX allows after a power loss. A file at least as long as its origin is
  kept: it holds the user's writes. The walk ends by recording its newest tag as
  synced.

With ``-o fsync=0`` none of this happens (no tag, no sync), as fuse-overlayfs.
"""
from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from dataclasses import dataclass
from typing import Callable

from . import format, syscalls
from .changes import is_clean
from .format import Format
from .layers import walk_tree
from .workdir import COPYUP_PENDING as HINT, COPYUP_SYNCED as SYNCED
from .nodes import split_ino

log = logging.getLogger("unionfs")

_SYNCED_WIDTH = 20  # digits: every write of the number is one same-sized overwrite
#: the flusher waits this long after the first pending copy-up, to batch the next ones
#: (UNIONFS_SYNC_DELAY, in seconds, lets the tests hold copy-ups pending)
BATCH_DELAY = float(os.environ.get("UNIONFS_SYNC_DELAY", "0.05"))

#: find(layer index, wanted st_inos) -> {st_ino: path} of regular files in that lower layer
FindOrigins = Callable[[int, set[int]], dict[int, bytes]]
#: open(layer index, path) -> a read-only fd on that lower file (OSError if it cannot be)
OpenOrigin = Callable[[int, bytes], int]


def boot_id() -> bytes:
    """The first 8 hex digits of this boot's id: enough to tell two boots apart."""
    with open("/proc/sys/kernel/random/boot_id", "rb") as f:
        return f.read().strip().replace(b"-", b"")[:8]


@dataclass(frozen=True)
class Tag:
    ino: int
    batch: int
    boot: bytes
    size: int


def parse_tag(value: bytes | None) -> Tag | None:
    """The pending tag in an identity xattr's value, or None (no tag, or not one of ours)."""
    if not value or b" " not in value:
        return None
    try:
        ino, batch, boot, size = value.split(b" ")
        return Tag(int(ino), int(batch), boot, int(size))
    except ValueError:
        return None


def read_synced(workdir_fd: int) -> int:
    """The newest batch known synced (0: none, or the record is missing or damaged)."""
    try:
        fd = os.open(SYNCED, os.O_RDONLY | os.O_CLOEXEC, dir_fd=workdir_fd)
    except FileNotFoundError:
        return 0
    try:
        text = os.read(fd, 64).strip()
    finally:
        os.close(fd)
    return int(text) if text.isdigit() else 0


def _open_record(workdir_fd: int) -> int:
    return os.open(SYNCED, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=workdir_fd)


def _write_synced(fd: int, batch: int) -> None:
    os.pwrite(fd, b"%0*d\n" % (_SYNCED_WIDTH, batch), 0)


def _untag(fmt: Format, fd: int, tag: Tag) -> None:
    fmt.set_identity(fd, None, b"%d" % tag.ino)


class Syncer:
    """Copy-ups of one mount that are linked but not yet known durable, by batch."""

    def __init__(self, upper: str, workdir: str, fmt: Format = format.OVERLAY) -> None:
        self.fmt = fmt
        # a real (not O_PATH) fd: syncfs refuses O_PATH ones
        self.upper_fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.work_root_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.boot = boot_id()
        # recover() ran first: every tag up to the record is settled, and the record is durable
        self.durable = read_synced(self.work_root_fd)
        self._record_fd = _open_record(self.work_root_fd)
        self._written = self.durable          # the number last written to the record
        self.batch = self.durable + 1         # the batch copy-ups join now
        self._cond = threading.Condition()
        self._dirty = False                   # copy-ups linked since the last batch began
        self._failed = False                  # a batch could not be synced: hint at close
        self._stopping = False
        self._flushing = False                # the thread is syncing a batch
        self._worker: threading.Thread | None = None

    def tag(self, ino: int, size: int) -> bytes:
        """The identity xattr's value for a copy-up of *size* bytes whose data is complete
        (the batch read here must not begin its sync before the data was written)."""
        return b"%d %d %s %d" % (ino, self.batch, self.boot, size)

    def add(self) -> None:
        """A tagged copy-up was linked into place: have a batch sync it."""
        with self._cond:
            if self._dirty:
                return  # the thread knows: waking it would cut its batch short
            self._dirty = True
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="unionfs-syncer", daemon=True)
                self._worker.start()
            self._cond.notify_all()

    def fsync(self, fd: int, datasync: bool) -> None:
        """The user's fsync of *fd*. If its tag is not known durable yet, drop the tag, and
        that durably too, so that no repair ever copies the origin over data the user
        synced. Blocking."""
        tag = parse_tag(self.fmt.identity(fd, None))
        (os.fdatasync if datasync else os.fsync)(fd)
        if tag is not None and tag.batch > self.durable:
            _untag(self.fmt, fd, tag)   # only now: the data is on disk before the tag goes
            os.fsync(fd)

    def settled(self, fd: int) -> bool:
        """Whether *fd*'s file carries no tag newer than the last durable batch: no repair
        can copy its origin over it. A sync the daemon never sees (an O_SYNC write or an
        msync the kernel does itself on a passthrough open) cannot drop a tag."""
        tag = parse_tag(self.fmt.identity(fd, None))
        return tag is None or tag.batch <= self.durable

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._dirty and not self._stopping and not self._unsettled():
                    self._cond.wait()
                settle = not self._dirty
                if not self._stopping:
                    self._cond.wait(BATCH_DELAY)  # close(), or a copy-up after a batch, notifies
                if self._stopping:
                    return  # close() syncs what is pending itself, and closes the fds
                # a copy-up came meanwhile: its batch gets the whole delay (the continue is
                # outside the with: mypyc does not compile one inside a try/finally)
                again = settle and self._dirty
                if not again:
                    # No copy-up since the last batch: one more syncfs makes its record
                    # durable, so its files are settled (passthrough waits for that) without
                    # waiting for a next batch that may never come.
                    written = self._written
                    if not settle:
                        batch, self.batch = self.batch, self.batch + 1
                        self._dirty = False
                    self._flushing = True
            if again:
                continue
            if settle:
                self._step(lambda: self._settle(written),
                           "syncing the record of synced copy-ups failed")
            else:
                self._step(lambda: self._flush(batch),
                           "syncing copied-up files failed; their tags stay unsettled")

    def _step(self, work: Callable[[], None], failure: str) -> None:
        """One sync of the thread; a failure is logged and leaves the hint at close()."""
        try:
            work()
        except Exception:  # noqa: BLE001 - the thread must go on; close() leaves the hint
            log.exception(failure)
            self._failed = True
        finally:
            with self._cond:
                self._flushing = False
                self._cond.notify_all()

    def _settle(self, written: int) -> None:
        syscalls.syncfs(self.upper_fd)
        self.durable = written

    def _unsettled(self) -> bool:
        """A batch is recorded, but the record is not known durable yet."""
        return not self._failed and self.durable < self._written

    def _flush(self, batch: int) -> None:
        """Every copy-up tagged *batch* or earlier has its data written by now: sync them
        (and, with them, the record written after the last batch), then record this one.
        Not after a failed batch: a later syncfs that succeeds says nothing of the pages a
        failed writeback dropped, so the record stays below it (the hint does the rest)."""
        syscalls.syncfs(self.upper_fd)
        self.durable = self._written
        if self._failed:
            return
        _write_synced(self._record_fd, batch)
        self._written = batch

    def close(self) -> None:
        """At unmount: the last batch synced and recorded, durably. If a batch failed, the
        hint makes the next mount settle its tags, though this stop is clean.

        The pending batch is synced here, in the caller's thread, rather than by waking
        the syncer's: the layers' filesystem stays busy until this is done, and a thread
        wake-up on a loaded machine can take milliseconds. Once it sees the stop, the
        syncer's thread touches no fd; it only returns (end_thread)."""
        if self._record_fd < 0:
            return
        with self._cond:
            self._stopping = True  # no notify: see end_thread
            while self._flushing:  # a batch already being synced: let it finish
                self._cond.wait()
            pending, self._dirty = self._dirty, False
        if pending:
            try:
                self._flush(self.batch)
            except Exception:  # noqa: BLE001 - the hint below makes the next mount settle it
                log.exception("syncing copied-up files failed; their tags stay unsettled")
                self._failed = True
        try:
            os.fsync(self._record_fd)
            self.durable = self._written
        except OSError:
            log.exception("recording the synced copy-ups failed")
            self._failed = True
        if self._failed:
            self._hint()
        os.close(self._record_fd)
        os.close(self.upper_fd)
        os.close(self.work_root_fd)
        self._record_fd = self.upper_fd = self.work_root_fd = -1

    def end_thread(self) -> None:
        """After close(): let the syncer's thread see the stop and return. Not done by
        close() itself: a thread woken then competes with the rest of the unmount for the
        interpreter lock, and loses milliseconds of it on a loaded machine. A daemon that
        exits next need not call this (the thread holds nothing)."""
        with self._cond:
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join()

    def _hint(self) -> None:
        """After a failed batch: have the next mount walk the upper even if this stop
        ends clean (best effort; the filesystem may be failing)."""
        with contextlib.suppress(OSError):
            fd = os.open(HINT, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600,
                         dir_fd=self.work_root_fd)
            os.close(fd)
            os.fsync(self.work_root_fd)


def recover(upper: str, workdir: str, find: FindOrigins, open_origin: OpenOrigin,
            fmt: Format = format.OVERLAY) -> int:
    """At mount, if the last mount may have left copy-ups unsynced: settle every tag newer
    than the record (see the module's docstring). Returns how many files had their data
    copied again."""
    hint = os.path.join(workdir, HINT)
    if is_clean(workdir) and not os.path.exists(hint):
        return 0
    upper_fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    work_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        synced = read_synced(work_fd)
        newest, torn = _settle_tree(fmt, upper_fd, synced, boot_id())
        repaired = _repair_all(torn, find, open_origin)
        syscalls.syncfs(upper_fd)
        rfd = _open_record(work_fd)
        try:
            _write_synced(rfd, max(synced, newest))
            os.fsync(rfd)
        finally:
            os.close(rfd)
        # the record is on disk: the hint may go, in the same directory commit as the
        # record's name (a crash before it leaves both, and the next mount walks again)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(HINT, dir_fd=work_fd)
        os.fsync(work_fd)
    finally:
        os.close(upper_fd)
        os.close(work_fd)
    return repaired


@dataclass
class _Torn:
    rel: bytes        # path in the upper, for the log
    fd: int           # the file, open for writing
    tag: Tag


def _settle_tree(fmt: Format, upper_fd: int, synced: int, boot: bytes
                 ) -> tuple[int, list[_Torn]]:
    """Sync every file tagged after *synced*; return the newest tag and the files that may
    have lost their data (tagged in another boot, shorter than their origin), still open."""
    newest = 0
    torn: list[_Torn] = []
    for dirfd, rel, name, de in walk_tree(upper_fd):
        if not de.is_file(follow_symlinks=False):
            continue
        tag = parse_tag(fmt.identity(dirfd, name))
        if tag is None or tag.batch <= synced:
            continue
        newest = max(newest, tag.batch)
        fd = syscalls.open_at(dirfd, name, os.O_RDWR | os.O_NOFOLLOW)
        if tag.boot != boot and os.fstat(fd).st_size < tag.size:
            torn.append(_Torn(rel, fd, tag))
            continue
        try:
            os.fsync(fd)   # only the daemon died (or the data is all there): keep it
        finally:
            os.close(fd)
    return newest, torn


def _repair_all(torn: list[_Torn], find: FindOrigins, open_origin: OpenOrigin) -> int:
    """Copy each torn file's data again from its origin, one walk per lower layer."""
    repaired = 0
    by_layer: dict[int, list[_Torn]] = {}
    for t in torn:
        by_layer.setdefault(split_ino(t.tag.ino)[0], []).append(t)
    try:
        for layer, files in by_layer.items():
            found = find(layer, {split_ino(t.tag.ino)[1] for t in files}) if layer >= 1 else {}
            for t in files:
                path = found.get(split_ino(t.tag.ino)[1])
                src = -1
                if path is not None:
                    with contextlib.suppress(OSError):
                        src = open_origin(layer, path)
                if src < 0:
                    log.warning("cannot check the copy-up of /%s: its origin is gone",
                                t.rel.decode(errors="replace"))
                elif _repair(t.fd, t.tag, src):
                    repaired += 1
                    log.warning("copy-up of /%s was not known durable before the machine went "
                                "down: its data was copied again from the lower layer",
                                t.rel.decode(errors="replace"))
                os.fsync(t.fd)
    finally:
        for t in torn:
            os.close(t.fd)
    return repaired


def _repair(fd: int, tag: Tag, src: int) -> bool:
    """Copy the origin's data (*src*, closed here) into *fd* again: its writeback was lost."""
    try:
        sst = os.fstat(src)
        if not stat.S_ISREG(sst.st_mode) or sst.st_size != tag.size:
            log.warning("cannot check a copy-up: its origin changed")
            return False
        st = os.fstat(fd)
        os.ftruncate(fd, 0)
        syscalls.copy_data(src, fd, tag.size)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        return True
    finally:
        os.close(src)
