"""mount(8) and /etc/fstab drive unionfs like fuse-overlayfs: mount.fuse3 runs
`unionfs SOURCE MOUNTPOINT -o OPTS` with no PATH, so scripts/setup puts the
command in /usr/local/sbin. These tests use the real mount(8) and umount(8)."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from helpers.mounting import daemon_pids, force_unmount, is_mounted, pid_gone, unionfs_cmd

# What /bin/sh (dash) searches when mount(8) gives it no PATH.
HELPER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing"),
]


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def helper_installed() -> None:
    """mount(8) must find a working `unionfs` that runs this checkout's code."""
    found = shutil.which("unionfs", path=HELPER_PATH)
    assert found, "no unionfs command where mount(8) looks for it: run scripts/setup"
    assert str(REPO) in Path(found).read_text(errors="replace"), \
        f"{found} belongs to another checkout: run scripts/setup here"
    proc = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{found} does not run: {proc.stderr.strip()} (run scripts/setup)"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for d in ("l1", "l2", "up", "work", "mnt"):
        (tmp_path / d).mkdir()
    (tmp_path / "l1/top.txt").write_text("top\n")
    (tmp_path / "l2/bottom.txt").write_text("bottom\n")
    return tmp_path


def overlay_opts(t: Path) -> str:
    return f"lowerdir={t}/l1:{t}/l2,upperdir={t}/up,workdir={t}/work"


def mount_line(mnt: Path) -> str:
    with open("/proc/self/mountinfo") as f:
        lines = [line for line in f if line.split()[4] == str(mnt)]
    assert len(lines) == 1, lines
    return lines[0]


def cleanup(mnt: Path) -> None:
    subprocess.run(unionfs_cmd("umount", str(mnt)), capture_output=True, timeout=60)
    force_unmount(str(mnt))


def wait_gone(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not all(pid_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return all(pid_gone(p) for p in pids)


def test_mount_t_fuse_unionfs(tree: Path) -> None:
    mnt = tree / "mnt"
    proc = subprocess.run(["mount", "-t", "fuse.unionfs", "my-union", str(mnt), "-o", overlay_opts(tree)],
                          capture_output=True, text=True, timeout=60)
    try:
        assert proc.returncode == 0, proc.stderr
        line = mount_line(mnt)
        assert " - fuse.unionfs my-union " in line
        assert (mnt / "top.txt").read_text() == "top\n"
        assert (mnt / "bottom.txt").read_text() == "bottom\n"
        (mnt / "bottom.txt").write_text("changed\n")
        assert (tree / "up/bottom.txt").read_text() == "changed\n"
        assert (tree / "l2/bottom.txt").read_text() == "bottom\n"
        pids = daemon_pids(str(mnt))
        assert len(pids) == 1
        # plain umount(8) works too; the daemon notices and exits by itself
        proc = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(str(mnt))
        assert wait_gone(pids), "daemon still running after umount(8)"
    finally:
        cleanup(mnt)


def test_mount_helper_ro_option(tree: Path) -> None:
    mnt = tree / "mnt"
    subprocess.run(["mount", "-t", "fuse.unionfs", "unionfs", str(mnt), "-o", "ro," + overlay_opts(tree)],
                   check=True, timeout=60)
    try:
        assert " ro," in mount_line(mnt) or " ro " in mount_line(mnt)
        assert (mnt / "top.txt").read_text() == "top\n"
        for attempt in (lambda: (mnt / "top.txt").write_text("x"),
                        lambda: (mnt / "new").mkdir(),
                        lambda: (mnt / "bottom.txt").unlink()):
            with pytest.raises(OSError) as exc:
                attempt()
            assert exc.value.errno == errno.EROFS
        assert os.listdir(tree / "up") == []
    finally:
        cleanup(mnt)


def test_mount_helper_rejects_bad_options(tree: Path) -> None:
    mnt = tree / "mnt"
    proc = subprocess.run(["mount", "-t", "fuse.unionfs", "unionfs", str(mnt), "-o", "bogus," + overlay_opts(tree)],
                          capture_output=True, text=True, timeout=60)
    try:
        assert proc.returncode != 0
        assert "unknown mount option 'bogus'" in proc.stderr
        assert not is_mounted(str(mnt))
    finally:
        cleanup(mnt)


@pytest.fixture
def fstab() -> Iterator[Path]:
    """/etc/fstab, restored byte for byte afterwards whatever happens."""
    path = Path("/etc/fstab")
    original = path.read_bytes() if path.exists() else None
    try:
        yield path
    finally:
        if original is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(original)


def test_fstab_line(tree: Path, fstab: Path) -> None:
    mnt = tree / "mnt"
    line = f"my-fstab-union {mnt} fuse.unionfs {overlay_opts(tree)},noauto,nofail,x-test=1,fsync=1 0 0\n"
    text = fstab.read_text() if fstab.exists() else ""
    fstab.write_text(text + ("" if text.endswith("\n") or not text else "\n") + line)
    try:
        proc = subprocess.run(["mount", str(mnt)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert " - fuse.unionfs my-fstab-union " in mount_line(mnt)
        assert sorted(os.listdir(mnt)) == ["bottom.txt", "top.txt"]
        (mnt / "new.txt").write_text("new\n")
        assert (tree / "up/new.txt").read_text() == "new\n"
        pids = daemon_pids(str(mnt))
        proc = subprocess.run(unionfs_cmd("umount", str(mnt)), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(str(mnt)) and wait_gone(pids, timeout=0.5)
    finally:
        cleanup(mnt)
