"""Rootless podman with unionfs as its overlay mount program: an unprivileged user the test
makes (with /etc/subuid and /etc/subgid ranges, XDG_RUNTIME_DIR, /dev/fuse as Debian ships
it) runs, diffs, commits, builds from cache, pushes to and pulls from a docker-registry on
loopback, and runs the pulled image, as tests/test_podman.py does as root.

Podman runs the mount program as the root of the user's namespace, so the daemon mounts
directly and keeps its uppers in the userxattr format; each container's root is checked to
be a unionfs mount, so a silent fallback to another driver cannot pass.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterator

import pytest

from helpers.engines import RUN_FLAGS, Registry, RootlessPodman, missing_tools, registry
from helpers.rootless import User, unprivileged_user
from test_podman import (BASE, BUILT_CHECK, BUILT_SHOWS, CONTAINERFILE, build, busybox_rootfs,
                         changes_committed, root_fstype)

pytestmark = [pytest.mark.mount, pytest.mark.rootfs, pytest.mark.slow]


@pytest.fixture(scope="module")
def user() -> Iterator[User]:
    if missing := missing_tools():
        pytest.fail(f"not installed: {' '.join(missing)} (run scripts/setup)")
    st = os.stat("/dev/fuse")
    saved = stat.S_IMODE(st.st_mode)
    if saved != 0o666:  # as on a stock Debian system; put back afterwards
        os.chmod("/dev/fuse", 0o666)
    try:
        with unprivileged_user("p", subids=True) as u:
            yield u
    finally:
        if saved != 0o666:
            os.chmod("/dev/fuse", saved)


@pytest.fixture(scope="module")
def reg(user: User) -> Iterator[Registry]:
    with registry(Path(user.path("registry"))) as r:
        yield r


@pytest.fixture(scope="module")
def engine(user: User, reg: Registry) -> Iterator[RootlessPodman]:
    top = Path(user.path("unionfs"))
    tar = busybox_rootfs(Path(user.path()))
    os.chmod(tar, 0o644)
    p = RootlessPodman(user, top, "unionfs", reg.address)
    try:
        p("import", str(tar), BASE)
        yield p
    finally:
        p.close()


def test_rootless_run_diff_commit(engine: RootlessPodman, user: User) -> None:
    diff, history, shown = changes_committed(engine)
    # the oracle: the same steps on rootless podman's native driver (kernel overlayfs in the
    # user's namespace)
    oracle = RootlessPodman(user, Path(user.path("kernel")), None)
    try:
        oracle("import", str(Path(user.path()) / "rootfs.tar"), BASE)
        kdiff, khistory, kshown = changes_committed(oracle)
    finally:
        oracle.close()
    for line in ("A /data/new", "C /data/keep", "D /data/gone", "D /olddir", "A /newdir",
                 "A /newdir/b/c", "A /data/orig.link"):
        assert line in kdiff, kdiff
    # as in test_podman: with a mount program podman diffs the trees, and a new hard link
    # leaves its target's fields alone
    assert diff == [d for d in kdiff if d != "C /data/orig"], (kdiff, diff)
    assert len(history) == len(khistory) == 2, (history, khistory)
    assert shown.split()[:-1] == kshown.split()[:-1], (shown, kshown)
    # what podman stored: the container layers are in the userxattr format, owned by the
    # user or its subordinate ids, with no trusted.* xattrs anywhere
    layers = Path(user.path("unionfs", "root", "overlay"))
    for path in layers.rglob("*"):
        if path.is_symlink():
            continue
        assert not [a for a in os.listxattr(path, follow_symlinks=False) if a.startswith("trusted.")], path


def test_rootless_build_cache_push_pull(engine: RootlessPodman, reg: Registry, user: User) -> None:
    p = engine
    ctx = Path(user.path("ctx"))
    user.run(["mkdir", str(ctx)], check=True)
    (ctx / "Containerfile").write_text(CONTAINERFILE)
    (ctx / "note.txt").write_text("note\n")
    first = build(p, ctx, "localhost/app:1")
    assert "Using cache" not in first, first
    again = build(p, ctx, "localhost/app:1")
    assert again.count("Using cache") == 3, again
    assert p.run("localhost/app:1", BUILT_CHECK) == BUILT_SHOWS
    remote = f"{reg.address}/app:1"
    p("push", "--tls-verify=false", "localhost/app:1", remote)
    assert reg.uploads(), reg.log_text()[-2000:]
    fresh = RootlessPodman(user, Path(user.path("fresh")), "unionfs", reg.address)
    try:
        fresh("pull", "--tls-verify=false", remote)
        assert root_fstype(fresh, remote) == "fuse.unionfs"
        assert fresh.run(remote, BUILT_CHECK) == BUILT_SHOWS
    finally:
        fresh.close()
