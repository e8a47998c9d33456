"""unionfs as a container engine's overlay mount program: fuse-overlayfs's command line
(`unionfs [-f] [-d] [-o OPTS]... MOUNTPOINT`) and its options, on real mounts.

containers/storage runs `MOUNT_PROGRAM -o lowerdir=l/A:l/B,upperdir=D,workdir=W,,volatile
MERGED` from its storage root, with each lower a symlink `l/SHORTID`, and unmounts with
fusermount3 -u or umount(2), removing the directories right after. tests/test_podman.py
drives the real engine; this module pins each option's meaning.
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers.mounting import daemon_pid, force_unmount, is_mounted, unionfs_cmd, wait_daemon_gone

pytestmark = [pytest.mark.mount]

NOBODY = 65534


def store(tmp_path: Path, layers: int = 2) -> Path:
    """A containers/storage-like tree: layer diffs, l/ID symlinks, a container's diff/work/merged."""
    root = tmp_path / "overlay"
    (root / "l").mkdir(parents=True)
    for i in range(layers):
        diff = root / f"layer{i}" / "diff"
        diff.mkdir(parents=True)
        (diff / f"only{i}").write_text(f"layer {i}\n")
        (diff / "shared").write_text(f"from layer {i}\n")
        (root / "l" / f"ID{i:03d}").symlink_to(f"../layer{i}/diff")
    for d in ("ctr/diff", "ctr/work", "ctr/merged"):
        (root / d).mkdir(parents=True)
    return root


def lowerdir(root: Path, layers: int = 2) -> str:
    return ":".join(f"l/ID{i:03d}" for i in range(layers))


def mount_program(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run unionfs as containers/storage runs its mount program: from the storage root."""
    proc = subprocess.run(unionfs_cmd(*args), cwd=root, capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def engine_opts(root: Path, layers: int = 2, extra: str = "") -> str:
    opts = f"lowerdir={lowerdir(root, layers)},upperdir={root}/ctr/diff,workdir={root}/ctr/work"
    return opts + ("," + extra if extra else "")


def mount_options(mnt: Path) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mnt):
                return set(fields[5].split(",")) | set(fields[-1].split(","))
    raise AssertionError(f"{mnt} is not mounted")


def unmount_like_the_engine(mnt: Path) -> None:
    """umount(2), then the engine removes the container's directories at once."""
    pid = daemon_pid(str(mnt))
    subprocess.run(["umount", str(mnt)], check=True)
    wait_daemon_gone(pid)


def test_the_engines_command_line(tmp_path: Path) -> None:
    root = store(tmp_path)
    mnt = root / "ctr/merged"
    # several -o, an empty field, volatile, options fuse-overlayfs takes for tuning
    mount_program(root, "-o", engine_opts(root, extra=",volatile"), "-o", "threaded=1,fast_ino=1",
                  "-o", 'context="system_u:object_r:container_file_t:s0:c1,c2"', str(mnt))
    try:
        assert sorted(os.listdir(mnt)) == ["only0", "only1", "shared"]
        assert (mnt / "shared").read_text() == "from layer 0\n"  # the first lower is the top
        (mnt / "new").write_text("x")
        assert (root / "ctr/diff/new").read_text() == "x"
        # as root, what fuse-overlayfs adds: a container's root is for all its users, setuid too
        opts = mount_options(mnt)
        assert "allow_other" in opts and "nosuid" not in opts and "noatime" in opts, opts
        assert "nodev" in opts, opts  # as fuse-overlayfs: device nodes of an image stay inert
    finally:
        if is_mounted(str(mnt)):
            unmount_like_the_engine(mnt)
    # the layers are free at once: the engine deletes them right after
    shutil.rmtree(root / "ctr")
    assert not (root / "ctr").exists()


def test_read_only_form_and_flags(tmp_path: Path) -> None:
    """An image mounted without a container layer: `lowerdir=DIFF:LOWERS` and nothing else;
    -f stays in the foreground until the unmount."""
    root = store(tmp_path)
    mnt = root / "ctr/merged"
    proc = subprocess.Popen(unionfs_cmd("-f", "-o", f"lowerdir={lowerdir(root)}", str(mnt)), cwd=root,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(str(mnt)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert is_mounted(str(mnt)), proc.stderr.read() if proc.poll() is not None else "not mounted"
        assert (mnt / "only1").read_text() == "layer 1\n"
        with pytest.raises(OSError) as e:
            (mnt / "new").write_text("x")
        assert e.value.errno == errno.EROFS
        assert proc.poll() is None  # -f: still in the foreground
        subprocess.run(["umount", str(mnt)], check=True)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(str(mnt))


def test_many_layers_mount_quickly(tmp_path: Path) -> None:
    """Images with 50+ layers exist. The mount's own time is printed (no timed assertion:
    the machine is shared); every layer must take part."""
    n = 64
    root = store(tmp_path, n)
    mnt = root / "ctr/merged"
    start = time.monotonic()
    mount_program(root, "-o", engine_opts(root, n), str(mnt))
    took = time.monotonic() - start
    try:
        print(f"\nmount of {n} layers: {took * 1000:.0f} ms")
        names = os.listdir(mnt)
        assert len(names) == n + 1 and all(f"only{i}" in names for i in range(n))
        assert (mnt / f"only{n - 1}").read_text() == f"layer {n - 1}\n"
    finally:
        unmount_like_the_engine(mnt)


@pytest.mark.parametrize("opts", [
    "squash_to_root", "squash_to_uid=1234", "squash_to_gid=4321",
    "squash_to_uid=1234,squash_to_root",  # the id given wins over root, in any order
])
def test_squash_owners(tmp_path: Path, opts: str) -> None:
    root = store(tmp_path)
    os.chown(root / "layer1/diff/only1", 7, 5)
    mnt = root / "ctr/merged"
    mount_program(root, "-o", engine_opts(root, extra=opts), str(mnt))
    try:
        for name in ("only1", "only0", ".", "new"):
            if name == "new":
                (mnt / "new").write_text("x")
                # only what is shown changes: the new file is stored as its creator's
                assert os.stat(root / "ctr/diff/new").st_uid == 0
            st = os.lstat(mnt / name)
            shown = (st.st_uid, st.st_gid)
            on_disk = (0, 0) if name != "only1" else (7, 5)
            want = (_squashed(opts, "uid", on_disk[0]), _squashed(opts, "gid", on_disk[1]))
            assert shown == want, (name, shown, want)
    finally:
        unmount_like_the_engine(mnt)


def _squashed(opts: str, which: str, on_disk: int) -> int:
    for item in opts.split(","):
        if item.startswith(f"squash_to_{which}="):
            return int(item.partition("=")[2])
    return 0 if "squash_to_root" in opts.split(",") else on_disk


def test_static_nlink(tmp_path: Path) -> None:
    root = store(tmp_path)
    (root / "ctr/diff/sub/a").mkdir(parents=True)
    (root / "ctr/diff/sub/b").mkdir()
    mnt = root / "ctr/merged"
    mount_program(root, "-o", engine_opts(root), str(mnt))
    try:
        assert os.stat(mnt / "sub").st_nlink == 4  # upper-only: the true count
    finally:
        unmount_like_the_engine(mnt)
    mount_program(root, "-o", engine_opts(root, extra="static_nlink"), str(mnt))
    try:
        assert os.stat(mnt / "sub").st_nlink == 1
        assert os.stat(mnt / "only0").st_nlink == 1  # files keep theirs
        os.link(mnt / "only0", mnt / "again")
        assert os.stat(mnt / "only0").st_nlink == 2
    finally:
        unmount_like_the_engine(mnt)


def test_noxattrs(tmp_path: Path) -> None:
    root = store(tmp_path)
    os.setxattr(root / "layer0/diff/only0", "user.tag", b"v")
    mnt = root / "ctr/merged"
    for opts, works in (("noxattrs=0", True), ("noxattrs=1", False)):
        mount_program(root, "-o", engine_opts(root, extra=opts), str(mnt))
        try:
            if works:
                assert os.getxattr(mnt / "only0", "user.tag") == b"v"
                assert "user.tag" in os.listxattr(mnt / "only0")
                os.setxattr(mnt / "only1", "user.new", b"w")
            else:
                for call in (lambda: os.getxattr(mnt / "only0", "user.tag"),
                             lambda: os.listxattr(mnt / "only0"),
                             lambda: os.setxattr(mnt / "only1", "user.other", b"w")):
                    with pytest.raises(OSError) as e:
                        call()
                    assert e.value.errno == errno.EOPNOTSUPP
        finally:
            unmount_like_the_engine(mnt)
    assert "user.other" not in os.listxattr(root / "ctr/diff/only1")


def test_noacl(tmp_path: Path) -> None:
    """An ACL entry lets nobody read a 0600 file; with noacl the kernel goes by the mode
    bits alone (as fuse-overlayfs without FUSE_CAP_POSIX_ACL)."""
    root = store(tmp_path)
    f = root / "layer0/diff/only0"
    os.chmod(f, 0o600)
    subprocess.run(["setfacl", "-m", f"u:{NOBODY}:r", str(f)], check=True)
    mnt = root / "ctr/merged"
    for opts, readable in (("", True), ("noacl", False)):
        mount_program(root, "-o", engine_opts(root, extra=opts), str(mnt))
        try:
            # from inside the mount: pytest's tmp directories are closed to other users
            proc = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                                   "cat", "only0"], cwd=mnt, capture_output=True, text=True)
            assert (proc.returncode == 0) is readable, (opts, proc.stderr)
        finally:
            unmount_like_the_engine(mnt)


def test_timeout(tmp_path: Path) -> None:
    """timeout= is how long the kernel may keep attributes: with 0 a change made to the
    upper behind the mount's back shows at once, with the default it does not."""
    root = store(tmp_path)
    (root / "ctr/diff/up").write_text("x")
    mnt = root / "ctr/merged"
    for opts, fresh in (("", False), ("timeout=0", True)):
        os.chmod(root / "ctr/diff/up", 0o644)
        mount_program(root, "-o", engine_opts(root, extra=opts), str(mnt))
        try:
            assert os.stat(mnt / "up").st_mode & 0o777 == 0o644
            os.chmod(root / "ctr/diff/up", 0o600)
            assert (os.stat(mnt / "up").st_mode & 0o777 == 0o600) is fresh, opts
        finally:
            unmount_like_the_engine(mnt)


def _syncs_of_a_mount(root: Path, opts: str) -> str:
    """Copy-ups, a user's fsync and an unmount under strace: the daemon's sync calls."""
    mnt = root / "ctr/merged"
    for d in ("ctr/diff", "ctr/work"):
        shutil.rmtree(root / d)
        (root / d).mkdir()
    mount_program(root, "-o", engine_opts(root, extra=opts), str(mnt))
    pid = daemon_pid(str(mnt))
    log = root / f"strace{len(opts)}.log"
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-o", str(log), "-e",
                               "trace=fsync,fdatasync,syncfs,sync,sync_file_range", "-e", "signal=none",
                               "-p", str(pid)],
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (log.exists() and _traced(pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        for name in ("only0", "only1", "shared"):
            with open(mnt / name, "a") as f:  # a copy-up each
                f.write("more\n")
                f.flush()
                os.fsync(f.fileno())
        fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        subprocess.run(["umount", str(mnt)], check=True)
        wait_daemon_gone(pid)
        tracer.wait(timeout=30)
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
        force_unmount(str(mnt))
    return log.read_text()


def _traced(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        return any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in f)


def test_volatile_does_no_durability_work(tmp_path: Path) -> None:
    root = store(tmp_path)
    durable = _syncs_of_a_mount(root, "")
    assert "sync" in durable, durable  # the same steps do sync without volatile
    assert _syncs_of_a_mount(root, "volatile") == ""
    assert (root / "ctr/diff/only0").read_text() == "layer 0\nmore\n"


@pytest.mark.parametrize("args, message", [
    (["-o", "lowerdir=l/ID000,plugins=/x.so", "M"], "plugins= is not supported"),
    (["-o", "lowerdir=l/ID000,xattr_permissions=1", "M"], "xattr_permissions=1"),
    (["-o", "lowerdir=l/ID000,noxattrs=yes", "M"], "noxattrs must be 0 or 1"),
    (["-o", "lowerdir=l/ID000,timeout=soon", "M"], "timeout must be a number of seconds"),
    (["-o", "lowerdir=l/ID000,squash_to_uid=root", "M"], "squash_to_uid must be a numeric id"),
    (["-o", "lowerdir=l/ID000,threaded=many", "M"], "threaded must be a number"),
    (["-o", "lowerdir=l/ID000,context=\"unbalanced", "M"], "unbalanced double quote"),
    (["-o", "lowerdir=l/ID000,bogus", "M"], "unknown mount option 'bogus'"),
    (["-o", "lowerdir=l/ID000"], "missing MOUNTPOINT"),
    (["-o", "lowerdir=l/ID000", "M", "N"], "too many arguments"),
    (["-o", "upperdir=ctr/diff", "M"], "missing -o lowerdir="),
    (["-o"], "option -o needs a value"),
    (["-f", "-x", "-o", "lowerdir=l/ID000", "M"], "unknown option '-x'"),
])
def test_refusals_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    root = store(tmp_path)
    mnt = root / "ctr/merged"
    args = [str(mnt) if a == "M" else str(root / "ctr/diff") if a == "N" else a for a in args]
    before = sorted(str(p) for p in root.rglob("*"))
    proc = mount_program(root, *args, check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("unionfs: error: "), proc.stderr
    assert message in proc.stderr, proc.stderr
    assert not is_mounted(str(mnt)) and sorted(str(p) for p in root.rglob("*")) == before


def test_volatile_stop_makes_no_name_in_the_workdir(tmp_path: Path) -> None:
    """An engine removes the container's directories right after its umount(2), while the
    daemon may still be stopping: a volatile stop creates nothing there (a new name makes
    the engine's rm -r fail with ENOTEMPTY). A later mount still knows what changed."""
    root = store(tmp_path)
    mnt = root / "ctr/merged"
    mount_program(root, "-o", engine_opts(root, extra="volatile"), str(mnt))
    (mnt / "made").write_text("x")
    os.unlink(mnt / "only1")
    names = sorted(os.listdir(root / "ctr/work"))
    unmount_like_the_engine(mnt)
    assert sorted(os.listdir(root / "ctr/work")) == names
    mount_program(root, "-o", engine_opts(root), str(mnt))
    try:
        proc = subprocess.run(unionfs_cmd("diff", str(mnt)), capture_output=True, text=True, check=True)
        assert proc.stdout.split("\n")[:-1] == ["A /made", "D /only1"], proc.stdout
    finally:
        unmount_like_the_engine(mnt)
