"""The `unionfs` command line: bad input is one line and touches nothing; mounts
start and stop cleanly, including dead ones. Real mounts, always cleaned up."""
from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from unionfs.config import ConfigError, parse_options, split_lowers
from helpers.snapshot import snapshot
from helpers.mounting import daemon_pids, force_unmount, is_mounted, pid_gone, unionfs_cmd, unionfs_mount

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing"),
]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(unionfs_cmd(*args), capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**os.environ, **(env or {})})


def tree_state(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root (and root) with type/mode, size and mtime: "nothing changed"
    means equal."""
    return snapshot(str(root), lambda p, st: (st.st_mode, st.st_size, st.st_mtime_ns),
                    include_root=True)


def mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if line.split()[4].startswith(str(root))]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """l1 (top) and l2 lower layers, an upper, a mountpoint, and things to trip over."""
    for d in ("l1/sub", "l2", "up/sub", "mnt", "work"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "l1/top.txt").write_text("top\n")
    (tmp_path / "l2/bottom.txt").write_text("bottom\n")
    (tmp_path / "l2/top.txt").write_text("shadowed\n")
    (tmp_path / "afile").write_text("not a directory\n")
    return tmp_path


def bad_cases(t: Path) -> dict[str, tuple[list[str], int, str, dict[str, str]]]:
    """name → (arguments, exit status, expected part of the message, extra environment)."""
    l1, l2, up, mnt = str(t / "l1"), str(t / "l2"), str(t / "up"), str(t / "mnt")
    return {
        "missing lower": (["mount", f"{l1}:{t}/nope", up, mnt], 1, "does not exist", {}),
        "lower is a file": (["mount", f"{l1}:{t}/afile", up, mnt], 1, "is not a directory", {}),
        "missing upper": (["mount", l1, f"{t}/nope", mnt], 1, "does not exist", {}),
        "upper is a file": (["mount", l1, f"{t}/afile", mnt], 1, "is not a directory", {}),
        "missing mountpoint": (["mount", l1, up, f"{t}/nope"], 1, "does not exist", {}),
        "empty lower list": (["mount", "", up, mnt], 1, "lower layer list is empty", {}),
        "empty lower entry": (["mount", f"{l1}::{l2}", up, mnt], 1, "empty path", {}),
        "same lower twice": (["mount", f"{l1}:{l2}:{l1}", up, mnt], 1, "used twice", {}),
        "same lower twice via ..": (["mount", f"{l1}:{t}/l2/../l1", up, mnt], 1, "used twice", {}),
        "lower is upper": (["mount", f"{l1}:{l2}", l2, mnt], 1, "used twice", {}),
        "upper inside lower": (["mount", l1, f"{l1}/sub", mnt], 1, "inside", {}),
        "lower inside upper": (["mount", f"{up}/sub", up, mnt], 1, "inside", {}),
        "mountpoint inside lower": (["mount", l1, up, f"{l1}/sub"], 1, "inside", {}),
        "mountpoint is upper": (["mount", l1, up, up], 1, "mountpoint", {}),
        "mountpoint is lower": (["mount", l1, l1], 1, "mountpoint", {}),
        "layer inside mountpoint": (["mount", l1, up, str(t)], 1, "inside the mountpoint", {}),
        "workdir inside upper": (["mount", "--workdir", f"{up}/sub", l1, up, mnt], 1, "overlaps", {}),
        "workdir is a lower": (["mount", "--workdir", l2, f"{l1}:{l2}", up, mnt], 1, "overlaps", {}),
        "missing workdir": (["mount", "--workdir", f"{t}/nope", l1, up, mnt], 1, "does not exist", {}),
        "workdir twice": (["mount", "--workdir", f"{t}/work", "-o", f"workdir={t}/l2", l1, up, mnt],
                          1, "workdir given twice", {}),
        "workdir without upper": (["mount", "-o", f"workdir={t}/work", l1, mnt], 1, "needs an upper", {}),
        "unknown option": (["mount", "-o", "rw,bogus", l1, up, mnt], 1, "unknown mount option 'bogus'", {}),
        "bad fsync": (["mount", "-o", "fsync=yes", l1, up, mnt], 1, "fsync must be 0 or 1", {}),
        "bad poll_us": (["mount", "-o", "poll_us=-5", l1, up, mnt], 1, "poll_us must be a number", {}),
        "huge poll_us": (["mount", "-o", "poll_us=100001", l1, up, mnt], 1, "from 0 to 100000", {}),
        "unsupported option": (["mount", "-o", "metacopy=on", l1, up, mnt], 1, "not supported", {}),
        "too few arguments": (["mount", l1], 2, "too few arguments", {}),
        "no arguments": (["mount"], 2, "too few arguments", {}),
        "too many arguments": (["mount", l1, up, mnt, mnt], 2, "too many arguments", {}),
        "lowers given twice": (["mount", "-o", f"lowerdir={l1}", l2, mnt], 2, "only the MOUNTPOINT", {}),
        "upper given twice": (["mount", "-o", f"upperdir={up}", l1, up, mnt], 2, "upper layer given twice", {}),
        "unknown flag": (["mount", "--bogus", l1, up, mnt], 2, "unrecognized arguments", {}),
        "unknown subcommand": (["frobnicate"], 2, "unknown command 'frobnicate'", {}),
        "no subcommand": ([], 2, "missing command", {}),
        "helper form without lowerdir": (["src", mnt, "-o", "rw"], 2, "needs -o lowerdir", {}),
        "umount of a plain directory": (["umount", mnt], 1, "not a unionfs mount", {}),
        "umount of another filesystem": (["umount", "/"], 1, "not a unionfs mount", {}),
        "umount of a missing path": (["umount", f"{t}/nope"], 1, "not a unionfs mount", {}),
        "no /dev/fuse": (["mount", l1, up, mnt], 1, "cannot use FUSE",
                         {"UNIONFS_DEV_FUSE": f"{t}/no-such-device"}),
    }


@pytest.mark.parametrize("case", sorted(bad_cases(Path("/x"))))
def test_bad_input_is_one_line_and_changes_nothing(tree: Path, case: str) -> None:
    args, code, message, env = bad_cases(tree)[case]
    before = tree_state(tree)
    proc = run(*args, env=env)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("unionfs: error: ")
    assert message in lines[0]
    assert proc.stdout == ""
    assert tree_state(tree) == before
    assert mounts_under(tree) == []


def test_workdir_on_another_filesystem(tree: Path) -> None:
    other = tree / "other"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(other)], check=True)
    try:
        before = tree_state(tree)
        proc = run("mount", "--workdir", str(other), str(tree / "l1"), str(tree / "up"), str(tree / "mnt"))
        assert proc.returncode == 1
        assert proc.stderr.count("\n") == 1 and "same filesystem" in proc.stderr
        assert tree_state(tree) == before
    finally:
        force_unmount(str(other))


def test_upper_on_a_read_only_filesystem(tree: Path) -> None:
    """Failures after validation (workdir creation, the core opening layers) are one line too."""
    ro = tree / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(ro)], check=True)
    try:
        (ro / "up").mkdir()
        (ro / "work").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        before = tree_state(tree)
        for extra in ([], ["--workdir", str(ro / "work")]):
            proc = run("mount", *extra, str(tree / "l1"), str(ro / "up"), str(tree / "mnt"))
            assert proc.returncode == 1
            assert proc.stderr.count("\n") == 1 and "Read-only file system" in proc.stderr, proc.stderr
            assert tree_state(tree) == before and mounts_under(tree / "mnt") == []
    finally:
        force_unmount(str(ro))


def test_option_parsing() -> None:
    fstab_noise = ("rw,defaults,auto,noauto,user,user=alice,nouser,users,owner,group,_netdev,nofail,"
                   "relatime,noatime,nodiratime,lazytime,x-systemd.automount,x-gvfs-hide,comment=hi,"
                   "redirect_dir=on,index=off,xino=auto,nfs_export=off,uuid=on,metacopy=off")
    opts = parse_options([fstab_noise, "ro,dev,suid,allow_other,default_permissions,fsync=0,noexec"])
    assert (opts.readonly, opts.dev, opts.suid, opts.allow_other, opts.fsync) == (True, True, True, True, False)
    assert "noexec" in opts.extra and opts.extra["redirect_dir"] == "on"
    assert parse_options(["ro", "rw,nodev"]).readonly is False  # later wins, as in mount(8)
    assert parse_options([]).allow_other is None  # the default is decided by who mounts
    assert parse_options(["allow_other,noallow_other"]).allow_other is False
    assert parse_options(["noallow_other", "rootfs"]).allow_other is True
    assert parse_options([]).poll_us == 200 and parse_options(["poll_us=0"]).poll_us == 0
    opts = parse_options([r"lowerdir=/a\:b:/c,upperdir=/u\,v,workdir=/w"])
    assert (opts.lowerdir, opts.upperdir, opts.workdir) == (["/a:b", "/c"], "/u,v", "/w")
    assert split_lowers("/x:/y") == ["/x", "/y"]
    assert parse_options(["userxattr"]).userxattr and not parse_options([]).userxattr
    for bad in ("nodev=1", "noallow_other=1", "lowerdir=", "index=maybe", "volatile=1", "userxattr=1", "sloppy",
                "poll_us=", "poll_us=1e3", "plugins=a.so", "xattr_permissions=1", "timeout=-1", "timeout=inf",
                "squash_to_gid=-1", "fsync=2", "writeback=on", "noacl=1"):
        with pytest.raises(ConfigError):
            parse_options([bad])


def test_fuse_overlayfs_option_parsing() -> None:
    """The options containers/storage passes to its mount program (fuse-overlayfs's)."""
    opts = parse_options(['lowerdir=l/A:l/B,,volatile', 'threaded=1,fast_ino=0,timeout=2.5',
                          'context="system_u:object_r:container_file_t:s0:c1,c2",noacl',
                          "static_nlink,squash_to_root,squash_to_gid=7,noxattrs=1,writeback=0",
                          "xattr_permissions=0,redirect_dir=off"])
    assert opts.lowerdir == ["l/A", "l/B"] and opts.volatile and opts.timeout == 2.5
    assert opts.extra["context"] == "system_u:object_r:container_file_t:s0:c1,c2"
    assert (opts.acl, opts.static_nlink, opts.xattrs, opts.writeback) == (False, True, False, False)
    assert opts.squashed() == (0, 7)
    assert parse_options(["squash_to_uid=5"]).squashed() == (5, None)
    assert parse_options([]).squashed() == (None, None)


def test_rootfs_shorthand_parsing() -> None:
    opts = parse_options(["rootfs"])
    assert (opts.allow_other, opts.dev, opts.suid, opts.readonly) == (True, True, True, False)
    opts = parse_options(["rootfs,nosuid", "ro"])  # expanded in place: later options still win
    assert (opts.allow_other, opts.dev, opts.suid, opts.readonly) == (True, True, False, True)
    assert parse_options(["nodev,rootfs"]).dev is True
    with pytest.raises(ConfigError, match="takes no value"):
        parse_options(["rootfs=yes"])


@pytest.mark.parametrize("form", ["-o rootfs", "--rootfs", "helper -o ...,rootfs"])
def test_rootfs_shorthand_reaches_the_kernel(tree: Path, form: str) -> None:
    """allow_other, dev and suid end up in the mount table, in each way of asking."""
    mnt = str(tree / "mnt")
    layers = f"{tree}/l1:{tree}/l2", f"{tree}/up", mnt
    args = {"-o rootfs": ["mount", "-o", "rootfs", *layers],
            "--rootfs": ["mount", "--rootfs", *layers],
            "helper -o ...,rootfs": ["unionfs", mnt, "-o",  # as mount.fuse3 runs it for an fstab line
                                     f"lowerdir={tree}/l1:{tree}/l2,upperdir={tree}/up,rootfs,noauto"]}[form]
    proc = run(*args)
    try:
        assert proc.returncode == 0, proc.stderr
        (line,) = mounts_under(tree)
        mount_opts, super_opts = line.split()[5].split(","), line.split(" - ")[1].split()[2].split(",")
        assert "nosuid" not in mount_opts and "nodev" not in mount_opts, line
        assert "allow_other" in super_opts and "default_permissions" in super_opts, line
    finally:
        run("umount", mnt)
        force_unmount(mnt)


@pytest.mark.parametrize("opts, wanted", [((), True), (("-o", "noallow_other"), False),
                                           (("-o", "rootfs,noallow_other"), False)])
def test_allow_other_is_roots_default(tree: Path, opts: tuple[str, ...], wanted: bool) -> None:
    """A mount made by root lets other users in unless `noallow_other` says otherwise."""
    mnt = str(tree / "mnt")
    proc = run("mount", *opts, f"{tree}/l1:{tree}/l2", f"{tree}/up", mnt)
    try:
        assert proc.returncode == 0, proc.stderr
        (line,) = mounts_under(tree)
        assert ("allow_other" in line.split(" - ")[1].split()[2].split(",")) is wanted, line
    finally:
        run("umount", mnt)
        force_unmount(mnt)


def test_help() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    assert "mount" in proc.stdout and "umount" in proc.stdout
    proc = run("mount", "--help")
    assert proc.returncode == 0 and "LOWER[:LOWER...]" in proc.stdout
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("unionfs ")


def test_mount_umount_roundtrip(tree: Path) -> None:
    mnt = tree / "mnt"
    proc = run("mount", f"{tree}/l1:{tree}/l2", str(tree / "up"), str(mnt))
    try:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "" and proc.stderr == ""
        assert is_mounted(str(mnt))  # live as soon as the command returned
        assert " - fuse.unionfs unionfs " in "".join(mounts_under(mnt))
        assert (mnt / "top.txt").read_text() == "top\n"
        assert (mnt / "bottom.txt").read_text() == "bottom\n"
        (mnt / "new.txt").write_text("new\n")
        assert (tree / "up/new.txt").read_text() == "new\n"
        work = tree / ".up.unionfs-work"
        assert stat.S_IMODE(work.stat().st_mode) == 0o700
        old = os.umask(0)
        try:  # the daemon's own umask must not bite into modes callers ask for
            os.close(os.open(mnt / "g.txt", os.O_CREAT | os.O_WRONLY, 0o666))
            (mnt / "gdir").mkdir(0o777)
        finally:
            os.umask(old)
        assert stat.S_IMODE((mnt / "g.txt").stat().st_mode) == 0o666
        assert stat.S_IMODE((mnt / "gdir").stat().st_mode) == 0o777
        pids = daemon_pids(str(mnt))
        assert len(pids) == 1
    finally:
        done = run("umount", str(mnt))
        force_unmount(str(mnt))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
    assert not is_mounted(str(mnt))
    assert pid_gone(pids[0]), "umount returned before the daemon exited"
    assert not (tree / "l1/new.txt").exists() and not (tree / "l2/new.txt").exists()


def test_umount_of_a_dead_mount(tree: Path) -> None:
    mnt = str(tree / "mnt")
    with unionfs_mount([f"{tree}/l1"], str(tree / "up"), mnt):
        (pid,) = daemon_pids(mnt)
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: pid_gone(pid))
        with pytest.raises(OSError) as exc:
            os.listdir(mnt)
        assert exc.value.errno == errno.ENOTCONN
        proc = run("umount", mnt)
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(mnt)
        assert os.listdir(mnt) == []  # the mountpoint is usable again
    # and a new mount of the same layers works
    with unionfs_mount([f"{tree}/l1"], str(tree / "up"), mnt):
        assert (Path(mnt) / "top.txt").read_text() == "top\n"
    assert not is_mounted(mnt)


def test_umount_of_a_dead_busy_mount_is_lazy(tree: Path) -> None:
    mnt = str(tree / "mnt")
    with unionfs_mount([f"{tree}/l1"], None, mnt):
        holder = subprocess.Popen(["sleep", "60"], cwd=mnt)
        try:
            (pid,) = daemon_pids(mnt)
            os.kill(pid, signal.SIGKILL)
            assert wait_for(lambda: pid_gone(pid))
            proc = run("umount", mnt)
            assert proc.returncode == 0, proc.stderr
            assert not is_mounted(mnt)
        finally:
            holder.kill()
            holder.wait()


def test_umount_of_a_busy_live_mount_fails(tree: Path) -> None:
    mnt = str(tree / "mnt")
    with unionfs_mount([f"{tree}/l1"], str(tree / "up"), mnt):
        holder = subprocess.Popen(["sleep", "60"], cwd=mnt)
        try:
            proc = run("umount", mnt)
            assert proc.returncode == 1
            assert proc.stderr.count("\n") == 1 and "busy" in proc.stderr
            assert is_mounted(mnt) and (Path(mnt) / "top.txt").read_text() == "top\n"
        finally:
            holder.kill()
            holder.wait()
        proc = run("umount", mnt)
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(mnt)


def _mount_below(mnt: Path, tree: Path) -> list[str]:
    """/proc, a tmpfs with a tmpfs inside and a second unionfs, all below *mnt* (as a rootfs has)."""
    for d in ("proc", "tmp", "srv/inner"):
        (mnt / d).mkdir(parents=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(mnt / "proc")], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt / "tmp")], check=True)
    (mnt / "tmp/deeper").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt / "tmp/deeper")], check=True)
    proc = run("mount", f"{tree}/l2", str(mnt / "srv/inner"))
    assert proc.returncode == 0, proc.stderr
    return [str(mnt / d) for d in ("proc", "tmp", "tmp/deeper", "srv/inner")]


def test_umount_with_mounts_below_refuses_and_names_them(tree: Path) -> None:
    mnt = tree / "mnt"
    with unionfs_mount([f"{tree}/l1"], str(tree / "up"), str(mnt)):
        below = _mount_below(mnt, tree)
        try:
            proc = run("umount", str(mnt))
            assert proc.returncode == 1
            (line,) = proc.stderr.splitlines()
            assert line.startswith("unionfs: error: ") and "mounts below it" in line and "-R" in line
            assert all(b in line for b in below), line
            assert all(is_mounted(b) for b in [str(mnt), *below])  # nothing was unmounted
            assert (mnt / "top.txt").read_text() == "top\n"
        finally:
            for b in reversed(below):
                force_unmount(b)


def test_umount_recursive_unmounts_below_first(tree: Path) -> None:
    mnt = tree / "mnt"
    with unionfs_mount([f"{tree}/l1"], str(tree / "up"), str(mnt)):
        below = _mount_below(mnt, tree)
        pids = daemon_pids(str(mnt)) + daemon_pids(below[-1])
        assert len(pids) == 2
        proc = run("umount", "-R", str(mnt))
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert mounts_under(tree) == []
        assert all(pid_gone(p) for p in pids), "umount -R returned before the daemons exited"
        assert run("umount", "--recursive", str(mnt)).returncode == 1  # nothing left to unmount


def test_umount_recursive_of_a_dead_mount_with_mounts_below(tree: Path) -> None:
    mnt = tree / "mnt"
    with unionfs_mount([f"{tree}/l1"], str(tree / "up"), str(mnt)):
        below = _mount_below(mnt, tree)
        (pid,) = daemon_pids(str(mnt))
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: pid_gone(pid))
        try:
            assert run("umount", str(mnt)).returncode == 1  # still refused without -R
            proc = run("umount", "-R", str(mnt))
            assert proc.returncode == 0, proc.stderr
            assert mounts_under(tree) == []
        finally:
            for b in reversed(below):
                force_unmount(b)


def test_read_only_union_without_upper(tree: Path) -> None:
    mnt = tree / "mnt"
    before = tree_state(tree)
    with unionfs_mount([f"{tree}/l1", f"{tree}/l2"], None, str(mnt)):
        assert sorted(os.listdir(mnt)) == ["bottom.txt", "sub", "top.txt"]
        with pytest.raises(OSError) as exc:
            (mnt / "x").write_text("x")
        assert exc.value.errno == errno.EROFS
    assert tree_state(tree) == before  # no workdir, no log, nothing


def test_ro_option_with_upper(tree: Path) -> None:
    mnt = tree / "mnt"
    with unionfs_mount([f"{tree}/l1"], str(tree / "up"), str(mnt), options=["ro"]):
        with pytest.raises(OSError) as exc:
            (mnt / "top.txt").write_text("changed")
        assert exc.value.errno == errno.EROFS
        with pytest.raises(OSError) as exc:
            (mnt / "newdir").mkdir()
        assert exc.value.errno == errno.EROFS
    assert os.listdir(tree / "up") == ["sub"]


def test_options_replace_positional_layers_and_reach_the_kernel(tree: Path) -> None:
    mnt = str(tree / "mnt")
    opts = (f"lowerdir={tree}/l1:{tree}/l2,upperdir={tree}/up,workdir={tree}/work,"
            "noexec,fsname=demo\\,src,noauto,x-systemd.requires=foo,index=on,redirect_dir=on")
    proc = run("mount", "-o", opts, mnt)
    try:
        assert proc.returncode == 0, proc.stderr
        (line,) = mounts_under(tree)
        assert " - fuse.unionfs demo,src " in line and "noexec" in line.split()[5]
        assert (Path(mnt) / "bottom.txt").read_text() == "bottom\n"
        assert not (tree / ".up.unionfs-work").exists()  # the given workdir is used
        assert (tree / "work/unionfs.log").exists()
    finally:
        run("umount", mnt)
        force_unmount(mnt)


def test_second_mount_of_the_same_upper_is_refused(tree: Path) -> None:
    other = tree / "mnt2"
    other.mkdir()
    with unionfs_mount([f"{tree}/l1"], str(tree / "up"), str(tree / "mnt")):
        proc = run("mount", f"{tree}/l2", str(tree / "up"), str(other))
        assert proc.returncode == 1
        assert proc.stderr.count("\n") == 1 and "in use" in proc.stderr
        assert not is_mounted(str(other))


def test_foreground_mount_stops_on_sigterm(tree: Path) -> None:
    mnt = str(tree / "mnt")
    log = tree / "stderr.log"
    with open(log, "w") as err:
        daemon = subprocess.Popen(unionfs_cmd("mount", "-f", "--debug", f"{tree}/l1", mnt),
                                  cwd=REPO, stderr=err)
    try:
        assert wait_for(lambda: is_mounted(mnt)), "foreground mount did not come up"
        assert (Path(mnt) / "top.txt").read_text() == "top\n"
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        assert not is_mounted(mnt)
        assert "DEBUG" in log.read_text()  # --debug logs requests to stderr in the foreground
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        force_unmount(mnt)


def test_daemon_unmounts_on_sigterm(tree: Path) -> None:
    mnt = str(tree / "mnt")
    with unionfs_mount([f"{tree}/l1"], str(tree / "up"), mnt):
        (pid,) = daemon_pids(mnt)
        os.kill(pid, signal.SIGTERM)
        assert wait_for(lambda: pid_gone(pid) and not is_mounted(mnt))
        assert "got SIGTERM" in (tree / ".up.unionfs-work/unionfs.log").read_text()


def test_debug_log_goes_to_the_workdir(tree: Path) -> None:
    mnt = tree / "mnt"
    with unionfs_mount([f"{tree}/l1"], str(tree / "up"), str(mnt), options=["debug"]):
        (mnt / "top.txt").read_text()
    log = (tree / ".up.unionfs-work/unionfs.log").read_text()
    assert "DEBUG" in log and "lookup" in log


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_launcher_restarts_only_mounts():
    """unionfs/launch.py restarts mounts on the C allocator (see test_scale); its list of
    the other commands must follow cli.COMMANDS."""
    from unionfs import cli, launch
    assert launch.OTHER_COMMANDS == set(cli.COMMANDS) - {"mount"}
    assert launch.wants_restart(["mount", "l", "u", "m"], {})
    assert launch.wants_restart(["unionfs", "/mnt", "-o", "lowerdir=/l"], {})  # helper form
    assert launch.wants_restart(["-o", "lowerdir=/l", "/mnt"], {})  # mount-program form
    assert launch.wants_restart(["-f", "-olowerdir=/l", "/mnt"], {})
    assert not launch.wants_restart(["mount", "l", "u", "m"], {"PYTHONMALLOC": "malloc"})
    assert not launch.wants_restart(["mount"], {"PYTHONMALLOC": "debug"})
    for argv in (["diff", "/mnt"], ["umount", "/mnt"], ["mark", "/mnt", "x"], ["--help"], ["--version"], []):
        assert not launch.wants_restart(argv, {}), argv
