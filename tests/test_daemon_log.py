"""Operating a mount: what the daemon says, where, and why it stops.

Foreground: stderr. Daemonised: WORKDIR/unionfs.log. `--debug` names every
request with its arguments and failed ones with their errno. A daemon that stops
says why (a signal, or the kernel ending the connection because somebody
unmounted, also lazily); a start that fails inside the daemon is printed by the
`unionfs mount` that started it. (test_cli.py has SIGTERM of a daemon, --debug
reaching the log at all, and the one-line errors of bad command lines.)
"""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from helpers.mounting import daemon_pids, force_unmount, is_mounted, pid_gone, unionfs_cmd, unionfs_mount
from test_cli import wait_for

pytestmark = [pytest.mark.mount]


def layers(tmp_path: Path) -> tuple[str, str, str, Path]:
    low, up, mnt = tmp_path / "low", tmp_path / "up", tmp_path / "mnt"
    for d in (low, up, mnt):
        d.mkdir()
    (low / "known-name.txt").write_text("known\n")
    return str(low), str(up), str(mnt), tmp_path / ".up.unionfs-work" / "unionfs.log"


def test_debug_log_names_each_request_and_its_error(tmp_path):
    low, up, mnt, log = layers(tmp_path)
    with unionfs_mount([low], up, mnt, options=("debug",)):
        os.stat(os.path.join(mnt, "known-name.txt"))
        try:
            os.getxattr(os.path.join(mnt, "known-name.txt"), "user.not-there")
        except OSError:
            pass
        Path(mnt, "made-here").write_text("x")
    text = log.read_text()
    assert "lookup(1, b'known-name.txt')" in text
    assert "getxattr(" in text and "b'user.not-there'" in text
    assert "getxattr -> ENODATA" in text
    assert "create(1, b'made-here'" in text
    assert "unmounted" in text


def test_lazy_unmount_from_under_the_daemon_is_logged(tmp_path):
    low, up, mnt, log = layers(tmp_path)
    with unionfs_mount([low], up, mnt):
        (pid,) = daemon_pids(mnt)
        fd = os.open(os.path.join(mnt, "known-name.txt"), os.O_RDONLY)   # keeps it busy
        try:
            subprocess.run(["umount", "-l", mnt], check=True)
            assert not is_mounted(mnt)
            assert os.read(fd, 100) == b"known\n"      # still served after the detach
        finally:
            os.close(fd)
        assert wait_for(lambda: pid_gone(pid), 30)
    text = log.read_text()
    assert f"the kernel ended the FUSE connection: {mnt} was unmounted" in text
    assert "got SIG" not in text and "internal error" not in text


def test_foreground_logs_to_stderr_and_says_why_it_stops(tmp_path):
    low, up, mnt, log = layers(tmp_path)
    errfile = tmp_path / "stderr"
    for how in ("umount", "SIGINT"):
        with open(errfile, "w") as err:
            daemon = subprocess.Popen(unionfs_cmd("mount", "-f", low, up, mnt), stderr=err)
        try:
            assert wait_for(lambda: is_mounted(mnt), 30)
            if how == "umount":
                subprocess.run(["umount", mnt], check=True)
            else:
                daemon.send_signal(signal.SIGINT)
            assert daemon.wait(timeout=60) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            force_unmount(mnt)
        text = errfile.read_text()
        assert f"mounted {mnt}" in text and f"unmounted {mnt}" in text
        assert ("the kernel ended the FUSE connection" in text) == (how == "umount")
        assert ("got SIGINT" in text) == (how == "SIGINT")
        assert not log.exists() or "mounted" not in log.read_text()  # stderr, not the file


def test_a_start_that_fails_in_the_daemon_is_printed(tmp_path):
    """The upper is locked by the first daemon; the second daemon finds out after the fork,
    and the `unionfs mount` that started it prints its reason (daemonised and -f alike)."""
    low, up, mnt, log = layers(tmp_path)
    other = tmp_path / "mnt2"
    other.mkdir()
    with unionfs_mount([low], up, mnt):
        for extra in ([], ["-f"]):
            proc = subprocess.run(unionfs_cmd("mount", *extra, low, up, str(other)),
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 1
            assert proc.stderr.splitlines() == \
                [f"unionfs: error: upper layer '{up}' is in use by another unionfs mount"]
            assert not is_mounted(str(other))
    assert "is in use by another unionfs mount" in log.read_text()


def _in_mountinfo(path: str) -> bool:
    """Like is_mounted, without its realpath: a stat of the mountpoint would wait for the
    daemon to serve, which is exactly the moment this must not wait for."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def test_a_stop_signal_right_after_the_mount_appears_stops_cleanly(tmp_path):
    """A Ctrl-C or a service manager's SIGTERM can come as soon as the mount is visible,
    before the request loop listens for signals. strace holds the daemon for 0.3 s after
    its mount(2) returns, so the signal lands in that window every time."""
    low, up, mnt, log = layers(tmp_path)
    errfile = tmp_path / "stderr"
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        with open(errfile, "w") as err:
            tracer = subprocess.Popen(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=mount",
                                       "-e", "inject=mount:delay_exit=300000",
                                       *unionfs_cmd("mount", "-f", low, up, mnt)], stderr=err)
        try:
            assert wait_for(lambda: _in_mountinfo(mnt) or tracer.poll() is not None, 30)
            (daemon,) = Path(f"/proc/{tracer.pid}/task/{tracer.pid}/children").read_text().split()
            os.kill(int(daemon), signum)
            assert tracer.wait(timeout=60) == 0, errfile.read_text()   # strace exits as its tracee did
        finally:
            if tracer.poll() is None:
                tracer.kill()
                tracer.wait()
            leftover = _in_mountinfo(mnt)
            force_unmount(mnt)
        assert not leftover
        text = errfile.read_text()
        assert f"got {signal.Signals(signum).name}, unmounting {mnt}" in text
        assert f"unmounted {mnt}" in text and "Traceback" not in text
