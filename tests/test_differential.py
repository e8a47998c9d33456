"""Differential test: seeded random op sequences on kernel overlayfs vs unionfs.

See tests/difftest/__init__.py for the stages. Environment knobs:

  UNIONFS_DIFF_SEEDS            number of seeds (default 24): test ids seed-0 ...
  UNIONFS_DIFF_SEED_LIST        explicit comma-separated seeds (overrides the above)
  UNIONFS_DIFF_OPS              ops per seed (default 300)
  UNIONFS_DIFF_SIDE             what side B is: unionfs (default) or kernel
  UNIONFS_DIFF_SELFTEST_SEEDS   kernel-vs-kernel harness self-test seeds (default 2)
  UNIONFS_DIFF_SHRINK_SECONDS   time budget to shrink a failing seed (default 60)
  UNIONFS_DIFF_SHRINK_TOTAL     time budget for all shrinking in one pytest run (default 240)
  UNIONFS_DIFF_TMP              where to put the case directories (default: $TMPDIR)
  UNIONFS_DIFF_REPLAY           run the ops printed by a failure ("as Python: ops = [...]"),
                                saved to this file, instead of the seeds (test id: replay)
  UNIONFS_DIFF_OVERLAY_XATTRS   also set/get trusted.overlay.* names through the mount
                                (kernel >= 6.7 escapes them; off by default)
  UNIONFS_DIFF_KEEP             keep the case directories (for debugging)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import pytest

from difftest import SIDES, ddmin, report, run_case, shrink
from difftest.ops import Op
from difftest.layers import build_layers, copy_layers
from difftest.view import capture, diff_views
from helpers.rootless import unprivileged_user

pytestmark = [pytest.mark.mount, pytest.mark.slow, pytest.mark.kernel]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _seeds() -> list[int]:
    explicit = os.environ.get("UNIONFS_DIFF_SEED_LIST")
    if explicit:
        return [int(s) for s in explicit.split(",") if s.strip()]
    return list(range(_env_int("UNIONFS_DIFF_SEEDS", 24)))


N_OPS = _env_int("UNIONFS_DIFF_OPS", 300)
SHRINK_SECONDS = float(os.environ.get("UNIONFS_DIFF_SHRINK_SECONDS", 60))
SIDE_B = os.environ.get("UNIONFS_DIFF_SIDE", "unionfs")
# Shrinking is bounded per seed and for the whole pytest run, so that a badly
# broken build still finishes in minutes (later failures are reported unshrunk).
_SHRINK_LEFT = [float(os.environ.get("UNIONFS_DIFF_SHRINK_TOTAL", 240))]


def _overlay_supported() -> bool:
    try:
        with open("/proc/filesystems") as f:
            if any(line.split()[-1] == "overlay" for line in f if line.strip()):
                return True
    except OSError:
        return False
    subprocess.run(["modprobe", "overlay"], capture_output=True)
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == "overlay" for line in f if line.strip())


def _skip_reason(need_fuse: bool) -> str | None:
    if os.geteuid() != 0:
        return "differential test needs root (mounts, trusted.* xattrs, chown)"
    if not _overlay_supported():
        return "kernel overlayfs not available"
    if need_fuse:
        try:
            os.close(os.open("/dev/fuse", os.O_RDWR))
        except OSError as e:
            return f"/dev/fuse not usable: {e}"
    return None


@pytest.fixture(scope="session")
def difftest_root():
    reason = _skip_reason(need_fuse=False)
    if reason:
        pytest.skip(reason)
    # The unionfs CLI runs as `python -m unionfs`: make sure this checkout is importable.
    pp = os.environ.get("PYTHONPATH", "")
    if REPO not in pp.split(os.pathsep):
        os.environ["PYTHONPATH"] = REPO + (os.pathsep + pp if pp else "")
    # Our own directory, not tmp_path_factory's: pytest prunes old numbered
    # dirs when a run starts, which must never hit a concurrent run's mounts.
    root = tempfile.mkdtemp(prefix="unionfs-difftest-", dir=os.environ.get("UNIONFS_DIFF_TMP"))
    os.chmod(root, 0o755)   # the unprivileged ops must be able to reach the mountpoints
    pristine = os.path.join(root, "pristine")
    build_layers(pristine)
    yield root, pristine
    left = [line.split()[4] for line in open("/proc/self/mountinfo")
            if line.split()[4].startswith(root + "/")]
    if not left:
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"differential test left mounts behind: {left}"


def _replay_ops() -> list | None:
    """UNIONFS_DIFF_REPLAY=FILE: a file holding a printed `ops = [Op(...), ...]` list."""
    path = os.environ.get("UNIONFS_DIFF_REPLAY")
    if not path:
        return None
    with open(path) as f:
        text = f.read().strip()
    if text.startswith("as Python:"):
        text = text[len("as Python:"):].strip()
    if text.startswith("ops ="):
        text = text[len("ops ="):].strip()
    return eval(text, {"Op": Op})  # noqa: S307 - a developer's own repro file


def _run_seed(difftest_root, seed: int, side_name: str, ops: list | None = None) -> None:
    root, pristine = difftest_root
    side = SIDES[side_name]
    base = os.path.join(root, f"{side_name}-seed-{seed}")
    if ops is not None:
        result = run_case(pristine, base, side, ops=ops)
    else:
        result = run_case(pristine, base, side, seed=seed, n_ops=N_OPS)
    for note in result.notes:
        warnings.warn(f"seed {seed}: {note}")
    if result.divergence is None:
        return
    shrunk = None
    budget = min(SHRINK_SECONDS, _SHRINK_LEFT[0])
    if budget > 0:
        t = time.monotonic()
        shrunk = shrink(pristine, os.path.join(root, f"{side_name}-shrink-{seed}"), side,
                        result.ops, result.divergence, budget,
                        result.outcomes)
        _SHRINK_LEFT[0] -= time.monotonic() - t
    msg = report(seed, side, len(ops) if ops is not None else N_OPS, result, shrunk)
    print(msg)
    pytest.fail(msg, pytrace=False)


@pytest.mark.parametrize("seed", [-1] if _replay_ops() is not None else _seeds(),
                         ids=lambda s: "replay" if s < 0 else f"seed-{s}")
def test_differential(difftest_root, seed):
    reason = _skip_reason(need_fuse=SIDE_B == "unionfs")
    if reason:
        pytest.skip(reason)
    _run_seed(difftest_root, seed, SIDE_B, _replay_ops() if seed < 0 else None)


@pytest.mark.parametrize("seed", [1000 + i for i in range(_env_int("UNIONFS_DIFF_SELFTEST_SEEDS", 2))],
                         ids=lambda s: f"seed-{s}")
def test_harness_kernel_vs_kernel(difftest_root, seed):
    """The harness itself: kernel overlayfs against itself must never diverge."""
    _run_seed(difftest_root, seed, "kernel")


NOMKNOD_SEEDS = _env_int("UNIONFS_DIFF_NOMKNOD_SEEDS", 4)


@pytest.mark.parametrize("seed", [3000 + i for i in range(NOMKNOD_SEEDS)], ids=lambda s: f"seed-{s}")
def test_differential_mknod_refused(difftest_root, seed):
    """unionfs where device nodes and RENAME_WHITEOUT are refused (a seccomp filter on the
    daemon, helpers.nomknod): it writes overlayfs's xattr whiteouts instead, and the same
    stages hold; the kernel reads that upper as the top-most lower layer."""
    reason = _skip_reason(need_fuse=True)
    if reason:
        pytest.skip(reason)
    _run_seed(difftest_root, seed, "unionfs-nomknod")


ROOTLESS_SEEDS = _env_int("UNIONFS_DIFF_ROOTLESS_SEEDS", 6)


@pytest.fixture(scope="module")
def rootless_user():
    """An unprivileged user with subordinate ids, made for these cases and removed after."""
    reason = _skip_reason(need_fuse=True)
    if reason:
        pytest.skip(reason)
    with unprivileged_user("d", subids=True) as user:
        user.env["PYTHONPATH"] = os.pathsep.join((REPO, os.path.join(REPO, "tests")))
        os.mkdir(user.path("cases"))
        os.chown(user.path("cases"), user.uid, user.gid)
        yield user


@pytest.mark.parametrize("seed", [2000 + i for i in range(ROOTLESS_SEEDS)], ids=lambda s: f"seed-{s}")
def test_differential_rootless(rootless_user, seed):
    """The same generator and stages as a user without root: kernel overlayfs -o userxattr
    against unionfs, both mounted by the root of the user's namespace, each then reading
    the other's upper (difftest/rootless.py)."""
    budget = min(SHRINK_SECONDS, _SHRINK_LEFT[0])
    t = time.monotonic()
    proc = rootless_user.run([sys.executable, "-m", "difftest.rootless", str(seed), str(N_OPS),
                              str(budget), rootless_user.path("cases")], userns=True,
                             timeout=600 + budget)
    _SHRINK_LEFT[0] -= time.monotonic() - t if proc.returncode else 0
    for line in proc.stdout.splitlines():
        if line.startswith("note: "):
            warnings.warn(line[len("note: "):])
    if proc.returncode != 0:
        pytest.fail(f"{proc.stdout}\n{proc.stderr}", pytrace=False)


def test_layer_copy_is_faithful(difftest_root):
    """`cp -a` keeps what the fixture relies on: xattrs (trusted.* too), hard links, nodes."""
    root, pristine = difftest_root
    dest = os.path.join(root, "copycheck")
    try:
        copies = copy_layers(pristine, dest)
        for copy in copies:
            orig = os.path.join(pristine, os.path.basename(copy))
            a, b = capture(orig), capture(copy)
            a.pop("<root>"), b.pop("<root>")
            assert diff_views(a, b) == []
        mid = os.path.join(dest, "mid")
        assert os.getxattr(os.path.join(mid, "opq"), "trusted.overlay.opaque") == b"y"
        st = os.lstat(os.path.join(mid, "gone.txt"))
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (0, 0)
        assert os.lstat(os.path.join(dest, "bottom", "other/sub/hl_c")).st_nlink == 3
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_ddmin_finds_minimal_subset():
    """The shrinker keeps exactly the ops needed for a synthetic failure."""
    needed = {3, 17, 42}
    calls = []

    def fails(c):
        calls.append(len(c))
        return c if needed <= set(c) else None

    out = ddmin(list(range(100)), fails, time.monotonic() + 30)
    assert sorted(out) == sorted(needed)
