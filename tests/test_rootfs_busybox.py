"""A busybox root filesystem on a union: chroot + unshare, users, /proc, devices.

A small root is built from Debian's busybox-static package (the .deb is cached
in ~/.cache/unionfs-rootfs; without network the installed /bin/busybox is
used) and split into two lower layers:

  base   busybox and its applet symlinks, /etc (passwd/group: root, alice 1000,
         bob 1001), sticky /tmp with files of alice and bob, /srv/data/...
  extra  /opt/app/..., files added to /srv/data, a new /etc/motd, and a
         whiteout of base's /etc/issue

Identical copies are mounted with unionfs (-o allow_other,dev,suid) and with
kernel overlayfs. On each, the same busybox script runs as root in new mount
and pid namespaces chrooted into the mount, with /proc mounted inside (and
unmounted at the end; it would vanish with the namespace anyway). It acts as
root and, through busybox su, as alice and bob: home directories, files
written by each user, permission refusals (another user's 0644 file, another
user's file in sticky /tmp, a 0750 home), a device node and a fifo actually
used, a renamed merged lower directory, deleted lower files and directories, a
hard link to a lower file, copy-up by chmod/chown, and a setuid copy of
busybox's su that only works if the suid bit is honoured. Each outcome goes
into /var/log/outcomes in the root.

Then the final views are compared entry by entry (type, mode, owner, size,
content hash, symlink target, rdev, link count) together with the outcomes
and the script's output: unionfs must show what overlayfs shows.
"""
from __future__ import annotations

import glob
import os
import shutil
import stat
import subprocess
import tempfile

import pytest

from helpers.mounting import is_mounted, kernel_overlay, unionfs_mount
from helpers.rootfs_helpers import ROOTFS_MARKS, assert_same_views, view


pytestmark = [pytest.mark.mount, pytest.mark.kernel, pytest.mark.rootfs, *ROOTFS_MARKS]

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "unionfs-rootfs")
ALICE, BOB = 1000, 1001


# -- getting busybox ----------------------------------------------------------------------

def busybox_deb() -> str | None:
    """Path of a cached busybox-static .deb, downloading it once; None if apt can't."""
    found = sorted(glob.glob(os.path.join(CACHE, "busybox-static_*.deb")))
    if found:
        return found[-1]
    os.makedirs(CACHE, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        os.chmod(tmp, 0o755)                 # so apt's _apt user may write there
        for attempt in range(2):
            r = subprocess.run(["apt-get", "download", "-q", "busybox-static"], cwd=tmp,
                               capture_output=True, timeout=120)
            debs = glob.glob(os.path.join(tmp, "busybox-static_*.deb"))
            if r.returncode == 0 and debs:
                deb = debs[0]
                if subprocess.run(["dpkg-deb", "-c", deb], capture_output=True).returncode == 0:
                    final = os.path.join(CACHE, os.path.basename(deb))
                    os.replace(deb, final)
                    return final
            if attempt == 0:
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
    return None


def install_busybox(root: str) -> None:
    deb = busybox_deb() if shutil.which("apt-get") and shutil.which("dpkg-deb") else None
    if deb:
        subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
    else:
        if not os.path.exists("/bin/busybox"):
            pytest.fail("neither `apt-get download busybox-static` nor /bin/busybox worked")
        os.makedirs(os.path.join(root, "bin"), exist_ok=True)
        shutil.copy2("/bin/busybox", os.path.join(root, "bin/busybox"))
    assert os.access(os.path.join(root, "bin/busybox"), os.X_OK)


# -- the layers ---------------------------------------------------------------------------

def put(root: str, rel: str, data: str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def mkdir(root: str, rel: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
    path = os.path.join(root, rel)
    os.makedirs(path, exist_ok=True)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def build_base(d: str) -> None:
    os.makedirs(d)
    install_busybox(d)
    for rel in ("sbin", "usr/bin", "usr/sbin", "usr/local/bin", "etc", "dev", "proc", "home",
                "var/log", "srv"):
        mkdir(d, rel)
    mkdir(d, "root", 0o700)
    mkdir(d, "tmp", 0o1777)
    subprocess.run(["chroot", d, "/bin/busybox", "--install", "-s"], check=True,
                   env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert os.readlink(os.path.join(d, "bin/sh")) == "/bin/busybox"
    # root has an empty password: the setuid su below then needs none
    put(d, "etc/passwd", "root::0:0:root:/root:/bin/sh\n"
                         f"alice:x:{ALICE}:{ALICE}:Alice:/home/alice:/bin/sh\n"
                         f"bob:x:{BOB}:{BOB}:Bob:/home/bob:/bin/sh\n")
    put(d, "etc/group", f"root:x:0:\nalice:x:{ALICE}:\nbob:x:{BOB}:\nstaff:x:50:alice,bob\n")
    put(d, "etc/shells", "/bin/sh\n/bin/ash\n")
    put(d, "etc/hostname", "unionroot\n")
    put(d, "etc/issue", "base issue\n")
    put(d, "etc/motd", "base motd\n")
    put(d, "tmp/lower-alice", "alice's lower file\n", uid=ALICE, gid=ALICE)
    put(d, "tmp/lower-bob", "bob's lower file\n", uid=BOB, gid=BOB)
    put(d, "srv/data/a.txt", "data a\n")
    put(d, "srv/data/sub/b.txt", "data sub b\n")
    put(d, "srv/old.txt", "old, to be deleted\n")
    put(d, "srv/shared.txt", "alice's shared file\n", uid=ALICE, gid=ALICE)
    put(d, "srv/linked.txt", "to be hard-linked\n")


def build_extra(d: str) -> None:
    os.makedirs(d)
    put(d, "opt/app/bin/tool", "#!/bin/sh\necho tool ran as $(id -u)\n", mode=0o755)
    put(d, "opt/app/conf", "setting=1\n")
    put(d, "opt/app/cache/c1", "cache 1\n")
    put(d, "opt/app/cache/deeper/c2", "cache 2\n")
    put(d, "srv/data/extra.txt", "extra layer's data file\n")
    put(d, "etc/motd", "extra motd\n")
    os.mknod(os.path.join(d, "etc/issue"), stat.S_IFCHR | 0o000, os.makedev(0, 0))  # whiteout
    for rel in ("opt", "srv", "srv/data", "etc"):
        os.chmod(os.path.join(d, rel), 0o755)


# -- the script run inside the root -------------------------------------------------------

SCRIPT = r"""
set -eu
mount -t proc proc /proc
LOG=/var/log/outcomes
: > $LOG
log() { echo "$*" >> $LOG; }
as() { su -s /bin/sh -c "$2" "$1"; }
try() { n=$1; shift; if "$@" >/dev/null 2>&1; then log "$n allowed"; else log "$n refused"; fi; }

log "pid1 $(cat /proc/1/comm) self $$"
[ ! -e /etc/issue ] && log "issue whited out"
log "motd $(cat /etc/motd)"

# home directories
for u in alice:1000 bob:1001; do
    n=${u%%:*}; i=${u#*:}
    mkdir -p /home/$n; chown $i:$i /home/$n; chmod 0750 /home/$n
done

# files written by different users
as alice 'echo "alice notes" > /home/alice/notes.txt; echo "alice tmp" > /tmp/alice.txt; chmod 0644 /tmp/alice.txt'
as bob 'echo "bob notes" > /home/bob/notes.txt; echo "bob tmp" > /tmp/bob.txt; mkdir /tmp/bobdir'
log "whoami $(as alice whoami) $(as bob 'id -u'):$(as bob 'id -g')"
try bob-writes-alice-0644 as bob 'echo x >> /tmp/alice.txt'
try bob-truncates-alice-lower as bob ': > /tmp/lower-alice'
try bob-deletes-alice-tmp as bob 'rm -f /tmp/alice.txt'
try bob-renames-alice-tmp as bob 'mv /tmp/alice.txt /tmp/stolen.txt'
try bob-deletes-alice-lower-tmp as bob 'rm -f /tmp/lower-alice'
try bob-lists-alice-home as bob 'ls /home/alice'
try bob-reads-alice-notes as bob 'cat /home/alice/notes.txt'
try alice-writes-etc-passwd as alice 'echo evil >> /etc/passwd'
try alice-creates-in-etc as alice 'touch /etc/alice'
try alice-appends-own-lower as alice 'echo "appended by alice" >> /srv/shared.txt'
try bob-appends-alice-lower as bob 'echo "appended by bob" >> /srv/shared.txt'
try alice-deletes-own-lower-tmp as alice 'rm /tmp/lower-alice'
try bob-deletes-own-lower-tmp as bob 'rm /tmp/lower-bob'
try alice-deletes-bob-dir as alice 'rmdir /tmp/bobdir'
try root-appends-alice-file sh -c 'echo "root was here" >> /tmp/alice.txt'
log "alice.txt $(cat /tmp/alice.txt | tr '\n' '|')"
log "shared $(cat /srv/shared.txt | tr '\n' '|')"

# a device node and a fifo, used by a user
mknod /dev/mynull c 1 3
chmod 0666 /dev/mynull
try alice-writes-dev as alice 'echo hello > /dev/mynull'
log "dev read $(as alice 'head -c 16 /dev/mynull | wc -c')"
mkfifo -m 0620 /tmp/pipe
chown alice:bob /tmp/pipe
log "fifo $(as alice '(echo ping > /tmp/pipe) & read l < /tmp/pipe; wait; echo $l')"

# lower-layer tree changes
mv /srv/data /srv/renamed
log "renamed $(cd /srv/renamed && find . | sort | tr '\n' ' ')"
[ ! -e /srv/data ] && log "old name gone"
mkdir /srv/data && echo new > /srv/data/new.txt
rm /srv/old.txt
rm -r /opt/app/cache
rm /srv/renamed/sub/b.txt
ln /srv/linked.txt /srv/hardlink.txt
echo "through the link" >> /srv/hardlink.txt
log "linked $(cat /srv/linked.txt | tr '\n' '|') nlink $(stat -c %h /srv/linked.txt)"
chmod 4755 /opt/app/bin/tool
chown alice:staff /opt/app/conf
ln -s ../opt/app/bin/tool /srv/tool-link
log "tool $(as bob /srv/tool-link)"

# a setuid file: a copy of busybox as su works for a user only if suid is honoured
cp /bin/busybox /usr/local/bin/su
chmod 4755 /usr/local/bin/su
log "suid su -> $(as alice '/usr/local/bin/su -s /bin/sh -c "id -u" root' 2>&1)"
log "plain su -> $(as alice '/bin/su -s /bin/sh -c "id -u" root 2>&1 || true')"

umount /proc
log "proc empty $(ls -A /proc | wc -l)"
echo done
"""


def run_script(mnt: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", f"--root={mnt}", "--wd=/", "/bin/sh", "-c", SCRIPT],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C"})


def read_outcomes(mnt: str) -> list[str]:
    with open(os.path.join(mnt, "var/log/outcomes")) as f:
        return f.read().splitlines()


EXPECTED = {
    "bob-writes-alice-0644": "refused",
    "bob-truncates-alice-lower": "refused",
    "bob-deletes-alice-tmp": "refused",
    "bob-renames-alice-tmp": "refused",
    "bob-deletes-alice-lower-tmp": "refused",
    "bob-lists-alice-home": "refused",
    "bob-reads-alice-notes": "refused",
    "alice-writes-etc-passwd": "refused",
    "alice-creates-in-etc": "refused",
    "alice-appends-own-lower": "allowed",
    "bob-appends-alice-lower": "refused",
    "alice-deletes-own-lower-tmp": "allowed",
    "bob-deletes-own-lower-tmp": "allowed",
    "alice-deletes-bob-dir": "refused",
    "root-appends-alice-file": "allowed",
    "alice-writes-dev": "allowed",
}


def test_busybox_rootfs_unionfs_matches_overlayfs(tmp_path):
    src = tmp_path / "src"
    build_base(str(src / "base"))
    build_extra(str(src / "extra"))
    sides = {}
    for side in ("uf", "k"):
        d = tmp_path / side
        d.mkdir()
        for layer in ("base", "extra"):
            subprocess.run(["cp", "-a", str(src / layer), str(d / layer)], check=True)
        for sub in ("upper", "work", "mnt"):
            (d / sub).mkdir()
        sides[side] = d
    lowers = {s: [str(d / "extra"), str(d / "base")] for s, d in sides.items()}
    uf, k = sides["uf"], sides["k"]

    results = {}
    with kernel_overlay(lowers["k"], str(k / "upper"), str(k / "work"), str(k / "mnt")):
        with unionfs_mount(lowers["uf"], str(uf / "upper"), str(uf / "mnt"), workdir=str(uf / "work"),
                           options=("allow_other", "dev", "suid")):
            for side, d in (("k", k), ("uf", uf)):
                mnt = str(d / "mnt")
                r = run_script(mnt)
                assert r.returncode == 0 and r.stdout.strip().endswith("done"), \
                    f"{side}: script failed ({r.returncode})\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
                results[side] = (r.stdout, read_outcomes(mnt), view(mnt))
                assert os.listdir(os.path.join(mnt, "proc")) == [], f"{side}: /proc left mounted"
            assert not is_mounted(str(uf / "mnt" / "proc")) and not is_mounted(str(k / "mnt" / "proc"))
    assert not is_mounted(str(uf / "mnt")) and not is_mounted(str(k / "mnt"))

    k_out, k_log, k_view = results["k"]
    uf_out, uf_log, uf_view = results["uf"]
    print("\n".join(k_log))
    # overlayfs itself behaved as a root filesystem should
    outcomes = dict(line.rsplit(" ", 1) for line in k_log if line.endswith(("allowed", "refused")))
    assert outcomes == EXPECTED, k_log
    assert "suid su -> 0" in k_log and "issue whited out" in k_log and "pid1 sh self 1" in k_log, k_log
    assert "fifo ping" in k_log and "dev read 0" in k_log, k_log
    # ... and unionfs behaved the same
    assert uf_log == k_log
    assert uf_out == k_out
    assert_same_views(uf_view, k_view)
    assert "srv/renamed/extra.txt" in uf_view and "srv/old.txt" not in uf_view
    assert uf_view["dev/mynull"][7] == os.makedev(1, 3)
