"""The work directory: scratch space for atomic changes, and the mount's private state.

Layout (all private to unionfs, never shown in the view); this module names every
path in it, and the modules that keep the files use these names::

    WORKDIR/work/           temporaries: copy-ups, new opaque dirs, removed trees (WorkDir)
    WORKDIR/lowers          the lower list of the last mount (one path a line)
    WORKDIR/changes.log     the changes log (changes.py), rewritten through changes.log.tmp
    WORKDIR/changes.clean   the changes log's marker of a clean stop (changes.py)
    WORKDIR/changes.lock    serialises rewrites of the log with other writers (changes.py)
    WORKDIR/copyup.synced   the newest batch of copy-ups known synced (durable.py)
    WORKDIR/copyup.pending  left by a batch of copy-ups that could not be synced (durable.py)
    WORKDIR/marks/NAME.json the state saved by `unionfs mark NAME` (diff.py)
    WORKDIR/unionfs.log     the daemon's log when it runs in the background (mount.py)
    WORKDIR/format          the upper's xattr prefix (format.py), noted by its first mount

It must be on the upper's filesystem so a finished temporary reaches the
upper by rename(2), which is atomic: a crash leaves either nothing or the
whole object in the view, and anything left in work/ is garbage, removed at
the next mount.

Only WorkDir (the daemon's scratch space) makes anything; the names and the
lowers record can be read by any process, with nothing made.
"""
from __future__ import annotations

import errno
import itertools
import os
import stat

from . import syscalls

SCRATCH = "work"
LOWERS = "lowers"
CHANGES_LOG = "changes.log"
CHANGES_CLEAN = "changes.clean"
CHANGES_LOCK = "changes.lock"
COPYUP_SYNCED = "copyup.synced"
COPYUP_PENDING = "copyup.pending"
MARKS = "marks"
DAEMON_LOG = "unionfs.log"
FORMAT = "format"


def path_of(workdir: str, name: str) -> str:
    """The path of *name* (one of the names above) in the work directory *workdir*."""
    return os.path.join(workdir, name)


def record_lowers(workdir: str, lowers: list[str]) -> None:
    """Remember the stack in the workdir, so `unionfs diff UPPER` works unmounted."""
    path = path_of(workdir, LOWERS)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join(p + "\n" for p in lowers))
    os.replace(tmp, path)


def recorded_lowers(workdir: str) -> list[str] | None:
    """The lower list the last mount recorded, or None if there is none."""
    try:
        with open(path_of(workdir, LOWERS)) as f:
            return [line for line in f.read().split("\n") if line]
    except FileNotFoundError:
        return None


def recorded_format(workdir: str) -> bytes | None:
    """The xattr prefix the upper was written with, as a mount noted it (None: never)."""
    try:
        with open(path_of(workdir, FORMAT), "rb") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def record_format(workdir: str, prefix: bytes) -> None:
    path = path_of(workdir, FORMAT)
    with open(path + ".tmp", "wb") as f:
        f.write(prefix + b"\n")
    os.replace(path + ".tmp", path)


class WorkDir:
    """The daemon's scratch space, WORKDIR/work/: temporaries made there reach the upper
    by rename(2) or linkat(2); whatever is left there at a mount is a crash's garbage."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(path_of(path, SCRATCH), mode=0o700, exist_ok=True)
        self.root_fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.fd = syscalls.open_dir_at(self.root_fd, os.fsencode(SCRATCH))
        self.dev = os.fstat(self.fd).st_dev
        self._seq = itertools.count()
        self._prefix = b"t%d." % os.getpid()
        self.owner = self._new_owner()

    def _new_owner(self) -> tuple[int, int]:
        """(uid, gid) a new object in work/ gets: the daemon's, or a set-gid work/'s
        group (or the filesystem's grpid rule), found by making one. A copy-up whose
        origin has this owner needs no chown."""
        fd, name = self.new_file()
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
            if name is not None:
                os.unlink(name, dir_fd=self.fd)
        return st.st_uid, st.st_gid

    def tmpname(self) -> bytes:
        """A fresh name in work/ (pid-prefixed, so two mounts' leftovers never clash)."""
        return self._prefix + str(next(self._seq)).encode()

    def new_file(self) -> tuple[int, bytes | None]:
        """A new empty regular file (mode 0600) open for writing, and its name in work/.

        O_TMPFILE where the filesystem has it: the file has no name at all until it
        is linked into place, so nothing is left behind by a crash and no work/
        entry is made and removed. Elsewhere a named temporary (name not None)."""
        try:
            return os.open(b".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=self.fd), None
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
        name = self.tmpname()
        return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                       dir_fd=self.fd), name

    def cleanup(self) -> int:
        """Remove every leftover of an earlier (crashed) mount; returns how many."""
        count = 0
        for name in os.listdir(syscalls.proc_path(self.fd)):
            self.remove_tree(name)
            count += 1
        return count

    def remove_tree(self, name: bytes) -> None:
        """Delete work/NAME and everything under it, fd-relatively, never following symlinks."""
        remove_tree_at(self.fd, name)

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.root_fd)


def remove_tree_at(dirfd: int, name: bytes) -> None:
    st = syscalls.lstat_at(dirfd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dirfd)
        return
    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        for child in os.listdir(sub):
            remove_tree_at(sub, os.fsencode(child))
    finally:
        os.close(sub)
    try:
        os.rmdir(name, dir_fd=dirfd)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
