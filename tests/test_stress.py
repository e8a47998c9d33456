"""stress-ng's filesystem stressors, with --verify, on a union.

The stressors run in a directory that comes from a lower layer and holds lower
files, so every name they make lands in a merged directory (copied up on the
first change). They run in groups of a few at a time (parallel within a group,
so the daemon serves several clients at once), each group for STRESS_SECONDS
(UNIONFS_STRESS_SECONDS overrides). The test fails on a non-zero exit of
stress-ng, on any "fail:" line it prints (some stressors report a failure
without changing the exit status), on a stressor that got no bogo-op done, on a
dead daemon, or on a lower file that reads wrong afterwards. `-s` prints the
bogo-ops per stressor.

Left out, and why:
  fiemap: FUSE has no FIEMAP (the kernel sends it no such ioctl for a regular file).
  fallocate and fpunch run only on the built-in binding (a stock pyfuse3 has no
      fallocate handler, and the stressors would only measure stress-ng's emulation).
  fsize: its checks go through fallocate emulation (which reports success when
      the run time ends mid-loop), and it writes at offsets beyond what the
      upper's filesystem allows, which the kernel's writeback cache accepts and
      the upper refuses at writeback (README Limits): the EFBIG then shows in the
      next syncfs of any process on the mount.
  getdent, open, splice: in this stress-ng (0.15) they work on /proc, /dev, /tmp,
      /sys and /run (or pipes), not in --temp-path: they would test the machine, not
      the union (getdent failed on the root filesystem while other jobs changed /tmp).
  (fstat is pointed at a lower directory with --fstat-dir; by default it stats /dev.)
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess

import pytest

from helpers.mounting import daemon_pid, pid_gone, unionfs_mount
from unionfs import binding

pytestmark = [pytest.mark.mount, pytest.mark.slow]

STRESS_SECONDS = int(os.environ.get("UNIONFS_STRESS_SECONDS", "10"))

# (stressor, extra options): sizes cut down from stress-ng's defaults (1 GiB files)
# so that one bogo-op fits in a group's time on a busy 2-CPU machine
GROUPS: list[list[tuple[str, list[str]]]] = [
    [("hdd", ["--hdd-bytes", "16M", "--hdd-opts", "wr-rnd,rd-rnd"]),
     ("seek", ["--seek-size", "16M"]), ("io", []), ("sync-file", ["--sync-file-bytes", "4M"])],
    [("mmap", ["--mmap-file", "--mmap-bytes", "2M"]), ("msync", ["--msync-bytes", "2M"]),
     ("readahead", ["--readahead-bytes", "16M"]), ("iomix", ["--iomix-bytes", "4M"])],
    [("copy-file", ["--copy-file-bytes", "128M"]), ("sendfile", []), ("fstat", ["--fstat-dir", "{sub}"])],
    [("dir", ["--dir-dirs", "1024"]), ("dentry", ["--dentries", "512"]), ("rename", []),
     ("dirdeep", ["--dirdeep-inodes", "2000"])],
    # one bogo-op of link or symlink is 8192 names made and removed: give them twice the time
    [("link", []), ("symlink", []), ("dirmany", [])],
    [("mknod", []), ("touch", []), ("xattr", [])],
    [("utime", []), ("chmod", []), ("chown", []), ("access", [])],
    # byte-range and flock locks stay in the kernel (pyfuse3 has no lock handlers), so this
    # group leaves the daemon to the two stressors that wait on it most
    [("lockf", []), ("flock", []), ("lockofd", []), ("locka", []), ("fcntl", []),
     ("filename", []), ("chdir", ["--chdir-dirs", "1024"])],
] + ([[("fallocate", ["--fallocate-bytes", "16M"]), ("fpunch", [])]]
     if "fallocate" in binding.load().fast_paths else [])

METRIC = re.compile(r"^\s*- stressor: (\S+)\n\s*bogo-ops: (\d+)", re.M)


def lower_data(i: int) -> bytes:
    return hashlib.sha256(b"stress%d" % i).digest() * (64 * (i + 1))


def run_group(group: list[tuple[str, list[str]]], seconds: int, tmp: str, yaml: str,
              pid: int) -> dict[str, int]:
    """Run the stressors of *group* together; fail on any failure; return bogo-ops."""
    args = ["stress-ng", "--temp-path", tmp, "--verify", "--metrics", "-t", str(seconds),
            "--yaml", yaml]
    for name, extra in group:
        args += [f"--{name}", "1", *(e.format(sub=os.path.join(tmp, "sub")) for e in extra)]
    names = [s for s, _ in group]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=seconds * 6 + 120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"stress-ng {names} hung (daemon alive: {not pid_gone(pid)})")
    out = proc.stdout + proc.stderr
    fails = [line for line in out.splitlines() if re.search(r"\bfail:|FAILED", line)]
    assert proc.returncode == 0 and not fails, \
        f"stress-ng {names} exit {proc.returncode}:\n" + "\n".join(fails or out.splitlines()[-30:])
    assert not pid_gone(pid), f"daemon died during {names}"
    with open(yaml) as f:
        return {name: int(ops) for name, ops in METRIC.findall(f.read())}


@pytest.mark.skipif(shutil.which("stress-ng") is None, reason="needs stress-ng (scripts/setup)")
def test_stress_ng_filesystem_stressors(tmp_path):
    lower, upper, work, mnt = (str(tmp_path / n) for n in ("lower", "upper", "work", "mnt"))
    for d in (upper, work, mnt):
        os.makedirs(d)
    os.makedirs(os.path.join(lower, "stress", "sub"))
    for i in range(40):
        with open(os.path.join(lower, "stress", f"f{i}"), "wb") as f:
            f.write(lower_data(i))
        with open(os.path.join(lower, "stress", "sub", f"s{i}"), "wb") as f:
            f.write(lower_data(i))
    bogo: dict[str, int] = {}
    with unionfs_mount([lower], upper, mnt, workdir=work):
        pid = daemon_pid(mnt)
        tmp = os.path.join(mnt, "stress")
        for n, group in enumerate(GROUPS):
            seconds = STRESS_SECONDS * (2 if any(s in ("link", "symlink") for s, _ in group) else 1)
            got = run_group(group, seconds, tmp, str(tmp_path / f"g{n}.yaml"), pid)
            for name, extra in group:
                if got.get(name, 0) == 0:
                    # a slow stressor can finish no op while its group shares a busy machine:
                    # alone, with twice the time, it must
                    again = run_group([(name, extra)], seconds * 2, tmp, str(tmp_path / f"{name}.yaml"), pid)
                    assert again.get(name, 0) > 0, f"{name} did no bogo-op, even alone: {got}"
                    got[name] = again[name]
            bogo.update(got)
        # the lower files the stressors worked among are intact, and stress-ng cleaned up
        for i in range(40):
            with open(os.path.join(tmp, f"f{i}"), "rb") as f:
                assert f.read() == lower_data(i), f"stress/f{i} changed"
            with open(os.path.join(tmp, "sub", f"s{i}"), "rb") as f:
                assert f.read() == lower_data(i), f"stress/sub/s{i} changed"
        assert sorted(os.listdir(tmp)) == sorted([f"f{i}" for i in range(40)] + ["sub"])
        assert sorted(os.listdir(os.path.join(tmp, "sub"))) == sorted(f"s{i}" for i in range(40))
        assert daemon_pid(mnt) == pid
    print(f"stress-ng, {len(GROUPS)} groups of about {STRESS_SECONDS}s, bogo-ops: "
          + ", ".join(f"{k} {v}" for k, v in bogo.items()))
