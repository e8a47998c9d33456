"""Deferred durability for copy-up: the same crash guarantee as an fsync per copy-up,
without a journal commit on the path of every first write.

Kernel overlayfs fdatasyncs each copied-up file before linking it into place, so a
power loss can never leave a half-copied file under the name. That costs one
journal commit (about 450 µs on ext4 here) inside the first write to every lower
file. We link first and sync later, in batches, and keep the guarantee:

* Before the link the new file gets the marker ``trusted.overlay.unionfs.pending``
  (boot id and origin: layer, size, mtime, path). An xattr is metadata, and a
  journalling filesystem commits it no later than the link that follows, so a
  name that survives a power loss carries its marker until the data is safe.
* A background thread syncfs()es the upper's filesystem for a whole batch, then
  removes the markers (the removals reach the disk with a later commit; until
  then a marker only means "check me").
* fsync of a marked file through the mount makes the data durable, removes the
  marker and commits again: a repair must never undo data the user synced.
* Unmount flushes everything and syncs before the stop is marked clean.
* A mount removes the changes log's clean marker, durably, before it serves
  anything (changes.py), so a marker can only outlive a stop that was not clean.
  (Or a batch that could not be synced: that one leaves ``WORKDIR/copyup.pending``.)
  The first copy-up of a mount so costs no extra journal commit (it used to create
  and sync that hint file: 7-25 ms here, once per mount, inside the first write).
  A mount that finds the last stop unclean, or the hint, walks the upper for markers:
  one from this boot means only the daemon died (the page cache kept the data),
  so the file is synced and unmarked; one from an earlier boot means the machine
  went down with the data perhaps unwritten. A lost writeback leaves a file shorter
  than it was (ext4, xfs and btrfs move the on-disk size only after the data), so a
  marked file shorter than its origin gets its data copied again from the origin
  (lower layers never change): what it held right after the copy-up. Writes made to
  it afterwards that were never fsynced are lost, as POSIX allows after a power loss.
  A file at least as long as its origin is kept: it holds the user's writes.

With ``-o fsync=0`` none of this happens (no marker, no sync), as fuse-overlayfs.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
from typing import Callable

from . import syscalls
from .changes import fsync_dir, is_clean
from .layers import OWN_PREFIX, walk_tree

log = logging.getLogger("unionfs")

MARK = OWN_PREFIX + b"pending"
HINT = "copyup.pending"
#: more pending copy-ups than this and new ones fsync at once (bounds held fds)
MAX_PENDING = 4096
#: the flusher waits this long after the first pending copy-up, to batch the next ones
#: (UNIONFS_SYNC_DELAY, in seconds, lets the tests hold copy-ups pending)
BATCH_DELAY = float(os.environ.get("UNIONFS_SYNC_DELAY", "0.05"))


def boot_id() -> bytes:
    with open("/proc/sys/kernel/random/boot_id", "rb") as f:
        return f.read().strip()


def _unmark(fd: int) -> None:
    with contextlib.suppress(OSError):  # ENODATA: a repair or a user fsync got there first
        os.removexattr(fd, MARK)  # fremovexattr: no /proc path to resolve


class Syncer:
    """Pending copy-ups of one mount: marked, linked, not yet known durable."""

    def __init__(self, upper: str, workdir: str) -> None:
        # real (not O_PATH) fds: syncfs and fsync refuse O_PATH ones
        self.upper_fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.work_root_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.boot = boot_id()
        self._cond = threading.Condition()
        self._pending: dict[int, int] = {}   # st_ino of the upper file -> an fd on it
        self._inflight: set[int] = set()     # inodes of the batch being synced right now
        self._failed = False                 # a batch could not be synced: hint at close
        self._stopping = False
        self._thread: threading.Thread | None = None

    def has_room(self) -> bool:
        return len(self._pending) < MAX_PENDING

    def mark(self, fd: int, layer: int, path: bytes, st: os.stat_result) -> bool:
        """Mark the new (not yet linked) file *fd* copied from (*layer*, *path*); False if
        it cannot be (the xattr too big for the filesystem): then the caller fsyncs it."""
        value = b"1 %s %d %d %d %s" % (self.boot, layer, st.st_size, st.st_mtime_ns, path)
        try:
            os.setxattr(fd, MARK, value)
        except OSError as e:
            if e.errno in (errno.E2BIG, errno.ENOSPC, errno.ERANGE, errno.ENOTSUP):
                return False
            raise
        return True

    def _hint(self) -> None:
        """After a failed batch: have the next mount walk the upper even if this stop
        ends clean (best effort; the filesystem may be failing)."""
        with contextlib.suppress(OSError):
            fd = os.open(HINT, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600,
                         dir_fd=self.work_root_fd)
            os.close(fd)
            os.fsync(self.work_root_fd)

    def add(self, fd: int) -> None:
        """Hand over *fd* (now linked into place): it is synced and unmarked in a batch."""
        ino = os.fstat(fd).st_ino
        with self._cond:
            wake = not self._pending
            old = self._pending.pop(ino, None)
            self._pending[ino] = fd
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="unionfs-syncer", daemon=True)
                self._thread.start()
            if wake:
                self._cond.notify_all()
        if old is not None:
            os.close(old)

    def fsync(self, fd: int, datasync: bool) -> None:
        """The user's fsync of *fd*. If its inode is still pending, also unmark it durably,
        so that no repair ever copies the origin over data the user synced. Blocking.

        An inode that is neither pending nor in the batch being synced was unmarked by a
        finished batch, and every batch ends with a commit of its unmarkings."""
        ino = os.fstat(fd).st_ino
        with self._cond:
            while ino in self._inflight:
                self._cond.wait()
            held = self._pending.pop(ino, None)
        (os.fdatasync if datasync else os.fsync)(fd)
        if held is not None:
            _unmark(held)
            os.close(held)
            os.fsync(fd)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
                if not self._stopping:
                    self._cond.wait(BATCH_DELAY)  # only close() notifies meanwhile
                batch, self._pending = self._pending, {}
                self._inflight = set(batch)
            try:
                self._flush(batch)
            except Exception:  # noqa: BLE001 - the thread must go on; close() leaves the hint
                log.exception("syncing copied-up files failed; they stay marked")
                self._failed = True  # close() leaves the hint
                for fd in batch.values():
                    os.close(fd)
            finally:
                with self._cond:
                    self._inflight = set()
                    self._cond.notify_all()

    def _flush(self, batch: dict[int, int]) -> None:
        """Data durable first, then the markers go, and that is committed too."""
        syscalls.syncfs(self.upper_fd)
        while batch:  # popped as closed: after a failure the caller closes the rest
            _ino, fd = batch.popitem()
            _unmark(fd)
            os.close(fd)
        syscalls.syncfs(self.upper_fd)

    def close(self) -> None:
        """At unmount: everything pending synced and unmarked, durably. If that failed,
        the hint makes the next mount settle the rest, though this stop is clean."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()  # it drains what is pending before it returns
        if self._pending or self._failed:
            self._hint()
        os.close(self.upper_fd)
        os.close(self.work_root_fd)


def recover(upper: str, workdir: str,
            origin: Callable[[int, bytes], tuple[int, bytes] | None]) -> int:
    """At mount, if the last mount left copy-ups pending: settle every marked file (see
    the module's docstring). *origin* maps (layer index, path) to the (dirfd, name) of
    the lower file. Returns how many files had their data copied again."""
    hint = os.path.join(workdir, HINT)
    if is_clean(workdir) and not os.path.exists(hint):
        return 0
    boot = boot_id()
    repaired = 0
    upper_fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        repaired = _recover_tree(upper_fd, boot, origin)
        syscalls.syncfs(upper_fd)
    finally:
        os.close(upper_fd)
    if os.path.exists(hint):
        os.unlink(hint)
        fsync_dir(workdir)
    return repaired


def _recover_tree(upper_fd: int, boot: bytes,
                  origin: Callable[[int, bytes], tuple[int, bytes] | None]) -> int:
    repaired = 0
    for dirfd, rel, name, de in walk_tree(upper_fd):
        if not de.is_file(follow_symlinks=False):
            continue
        value = syscalls.getxattr(dirfd, name, MARK)
        if value is None:
            continue
        fd = syscalls.open_at(dirfd, name, os.O_RDWR | os.O_NOFOLLOW)
        try:
            if _repair(fd, value, boot, origin):
                repaired += 1
                log.warning("copy-up of /%s was not known durable before the machine went "
                            "down: its data was copied again from the lower layer",
                            rel.decode(errors="replace"))
            os.fsync(fd)
            _unmark(fd)
        finally:
            os.close(fd)
    return repaired


def _repair(fd: int, value: bytes, boot: bytes,
            origin: Callable[[int, bytes], tuple[int, bytes] | None]) -> bool:
    """Copy the origin's data into *fd* again if its marker is from another boot and the
    file is shorter than its origin (its writeback was lost)."""
    try:
        _v, mboot, layer, size, mtime, path = value.split(b" ", 5)
        layer_i, size_i, mtime_i = int(layer), int(size), int(mtime)
    except ValueError:
        log.warning("ignoring a malformed copy-up marker %r", value[:80])
        return False
    if mboot == boot:
        return False  # only the daemon died: the page cache kept every byte
    loc = origin(layer_i, path)
    src = -1
    if loc is not None:
        with contextlib.suppress(OSError):
            src = syscalls.open_at(*loc, os.O_RDONLY | os.O_NOFOLLOW)
    if src < 0:
        log.warning("cannot check the copy-up of %r: its origin is gone", path)
        return False
    try:
        sst = os.fstat(src)
        if not stat.S_ISREG(sst.st_mode) or sst.st_size != size_i or sst.st_mtime_ns != mtime_i:
            log.warning("cannot check the copy-up of %r: its origin changed", path)
            return False
        st = os.fstat(fd)
        if st.st_size >= size_i:
            return False
        os.ftruncate(fd, 0)
        syscalls.copy_data(src, fd, size_i)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        return True
    finally:
        os.close(src)
