"""After an unmount returns, the layers' filesystem is free; umount(8) waits for the daemon.

The unmount loop is scripts/bench_umount.py (tmpfs holding lower/upper/work, a union
of them, a few changes, `UNMOUNT MNT && umount TMPFS`): plain `umount` (through
/sbin/umount.fuse.unionfs) and `unionfs umount` wait for the daemon, so neither may
ever find the tmpfs busy; `umount -i` and `fusermount3 -u` do not wait (umount(2)
returns before the daemon sees the connection end), so their counts are printed only.

The helper and /usr/local/sbin/unionfs are machine-wide; each test runs in a mount
namespace of its own where this checkout's helper and a `unionfs` of its choosing are
bind-mounted over them (umount(8) clears PATH for its helpers, so that is the only
way to choose the command), and its mounts stay in there.
"""
from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from bench_umount import COMMAND, HELPER, REPO, private_namespace, unionfs_wrapper  # noqa: E402

REPO_HELPER = os.path.join(REPO, "scripts", "umount.fuse.unionfs")

pytestmark = pytest.mark.skipif(not (os.path.exists(HELPER) and os.path.exists(COMMAND)),
                                reason="needs scripts/setup (the umount helper and the command)")


def test_helper_is_the_one_setup_installs():
    assert filecmp.cmp(HELPER, REPO_HELPER, shallow=False), f"{HELPER} is stale: run scripts/setup"


def test_no_busy_layers_after_umount_or_unionfs_umount():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench_umount.py"),
                           "--rounds", "50", "--impl", "unionfs", "--json"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    busy = json.loads(proc.stdout.strip().splitlines()[-1])["unionfs"]
    print(f"\nbusy rounds of 50 (`UNMOUNT MNT && umount TMPFS`): {busy}")
    assert (busy["umount"], busy["unionfs umount"]) == (0, 0), busy


def _in_namespace(tmp_path, script: str, command_body: str) -> subprocess.CompletedProcess[str]:
    """Run *script* (sh) in a private mount namespace where the helper is this checkout's
    and /usr/local/sbin/unionfs is a script with *command_body*. $PY runs this checkout's
    unionfs; $L $U $W $M are a lower, an upper, a workdir and a mountpoint; $CALLS is where
    a recording command writes its arguments."""
    paths = {k: tmp_path / v for k, v in
             (("L", "lower"), ("U", "upper"), ("W", "work"), ("M", "mnt"), ("BIN", "bin"))}
    for p in paths.values():
        p.mkdir()
    (paths["L"] / "f").write_text("lower\n")
    command = tmp_path / "command"
    command.write_text("#!/bin/sh\n" + command_body + "\n")
    command.chmod(0o755)
    unionfs_wrapper(str(paths["BIN"]))
    env = dict(os.environ, PY=sys.executable, CALLS=str(tmp_path / "calls"),
               **{k: str(v) for k, v in paths.items()})
    # whatever happens, nothing stays mounted in the namespace (its daemon would keep it alive)
    script = 'trap \'umount -l "$M" 2>/dev/null || true\' EXIT\n' + script
    argv = private_namespace(["sh", "-c", script], {HELPER: REPO_HELPER, COMMAND: str(command)})
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


RECORDING = 'echo "$@" >> "$CALLS"; exec "$PY" -m unionfs "$@"'
MOUNT = '"$PY" -m unionfs mount --workdir "$W" "$L" "$U" "$M"'
#: prints the daemon's pid (from its pid file, found by the mount's device number)
DAEMON = ('dev=$(awk -v m="$M" \'$5 == m {print $3}\' /proc/self/mountinfo); '
          'pid=$(head -n 1 /run/unionfs/$dev.pid | cut -d" " -f1)')


def test_umount_runs_the_helper_and_waits_for_the_daemon(tmp_path):
    proc = _in_namespace(tmp_path, f"""set -e
        {MOUNT}; {DAEMON}
        echo x >> "$M/f"
        umount "$M"
        state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d" " -f1)
        case $state in ""|Z|X) ;; *) echo "daemon $pid still running ($state)";; esac
        grep -q "^umount $M\\$" "$CALLS" && echo helper-ran
        {MOUNT}                       # the upper's lock is free at once
        umount -i "$M"                # no helper: nothing recorded
        [ "$(grep -c umount "$CALLS")" = 1 ] && echo skipped-by-umount-i
        {MOUNT}                       # the daemon before may still be exiting: not locked out
        umount "$M"
        """, RECORDING)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["helper-ran", "skipped-by-umount-i"], proc.stdout + proc.stderr


@pytest.mark.parametrize("body", ["exit 1", "exec /nonexistent/python -m unionfs \"$@\""])
def test_a_failing_helper_still_unmounts(tmp_path, body):
    """umount(8) does nothing itself after its helper: a `unionfs` that fails (or cannot
    run at all) must not leave the mount behind."""
    proc = _in_namespace(tmp_path, f"""set -e
        {MOUNT}
        umount "$M"
        if awk -v m="$M" '$5 == m {{found=1}} END {{exit !found}}' /proc/self/mountinfo; then
            echo still-mounted
        fi
        """, body)
    assert proc.returncode == 0, proc.stderr
    assert "still-mounted" not in proc.stdout
