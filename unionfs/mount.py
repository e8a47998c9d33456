"""Running and stopping the FUSE daemon.

Only this module and the core (unionfs.fs) load the FUSE binding
(unionfs.binding). `start` returns only once the mount is live (or raised
MountError with one line of reason), so scripts, mount(8) and fstab can use
the mount right after we exit.
`unmount` waits until the daemon is gone, so a following mount of the same
layers cannot race with a daemon that is still flushing.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import logging
import logging.handlers
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from . import utab, workdir
from .config import FSTYPE, MountConfig, escape_fuse_option, kernel_flag_options
from .format import MixedFormat
from .runstate import (MountEntry, alive, lock_dir, mount_entries, read_pidfile, remove_pidfile,
                       this_process, top_mount, write_pidfile)

log = logging.getLogger("unionfs")

MAX_TASKS = 32          # concurrent request handlers in the trio loop
UMOUNT_TIMEOUT_ENV = "UNIONFS_UMOUNT_TIMEOUT"
MNT_DETACH = 2


class MountError(Exception):
    """A failure to mount or unmount, reported to the user as one line."""


# --------------------------------------------------------------------------
# Starting
# --------------------------------------------------------------------------

def start(config: MountConfig, created_workdir: bool = False) -> None:
    """Mount *config*; in the foreground this serves until unmounted.

    If the mount fails and we created the workdir for it, the workdir is
    removed again so a failed mount leaves nothing behind.
    """
    try:
        if config.foreground:
            _setup_logging(config, logging.StreamHandler(sys.stderr))
            serving = _prepare(config)
        else:
            _daemonize(config)
            return
    except BaseException:
        if created_workdir and config.workdir:
            shutil.rmtree(config.workdir, ignore_errors=True)
        raise
    _serve(config, serving)


def _is_our_mount(path: str) -> bool:
    entry = top_mount(path)
    return entry is not None and entry.fstype == FSTYPE


def _daemonize(config: MountConfig) -> None:
    """Fork; the child mounts and reports readiness (or the error) through a pipe."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: never returns
        os.close(read_fd)
        code = 1
        try:
            os.setsid()
            code = _daemon_child(config, write_fd)
        except MountError:
            pass  # already logged by _serve
        except BaseException:  # noqa: BLE001 - the daemon must not unwind into the CLI
            with contextlib.suppress(BaseException):
                log.exception("daemon failed")
        finally:
            with contextlib.suppress(BaseException):
                logging.shutdown()
            os._exit(code)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 4096):
        chunks.append(chunk)
    os.close(read_fd)
    message = b"".join(chunks).decode(errors="replace").strip()
    if message == "ok":
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    raise MountError(message or "the daemon exited before the mount was ready")


def _daemon_child(config: MountConfig, ready_fd: int) -> int:
    """Detach from the terminal, mount, say "ok" (or why not) on ready_fd, then serve."""
    try:
        _detach_stdio(config)
        serving = _prepare(config)
    except BaseException as e:  # noqa: BLE001 - whatever it is, the parent prints one line
        message = str(e) if isinstance(e, MountError) else f"internal error: {type(e).__name__}: {e}"
        log.error("mount of %s failed: %s", config.mountpoint, message, exc_info=not isinstance(e, MountError))
        os.write(ready_fd, message.encode())
        os.close(ready_fd)
        return 1
    os.write(ready_fd, b"ok")
    os.close(ready_fd)
    _serve(config, serving)
    return 0


def _detach_stdio(config: MountConfig) -> None:
    """stdin from /dev/null; stdout, stderr and logging to WORKDIR/unionfs.log or syslog.

    Done first, so nothing the daemon prints reaches the caller's terminal or
    keeps its pipes open (which would hang `$(unionfs mount ...)`).
    """
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    logfile = workdir.path_of(config.workdir, workdir.DAEMON_LOG) if config.workdir else None
    if logfile:
        try:
            out = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError:
            logfile = None  # e.g. a read-only workdir: the core will say what is wrong
        else:
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.close(out)
    os.close(devnull)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    handler: logging.Handler = logging.NullHandler()
    if logfile:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        with contextlib.suppress(OSError):  # no syslog daemon listening: no log
            handler = logging.handlers.SysLogHandler("/dev/log")
            handler.ident = f"unionfs[{os.getpid()}]: "
    _setup_logging(config, handler)


def _setup_logging(config: MountConfig, handler: logging.Handler) -> None:
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    log.setLevel(logging.DEBUG if config.debug else logging.INFO)


@dataclass
class _Serving:
    """What _serve needs from _prepare: the pid file to remove and the locks to hold."""

    pidfile: str | None
    locks: list[int]
    ops: Any = None  # fs.Operations, for the SIGUSR1 stats
    deferred: list[int] = field(default_factory=list)  # stop signals that came before serving
    released: bool = False  # _let_go has run


def _prepare(config: MountConfig) -> _Serving:
    """Everything up to a live mount; raises MountError with one line."""
    _raise_nofile_limit()
    os.umask(0o077)   # private state files stay private; the core sets union objects' modes explicitly
    os.chdir("/")     # do not keep the caller's cwd busy
    locks = [_lock_dir(path, what) for path, what in
             ((config.upper, "upper layer"), (config.workdir, "workdir")) if path]
    try:
        from . import binding, describe_modules, fs  # the core; imported late so CLI errors never need pyfuse3
        fuse = binding.load()
    except ImportError as e:
        raise MountError(f"the filesystem core is not available ({e})") from None
    pyfuse3 = fuse.module
    log.info("FUSE binding: %s; poll_us=%d; modules: %s", fuse.describe(), config.poll_us,
             describe_modules())
    wanted, why_not = fs.passthrough_plan(config)
    if not wanted:
        if config.passthrough == "on":
            raise MountError(f"passthrough=on: {why_not}")
        log.info("passthrough: off (%s)", why_not)
    if fuse.missing():
        log.warning("running on %s without the fast paths %s (%s): more requests and more "
                    "time per request; `pip install .` builds the built-in binding",
                    fuse.name, ", ".join(fuse.missing()), fuse.fallback_reason or "its own build")
    try:
        ops = fs.make_operations(config, passthrough=wanted)
        options = set(fs.fuse_options(config)) | kernel_flag_options(config)
        options = {escape_fuse_option(o) for o in options}
    except MixedFormat as e:
        raise MountError(str(e)) from None
    except (OSError, ValueError) as e:
        raise MountError(f"cannot open the layers: {_describe(e)}") from None
    deferred = _defer_stop_signals()
    _init_fuse(pyfuse3, ops, config.mountpoint, options)
    entry = top_mount(config.mountpoint)
    pidfile = None
    if entry is not None:
        with contextlib.suppress(OSError):
            pidfile = write_pidfile(entry.devno, config.mountpoint, config.upper, config.workdir)
        utab.add(config.fsname, config.mountpoint)  # so that plain `umount` waits for us
    log.info("mounted %s (pid %d)", config.mountpoint, os.getpid())
    return _Serving(pidfile, locks, ops, deferred)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _defer_stop_signals() -> list[int]:
    """From just before the kernel mount until the request loop listens, remember signals.

    The mount is visible (and a test or a user may signal us) before trio's signal
    receiver is open. Python's default SIGINT raises KeyboardInterrupt wherever the
    main thread is, and SIGTERM/SIGHUP/SIGUSR1 would kill the process outright, so
    a signal in that window made a clean stop exit 130 or leave the mount behind.
    The list is read once the receiver is open: a remembered stop signal stops the
    mount the same way as one that arrives later."""
    deferred: list[int] = []
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda signum, _frame: deferred.append(signum))
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # stats asked before serving: none yet
    return deferred


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e) or type(e).__name__


def _init_fuse(pyfuse3: Any, ops: Any, mountpoint: str, options: set[str]) -> None:
    """pyfuse3.init, with libfuse's complaint on fd 2 turned into our one-line error."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            pyfuse3.init(ops, mountpoint, options)
            return
        except Exception as e:  # pyfuse3 raises RuntimeError; libfuse says why on stderr
            error = e
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        said = [line for line in captured.read().decode(errors="replace").splitlines() if line.strip()]
    for line in said:
        log.debug("libfuse: %s", line)
    reason = said[-1].strip().removeprefix("fuse: ") if said else str(error)
    raise MountError(f"cannot mount on '{mountpoint}': {reason}")


LOCK_GRACE = 3.0  # seconds a just-unmounted daemon may take to let go of its layers


def _lock_dir(path: str, what: str) -> int:
    """Hold an exclusive lock for the daemon's life, like overlayfs' "in-use" check.

    A daemon whose mount is already gone may still be finishing (closing the changes
    log) when the next mount of the same upper starts, e.g. after a lazy or forced
    unmount that did not wait for it: give it a moment before calling the upper busy."""
    fd = lock_dir(path, LOCK_GRACE)
    if fd is None:
        raise MountError(f"{what} '{path}' is in use by another unionfs mount")
    return fd


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _raise_nofile_limit() -> None:
    """The core keeps a descriptor per open file and layer; allow as many as we may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


#: the cyclic collector's thresholds while serving (CPython's default: 700, 10, 10)
GC_THRESHOLDS = (50_000, 20, 100)


def _tune_gc() -> None:
    """Fewer passes of Python's cyclic garbage collector while serving. With the default
    thresholds a walk collects every 700 new objects, and every node the kernel keeps
    (one per name it looked up) is traversed again at each full collection, which grows
    with the tree walked; no request is answered while one runs. The
    objects made while mounting never become garbage: frozen, no collection walks them.
    Nodes form no cycles (a node points only to its parent, which keeps a count of its
    children), so reference counting frees them at forget; the collector only gathers
    the odd cycle (a traceback, a frame), and later."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


#: the request loop's time slice, in ns (see _short_slice)
SLICE_NS = 500_000
_SYS_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}


def _short_slice() -> None:
    """Ask the scheduler for a short time slice for the request loop's thread.

    Every request is a client blocked until we answer, and the end of the FUSE
    connection is a caller about to unmount the layers' filesystem (_let_go): both
    want this thread running soon after it is woken. With the default slice a woken
    thread often waits out a busy neighbour's slice first (milliseconds on a loaded
    machine). Since Linux 6.12 a slice shorter than the running task's (sched_setattr's
    sched_runtime for SCHED_OTHER) lets a woken thread preempt it, while its share of
    the CPU stays what its nice value gives it; older kernels ignore the field. Long
    enough (0.5 ms) for _let_go to run in one piece."""
    number = _SYS_SCHED_SETATTR.get(os.uname().machine)
    if number is None:
        return
    # struct sched_attr, first version (48 bytes): size, policy, flags, nice, priority,
    # runtime, deadline, period
    attr = struct.pack("=IIQiIQQQ", 48, os.SCHED_OTHER, 0, os.getpriority(os.PRIO_PROCESS, 0),
                       0, SLICE_NS, 0, 0)
    buf = ctypes.create_string_buffer(attr, len(attr))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, 0, buf, 0) != 0:
        log.debug("sched_setattr: %s", os.strerror(ctypes.get_errno()))


def _serve(config: MountConfig, serving: _Serving) -> None:
    """Run the request loop until unmounted or signalled, then clean up."""
    import trio

    from .binding import load
    pyfuse3 = load().module

    signalled = False
    _tune_gc()
    _short_slice()

    async def run() -> None:
        with trio.open_signal_receiver(*STOP_SIGNALS, signal.SIGUSR1) as signals:
            if serving.deferred:  # signalled while mounting: stop without serving
                stop(serving.deferred[0])
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(terminate_on_signal, signals)
                await pyfuse3.main(max_tasks=MAX_TASKS)
                _let_go(config, serving, signalled)
                nursery.cancel_scope.cancel()

    async def terminate_on_signal(signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if signum == signal.SIGUSR1:  # `kill -USR1 PID`: what the daemon holds, in its log
                log.info("stats: %s, rss_kib=%s, gc_passes=%s", ", ".join(
                    f"{k}={v}" for k, v in serving.ops.stats().items()), _rss_kib(),
                    sum(g["collections"] for g in gc.get_stats()))
                continue
            stop(signum)
            pyfuse3.terminate()
            return

    def stop(signum: int) -> None:
        nonlocal signalled
        signalled = True
        log.info("got %s, unmounting %s", signal.Signals(signum).name, config.mountpoint)

    try:
        trio.run(run)
    except Exception as e:
        log.exception("request loop failed; unmounting %s", config.mountpoint)
        raise MountError(f"request loop failed: {_describe(e)} (see the log)") from None
    finally:
        _stop(config, serving, pyfuse3, signalled)


def _let_go(config: MountConfig, serving: _Serving, signalled: bool) -> None:
    """Right after the request loop, before anything else: free the layers.

    Whoever unmounted may unmount the layers' filesystem next (umount(2) returns
    before the daemon even sees the connection end; only `unionfs umount` and the
    umount(8) helper wait for it), and gets EBUSY while any fd of ours is on it.
    So every fd on a layer goes first, then the stop is recorded as clean (its
    few fds are in the workdir), then the locks (a new mount of the same upper
    may start from here) and the log file; trio's teardown, libfuse's and the
    pid file come after. Runs once; a request loop that failed gets it from _stop."""
    if serving.released:
        return
    serving.released = True
    ops = serving.ops
    if ops is not None:
        try:
            ops.release_layers()
        except Exception:  # noqa: BLE001 - the process exit closes what is left
            log.exception("closing the layers failed")
        try:
            ops.shutdown()
        except Exception:  # noqa: BLE001 - the stop is not marked clean: the next mount reconciles
            log.exception("recording a clean stop failed")
    for fd in serving.locks:
        os.close(fd)
    serving.locks = []
    if not signalled:  # say why we stop: nobody asked this process to
        log.info("the kernel ended the FUSE connection: %s was unmounted (umount, umount -l "
                 "or fusermount -u)", config.mountpoint)
    log.info("unmounted %s", config.mountpoint)
    if not config.foreground:
        _release_log()


def _stop(config: MountConfig, serving: _Serving, pyfuse3: Any, signalled: bool) -> None:
    """What is left once the layers are free (or the loop failed before _let_go)."""
    _let_go(config, serving, signalled)
    with contextlib.suppress(Exception):
        pyfuse3.close(unmount=True)
    devno = os.path.basename(serving.pidfile or "").removesuffix(".pid")
    if serving.pidfile and not any(e.devno == devno for e in mount_entries()):
        # the device number may already serve another mount, with its own pid file
        remove_pidfile(devno, this_process())
    utab.remove(config.mountpoint, still_mounted=top_mount(config.mountpoint) is not None)


def _release_log() -> None:
    """stdout and stderr (WORKDIR/unionfs.log) to /dev/null: the log file is on the
    upper's filesystem too. Nothing is logged after this."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    logging.getLogger().handlers[:] = [logging.NullHandler()]


# --------------------------------------------------------------------------
# Stopping
# --------------------------------------------------------------------------

def submounts(mnt: str) -> list[MountEntry]:
    """Mounts strictly below *mnt*, in the order to unmount them: children before parents.

    mountinfo lists a mount after the one it sits on, so its reverse is a safe
    order (also for several mounts stacked on one directory).
    """
    prefix = mnt.rstrip("/") + "/"
    return [e for e in reversed(mount_entries()) if e.mountpoint.startswith(prefix)]


def unmount(path: str, recursive: bool = False) -> None:
    """Unmount the unionfs at *path* and wait for its daemon to exit.

    Mounts below it (/proc, /dev, /sys of a root on the union) make the
    kernel refuse with EBUSY, which says nothing about why: they are named
    instead, and nothing is unmounted unless *recursive* asks to unmount
    them first (deepest first; a unionfs among them also waits for its daemon).
    """
    mnt = os.path.realpath(os.path.abspath(path))
    entry = top_mount(mnt)
    if entry is None:
        raise MountError(f"'{path}' is not a unionfs mount (nothing is mounted there)")
    if entry.fstype != FSTYPE:
        raise MountError(f"'{path}' is not a unionfs mount (it is {entry.fstype})")
    below = submounts(mnt)
    if below and not recursive:
        names = ", ".join(dict.fromkeys(e.mountpoint for e in reversed(below)))  # stacked: once
        raise MountError(f"'{path}' has mounts below it: {names} "
                         "(unmount them first, or use `unionfs umount -R`)")
    pf = read_pidfile(entry.devno)
    owner = pf.owner if pf is not None else None
    dead = owner is not None and not alive(*owner)
    if below and dead:
        # paths below a dead FUSE mount may not resolve (ENOTCONN); detaching
        # the union takes everything mounted below it along
        _umount(mnt, lazy=True, dead=dead)
    else:
        for sub in below:
            if sub.fstype == FSTYPE and top_mount(sub.mountpoint) == sub:
                unmount(sub.mountpoint)
            else:
                _umount(sub.mountpoint, lazy=False, dead=False)
        _umount(mnt, lazy=False, dead=dead)
    if owner is not None:
        _wait_for_exit(*owner)
    remove_pidfile(entry.devno, owner)  # not another mount's (device numbers get reused)
    utab.remove(mnt, still_mounted=top_mount(mnt) is not None)  # a daemon that died left it


def _umount(mnt: str, lazy: bool, dead: bool) -> None:
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(mnt), MNT_DETACH if lazy else 0) == 0:
            return
        err = ctypes.get_errno()
    else:
        cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), mnt]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            return
        err = errno.EBUSY if "busy" in proc.stderr else errno.EPERM
    if err == errno.EINVAL and not _is_our_mount(mnt):
        return  # someone else unmounted it meanwhile
    if err == errno.EBUSY and dead and not lazy:
        return _umount(mnt, lazy=True, dead=dead)
    raise MountError(f"cannot unmount '{mnt}': {os.strerror(err)}")


def _wait_for_exit(pid: int, starttime: str | None) -> None:
    """Wait for the daemon; nudge it with SIGTERM, then SIGKILL, if it lingers."""
    timeout = float(os.environ.get(UMOUNT_TIMEOUT_ENV, "30"))
    for sig, wait in ((None, timeout), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if sig is not None and alive(pid, starttime):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while alive(pid, starttime):
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        else:
            return
