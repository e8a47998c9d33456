"""unionfs without root: an unprivileged user the test makes mounts through fusermount3, and
the root of a user namespace (`unshare -r -m`) mounts directly.

The upper of such a mount is in kernel overlayfs's userxattr format (user.overlay.*), which a
kernel `mount -t overlay -o userxattr` in a user namespace reads as the same view, and the
other way round. Formats are never mixed in one upper; the union's own xattrs are neither
shown nor accepted through the mount; one user cannot reach another's files.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

from helpers.mounting import force_unmount, is_mounted, unionfs_mount
from helpers.rootless import User, unprivileged_user

pytestmark = [pytest.mark.mount, pytest.mark.kernel]


@pytest.fixture
def user():
    with unprivileged_user("a") as u:
        yield u


def _layers(u: User) -> tuple[str, str, str]:
    """A lower with a file, a directory and a whiteout-able name, an empty upper and a
    mountpoint, all owned by the user."""
    lower, upper, mnt = u.path("lower"), u.path("upper"), u.path("mnt")
    script = textwrap.dedent(f"""
        set -e
        mkdir -p {lower}/dir/sub {upper} {mnt}
        echo lower > {lower}/file
        echo gone > {lower}/dir/gone
        echo keep > {lower}/dir/sub/keep
        """)
    u.run(["sh", "-c", script], check=True)
    return lower, upper, mnt


def _mounted_by(mnt: str) -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mnt:
                return line.rpartition(" - ")[2]
    return None


def test_user_mounts_and_unmounts_through_fusermount(user):
    lower, upper, mnt = _layers(user)
    try:
        proc = user.unionfs("mount", lower, upper, mnt)
        assert proc.returncode == 0, proc.stderr
        info = _mounted_by(mnt)
        assert info is not None and info.startswith("fuse.unionfs ")
        assert f"user_id={user.uid}" in info
        # the daemon's pid file is in the user's runtime directory, not root's /run
        pidfiles = os.listdir(os.path.join(user.runtime_dir, "unionfs"))
        assert len(pidfiles) == 1 and pidfiles[0].endswith(".pid")
        script = textwrap.dedent(f"""
            set -e
            cat {mnt}/file
            echo more >> {mnt}/file
            rm {mnt}/dir/gone
            mkdir {mnt}/new && echo n > {mnt}/new/f
            ls {mnt}/dir
            """)
        proc = user.run(["sh", "-c", script])
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "lower\nsub\n"
        proc = user.unionfs("umount", mnt)
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(mnt)
        assert os.listdir(os.path.join(user.runtime_dir, "unionfs")) == []
    finally:
        force_unmount(mnt)
    # the upper is in the userxattr format: the user owns all of it, nothing trusted.*
    with open(os.path.join(upper, "file")) as f:
        assert f.read() == "lower\nmore\n"
    assert _NO_PASSTHROUGH in _daemon_log(upper)
    st = os.lstat(os.path.join(upper, "dir", "gone"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    ino = os.getxattr(os.path.join(upper, "file"), "user.overlay.unionfs.ino")
    assert ino.split()[0].isdigit()
    for dirpath, dirs, files in os.walk(upper):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            assert os.lstat(path).st_uid == user.uid
            assert not [a for a in os.listxattr(path, follow_symlinks=False)
                        if a.startswith("trusted.")]


def test_allow_other_needs_user_allow_other(user):
    """fusermount3 refuses allow_other to users unless /etc/fuse.conf says user_allow_other:
    one line, exit 1, nothing mounted, no workdir left behind."""
    with open("/etc/fuse.conf") as f:
        if any(line.strip() == "user_allow_other" for line in f):
            pytest.skip("/etc/fuse.conf allows allow_other to every user here")
    lower, upper, mnt = _layers(user)
    proc = user.unionfs("mount", "-o", "allow_other", lower, upper, mnt, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("unionfs: error: "), proc.stderr
    assert "user_allow_other" in lines[0] and "/etc/fuse.conf" in lines[0]
    assert not is_mounted(mnt)
    assert not os.path.exists(user.path(".upper.unionfs-work"))


def test_user_namespace_root_mounts_directly(user):
    """`unshare -r -m`: root of its own namespaces, the daemon mounts with mount(2) and
    unmounts with umount(2), with no fusermount3 and no access to the host's /run."""
    lower, upper, mnt = _layers(user)
    py = sys.executable
    script = textwrap.dedent(f"""
        set -e
        {py} -m unionfs mount {lower} {upper} {mnt}
        grep -q " {mnt} .* - fuse.unionfs " /proc/self/mountinfo
        echo more >> {mnt}/file
        rm -r {mnt}/dir/sub
        cat {mnt}/file
        ls -A {mnt}/dir
        ls {os.path.join(user.runtime_dir, 'unionfs')}
        {py} -m unionfs umount {mnt}
        ! grep -q " {mnt} " /proc/self/mountinfo
        """)
    proc = user.run(["sh", "-c", script], userns=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[:2] == ["lower", "more"]
    assert out[2:3] == ["gone"]
    assert out[3].endswith(".pid")
    st = os.lstat(os.path.join(upper, "dir", "sub"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.lstat(os.path.join(upper, "file")).st_uid == user.uid
    # root of a user namespace is not root of the machine: no backing files for it
    assert _NO_PASSTHROUGH in _daemon_log(upper)


_NO_PASSTHROUGH = "passthrough: off (backing files need CAP_SYS_ADMIN in the initial user namespace)"


def _daemon_log(upper: str) -> str:
    """The daemon's log in the default workdir beside *upper*."""
    work = os.path.join(os.path.dirname(upper), f".{os.path.basename(upper)}.unionfs-work")
    with open(os.path.join(work, "unionfs.log")) as f:
        return f.read()


def _kernel_view_script(lower: str, upper: str, work: str, mnt: str, body: str) -> str:
    """Shell that mounts kernel overlayfs -o userxattr (in the user's namespace), runs
    *body*, unmounts."""
    return textwrap.dedent(f"""
        set -e
        mkdir -p {work} {mnt}
        mount -t overlay overlay -o lowerdir={lower},upperdir={upper},workdir={work},userxattr {mnt}
        trap 'umount {mnt}' EXIT
        """) + textwrap.dedent(body)


LIST = "(cd {m} && find . | LC_ALL=C sort | while read -r p; do " \
       "printf '%s %s ' \"$p\" \"$(stat -c %F:%a:%s \"$p\")\"; " \
       "if [ -f \"$p\" ]; then md5sum < \"$p\"; else echo; fi; done)\n"


def test_kernel_userxattr_mount_reads_the_same_upper_and_back(user):
    """An upper unionfs wrote as the user shows the same view through kernel overlayfs
    -o userxattr in a user namespace; an upper that kernel mount wrote shows the same
    view through unionfs (whiteouts, opaque directories, copied-up and new files)."""
    lower, upper, mnt = _layers(user)
    changes = textwrap.dedent(f"""
        echo more >> {{m}}/file
        rm {{m}}/dir/gone
        rm -r {{m}}/dir/sub && mkdir {{m}}/dir/sub && echo new > {{m}}/dir/sub/fresh
        mkdir -p {{m}}/new/deep && echo n > {{m}}/new/deep/f
        ln -s file {{m}}/link
        """)
    py = sys.executable
    views = {}
    # 1. unionfs (plain user, fusermount3) writes upper; 2. kernel reads it
    proc = user.unionfs("mount", lower, upper, mnt)
    assert proc.returncode == 0, proc.stderr
    try:
        user.run(["sh", "-c", "set -e\n" + changes.format(m=mnt)], check=True)
        views["unionfs"] = user.run(["sh", "-c", LIST.format(m=mnt)], check=True).stdout
    finally:
        user.unionfs("umount", mnt)
        force_unmount(mnt)
    script = _kernel_view_script(lower, upper, user.path("kwork"), user.path("kmnt"),
                                 LIST.format(m=user.path("kmnt")))
    views["kernel-on-unionfs"] = user.run(["sh", "-c", script], userns=True, check=True).stdout
    # 3. kernel writes a second upper from scratch; 4. unionfs (in the same kind of
    # namespace, and as the plain user) reads it
    upper2 = user.path("upper2")
    os.mkdir(upper2)
    os.chown(upper2, user.uid, user.gid)
    script = _kernel_view_script(lower, upper2, user.path("kwork2"), user.path("kmnt2"),
                                 changes.format(m=user.path("kmnt2")) + LIST.format(m=user.path("kmnt2")))
    views["kernel"] = user.run(["sh", "-c", script], userns=True, check=True).stdout
    script = textwrap.dedent(f"""
        set -e
        {py} -m unionfs mount {lower} {upper2} {mnt}
        trap '{py} -m unionfs umount {mnt}' EXIT
        """) + LIST.format(m=mnt)
    views["unionfs-on-kernel (userns)"] = user.run(["sh", "-c", script], userns=True, check=True).stdout
    proc = user.unionfs("mount", lower, upper2, mnt)
    assert proc.returncode == 0, proc.stderr
    try:
        views["unionfs-on-kernel"] = user.run(["sh", "-c", LIST.format(m=mnt)], check=True).stdout
    finally:
        user.unionfs("umount", mnt)
        force_unmount(mnt)
    assert "./dir/sub/fresh" in views["kernel"] and "./dir/gone" not in views["kernel"]
    assert os.getxattr(os.path.join(upper2, "dir", "sub"), "user.overlay.opaque") == b"y"
    for name, view in views.items():
        assert view == views["kernel"], f"{name} differs from kernel overlayfs:\n{view}\n---\n{views['kernel']}"


def test_private_xattrs_hidden_and_refused(user):
    """user.overlay.* (the format's, overlayfs's and ours) and trusted.overlay.* are neither
    listed, read, set nor removed through a rootless mount; other user.* names work."""
    lower, upper, mnt = _layers(user)
    proc = user.unionfs("mount", lower, upper, mnt)
    assert proc.returncode == 0, proc.stderr
    code = textwrap.dedent("""
        import errno, os, sys
        m = sys.argv[1]
        f = os.path.join(m, "file")
        open(f, "a").close()                      # copy it up: it gets its identity xattr
        out = [sorted(os.listxattr(f))]
        for name in ("user.overlay.unionfs.ino", "user.overlay.opaque", "user.overlay.origin",
                     "trusted.overlay.opaque"):
            for call in (lambda: os.getxattr(f, name), lambda: os.setxattr(f, name, b"y"),
                         lambda: os.removexattr(f, name)):
                try:
                    call()
                    out.append((name, "ok"))
                except OSError as e:
                    out.append((name, errno.errorcode[e.errno]))
        os.setxattr(f, "user.mine", b"1")
        out.append(os.getxattr(f, "user.mine"))
        print(repr(out))
        """)
    try:
        proc = user.python(code, mnt)
    finally:
        user.unionfs("umount", mnt)
        force_unmount(mnt)
    assert proc.returncode == 0, proc.stderr
    out = eval(proc.stdout)  # noqa: S307 - our own child's repr
    assert out[0] == []
    assert out[-1] == b"1"
    assert all(result != "ok" for _, result in out[1:-1]), out
    assert os.getxattr(os.path.join(upper, "file"), "user.overlay.unionfs.ino")
    assert "user.overlay.opaque" not in os.listxattr(os.path.join(upper, "file"))


def test_formats_are_never_mixed_in_one_upper(tmp_path, user):
    """Root without -o userxattr refuses an upper a user mount wrote, and root with it an
    upper written in trusted.overlay.*: one line each, nothing mounted."""
    lower, upper, mnt = _layers(user)
    proc = user.unionfs("mount", lower, upper, mnt)
    assert proc.returncode == 0, proc.stderr
    user.run(["sh", "-c", f"rm -r {mnt}/dir/sub"], check=True)
    user.unionfs("umount", mnt, check=True)
    root_mnt = str(tmp_path / "m")
    os.mkdir(root_mnt)
    for work in (None, str(tmp_path / "w")):   # with the format noted, and found by a walk
        args = ["mount"] + (["--workdir", work] if work else []) + [lower, upper, root_mnt]
        if work:
            os.mkdir(work)
        proc = subprocess.run([sys.executable, "-m", "unionfs", *args], capture_output=True,
                              text=True, timeout=60)
        force_unmount(root_mnt)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.startswith("unionfs: error: ") and proc.stderr.count("\n") == 1
        assert "userxattr" in proc.stderr and "-o userxattr" in proc.stderr
        assert not is_mounted(root_mnt)
    # root with -o userxattr takes it, and writes user.overlay.* only
    work = str(tmp_path / "w")
    with unionfs_mount([lower], upper, root_mnt, workdir=work, options=["userxattr"]):
        shutil.rmtree(os.path.join(root_mnt, "dir"))
        os.mkdir(os.path.join(root_mnt, "dir"))
    assert os.getxattr(os.path.join(upper, "dir"), "user.overlay.opaque") == b"y"
    assert not [a for a in os.listxattr(os.path.join(upper, "dir")) if a.startswith("trusted.")]
    # and a trusted.overlay.* upper is refused with -o userxattr
    upper3, work3 = str(tmp_path / "u3"), str(tmp_path / "w3")
    os.mkdir(upper3), os.mkdir(work3)
    with unionfs_mount([lower], upper3, root_mnt, workdir=work3):
        shutil.rmtree(os.path.join(root_mnt, "dir"))
        os.mkdir(os.path.join(root_mnt, "dir"))
    assert os.getxattr(os.path.join(upper3, "dir"), "trusted.overlay.opaque") == b"y"
    for w in (work3, str(tmp_path / "w4")):
        os.makedirs(w, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "unionfs", "mount", "-o", "userxattr",
                               "--workdir", w, lower, upper3, root_mnt],
                              capture_output=True, text=True, timeout=60)
        force_unmount(root_mnt)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert "trusted.overlay" in proc.stderr and not is_mounted(root_mnt)


def test_userxattr_renames_a_merged_directory_by_copying_it(tmp_path, user):
    """No redirects in the userxattr format (overlayfs refuses redirect_dir=on with
    userxattr, and there gives EXDEV, so mv copies): unionfs renames a directory with lower
    contents by copying its tree up and moving it as an opaque directory, leaving no
    whiteout inside it. Kernel overlayfs -o userxattr reads that upper as the same view,
    and `unionfs diff` says what it says of the redirect that the trusted format keeps."""
    lower, upper, mnt = _layers(user)
    user.run(["sh", "-c", f"set -e; ln {lower}/file {lower}/dir/sub/hard; "
                          f"setfattr -n user.mine -v 1 {lower}/dir/gone; "
                          f"touch -d 2001-02-03 {lower}/dir/sub/keep"], check=True)
    proc = user.unionfs("mount", lower, upper, mnt)
    assert proc.returncode == 0, proc.stderr
    code = textwrap.dedent("""
        import errno, os, sys
        m = sys.argv[1]
        os.rename(os.path.join(m, "dir"), os.path.join(m, "moved"))
        st = os.stat(os.path.join(m, "moved", "sub", "hard"))
        print(repr([sorted(os.listdir(m)), st.st_nlink,
                    os.stat(os.path.join(m, "file")).st_ino == st.st_ino]))
        """)
    try:
        user.run(["sh", "-c", f"echo more > {mnt}/dir/new && rm {mnt}/dir/sub/keep && "
                              f"cp -p {lower}/dir/sub/keep {mnt}/dir/sub/keep"], check=True)
        proc = user.python(code, mnt)
        assert proc.returncode == 0, proc.stderr
        ours = user.run(["sh", "-c", LIST.format(m=mnt)], check=True).stdout
        xattr = user.run(["getfattr", "--only-values", "-n", "user.mine", f"{mnt}/moved/gone"],
                         check=True).stdout
    finally:
        user.unionfs("umount", mnt)
        force_unmount(mnt)
    assert eval(proc.stdout) == [["file", "moved"], 2, True]  # noqa: S307
    assert xattr == "1"
    assert "./moved/sub/keep" in ours and "./dir" not in ours
    assert os.getxattr(os.path.join(upper, "moved"), "user.overlay.opaque") == b"y"
    assert not [a for a in os.listxattr(os.path.join(upper, "moved")) if "redirect" in a]
    st = os.lstat(os.path.join(upper, "dir"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    inside = [os.lstat(os.path.join(p, n)) for p, _, names in os.walk(os.path.join(upper, "moved"))
              for n in names]
    assert inside and not [s for s in inside if stat.S_ISCHR(s.st_mode)]
    script = _kernel_view_script(lower, upper, user.path("kwork"), user.path("kmnt"),
                                 LIST.format(m=user.path("kmnt")))
    assert user.run(["sh", "-c", script], userns=True, check=True).stdout == ours
    # the same changes in the trusted format (a redirect), by root: the same diff
    diffs = [user.unionfs("diff", upper, check=True).stdout]
    tupper, tmnt = str(tmp_path / "u"), str(tmp_path / "m")
    os.mkdir(tupper), os.mkdir(tmnt)
    with unionfs_mount([lower], tupper, tmnt):
        subprocess.run(["sh", "-c", f"set -e; echo more > {tmnt}/dir/new; rm {tmnt}/dir/sub/keep; "
                                    f"cp -p {lower}/dir/sub/keep {tmnt}/dir/sub/keep; "
                                    f"mv {tmnt}/dir {tmnt}/moved"], check=True)
    assert os.getxattr(os.path.join(tupper, "moved"), "trusted.overlay.redirect")
    diffs.append(subprocess.run([sys.executable, "-m", "unionfs", "diff", tupper],
                                capture_output=True, text=True, check=True).stdout)
    assert diffs[0] == diffs[1] and "D /dir\n" in diffs[0] and "A /moved/sub/keep\n" in diffs[0]


MAPPING = "0:1000:1:1:110000:65536:200000:300000:10"   # the last range overlaps nothing


def _owners_after_ops(mnt: str) -> dict[str, tuple[int, int]]:
    """Create, mkdir and chown through *mnt* as mapped and unmapped callers; return the
    owners shown."""
    import errno as _errno

    def as_user(uid: int, fn) -> str:
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
                fn()
                os._exit(0)
            except OSError as e:
                os._exit(100 + e.errno)
            except BaseException:
                os._exit(99)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        return "ok" if code == 0 else _errno.errorcode.get(code - 100, str(code))

    results = {
        "new-by-110005": as_user(110005, lambda: open(os.path.join(mnt, "pub", "n1"), "w").close()),
        "new-by-1000": as_user(1000, lambda: os.mkdir(os.path.join(mnt, "pub", "d1"))),
        "new-by-300003": as_user(300003, lambda: open(os.path.join(mnt, "pub", "n2"), "w").close()),
        "new-by-5000": as_user(5000, lambda: open(os.path.join(mnt, "pub", "n3"), "w").close()),
    }
    os.chown(os.path.join(mnt, "a"), 110010, 1000)
    os.chown(os.path.join(mnt, "b"), 5000, -1)     # no range: stored as the overflow id
    out = {name: (st.st_uid, st.st_gid) for name in ("a", "b", "c", "pub", "pub/n1", "pub/d1",
                                                     "pub/n2", "pub/n3")
           if (st := _lstat(os.path.join(mnt, name))) is not None}
    out.update({k: v for k, v in results.items()})  # type: ignore[misc]
    return out


def _lstat(path: str):
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _stored(upper: str) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirs, files in os.walk(upper):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not name.startswith(".wh."):  # fuse-overlayfs marks new directories opaque so
                out[os.path.relpath(path, upper)] = (st.st_uid, st.st_gid)
    return out


@pytest.fixture
def public_tmp():
    """A directory other users can reach (pytest's tmp_path is below a root-only one)."""
    import tempfile
    base = tempfile.mkdtemp(prefix="unionfs-idmap-", dir="/var/tmp")
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        with open("/proc/self/mountinfo") as f:
            left = [line.split()[4] for line in f if line.split()[4].startswith(base + "/")]
        for mnt in left:
            force_unmount(mnt)
        shutil.rmtree(base, ignore_errors=True)


def test_uidmapping_gidmapping_as_fuse_overlayfs(public_tmp):
    """uidmapping=/gidmapping= against fuse-overlayfs itself on the same operations: the
    owners shown for stored ids in, across and outside the ranges, and the owners stored
    for what mapped and unmapped callers create and chown."""
    import shutil as _shutil
    if _shutil.which("fuse-overlayfs") is None:
        pytest.fail("fuse-overlayfs is not installed (scripts/setup installs it)")
    results = {}
    for impl in ("fuse-overlayfs", "unionfs"):
        base = os.path.join(public_tmp, impl)
        lower, upper, work, mnt = (os.path.join(base, d) for d in ("lower", "upper", "work", "mnt"))
        for d in (lower, upper, work, mnt):
            os.makedirs(d)
        os.chmod(base, 0o755)
        for name, owner in (("a", 0), ("b", 1), ("c", 70000)):
            with open(os.path.join(lower, name), "w") as f:
                f.write(name)
            os.chown(os.path.join(lower, name), owner, owner)
        os.mkdir(os.path.join(lower, "pub"), 0o777)
        os.chmod(os.path.join(lower, "pub"), 0o777)
        opts = (f"lowerdir={lower},upperdir={upper},workdir={work},"
                f"uidmapping={MAPPING},gidmapping={MAPPING},allow_other")
        cmd = (["fuse-overlayfs", "-o", opts, mnt] if impl == "fuse-overlayfs" else
               [sys.executable, "-m", "unionfs", "mount", "-o", opts, mnt])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        try:
            shown = _owners_after_ops(mnt)
        finally:
            if impl == "unionfs":
                subprocess.run([sys.executable, "-m", "unionfs", "umount", mnt], capture_output=True)
            force_unmount(mnt)
        results[impl] = (shown, _stored(upper))
    shown, stored = results["unionfs"]
    assert shown["a"] == (110010, 1000) and stored["a"] == (11, 0)
    assert shown["c"] == (65534, 65534)
    assert stored["pub/n1"] == (6, 6) and stored["pub/n2"] == (200003, 200003)
    assert results["unionfs"] == results["fuse-overlayfs"]


def test_one_user_cannot_reach_anothers_files():
    """Through user B's own mount of layers holding user A's files, B gets what the modes
    give B and no more (the daemon runs as B, the kernel checks the modes shown); A's mount
    is closed to B altogether (no allow_other); and in a user namespace, where the mount
    lets every mapped user in, one mapped user cannot read another's private file."""
    with unprivileged_user("a") as a, unprivileged_user("b") as b:
        lower = a.path("lower")
        a.run(["sh", "-c", textwrap.dedent(f"""
            set -e
            mkdir -p {lower}/private {lower}/open
            echo secret > {lower}/secret && chmod 600 {lower}/secret
            echo hidden > {lower}/private/f && chmod 700 {lower}/private
            echo readable > {lower}/open/f && chmod 644 {lower}/open/f
            mkdir {a.path('upper')} {a.path('mnt')}
            """)], check=True)
        os.chmod(a.home, 0o755)
        upper, mnt = b.path("upper"), b.path("mnt")
        b.run(["mkdir", upper, mnt], check=True)
        proc = b.unionfs("mount", lower, upper, mnt)
        assert proc.returncode == 0, proc.stderr
        code = textwrap.dedent("""
            import errno, os, sys
            m = sys.argv[1]
            def outcome(fn):
                try:
                    fn()
                    return "ok"
                except OSError as e:
                    return errno.errorcode[e.errno]
            print(repr({
                "read secret": outcome(lambda: open(os.path.join(m, "secret")).read()),
                "list private": outcome(lambda: os.listdir(os.path.join(m, "private"))),
                "read private/f": outcome(lambda: open(os.path.join(m, "private/f")).read()),
                "read open/f": outcome(lambda: open(os.path.join(m, "open/f")).read()),
                "write open/f": outcome(lambda: open(os.path.join(m, "open/f"), "a").write("x")),
                "chmod secret": outcome(lambda: os.chmod(os.path.join(m, "secret"), 0o666)),
                "new in open": outcome(lambda: open(os.path.join(m, "open/new"), "w").close()),
                "unlink open/f": outcome(lambda: os.unlink(os.path.join(m, "open/f"))),
            }))
            """)
        try:
            seen = b.python(code, mnt)
            proc = a.unionfs("mount", lower, a.path("upper"), a.path("mnt"))
            assert proc.returncode == 0, proc.stderr
            try:
                into_a = b.python("import os, sys; os.listdir(sys.argv[1])", a.path("mnt"))
            finally:
                a.unionfs("umount", a.path("mnt"))
                force_unmount(a.path("mnt"))
        finally:
            b.unionfs("umount", mnt)
            force_unmount(mnt)
        assert seen.returncode == 0, seen.stderr
        assert eval(seen.stdout) == {  # noqa: S307 - our own child's repr
            "read secret": "EACCES", "list private": "EACCES", "read private/f": "EACCES",
            "read open/f": "ok", "write open/f": "EACCES", "chmod secret": "EPERM",
            "new in open": "EACCES", "unlink open/f": "EACCES"}
        assert into_a.returncode != 0 and "Permission denied" in into_a.stderr
        assert os.listdir(upper) == []   # nothing was copied up for B
        # in a user namespace: ids 1000 and 1001 there, one mount that lets both in
    with unprivileged_user("n", subids=True) as n:
        lower, upper, mnt = n.path("lower"), n.path("upper"), n.path("mnt")
        py = sys.executable
        script = textwrap.dedent(f"""
            set -e
            mkdir -p {lower} {upper} {mnt}
            echo mine > {lower}/mine && chown 1000:1000 {lower}/mine && chmod 600 {lower}/mine
            chmod 755 {n.home} {lower} {upper}
            {py} -m unionfs mount {lower} {upper} {mnt}
            trap '{py} -m unionfs umount {mnt}' EXIT
            setpriv --reuid=1000 --regid=1000 --clear-groups cat {mnt}/mine
            if setpriv --reuid=1001 --regid=1001 --clear-groups cat {mnt}/mine 2>/dev/null; then
                echo LEAKED
            fi
            setpriv --reuid=1001 --regid=1001 --clear-groups sh -c 'echo x >> {mnt}/mine' 2>/dev/null \\
                || echo refused
            """)
        proc = n.run(["sh", "-c", script], userns=True)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["mine", "refused"]


def test_diff_of_a_rootless_mount(user):
    """`unionfs diff` as the user, of the live mount and of the unmounted upper, reads the
    userxattr format: an opaque directory replaces what was below it."""
    lower, upper, mnt = _layers(user)
    proc = user.unionfs("mount", lower, upper, mnt)
    assert proc.returncode == 0, proc.stderr
    try:
        user.run(["sh", "-c", f"set -e; rm -r {mnt}/dir/sub; mkdir {mnt}/dir/sub; "
                              f"echo n > {mnt}/dir/sub/new; echo x >> {mnt}/file"], check=True)
        live = user.unionfs("diff", mnt, check=True).stdout
    finally:
        user.unionfs("umount", mnt)
        force_unmount(mnt)
    assert os.getxattr(os.path.join(upper, "dir", "sub"), "user.overlay.opaque") == b"y"
    offline = user.unionfs("diff", upper, check=True).stdout
    want = ["C /dir", "C /dir/sub", "D /dir/sub/keep", "A /dir/sub/new", "C /file"]
    assert live.splitlines() == want and offline.splitlines() == want, (live, offline)


OVERRIDE_SCRIPT = r"""
set -e
b={base}
mkdir -p $b/lower/d $b/lower/priv $b/lower/pub $b/upper $b/work $b/mnt
echo f > $b/lower/f; echo g > $b/lower/d/g; echo p > $b/lower/priv/p
chown 1000:1000 $b/lower/d/g; chmod 0600 $b/lower/d/g; chmod 0700 $b/lower/priv; chmod 0777 $b/lower/pub
setfattr -n user.containers.override_stat -v 0:0:755 $b/lower      # the lower is read with it
setfattr -n user.containers.override_stat -v 7:8:0640 $b/lower/f
{mount} -o lowerdir=$b/lower,upperdir=$b/upper,workdir=$b/work,xattr_permissions=2 $b/mnt
m=$b/mnt
echo "shown f before $(stat -c %a:%u:%g $m/f)"
chown 1000:1001 $m/d/g              # copy-up, then a chown only the xattr keeps
chmod 0604 $m/f                     # the lower's kept owner stays, the mode changes
echo more >> $m/d/g
mkdir -m 0710 $m/newdir
setpriv --reuid=1000 --regid=1000 --clear-groups sh -c "umask 022; echo n > $m/pub/newfile"
touch $m/priv/p
setfattr -n user.containers.override_stat -v 1:1:777 $m/pub 2>/dev/null || echo "refused"
for p in . f d d/g priv priv/p newdir pub/newfile; do echo "shown $p $(stat -c %a:%u:%g $m/$p)"; done
cd $b/upper
for p in f d d/g priv priv/p newdir pub/newfile; do
    echo "stored $p $(stat -c %a:%u:%g $p) $(getfattr --only-values -n user.containers.override_stat $p)"
done
echo "root $(getfattr --only-values -n user.containers.override_stat .)"
"""


def test_override_stat_xattr_permissions():
    """-o xattr_permissions=2, as podman's mount program runs (the root of a user namespace
    with subordinate ids), by fuse-overlayfs's rules (owners.StatOverride): what the mount
    shows and what the upper stores after a chown, a chmod, a copy-up, a mkdir and a create
    by another user; the xattr is not the mount's users' to set."""
    with unprivileged_user("o", subids=True) as u:
        script = OVERRIDE_SCRIPT.format(base=u.path("t"), mount=f"{sys.executable} -m unionfs")
        proc = u.run(["sh", "-c", script], userns=True)
        assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "shown f before 640:7:8",
        "refused",
        "shown . 755:0:0",             # the upper root gets the first marked lower root's
        "shown f 604:7:8",
        "shown d 755:0:0",
        "shown d/g 600:1000:1001",
        "shown priv 700:0:0",
        "shown priv/p 644:0:0",
        "shown newdir 710:0:0",
        "shown pub/newfile 644:1000:1000",
        "stored f 755:0:0 7:8:100604",  # the object is the daemon's, at least 0755
        "stored d 755:0:0 0:0:40755",
        "stored d/g 755:0:0 1000:1001:100600",
        "stored priv 755:0:0 0:0:40700",
        "stored priv/p 755:0:0 0:0:100644",
        "stored newdir 755:0:0 0:0:40710",
        "stored pub/newfile 755:0:0 1000:1000:100644",
        "root 0:0:755"], proc.stdout


def test_userxattr_whiteouts_in_xattr_form_where_mknod_is_refused(user):
    """The root of a user namespace whose daemon may make no 0/0 device nor RENAME_WHITEOUT
    (helpers.nomknod's seccomp filter) writes user.overlay.whiteout files in directories
    marked user.overlay.opaque="x"; kernel overlayfs -o userxattr reads that upper (as a
    lower layer: its readdir skips the xattr form in an upper) as the view kernel overlayfs
    itself makes with the same changes, and unionfs remounts it the same."""
    from helpers import nomknod
    lower, upper, mnt = _layers(user)
    py = sys.executable
    changes = textwrap.dedent("""
        rm {m}/dir/gone {m}/file
        rm -r {m}/dir/sub && mkdir {m}/dir/sub && echo new > {m}/dir/sub/fresh
        echo kept > {m}/dir/kept
        """)
    kmnt, upper2 = user.path("kmnt"), user.path("upper2")
    script = textwrap.dedent(f"""
        set -e
        {' '.join(nomknod.argv([py, '-m', 'unionfs', 'mount', lower, upper, mnt]))}
        """) + changes.format(m=mnt) + LIST.format(m=mnt) + textwrap.dedent(f"""
        {py} -m unionfs umount {mnt}
        echo ===
        mkdir -p {kmnt}
        mount -t overlay overlay -o lowerdir={upper}:{lower},userxattr {kmnt}
        """) + LIST.format(m=kmnt) + f"umount {kmnt}\necho ===\n" + textwrap.dedent(f"""
        {py} -m unionfs mount {lower} {upper} {mnt}
        """) + LIST.format(m=mnt) + f"{py} -m unionfs umount {mnt}\n"
    proc = user.run(["sh", "-c", script], userns=True)
    assert proc.returncode == 0, proc.stderr
    ours, kernel_read, remount = proc.stdout.split("===\n")
    os.mkdir(upper2)
    os.chown(upper2, user.uid, user.gid)
    script = _kernel_view_script(lower, upper2, user.path("kwork"), user.path("kmnt2"),
                                 changes.format(m=user.path("kmnt2")) + LIST.format(m=user.path("kmnt2")))
    kernel = user.run(["sh", "-c", script], userns=True, check=True).stdout
    assert "./dir/kept" in kernel and "./file" not in kernel
    assert ours == kernel_read == remount == kernel
    st = os.lstat(os.path.join(upper, "file"))
    assert stat.S_ISREG(st.st_mode) and st.st_size == 0
    assert os.getxattr(os.path.join(upper, "file"), "user.overlay.whiteout") == b""
    assert os.getxattr(os.path.join(upper, "dir", "gone"), "user.overlay.whiteout") == b""
    assert os.getxattr(upper, "user.overlay.opaque") == b"x"
    assert os.getxattr(os.path.join(upper, "dir", "sub"), "user.overlay.opaque") == b"y"
    assert not [p for p, _, names in os.walk(upper) for n in names
                if stat.S_ISCHR(os.lstat(os.path.join(p, n)).st_mode)]
