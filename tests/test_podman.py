"""unionfs as podman's overlay mount program: the image-layer steps of the Docker tutorials,
through Debian's podman (with its own storage: tests/helpers/engines.py), runc and a docker-registry
on loopback.

Where podman's own output is compared (podman diff), the oracle is the same steps on
podman's native driver, kernel overlayfs. The container's root is checked to be a unionfs
mount, so a silent fallback to another driver cannot pass.
"""
from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from helpers.engines import (RUN_FLAGS, Podman, Registry, missing_tools, mounts_under, podman, registry,
                     unionfs_daemons_under)
from helpers.mounting import wait_daemon_gone

pytestmark = [pytest.mark.mount, pytest.mark.kernel, pytest.mark.rootfs, pytest.mark.slow]

BASE = "localhost/base:1"
CHANGES = r"""
set -eu
echo new > /data/new
echo more >> /data/keep
rm /data/gone
mv /olddir /newdir
ln /data/orig /data/orig.link
"""


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    if missing := missing_tools():
        pytest.fail(f"not installed: {' '.join(missing)} (run scripts/setup)")


def busybox_rootfs(tmp: Path) -> Path:
    """A tarball of a tiny root: busybox and its applets, a few files the steps change."""
    root = tmp / "rootfs"
    for d in ("bin", "etc", "tmp", "data", "olddir/b"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for a in applets:
        if a != "busybox":
            (root / "bin" / a).symlink_to("busybox")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    for name, text in (("keep", "keep\n"), ("gone", "gone\n"), ("orig", "orig\n"), ("gone2", "2\n")):
        (root / "data" / name).write_text(text)
    (root / "olddir/a").write_text("a\n")
    (root / "olddir/b/c").write_text("c\n")
    tar = tmp / "rootfs.tar"
    subprocess.run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(tar), "."], check=True)
    return tar


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Iterator[Path]:
    top = tmp_path_factory.mktemp("podman")
    yield top
    left = mounts_under(top)
    shutil.rmtree(top, ignore_errors=True)
    assert not left, f"mounts left behind: {left}"


@pytest.fixture(autouse=True)
def _nothing_served_after(work: Path) -> Iterator[None]:
    """Every container podman ran is unmounted by podman, and its daemon exits (it may
    still be finishing when podman returns: umount(2) does not wait for it)."""
    yield
    for pid in unionfs_daemons_under(work):
        wait_daemon_gone(pid)
    assert [m for m in mounts_under(work) if m.endswith("/merged")] == []


@pytest.fixture(scope="module")
def reg(work: Path) -> Iterator[Registry]:
    with registry(work / "registry") as r:
        yield r


@pytest.fixture(scope="module")
def engine(work: Path, reg: Registry) -> Iterator[Podman]:
    """podman with unionfs, the busybox root imported as localhost/base:1."""
    with podman(work / "unionfs", "unionfs", reg.address) as p:
        p("import", str(busybox_rootfs(work)), BASE)
        yield p


def root_fstype(p: Podman, image: str) -> str:
    line = p.run(image, "grep -m1 ' / / ' /proc/self/mountinfo || head -1 /proc/self/mountinfo")
    return line.split(" - ")[1].split()[0]


def changes_committed(p: Podman) -> tuple[list[str], list[str], str]:
    """Run CHANGES in a container, commit it, run the committed image: (`podman diff`
    sorted, `podman image history`, what the committed image shows)."""
    assert root_fstype(p, BASE) == p.fstype
    cid = p.out("run", *RUN_FLAGS, "-d", BASE, "sh", "-c", CHANGES).strip()
    assert p.out("wait", cid).strip() == "0", p.out("logs", cid)
    diff = sorted(p.out("diff", cid).split("\n")[:-1])
    p("commit", "-q", cid, "localhost/changed:1")
    p("rm", cid)
    history = p.out("image", "history", "--format", "{{.ID}}", "localhost/changed:1").split()
    shown = p.run("localhost/changed:1", "cat /data/new /data/keep /data/orig.link; ls /data; "
                  "ls /newdir; ls /newdir/b; test ! -e /olddir && test ! -e /data/gone && echo gone; "
                  "stat -c %h /data/orig")
    return diff, history, shown


def _listing_diff(want: list[str], got: list[str]) -> str:
    return "\n".join(difflib.unified_diff(want, got, "oracle", "unionfs", lineterm=""))


def test_run_diff_commit_history(engine: Podman, work: Path) -> None:
    diff, history, shown = changes_committed(engine)
    # the oracles: the same steps on podman's native kernel overlay driver, and with
    # fuse-overlayfs as the mount program
    oracles = {}
    for name, program in (("kernel", None), ("fuse-overlayfs", "fuse-overlayfs")):
        with podman(work / name, program) as other:
            other("import", str(work / "rootfs.tar"), BASE)
            oracles[name] = changes_committed(other)
    kdiff, khistory, kshown = oracles["kernel"]
    for line in ("A /data/new", "C /data/keep", "D /data/gone", "D /olddir", "A /newdir",
                 "A /newdir/b/c", "A /data/orig.link", "C /data/orig"):
        assert line in kdiff, kdiff  # the oracle shows what the steps did
    # With a mount program podman diffs the mounted trees by mode, owner, size and mtime
    # (its "naive diff"), not by the upper directory: a new hard link leaves its target's
    # fields alone, so the target is neither listed nor committed (the committed layer holds
    # the link as a file of its own), with fuse-overlayfs too.
    assert diff == oracles["fuse-overlayfs"][0], _listing_diff(oracles["fuse-overlayfs"][0], diff)
    assert diff == [d for d in kdiff if d != "C /data/orig"], _listing_diff(kdiff, diff)
    assert len(history) == len(khistory) == 2, (history, khistory)  # imported + committed
    assert shown == oracles["fuse-overlayfs"][2]
    assert shown.split() == ["new", "keep", "more", "orig", "gone2", "keep", "new", "orig",
                             "orig.link", "a", "b", "c", "gone", "1"], shown
    assert kshown.split()[-1] == "2" and kshown.split()[:-1] == shown.split()[:-1], kshown


CONTAINERFILE = """\
FROM localhost/base:1
RUN mkdir /app && echo one > /app/one && rm /data/gone2 && mv /data/keep /app/kept
COPY note.txt /app/note.txt
RUN cat /app/note.txt /app/one > /app/both && ln /app/both /app/both.link
"""
BUILT_SHOWS = "note\none\nkeep\n2\nyes\n"
BUILT_CHECK = ("cat /app/both /app/kept; stat -c %h /app/both; "
               "test ! -e /data/gone2 && test ! -e /data/keep && echo yes")


def build(p: Podman, ctx: Path, tag: str) -> str:
    return p.out("build", *RUN_FLAGS, "-t", tag, str(ctx), timeout=900)


def test_build_cache_push_pull(engine: Podman, reg: Registry, work: Path) -> None:
    p = engine
    ctx = work / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(CONTAINERFILE)
    (ctx / "note.txt").write_text("note\n")
    first = build(p, ctx, "localhost/app:1")
    assert "Using cache" not in first, first
    again = build(p, ctx, "localhost/app:1")
    assert again.count("Using cache") == 3, again  # RUN, COPY, RUN: every step from the cache
    image_id = p.out("image", "inspect", "--format", "{{.Id}}", "localhost/app:1").strip()
    assert image_id.startswith(again.strip().splitlines()[-1][:12]), again
    history = p.out("image", "history", "--format", "{{.CreatedBy}}", "localhost/app:1")
    assert [line for line in history.splitlines() if "RUN" in line or "COPY" in line or "mkdir" in line
            or "ln /app" in line][:3] and len(history.splitlines()) == 4, history
    assert p.run("localhost/app:1", BUILT_CHECK) == BUILT_SHOWS

    # push it, then a second image on the same base: the base layer is not sent again
    remote = f"{reg.address}/app:1"
    p("push", "--tls-verify=false", "localhost/app:1", remote)
    pushed_once = reg.uploads()
    (ctx / "Containerfile").write_text("FROM localhost/base:1\nRUN echo other > /other\n")
    build(p, ctx, "localhost/other:1")
    p("push", "--tls-verify=false", "localhost/other:1", f"{reg.address}/other:1")
    uploads = reg.uploads()
    assert len(uploads) == len(set(uploads)), uploads  # no blob received twice
    assert len(uploads) == len(pushed_once) + 2, (pushed_once, uploads)  # its layer and config
    blobs = reg.blobs()  # it holds each once, and the two manifests
    assert blobs >= set(uploads) and len(blobs) == len(uploads) + 2, (blobs, uploads)

    # a fresh storage pulls it and runs it
    with podman(work / "fresh", "unionfs", reg.address) as q:
        q("pull", "--tls-verify=false", remote)
        assert root_fstype(q, remote) == "fuse.unionfs"
        assert q.run(remote, BUILT_CHECK) == BUILT_SHOWS


def test_debian_image_apt_get_install(engine: Podman, work: Path) -> None:
    """The suite's debootstrap root as an image: apt-get installs from a local file: repo
    (many small files, hard links, renames, dpkg's database) and dpkg -l lists them."""
    from helpers.debian_root import debian_layers
    from test_rootfs_debian import write_packages_index
    cache = debian_layers()
    repo = work / "repo"
    shutil.copytree(os.path.join(cache, "debs"), repo)
    write_packages_index(str(repo))
    repo.chmod(0o755)
    p = engine
    p("import", os.path.join(cache, "base.tar"), "localhost/debian:1", timeout=900)
    out = p.run("localhost/debian:1", APT_SCRIPT, "-v", f"{repo}:/mnt:ro")
    listed = {line.split()[1].split(":")[0]: line.split()[0] for line in out.splitlines() if line[:2] in ("ii", "un")}
    assert {name: listed.get(name) for name in ("sudo", "bc", "netbase", "libreadline8")} == \
        {"sudo": "ii", "bc": "ii", "netbase": "ii", "libreadline8": "ii"}, out
    assert "bc: 18446744073709551616" in out, out


APT_SCRIPT = r"""
set -eu
q() { if ! "$@" > /tmp/q.log 2>&1; then cat /tmp/q.log; echo "FAILED: $*"; exit 1; fi; }
rm -f /etc/apt/sources.list /etc/apt/sources.list.d/*
echo 'deb [trusted=yes] file:/mnt ./' > /etc/apt/sources.list.d/local.list
q apt-get update
q apt-get install -y --no-install-recommends sudo bc netbase
echo "bc: $(echo '2^64' | bc)"
dpkg -l sudo bc netbase libreadline8
"""
