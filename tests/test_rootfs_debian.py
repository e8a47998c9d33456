"""A real Debian root on a union, used the way package managers and admins use one.

The layers (tests/helpers/debian_root.py, cached in /var/cache/unionfs-tests; about a
minute to build the first time) are the real shape of an image: `base` is
`debootstrap --variant=minbase bookworm`, `extra` the upper of a kernel
overlayfs on which `dpkg -i less` ran (kernel whiteouts, trusted.overlay.*
xattrs). The same two lowers are mounted with unionfs (`-o rootfs`) and with
kernel overlayfs, each with a fresh upper; in both the same script runs in
new mount and pid namespaces chrooted into the mount, with /proc, /sys, /dev
and a tmpfs /run mounted inside the union:

  dpkg    -i of a local .deb built here (conffile, hard link, preinst
          dpkg-divert --rename of a base file, postinst making a setgid
          directory), a locally edited conffile kept by --force-confold over
          an upgrade split into --unpack and --configure, a reinstall of `less`
          (renames over files of the top lower), --purge of e2fsprogs (files
          of the bottom lower removed)
  apt     a local file: repo made of .debs the cache fetched (offline,
          deterministic): update, install sudo bc netbase (bc pulls in
          libreadline8 and readline-common), purge bc, autoremove
  users   useradd, chpasswd, su alice/bob -c, a 0750 home, sticky /tmp, a
          setgid directory, sudo (setuid root) allowed for one user only
  ldconfig, a perl script (hard links, renames, O_EXCL, nlink)

The script's output must be the same on both, the final views must be the
same (tests/rootfs_helpers.view: types, modes, owners, sizes, content hashes,
symlink targets, devices, hard-link groups), `unionfs diff` must list what
dpkg and apt changed, and kernel overlayfs mounted on unionfs's upper must
show unionfs's view.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import pytest

from helpers import debian_root
from helpers.mounting import is_mounted, kernel_overlay, unionfs_cmd, unionfs_mount
from helpers.rootfs_helpers import ROOTFS_MARKS, assert_same_views, hard_link_groups, view

pytestmark = [pytest.mark.mount, pytest.mark.slow, pytest.mark.kernel, pytest.mark.rootfs, *ROOTFS_MARKS]

ENV = debian_root.ENV


# -- the layers, once per module ----------------------------------------------------------

@pytest.fixture(scope="module")
def debian(tmp_path_factory) -> dict[str, str]:
    """extra and base lower layers, the cached .debs, and a local apt repo of them plus the probe."""
    try:
        cache = debian_root.debian_layers()
    except debian_root.BuildError as e:
        pytest.fail(f"cannot build the cached Debian root: {e}")
    d = tmp_path_factory.mktemp("debian")
    extra, base = debian_root.extract(cache, str(d))
    repo = d / "repo"
    repo.mkdir()
    for deb in os.listdir(os.path.join(cache, "debs")):
        shutil.copy(os.path.join(cache, "debs", deb), repo)
    for version in ("1.0", "2.0"):
        build_probe(str(d / "probe"), version, str(repo))
    write_packages_index(str(repo))
    yield {"extra": extra, "base": base, "repo": str(repo)}


# -- a package of our own -----------------------------------------------------------------

PREINST = """#!/bin/sh
set -e
if [ "$1" = install ]; then
    dpkg-divert --package unionfs-probe --add --rename --divert /usr/bin/tac.distrib /usr/bin/tac
fi
"""
POSTINST = """#!/bin/sh
set -e
if [ "$1" = configure ]; then
    mkdir -p /var/lib/unionfs-probe
    echo "configured from ${2:-nothing}" >> /var/lib/unionfs-probe/state
    chgrp staff /var/lib/unionfs-probe
    chmod 2775 /var/lib/unionfs-probe
fi
"""
POSTRM = """#!/bin/sh
set -e
if [ "$1" = remove ]; then
    dpkg-divert --package unionfs-probe --remove --rename --divert /usr/bin/tac.distrib /usr/bin/tac
fi
if [ "$1" = purge ]; then rm -rf /var/lib/unionfs-probe; fi
"""


def build_probe(work: str, version: str, out: str) -> str:
    """unionfs-probe_VERSION_all.deb: a conffile, a hard link, maintainer scripts, a diversion."""
    tree = os.path.join(work, version)
    files = {
        "DEBIAN/control": f"Package: unionfs-probe\nVersion: {version}\nArchitecture: all\n"
                          "Maintainer: unionfs tests <root@localhost>\nDepends: perl-base\n"
                          "Description: exercises dpkg on a union\n",
        "DEBIAN/conffiles": "/etc/unionfs-probe.conf\n",
        "DEBIAN/preinst": PREINST, "DEBIAN/postinst": POSTINST, "DEBIAN/postrm": POSTRM,
        "etc/unionfs-probe.conf": f"# shipped with {version}\nsetting = {version}\n",
        "usr/share/unionfs-probe/data": f"probe data {version}\n" * 2000,
        "usr/bin/tac": "#!/usr/bin/perl\n# diverted by unionfs-probe\nexec '/usr/bin/tac.distrib', @ARGV;\n",
        "usr/share/doc/unionfs-probe/copyright": "public domain\n",
    }
    for rel, text in files.items():
        p = os.path.join(tree, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(text)
        os.chmod(p, 0o755 if rel.startswith(("DEBIAN/p", "usr/bin")) else 0o644)
    os.link(os.path.join(tree, "usr/share/unionfs-probe/data"),
            os.path.join(tree, "usr/share/unionfs-probe/data.link"))
    deb = os.path.join(out, f"unionfs-probe_{version}_all.deb")
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", tree, deb], check=True,
                   capture_output=True, env={**ENV, "SOURCE_DATE_EPOCH": "1700000000"})
    return deb


def write_packages_index(repo: str) -> None:
    """A flat apt repository's Packages file: each .deb's control fields plus where and what it is."""
    stanzas = []
    for name in sorted(os.listdir(repo)):
        if not name.endswith(".deb"):
            continue
        path = os.path.join(repo, name)
        control = subprocess.run(["dpkg-deb", "-f", path], check=True, capture_output=True,
                                 text=True).stdout.rstrip("\n")
        with open(path, "rb") as f:
            data = f.read()
        stanzas.append(f"{control}\nFilename: ./{name}\nSize: {len(data)}\n"
                       f"SHA256: {hashlib.sha256(data).hexdigest()}\n")
    with open(os.path.join(repo, "Packages"), "w") as f:
        f.write("\n".join(stanzas))


# -- the script run inside the root -------------------------------------------------------

SCRIPT = r"""
set -eu
# noisy commands: output only if they fail (apt prints download rates, dpkg progress)
q() { if ! "$@" > /run/q.log 2>&1; then cat /run/q.log; echo "FAILED: $*"; exit 1; fi; }
try() { n=$1; shift; if "$@" >/dev/null 2>&1; then echo "$n allowed"; else echo "$n refused"; fi; }

echo "== dpkg"
q dpkg -i /mnt/unionfs-probe_1.0_all.deb
echo "state $(cat /var/lib/unionfs-probe/state)"
echo "local edit" >> /etc/unionfs-probe.conf
q dpkg --unpack /mnt/unionfs-probe_2.0_all.deb
echo "after unpack: $(dpkg-query -W -f '${Status} ${Version}' unionfs-probe)"
q dpkg --configure --force-confold unionfs-probe
echo "after configure: $(dpkg-query -W -f '${Status} ${Version}' unionfs-probe)"
echo "conf: $(tr '\n' '|' < /etc/unionfs-probe.conf) dist: $(tr '\n' '|' < /etc/unionfs-probe.conf.dpkg-dist)"
echo "state $(tr '\n' '|' < /var/lib/unionfs-probe/state) $(stat -c '%A %G' /var/lib/unionfs-probe)"
echo "data links $(stat -c %h /usr/share/unionfs-probe/data) $(stat -c %h /usr/share/unionfs-probe/data.link)"
echo "diversions: $(dpkg-divert --list 'unionfs-probe' | tr '\n' '|')"
echo "tac: $(printf 'a\nb\n' | tac | tr '\n' ' ') $(head -c 2 /usr/bin/tac.distrib | od -An -c | tr -d ' ')"
q dpkg -i /mnt/less_*.deb
echo "less $(dpkg-query -W -f '${Status} ${Version}' less) $(less --version | head -1)"
q dpkg --purge e2fsprogs
echo "e2fsprogs: $(dpkg-query -W -f '${Status}' e2fsprogs 2>&1 || true) mke2fs: $(ls /sbin/mke2fs 2>&1 || true)"
q dpkg --audit
echo "== apt"
rm /etc/apt/sources.list
echo 'deb [trusted=yes] file:/mnt ./' > /etc/apt/sources.list.d/local.list
q apt-get update
q apt-get install -y --no-install-recommends sudo bc netbase
echo "bc: $(echo '2^64' | bc) readline: $(dpkg-query -W -f '${Status}' libreadline8)"
q apt-get purge -y bc
q apt-get autoremove -y --purge
echo "after purge: bc $(dpkg-query -W -f '${Status}' bc 2>&1 || true); libreadline8 $(dpkg-query -W -f '${db:Status-Abbrev}' libreadline8 2>&1 || true)"
echo "services: $(grep -c . /etc/services) manual: $(apt-mark showmanual | grep -E '^(sudo|bc|netbase|libreadline8)$' | tr '\n' ' ')"
echo "== users"
q useradd -m -u 1000 -s /bin/bash -G staff alice
q useradd -m -u 1001 -s /bin/bash bob
printf 'alice:alice-secret\nbob:bob-secret\n' | chpasswd
chmod 0750 /home/alice
echo "passwd: $(passwd -S alice | cut -d' ' -f1-2) $(grep -c '^alice:\$' /etc/shadow)"
echo "ids: $(su alice -c 'id') / $(su bob -c 'id -un')"
su alice -c 'echo "alice was here" > ~/hello; echo tmp > /tmp/alice.tmp'
try bob-reads-alice-home su bob -c 'cat /home/alice/hello'
try bob-removes-alice-tmp su bob -c 'rm -f /tmp/alice.tmp'
try alice-removes-own-tmp su alice -c 'rm /tmp/alice.tmp'
try bob-writes-etc su bob -c 'echo x >> /etc/hostname'
mkdir /srv/team && chgrp staff /srv/team && chmod 2775 /srv/team
su alice -c 'umask 002; echo team > /srv/team/notes; mkdir /srv/team/sub'
echo "setgid: $(stat -c '%A %U:%G' /srv/team/notes) $(stat -c '%A %U:%G' /srv/team/sub)"
try bob-writes-team-dir su bob -c 'touch /srv/team/bob'
try alice-writes-probe-state su alice -c 'touch /var/lib/unionfs-probe/alice'
echo "127.0.1.1 $(hostname)" >> /etc/hosts   # else sudo warns that it cannot resolve it
echo 'alice ALL=(root) NOPASSWD: /usr/bin/id' > /etc/sudoers.d/alice
chmod 0440 /etc/sudoers.d/alice
echo "sudo alice: $(su alice -c 'sudo -n /usr/bin/id -u' 2>&1) suid: $(stat -c %A /usr/bin/sudo)"
try bob-sudo su bob -c 'sudo -n /usr/bin/id -u'
echo "== ldconfig"
cp -a /usr/lib/x86_64-linux-gnu/libz.so.1.* /usr/local/lib/
ldconfig
echo "libz link: $(readlink /usr/local/lib/libz.so.1) cache: $(ldconfig -p | grep -c 'libz.so.1 ')"
echo "== perl"
perl -e '
    use strict; use Fcntl;
    my $d = "/srv/perl"; mkdir $d or die "mkdir: $!";
    open(my $f, ">", "$d/a") or die; print $f "from perl\n" x 100; close $f;
    link("$d/a", "$d/b") or die "link: $!";
    rename("$d/a", "$d/c") or die "rename: $!";
    rename("/usr/share/unionfs-probe/data", "$d/moved") or die "rename lower: $!";
    sysopen(my $x, "$d/c", O_CREAT|O_EXCL|O_WRONLY) and die "O_EXCL ignored";
    my @s = stat("$d/b"); my @m = stat("$d/moved");
    opendir(my $dh, $d) or die; my @n = sort grep { !/^\./ } readdir($dh);
    print "perl: nlink $s[3] moved nlink $m[3] entries @n\n";
'
echo "done"
"""


def run_script(mnt: str, repo: str) -> subprocess.CompletedProcess[str]:
    """SCRIPT chrooted into *mnt* in new mount and pid namespaces, /proc /sys /dev /run mounted inside."""
    setup = ('set -e; mount -t proc proc "$R/proc"; mount -t sysfs sysfs "$R/sys"; '
             'mount --rbind /dev "$R/dev"; mount -t tmpfs tmpfs "$R/run"; '
             'mount --bind "$REPO" "$R/mnt"; mount -o remount,bind,ro "$R/mnt"; '
             'exec chroot "$R" /bin/sh -c "$0"')
    return subprocess.run(["unshare", "--mount", "--pid", "--fork", "/bin/sh", "-c", setup, SCRIPT],
                          capture_output=True, text=True, timeout=900,
                          env={**ENV, "R": mnt, "REPO": repo})


# What legitimately differs between two runs of the same steps (everything else must be equal):
IGNORE_CONTENT = (
    "var/log/*",                      # dpkg.log, apt/history.log, alternatives.log: timestamps
    "var/cache/ldconfig/aux-cache",   # keyed by the libraries' inode numbers and ctimes
    "var/cache/apt/*.bin",            # apt's binary caches record the index files' mtimes
)


def mask_shadow(data: bytes) -> bytes:
    """chpasswd salts every hash at random, and the last-change day moves at midnight."""
    out = []
    for line in data.split(b"\n"):
        f = line.split(b":")
        if len(f) > 2 and f[1].startswith(b"$"):
            f[1] = b"$HASH"
        if len(f) > 2:
            f[2] = b"DAY"
        out.append(b":".join(f))
    return b"\n".join(out)


NORMALISE = {"etc/shadow": mask_shadow, "etc/shadow-": mask_shadow}


def root_view(mnt: str) -> dict[str, tuple]:
    return view(mnt, link_groups=True, ignore_content=IGNORE_CONTENT, normalise=NORMALISE)


def diff_lines(mnt: str) -> list[str]:
    r = subprocess.run(unionfs_cmd("diff", mnt), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_debian_root_unionfs_matches_overlayfs(debian, tmp_path):
    lowers = [debian["extra"], debian["base"]]
    sides = {}
    for side in ("uf", "k"):
        for sub in ("upper", "work", "mnt"):
            (tmp_path / side / sub).mkdir(parents=True)
        sides[side] = tmp_path / side
    uf, k = sides["uf"], sides["k"]
    results = {}
    with kernel_overlay(lowers, str(k / "upper"), str(k / "work"), str(k / "mnt")):
        with unionfs_mount(lowers, str(uf / "upper"), str(uf / "mnt"), workdir=str(uf / "work"),
                           options=("rootfs",)):
            for side, d in (("k", k), ("uf", uf)):
                mnt = str(d / "mnt")
                r = run_script(mnt, debian["repo"])
                assert r.returncode == 0 and r.stdout.rstrip().endswith("done"), \
                    f"{side}: script failed ({r.returncode})\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
                for sub in ("proc", "sys", "dev", "run", "mnt"):
                    assert not is_mounted(os.path.join(mnt, sub)), f"{side}: {sub} left mounted"
                results[side] = (r.stdout, root_view(mnt))
            changes = diff_lines(str(uf / "mnt"))
    k_out, k_view = results["k"]
    uf_out, uf_view = results["uf"]
    print(k_out)
    # the steps did on overlayfs what they should
    for expected in ("after configure: install ok installed 2.0",
                     "conf: # shipped with 1.0|setting = 1.0|local edit| dist: # shipped with 2.0|setting = 2.0|",
                     "state configured from nothing|configured from 1.0| drwxrwsr-x staff",
                     "data links 2 2", "tac: b a  177E", "e2fsprogs: unknown ok not-installed mke2fs: ls: cannot access",
                     "bc: 18446744073709551616 readline: install ok installed", "manual: netbase sudo \n",
                     "libreadline8 dpkg-query: no packages found matching libreadline8", "bob-reads-alice-home refused", "bob-removes-alice-tmp refused",
                     "alice-removes-own-tmp allowed", "bob-writes-etc refused",
                     "setgid: -rw-rw-r-- alice:staff drwxrwsr-x alice:staff", "bob-writes-team-dir refused",
                     "alice-writes-probe-state allowed", "sudo alice: 0 suid: -rwsr-xr-x", "bob-sudo refused",
                     "libz link: libz.so.1.2.13", "perl: nlink 2 moved nlink 2 entries b c moved"):
        assert expected in k_out, f"overlayfs run lacks {expected!r}:\n{k_out}"
    # ... and unionfs did the same
    assert uf_out == k_out
    assert_same_views(uf_view, k_view)
    assert {"usr/bin/perl", "usr/bin/perl5.36.0"} in hard_link_groups(uf_view)
    assert {"srv/perl/b", "srv/perl/c"} in hard_link_groups(uf_view)

    # unionfs diff shows what dpkg, apt and the users changed, and nothing that stayed
    for line in ("A /usr/share/unionfs-probe", "A /usr/share/unionfs-probe/data.link",
                 "A /etc/unionfs-probe.conf", "A /etc/unionfs-probe.conf.dpkg-dist",
                 "A /var/lib/dpkg/info/unionfs-probe.list", "C /var/lib/dpkg/status",
                 "A /usr/bin/tac.distrib", "C /usr/bin/tac", "C /var/lib/dpkg/diversions",
                 "D /etc/mke2fs.conf", "D /usr/sbin/mke2fs", "D /var/lib/dpkg/info/e2fsprogs.list",
                 "D /etc/apt/sources.list", "A /etc/apt/sources.list.d/local.list",
                 "A /usr/bin/sudo", "A /etc/services", "C /etc/passwd", "C /etc/shadow", "C /etc/group",
                 "A /home/alice/hello", "A /srv/team/notes", "A /usr/local/lib/libz.so.1",
                 "C /etc/ld.so.cache", "A /srv/perl/moved", "C /etc/apt/sources.list.d"):
        assert line in changes, f"{line!r} missing from unionfs diff:\n" + "\n".join(changes)
    paths = {c.split(" ", 1)[1] for c in changes}
    for unchanged in ("/usr/bin/perl", "/usr/bin/dpkg", "/etc/hostname", "/usr/share/doc/less"):
        assert unchanged not in paths
    assert not any(p.startswith(("/usr/bin/bc", "/usr/share/doc/bc", "/proc/", "/sys/", "/dev/pts"))
                   for p in paths), [p for p in paths if "bc" in p or p.startswith(("/proc", "/sys"))]

    # the upper unionfs wrote reads the same through kernel overlayfs
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={uf / 'upper'}:{':'.join(lowers)},redirect_dir=follow", str(ro)], check=True)
    try:
        assert_same_views(root_view(str(ro)), uf_view, ("overlayfs on unionfs's upper", "unionfs"))
    finally:
        subprocess.run(["umount", str(ro)], check=True)


# -- the usual tools on the union -----------------------------------------------------------

GIT_ENV = {**ENV, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@localhost", "GIT_AUTHOR_DATE": "1700000000 +0000",
           "GIT_COMMITTER_DATE": "1700000000 +0000", "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent"}


def change_the_root(mnt: str) -> None:
    """Changes that give the view copy-ups, moved lower directories, whiteouts and new hard links."""
    os.chmod(os.path.join(mnt, "usr/bin/uncompress"), 0o700)           # one name of a lower pair
    os.link(os.path.join(mnt, "etc/debian_version"), os.path.join(mnt, "srv/debian_version.link"))
    os.setxattr(os.path.join(mnt, "etc/debian_version"), "user.note", b"set on the union")
    shutil.rmtree(os.path.join(mnt, "usr/share/doc/less"))              # a directory of the top lower
    os.rename(os.path.join(mnt, "usr/share/man"), os.path.join(mnt, "usr/share/man.moved"))
    with open(os.path.join(mnt, "etc/motd"), "a") as f:
        f.write("appended on the union\n")


def git(repo: str, *args: str) -> str:
    r = subprocess.run(["git", "-C", repo, "-c", "gc.auto=0", "-c", "pack.threads=1", *args],
                       capture_output=True, text=True, timeout=300, env=GIT_ENV)
    assert r.returncode == 0, f"git {' '.join(args)}: {r.stderr}"
    return r.stdout


def git_workflow(mnt: str) -> list[str]:
    """init, two commits of a copy of /etc, gc (loose objects packed and deleted), fsck."""
    repo = os.path.join(mnt, "srv/repo")
    git(mnt, "init", "-q", "-b", "main", repo)
    shutil.copytree(os.path.join(mnt, "etc"), os.path.join(repo, "etc"), symlinks=True)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "etc")
    with open(os.path.join(repo, "etc/motd"), "a") as f:
        f.write("second commit\n")
    os.remove(os.path.join(repo, "etc/hostname"))
    git(repo, "commit", "-q", "-a", "-m", "second")
    loose_before = git(repo, "count-objects", "-v").splitlines()[0]
    git(repo, "gc", "-q", "--prune=now")
    counts = {k: v for k, _, v in (line.partition(": ") for line in git(repo, "count-objects", "-v").splitlines())}
    return [git(repo, "rev-parse", "HEAD").strip(), loose_before, f"loose after gc {counts['count']}",
            f"packs {counts['packs']} in-pack {counts['in-pack']}", git(repo, "fsck", "--full", "--strict"),
            git(repo, "status", "--porcelain"), git(repo, "log", "--format=%H %s"),
            git(repo, "ls-tree", "-r", "HEAD")]


def tools_view(root: str, xattrs: bool = True) -> dict[str, tuple]:
    return view(root, link_groups=True, xattrs=xattrs)


def test_git_tar_cpio_rsync_on_a_debian_union(debian, tmp_path):
    lowers = [debian["extra"], debian["base"]]
    for side in ("uf", "k"):
        for sub in ("upper", "work", "mnt"):
            (tmp_path / side / sub).mkdir(parents=True)
    uf, k = str(tmp_path / "uf/mnt"), str(tmp_path / "k/mnt")
    with kernel_overlay(lowers, str(tmp_path / "k/upper"), str(tmp_path / "k/work"), k):
        with unionfs_mount(lowers, str(tmp_path / "uf/upper"), uf, workdir=str(tmp_path / "uf/work"),
                           options=("rootfs",)):
            change_the_root(uf)
            change_the_root(k)
            # git: the same history, packed the same, fsck clean, on both
            uf_git, k_git = git_workflow(uf), git_workflow(k)
            assert k_git[2:4] == ["loose after gc 0", "packs 1 in-pack " + k_git[3].split()[-1]], k_git
            assert uf_git == k_git
            the_view, k_view = tools_view(uf), tools_view(k)
            # git's index caches every file's stat data (times, inode and device numbers)
            index = "srv/repo/.git/index"
            assert the_view[index][:6] == k_view[index][:6]        # type, mode, owner, links, size
            assert_same_views({p: e for p, e in the_view.items() if p != index},
                              {p: e for p, e in k_view.items() if p != index})
            assert {"usr/bin/gunzip", "usr/bin/uncompress"} in hard_link_groups(the_view)
            assert {"etc/debian_version", "srv/debian_version.link"} in hard_link_groups(the_view)
            assert the_view["etc/debian_version"][8] == (("user.note", b"set on the union"),)

            # tar: everything, with xattrs, through a pipe
            dest = tmp_path / "tar"
            dest.mkdir()
            subprocess.run(f"tar --numeric-owner --xattrs --xattrs-include='*' -C {uf} -cf - . | "
                           f"tar --numeric-owner --xattrs --xattrs-include='*' -C {dest} -xpf -",
                           shell=True, check=True, env=ENV)
            assert_same_views(tools_view(str(dest)), the_view, ("tar copy", "unionfs"))
            shutil.rmtree(dest)

            # cpio (newc keeps hard links, not xattrs)
            dest.mkdir()
            subprocess.run(f"cd {uf} && find . -depth -print0 | cpio --null --quiet -o -H newc | "
                           f"(cd {dest} && cpio --quiet -idmu --no-absolute-filenames)",
                           shell=True, check=True, env=ENV)
            no_xattrs = {p: e[:8] + e[9:] for p, e in the_view.items()}
            assert_same_views(tools_view(str(dest), xattrs=False), no_xattrs, ("cpio copy", "unionfs"))
            shutil.rmtree(dest)

            # rsync -aHAX
            subprocess.run(["rsync", "-aHAX", "--numeric-ids", uf + "/", str(dest) + "/"], check=True, env=ENV)
            assert_same_views(tools_view(str(dest)), the_view, ("rsync copy", "unionfs"))
            shutil.rmtree(dest)
