"""unionfs without root: an unprivileged user the test makes mounts through fusermount3, and
the root of a user namespace (`unshare -r -m`) mounts directly.

The upper of such a mount is in kernel overlayfs's userxattr format (user.overlay.*), which a
kernel `mount -t overlay -o userxattr` in a user namespace reads as the same view, and the
other way round. Formats are never mixed in one upper; the union's own xattrs are neither
shown nor accepted through the mount; one user cannot reach another's files.
"""
from __future__ import annotations

import os
import stat
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mounting import force_unmount, is_mounted  # noqa: E402
from rootless import User, unprivileged_user  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="makes users and mounts: needs root")


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
