"""The built-in FUSE binding (unionfs._pyfuse3, docs/binding.md): its own features, each
seen through a real mount of a tiny filesystem on the binding alone (binding_fs.py) and
compared with the same mount without the feature; the patch series checked to be exactly
the difference from upstream; and what unionfs says about the binding it runs on."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from helpers.mounting import force_unmount, is_mounted, unionfs_cmd, unionfs_mount

pytestmark = [pytest.mark.mount]

REPO = Path(__file__).resolve().parent.parent
BINDING = REPO / "unionfs" / "_pyfuse3"
PATCHES = REPO / "patches" / "pyfuse3"
HERE = Path(__file__).resolve().parent
DATA = bytes(range(256)) * 1024  # 256 KiB, every offset distinguishable
EXT = importlib.machinery.EXTENSION_SUFFIXES[0]


class Counted:
    """The daemon's counts, filled in once it has been unmounted and has exited."""
    calls: dict[str, int]
    readdir_fhs: list[int]
    passthrough: bool


@contextlib.contextmanager
def counting_mount(tmp_path: Path, **features: int) -> Iterator[tuple[str, Counted, int]]:
    """Mount binding_fs.py with *features*; yield (mountpoint, counts, daemon pid)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    backing = tmp_path / "backing"
    backing.write_bytes(DATA)
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "helpers" / "binding_fs.py"), str(mnt), str(backing),
         *(f"{k}={v}" for k, v in features.items())],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    counted = Counted()
    try:
        deadline = time.monotonic() + 60
        while not is_mounted(str(mnt)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"binding_fs did not mount: {proc.stderr.read() if proc.poll() is not None else 'timeout'}")
            time.sleep(0.02)
        yield str(mnt), counted, proc.pid
        subprocess.run(["umount", str(mnt)], check=True)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        result = json.loads(out)
        counted.calls = _counts(result["calls"])
        counted.readdir_fhs = result["readdir_fhs"]
        counted.passthrough = result["passthrough"]
    finally:
        force_unmount(str(mnt))
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _counts(calls: dict[str, int]) -> dict[str, int]:
    return {name: calls.get(name, 0) for name in
            ("getattr", "lookup", "opendir", "readdir", "releasedir", "readlink", "open", "read",
             "release")}


# -- the features ---------------------------------------------------------------------------

@pytest.mark.parametrize("on", [True, False], ids=["read_fds", "stock_read"])
def test_read_fds_answers_reads_without_python(tmp_path: Path, on: bool) -> None:
    with counting_mount(tmp_path, **({"read_fds": 1} if on else {})) as (mnt, counted, _):
        for offset in (0, 4096 * 3 + 17, len(DATA) - 100):
            with open(os.path.join(mnt, "data"), "rb") as f:  # no keep_cache: pages dropped at open
                f.seek(offset)
                assert f.read(100) == DATA[offset:offset + 100]
        assert Path(mnt, "data").read_bytes() == DATA
    assert counted.calls["open"] == 4 and counted.calls["release"] == 4
    if on:
        assert counted.calls["read"] == 0, counted.calls
    else:
        assert counted.calls["read"] >= 4, counted.calls


def _kernel_has_passthrough() -> bool:
    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", os.uname().release).groups())
    return (major, minor) >= (6, 9)


@pytest.mark.skipif(os.geteuid() != 0, reason="backing files need CAP_SYS_ADMIN (root)")
@pytest.mark.skipif(not _kernel_has_passthrough(), reason="FUSE passthrough is Linux 6.9+")
def test_passthrough_reads_and_writes_without_the_daemon(tmp_path: Path) -> None:
    """With passthrough=1 binding_fs gives its data file's opens one backing id: reads
    and writes never reach it (it has no write handler at all), and two files open at
    once share the backing file the kernel writes to."""
    with counting_mount(tmp_path, passthrough=1) as (mnt, counted, _):
        path = os.path.join(mnt, "data")
        with open(path, "rb") as reader, open(path, "r+b", buffering=0) as writer:
            reader.seek(4096 * 3 + 17)
            assert reader.read(100) == DATA[4096 * 3 + 17:4096 * 3 + 117]
            writer.seek(5000)
            assert writer.write(b"through") == 7
            reader.seek(5000)
            assert reader.read(7) == b"through"
        assert Path(path).read_bytes()[4990:5010] == DATA[4990:5000] + b"through" + DATA[5007:5010]
    assert counted.passthrough
    assert counted.calls["open"] == 3 and counted.calls["release"] == 3, counted.calls
    assert counted.calls["read"] == 0, counted.calls
    assert (tmp_path / "backing").read_bytes()[5000:5007] == b"through"


def test_without_passthrough_the_daemon_reads(tmp_path: Path) -> None:
    """The same file without passthrough=1: reads reach the daemon, and so would writes
    (binding_fs refuses them: it has no write handler)."""
    with counting_mount(tmp_path) as (mnt, counted, _):
        with open(os.path.join(mnt, "data"), "rb") as f:
            assert f.read() == DATA
        with pytest.raises(OSError):
            with open(os.path.join(mnt, "data"), "r+b", buffering=0) as f:
                f.write(b"x")
    assert not counted.passthrough
    assert counted.calls["read"] >= 1, counted.calls


@pytest.mark.parametrize("on", [True, False], ids=["no_opendir", "opendir"])
def test_no_opendir_lists_without_opening(tmp_path: Path, on: bool) -> None:
    with counting_mount(tmp_path, **({"no_opendir": 1} if on else {})) as (mnt, counted, _):
        for _ in range(3):
            assert sorted(os.listdir(os.path.join(mnt, "sub"))) == ["one", "three", "two"]
            assert sorted(os.listdir(mnt)) == ["data", "link", "sub"]
    if on:
        assert counted.calls["opendir"] == 0 and counted.calls["releasedir"] == 0, counted.calls
        # readdir is handed the directory's inode where it had opendir's handle
        assert set(counted.readdir_fhs) == {1, 4}, counted.readdir_fhs
    else:
        assert counted.calls["opendir"] == 6 and counted.calls["releasedir"] == 6, counted.calls
        assert set(counted.readdir_fhs) == {1001, 1004}, counted.readdir_fhs


@pytest.mark.parametrize("on", [True, False], ids=["cache_readdir", "no_cache"])
def test_cache_readdir_keeps_listings_in_the_kernel(tmp_path: Path, on: bool) -> None:
    with counting_mount(tmp_path, **({"cache_readdir": 1} if on else {})) as (mnt, counted, _):
        sub = os.path.join(mnt, "sub")
        assert sorted(os.listdir(sub)) == ["one", "three", "two"]
        assert sorted(os.listdir(sub)) == ["one", "three", "two"]
        assert sorted(os.listdir(sub)) == ["one", "three", "two"]
    # a listing is one READDIRPLUS with entries and one at the end
    first = 2
    if on:
        assert counted.calls["readdir"] == first, counted.calls
    else:
        assert counted.calls["readdir"] == 3 * first, counted.calls


@pytest.mark.parametrize("on", [True, False], ids=["cache_symlinks", "no_cache"])
def test_cache_symlinks_keeps_targets_in_the_kernel(tmp_path: Path, on: bool) -> None:
    with counting_mount(tmp_path, **({"enable_cache_symlinks": 1} if on else {})) as (mnt, counted, _):
        for _ in range(3):
            assert os.readlink(os.path.join(mnt, "link")) == "data"
    assert counted.calls["readlink"] == (1 if on else 3), counted.calls


def longest_empty_run(pid: int, mnt: str, tmp_path: Path, lookups: int) -> int:
    """While a client makes *lookups* LOOKUPs one after another (names the kernel does not
    cache) and until the daemon sleeps in epoll again: the longest run of the daemon's
    reads of /dev/fuse that found no request queued (EAGAIN: the fd is non-blocking) with
    no epoll call between them."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (scripts/setup installs it)")
    trace = tmp_path / "strace.out"
    strace = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=read,epoll_wait,epoll_pwait",
                               "-e", "read=none", "-o", str(trace), "-p", str(pid)],
                              stderr=subprocess.PIPE)
    try:
        wait_for(lambda: all(tracer_pid(pid, tid) for tid in os.listdir(f"/proc/{pid}/task")),
                 "strace attached", strace)
        for i in range(lookups):
            with pytest.raises(FileNotFoundError):
                os.stat(os.path.join(mnt, f"missing{i}"))
        wait_for(lambda: Path(f"/proc/{pid}/wchan").read_text() == "do_epoll_wait",
                 "the daemon asleep in epoll", strace)
    finally:
        strace.terminate()
        strace.wait(timeout=30)
    runs: dict[str, int] = {}
    longest = 0
    for line in trace.read_text().splitlines():
        m = re.match(r"(\d+)\s+(read|epoll_wait|epoll_pwait)\(", line)
        if m:
            tid = m.group(1)
            runs[tid] = runs.get(tid, 0) + 1 if m.group(2) == "read" and "EAGAIN" in line else 0
            longest = max(longest, runs[tid])
    assert runs, f"strace saw no read of /dev/fuse: {trace.read_text()[:2000]!r}"
    return longest


def wait_for(ready, what: str, strace: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not ready():
        assert time.monotonic() < deadline and strace.poll() is None, f"no {what}"
        time.sleep(0.01)


def tracer_pid(pid: int, tid: str) -> int:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("TracerPid:"))


def test_poll_us_polls_an_empty_queue_before_sleeping(tmp_path: Path) -> None:
    """An empty queue shows as a read failing with EAGAIN. With poll_us=0 the one request
    task then waits in epoll every time; with poll_us it reads again and again until a
    request comes or the time is up, which after the client's last request is the whole
    0.1 s: many reads, even traced. (One task: with more, each may find the queue empty
    once before the first of them sleeps.)"""
    with counting_mount(tmp_path, poll_us=0, max_tasks=1) as (mnt, _, pid):
        without = longest_empty_run(pid, mnt, tmp_path, 100)
    with counting_mount(tmp_path, poll_us=100_000, max_tasks=1) as (mnt, _, pid):
        polled = longest_empty_run(pid, mnt, tmp_path, 100)
    assert without == 1 and polled >= 20, (without, polled)


# -- the patch series ---------------------------------------------------------------------------

def test_patch_series_is_the_whole_difference_from_upstream(tmp_path: Path) -> None:
    """patches/pyfuse3, undone in reverse order from the vendored tree, gives back pyfuse3
    3.5.0's own files byte for byte (their hashes, from the release, in upstream.sha256):
    no change to the binding goes unrecorded, and the series applies to upstream as it is."""
    if shutil.which("patch") is None:
        pytest.skip("patch is not installed (scripts/setup installs it)")
    tree = tmp_path / "upstream"
    shutil.copytree(BINDING, tree / "src" / "pyfuse3",
                    ignore=shutil.ignore_patterns("Include", "LICENSE", "__pycache__", "*.so"))
    shutil.copytree(BINDING / "Include", tree / "Include")
    shutil.copy(BINDING / "LICENSE", tree / "LICENSE")
    series = (PATCHES / "series").read_text().split()
    assert sorted(series) == sorted(p.name for p in PATCHES.glob("*.patch"))
    for name in reversed(series):
        subprocess.run(["patch", "-R", "-p1", "-s", "--no-backup-if-mismatch", "-i", str(PATCHES / name)],
                       cwd=tree, check=True)
    want = dict(line.split()[::-1] for line in (PATCHES / "upstream.sha256").read_text().splitlines())
    have = {str(p.relative_to(tree)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in tree.rglob("*") if p.is_file()}
    assert have == want


# -- what unionfs says about its binding --------------------------------------------------------

ALL_FAST_PATHS = "cache_readdir, cache_symlinks, dont_mask, no_opendir, queued_requests, poll_us, read_fds, idle_tasks, fallocate, lseek, passthrough"


def test_version_names_the_builtin_binding() -> None:
    proc = subprocess.run(unionfs_cmd("--version"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("unionfs ")
    assert lines[1] == ("FUSE binding: built-in pyfuse3 3.5.0 (unionfs._pyfuse3, patches/pyfuse3); "
                        f"fast paths: {ALL_FAST_PATHS}"), lines


def test_daemon_log_names_the_binding(layers) -> None:
    with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
        os.listdir(layers.mnt)
    log = Path(layers.work, "unionfs.log").read_text()
    said = [line for line in log.splitlines() if "FUSE binding" in line]
    assert len(said) == 1 and f"built-in pyfuse3 3.5.0" in said[0] and ALL_FAST_PATHS in said[0], log
    assert " WARNING: " not in log, log


def test_an_unbuilt_tree_is_not_taken_for_the_binding(tmp_path: Path) -> None:
    """A checkout whose binding was never compiled has unionfs/_pyfuse3/ all the same, and
    Python imports that directory as an (empty) namespace package: it must count as no
    built-in binding, not as one without attributes."""
    shutil.copytree(REPO / "unionfs", tmp_path / "unionfs",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    proc = subprocess.run(unionfs_cmd("--version"), capture_output=True, text=True, timeout=60,
                          cwd=tmp_path,  # `python -m` looks in the working directory first
                          env={**os.environ, "PYTHONPATH": str(tmp_path), "UNIONFS_BINDING": "builtin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].startswith("FUSE binding: none (the built-in FUSE binding "
                                                  "is not built (no compiled unionfs._pyfuse3"), proc.stdout


def stock_pyfuse3() -> bool:
    return subprocess.run([sys.executable, "-c", "import pyfuse3"], capture_output=True).returncode == 0


def test_a_binding_that_is_not_there_is_one_line(layers) -> None:
    for choice, said in (("bogus", "UNIONFS_BINDING='bogus': choose 'builtin' or 'pyfuse3'"),
                         ("pyfuse3", "pyfuse3 is not installed")):
        if choice == "pyfuse3" and stock_pyfuse3():
            continue
        proc = subprocess.run(unionfs_cmd("mount", ":".join(layers.lowers), layers.upper, layers.mnt),
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "UNIONFS_BINDING": choice})
        try:
            assert proc.returncode != 0 and not is_mounted(layers.mnt)
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("unionfs: error: ") and said in lines[0], lines
        finally:
            force_unmount(layers.mnt)


@pytest.mark.skipif(not stock_pyfuse3(), reason="no stock pyfuse3 in this venv (scripts/test's stock tier has one)")
def test_stock_pyfuse3_serves_with_one_warning(layers) -> None:
    os.environ["UNIONFS_BINDING"] = "pyfuse3"
    try:
        with unionfs_mount(layers.lowers, layers.upper, layers.mnt, workdir=layers.work):
            assert sorted(os.listdir(layers.mnt))
    finally:
        del os.environ["UNIONFS_BINDING"]
    warnings = [line for line in Path(layers.work, "unionfs.log").read_text().splitlines()
                if " WARNING: " in line]
    assert len(warnings) == 1 and "without the fast paths" in warnings[0], warnings


# -- pip install . ------------------------------------------------------------------------------

def source_copy(tmp_path: Path) -> Path:
    """The tree as a fresh clone has it: no venv, no build products."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "*.so", "__pycache__", ".pytest_cache"))
    return src


@pytest.mark.slow  # pip builds the binding (and with mypyc the modules): half a minute or more
@pytest.mark.parametrize("mypyc", [False, True], ids=["python", "mypyc"])
def test_pip_install_gives_the_fast_daemon(tmp_path: Path, mypyc: bool) -> None:
    """`python3 -m venv v && v/bin/pip install .`, as a Python user installs things: the
    package pip builds carries every module and the built-in binding, and mounts; with
    UNIONFS_MYPYC=1 its modules are compiled, and a copy-up through them works."""
    src = source_copy(tmp_path)
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(src)],
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "UNIONFS_MYPYC": "1" if mypyc else "0"})
    assert pip.returncode == 0, pip.stdout + pip.stderr
    shutil.rmtree(src)  # the install must not lean on the source tree
    unionfs = str(venv / "bin" / "unionfs")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "UNIONFS_BINDING", "UNIONFS_PURE")}
    version = subprocess.run([unionfs, "--version"], capture_output=True, text=True, env=env, timeout=60)
    assert version.returncode == 0, version.stderr
    assert version.stdout.splitlines()[1] == (
        "FUSE binding: built-in pyfuse3 3.5.0 (unionfs._pyfuse3, patches/pyfuse3); "
        f"fast paths: {ALL_FAST_PATHS}"), version.stdout
    assert version.stdout.splitlines()[2] == (
        "modules: compiled by mypyc (12: stack, layers, merge, namespace, union, copyup, "
        "durable, changes, format, files, owners, workdir)" if mypyc else
        "modules: pure Python (not compiled (built without UNIONFS_MYPYC=1, or mypyc failed))"), version.stdout
    lower, upper, mnt = (tmp_path / n for n in ("lower", "upper", "mnt"))
    for d in (lower, upper, mnt):
        d.mkdir()
    (lower / "a.txt").write_text("lower\n")
    mounted = subprocess.run([unionfs, "mount", str(lower), str(upper), str(mnt)],
                             capture_output=True, text=True, env=env, timeout=60)
    try:
        assert mounted.returncode == 0, mounted.stderr
        (mnt / "a.txt").write_text("changed\n")
        assert (upper / "a.txt").read_text() == "changed\n"
        assert (lower / "a.txt").read_text() == "lower\n"
        diff = subprocess.run([unionfs, "diff", str(mnt)], capture_output=True, text=True, env=env,
                              timeout=60)
        assert diff.returncode == 0 and diff.stdout.split() == ["C", "/a.txt"], diff
    finally:
        subprocess.run([unionfs, "umount", str(mnt)], capture_output=True, env=env, timeout=60)
        force_unmount(str(mnt))


@pytest.mark.slow  # pip builds the binding: half a minute or more
def test_a_build_without_libfuse_headers_says_so_in_one_line(tmp_path: Path) -> None:
    """pkg-config finding no fuse3 (as on a machine without libfuse3-dev): pip fails, with
    our one line among its output, and installs nothing."""
    src = source_copy(tmp_path)
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    empty = tmp_path / "no-pc-files"
    empty.mkdir()
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(src)],
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PKG_CONFIG_LIBDIR": str(empty), "PKG_CONFIG_PATH": ""})
    said = [line.strip() for line in (pip.stdout + pip.stderr).splitlines()
            if "unionfs: error:" in line]
    assert pip.returncode != 0
    assert said == ["unionfs: error: building the FUSE binding needs pkg-config and libfuse 3.2.0 "
                    "or newer with its headers (Debian: apt-get install pkg-config libfuse3-dev)"], \
        pip.stdout + pip.stderr
    assert not (venv / "bin" / "unionfs").exists()


# -- the modules mypyc compiles (docs/design.md, "Compiled modules") -------------------------

COMPILED_TREE = (REPO / "unionfs" / "_compiled.txt").exists()
NOT_COMPILED = "this tree's modules were not compiled (UNIONFS_MYPYC=1 pip install -e .)"


def where_modules(tree: Path, **env: str) -> list[str]:
    """What a python run from *tree* (PYTHONPATH) imports unionfs.union and unionfs.copyup
    from, and why the modules are not compiled ("" when they are)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import unionfs, unionfs.union, unionfs.copyup; "
         "print(unionfs.union.__file__, unionfs.copyup.__file__, repr(unionfs.compiled_why))"],
        capture_output=True, text=True, timeout=60, cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree), "UNIONFS_PURE": "0", **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(maxsplit=2)


@pytest.mark.skipif(not COMPILED_TREE, reason=NOT_COMPILED)
def test_compiled_modules_are_used_and_pure_asks_for_the_source(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(REPO / "unionfs", tree / "unionfs", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("_compiled__mypyc", "_pyfuse3"):  # the shared extension sits in the package
        assert any(p.name.startswith(name) for p in (tree / "unionfs").iterdir())
    union, nodes, why = where_modules(tree)
    assert union.endswith("/union" + EXT) and nodes.endswith("/copyup" + EXT) and why == "''"
    union, nodes, why = where_modules(tree, UNIONFS_PURE="1")
    assert union.endswith("/union.py") and nodes.endswith("/copyup.py") and "UNIONFS_PURE" in why


@pytest.mark.skipif(not COMPILED_TREE, reason=NOT_COMPILED)
def test_a_source_changed_after_the_build_is_run_as_source(tmp_path: Path) -> None:
    """A tree edited after `pip install -e .`, or run with PYTHONPATH: one changed module
    makes every compiled module run from its .py, never the stale extensions, and
    `--version` says why."""
    tree = tmp_path / "tree"
    shutil.copytree(REPO / "unionfs", tree / "unionfs", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tree / "unionfs" / "merge.py", "a") as f:
        f.write("\nEDITED = True\n")
    union, nodes, why = where_modules(tree)
    assert union.endswith("/union.py") and nodes.endswith("/copyup.py"), (union, nodes)
    assert "merge.py changed since the build" in why, why
    version = subprocess.run([sys.executable, "-m", "unionfs", "--version"], capture_output=True,
                             text=True, timeout=60, cwd=tree,
                             env={**os.environ, "PYTHONPATH": str(tree), "UNIONFS_PURE": "0"})
    assert version.returncode == 0, version.stderr
    assert version.stdout.splitlines()[2] == (
        "modules: pure Python (merge.py changed since the build: reinstall to compile them again)")


@pytest.mark.slow  # pip builds the binding: half a minute or more
def test_a_build_mypyc_rejects_installs_pure_python_with_one_warning(tmp_path: Path) -> None:
    """mypy refusing a module (as a mypy of another version might): pip still installs,
    says so in one warning line, and the package runs its Python source."""
    src = source_copy(tmp_path)
    with open(src / "unionfs" / "nodes.py", "a") as f:
        f.write("\nNOT_AN_INT: int = 'a str'\n")
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-v", str(src)],
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "UNIONFS_MYPYC": "1"})
    assert pip.returncode == 0, pip.stdout + pip.stderr
    said = [line.strip() for line in (pip.stdout + pip.stderr).splitlines() if "unionfs: warning:" in line]
    assert len(said) == 1 and said[0].startswith("unionfs: warning: mypyc could not compile the modules") \
        and said[0].endswith("installing the pure-Python modules"), said
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "UNIONFS_BINDING", "UNIONFS_PURE")}
    version = subprocess.run([str(venv / "bin" / "unionfs"), "--version"], capture_output=True,
                             text=True, env=env, timeout=60)
    assert version.returncode == 0, version.stderr
    assert version.stdout.splitlines()[2].startswith("modules: pure Python (not compiled"), version.stdout

