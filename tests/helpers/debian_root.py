"""A real Debian root split into two image layers, built once and cached.

`debian_layers()` returns a directory holding

  base.tar    `debootstrap --variant=minbase bookworm` (from the host's Debian
              mirror), tarred with numeric owners and all xattrs
  extra.tar   the upper directory of a kernel overlayfs mount over base in
              which `dpkg -i less_*.deb; rm -rf /var/lib/apt/lists/*` ran in a
              chroot: the next layer of an image in the shape docker's overlay2
              driver leaves it (kernel whiteouts, trusted.overlay.* xattrs,
              dpkg's database changes)
  debs/       .deb files fetched by the root's own apt at build time (so their
              versions match the root): sudo, bc and its dependencies, netbase,
              less; the tests install them from a local file: repo, offline
  MANIFEST    what was built from what

It lives in CACHE_ROOT (default /var/cache/unionfs-tests, or
$UNIONFS_TEST_CACHE), in a directory named by suite, variant and RECIPE, so
a changed recipe builds anew. A build happens in a temporary directory there
and is renamed into place only when complete, under a lock, so an
interrupted or concurrent run never sees or leaves half a cache. The first
build needs the network and takes about a minute; later runs only extract.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import shutil
import subprocess
import tempfile

SUITE = "bookworm"
VARIANT = "minbase"
RECIPE = "v1"          # bump when what is built changes
DEBS = ("sudo", "bc", "netbase", "less")
EXTRA_PACKAGE = "less"
CACHE_ROOT = os.environ.get("UNIONFS_TEST_CACHE", "/var/cache/unionfs-tests")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive",
       "HOME": "/root"}
# what tar needs to carry a layer whole: owners as numbers, every xattr (trusted.overlay.* too)
TAR_FLAGS = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls"]


class BuildError(RuntimeError):
    pass


def host_mirror() -> str:
    """The host's Debian mirror (its apt sources), so the root comes from where the host's packages do."""
    if os.environ.get("UNIONFS_TEST_MIRROR"):
        return os.environ["UNIONFS_TEST_MIRROR"]
    texts = []
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]:
        with contextlib.suppress(OSError), open(path) as f:
            texts.append(f.read())
    for text in texts:
        for url in re.findall(r"^\s*(?:deb\s+(?:\[[^]]*\]\s+)?|URIs:\s*)(\S+)", text, re.M):
            if url.startswith("http") and "security" not in url and url.rstrip("/").endswith("/debian"):
                return url
    return DEFAULT_MIRROR


def run(cmd: list[str], timeout: float = 900, **kw) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, **kw)
    if r.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def in_chroot(root: str, script: str, binds: dict[str, str] | None = None) -> str:
    """Run *script* with /bin/sh chrooted into *root*, /proc mounted, in new mount and pid namespaces."""
    setup = "set -e; mount -t proc proc \"$R/proc\"; "
    for i, inside in enumerate(binds or {}):
        setup += f'mount --bind "$B{i}" "$R{inside}"; '
    env = {**ENV, "R": root, **{f"B{i}": o for i, o in enumerate((binds or {}).values())}}
    r = subprocess.run(["unshare", "--mount", "--pid", "--fork", "/bin/sh", "-c",
                        setup + 'exec chroot "$R" /bin/sh -c "$0"', script],
                       capture_output=True, text=True, timeout=900, env=env)
    if r.returncode != 0:
        raise BuildError(f"in chroot {root}: {script!r} failed ({r.returncode}):\n{r.stdout[-3000:]}\n"
                         f"{r.stderr[-3000:]}")
    return r.stdout


def _build(dest: str) -> None:
    """Everything the cache holds, into the empty directory *dest*."""
    if not shutil.which("debootstrap"):
        raise BuildError("debootstrap is not installed (run scripts/setup)")
    root = os.path.join(dest, "root")
    mirror = host_mirror()
    run(["debootstrap", f"--variant={VARIANT}", SUITE, root, mirror])
    # the extra .debs, as the root's apt resolves them (versions that fit the root); the
    # clean first drops the .debs debootstrap left, as images do
    in_chroot(root, "apt-get clean && apt-get install -d -y -q --no-install-recommends " + " ".join(DEBS))
    debs = os.path.join(dest, "debs")
    os.mkdir(debs)
    for deb in glob.glob(os.path.join(root, "var/cache/apt/archives/*.deb")):
        shutil.move(deb, debs)
    in_chroot(root, "apt-get clean")
    run(["tar", *TAR_FLAGS, "-C", root, "-cf", os.path.join(dest, "base.tar"), "."])
    # the second layer: dpkg -i on a kernel overlay over base; its upper is the layer
    x = os.path.join(dest, "x")
    for d in ("upper", "work", "mnt"):
        os.makedirs(os.path.join(x, d))
    mnt = os.path.join(x, "mnt")
    run(["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={root},upperdir={x}/upper,workdir={x}/work", mnt])
    try:
        deb = os.path.basename(glob.glob(os.path.join(debs, f"{EXTRA_PACKAGE}_*.deb"))[0])
        # and, as image builds do in the same step, drop apt's lists (whiteouts in the layer)
        in_chroot(mnt, f"dpkg -i /mnt/{deb} && rm -rf /var/lib/apt/lists/*", binds={"/mnt": debs})
    finally:
        run(["umount", mnt])
    run(["tar", *TAR_FLAGS, "-C", os.path.join(x, "upper"), "-cf", os.path.join(dest, "extra.tar"), "."])
    versions = run(["chroot", root, "dpkg-query", "-W"]).stdout
    with open(os.path.join(dest, "MANIFEST"), "w") as f:
        f.write(f"debootstrap --variant={VARIANT} {SUITE} {mirror}\n"
                f"extra: dpkg -i {deb}; rm -rf /var/lib/apt/lists/* on kernel overlayfs over base\n"
                f"debs: {' '.join(sorted(os.listdir(debs)))}\n\nbase packages:\n{versions}")
    shutil.rmtree(root)
    shutil.rmtree(x)


def debian_layers() -> str:
    """The cache directory (built first if missing); raises BuildError if it cannot be built."""
    final = os.path.join(CACHE_ROOT, f"debian-{SUITE}-{VARIANT}-{RECIPE}")
    if os.path.exists(os.path.join(final, "MANIFEST")):
        return final
    os.makedirs(CACHE_ROOT, exist_ok=True)
    with open(os.path.join(CACHE_ROOT, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)            # a concurrent run builds it once
        if os.path.exists(os.path.join(final, "MANIFEST")):
            return final
        tmp = tempfile.mkdtemp(prefix=".build-", dir=CACHE_ROOT)
        try:
            os.chmod(tmp, 0o755)
            _build(tmp)
            os.rename(tmp, final)                   # complete or not there at all
        finally:
            if os.path.exists(tmp):
                force_rmtree(tmp)
    return final


def force_rmtree(path: str) -> None:
    """Remove a half build, unmounting anything a failed step left mounted in it first."""
    with open("/proc/self/mountinfo") as f:
        mounted = [line.split()[4] for line in f if line.split()[4].startswith(path + "/")]
    for m in reversed(mounted):
        subprocess.run(["umount", "-l", m], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def extract(cache: str, into: str) -> tuple[str, str]:
    """(extra, base): the two layer directories, extracted from the cache under *into*."""
    layers = []
    for name in ("extra", "base"):
        d = os.path.join(into, name)
        os.makedirs(d)
        run(["tar", *TAR_FLAGS, "-C", d, "-xpf", os.path.join(cache, f"{name}.tar")])
        layers.append(d)
    return layers[0], layers[1]
