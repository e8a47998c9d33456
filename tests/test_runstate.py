"""The run state a live mount leaves (pid file, mount table, workdir lock), as the
commands that are not the daemon read it: `unionfs diff` finds a live union by its
mountpoint or by its upper, without loading the daemon's modules."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers.mounting import unionfs_mount

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts)"),
]

# runs `unionfs diff` in this process (cli.dispatch: main() itself loads mount.py for its
# MountError), then names the daemon's modules it loaded
PROBE = """
import sys
from unionfs import cli
assert cli.dispatch(sys.argv[1:]) == 0
sys.stdout.flush()
loaded = sorted(m for m in sys.modules if m in ("pyfuse3", "trio", "unionfs.mount", "unionfs.fs"))
print("LOADED:" + ",".join(loaded), file=sys.stderr)
"""


def diff_here(*args: str) -> tuple[list[str], str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, "diff", *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = [line for line in proc.stderr.splitlines() if line.startswith("LOADED")]
    assert loaded, proc.stderr
    return proc.stdout.splitlines(), loaded[-1]


def test_diff_finds_a_live_union_by_its_pid_file_without_the_daemon(tmp_path):
    lower, upper, mnt, work = (str(tmp_path / n) for n in ("lower", "upper", "mnt", "work"))
    for d in (lower, upper, mnt, work):
        os.makedirs(d)
    with open(os.path.join(lower, "old"), "w") as f:
        f.write("old\n")
    with unionfs_mount([lower], upper, mnt, workdir=work):
        with open(os.path.join(mnt, "new"), "w") as f:
            f.write("new\n")
        os.unlink(os.path.join(mnt, "old"))
        # by mountpoint: the pid file names the upper and the workdir
        by_mount, loaded = diff_here(mnt)
        assert by_mount == ["A /new", "D /old"]
        assert loaded == "LOADED:", loaded
        # by upper: the workdir is locked by the daemon, whose pid file names the mountpoint
        by_upper, loaded = diff_here("--workdir", work, upper)
        assert by_upper == by_mount
        assert loaded == "LOADED:", loaded
