"""scripts/fusetrace.py: the per-request latency tool the performance work is measured with."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.mount]

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "scripts", "fusetrace.py")


def _has_fuse_tracepoints() -> bool:
    subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"],
                   stderr=subprocess.DEVNULL, check=False)
    return os.path.isdir("/sys/kernel/tracing/events/fuse")


@pytest.mark.skipif(not _has_fuse_tracepoints(), reason="no fuse tracepoints (Linux 6.15+)")
def test_fusetrace_counts_the_requests_a_command_makes(mounted, tmp_path):
    """A chmod of a lower file through the mount is one SETATTR (with its copy-up in it);
    a fresh mount has not seen the name yet, so the kernel looks it up first."""
    out = tmp_path / "lat.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--json", str(out), "--",
                           "chmod", "600", os.path.join(mounted.mnt, "dir", "a.txt")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    import json
    lat = json.loads(out.read_text())
    assert len(lat.get("FUSE_SETATTR", [])) >= 1, proc.stdout
    assert len(lat.get("FUSE_LOOKUP", [])) >= 2, proc.stdout  # dir, then a.txt
    assert all(v > 0 for vs in lat.values() for v in vs)
    assert "FUSE_SETATTR" in proc.stdout
    with open("/sys/kernel/tracing/events/fuse/enable") as f:
        assert f.read().strip() == "0"  # left as it found it


def test_fusetrace_passes_the_command_exit_status_on(tmp_path):
    if not _has_fuse_tracepoints():
        pytest.skip("no fuse tracepoints (Linux 6.15+)")
    proc = subprocess.run([sys.executable, SCRIPT, "--", "sh", "-c", "exit 3"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr


@pytest.mark.skipif(not _has_fuse_tracepoints(), reason="no fuse tracepoints (Linux 6.15+)")
def test_fusetrace_mount_counts_that_mount_only(mounted, tmp_path):
    """--mount counts the requests of that mount's connection and none of another's, and
    leaves no tracefs instance behind."""
    from helpers.mounting import unionfs_mount
    low, mnt2 = tmp_path / "low2", tmp_path / "mnt2"
    low.mkdir()
    mnt2.mkdir()
    (low / "f").write_text("f\n")
    with unionfs_mount([str(low)], None, str(mnt2)):
        out = tmp_path / "lat.json"
        script = (f"cat {os.path.join(mounted.mnt, 'dir', 'a.txt')} {mnt2 / 'f'}; "
                  f"stat {mnt2} >/dev/null")
        proc = subprocess.run([sys.executable, SCRIPT, "--mount", str(mnt2), "--json", str(out), "--",
                               "sh", "-c", script], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    import json
    lat = json.loads(out.read_text())
    # mnt2: a lookup of f (and its open); the first mount's lookups of dir and a.txt not
    assert len(lat.get("FUSE_LOOKUP", [])) == 1, proc.stdout
    assert len(lat.get("FUSE_OPEN", [])) == 1, proc.stdout
    assert not [d for d in os.listdir("/sys/kernel/tracing/instances") if d.startswith("fusetrace-")]
