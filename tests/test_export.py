"""`unionfs export`: the layer, applied by an independent applier (umoci) on top of the
lower view, gives exactly the union's view; over seeded random changes (renamed
directories, whiteouts, opaque directories, hard links, xattrs), live and unmounted.

  UNIONFS_EXPORT_SEEDS   number of seeds (default 4)
"""
from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
import tarfile

import pytest

from helpers.mounting import kernel_view, unionfs_cmd, unionfs_mount
from helpers.oci_helpers import (capture, differences, members, oci_layout, tar_diffid, tar_tree,
                         umoci_unpack)
from test_diff_property import Ops, build_lowers

pytestmark = [
    pytest.mark.mount,
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, chown, devices)"),
]

SEEDS = int(os.environ.get("UNIONFS_EXPORT_SEEDS", 4))
N_OPS = 60


def export(target: str, out: str, *args: str) -> tuple[str, str, str]:
    proc = subprocess.run(unionfs_cmd("export", "-o", out, *args, target), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    return lines["digest"], lines["diffid"], proc.stderr


def specials(mnt: str, rng: random.Random) -> None:
    """What random operations do not make: a renamed lower directory, an opaque one (a
    removed lower directory made again), a device, a capability, a hard link of a new file."""
    os.rename(f"{mnt}/deep", f"{mnt}/deep2")
    shutil.rmtree(f"{mnt}/b", ignore_errors=True)
    os.makedirs(f"{mnt}/b/again", exist_ok=True)
    with open(f"{mnt}/b/again/f", "wb") as f:
        f.write(b"made again\n")
    os.mknod(f"{mnt}/dev{rng.randrange(100)}", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    with open(f"{mnt}/cap", "wb") as f:
        f.write(b"#!/bin/true\n")
    subprocess.run(["setcap", "cap_net_raw+ep", f"{mnt}/cap"], check=True, capture_output=True)
    os.link(f"{mnt}/cap", f"{mnt}/cap-link")


@pytest.mark.parametrize("seed", range(SEEDS), ids=lambda s: f"seed-{s}")
def test_export_applied_by_umoci_is_the_view(tmp_path, seed):
    rng = random.Random(1000 + seed)
    lowers = build_lowers(str(tmp_path / "layers"))
    upper, mnt = str(tmp_path / "upper"), str(tmp_path / "mnt")
    os.makedirs(upper)
    os.makedirs(mnt)
    base_tar = str(tmp_path / "base.tar")
    os.makedirs(tmp_path / "lowerview")
    with kernel_view(lowers, str(tmp_path / "lowerview")) as view:
        tar_tree(view, base_tar)
    ops = Ops(mnt, upper, rng)
    live = seed % 2 == 0
    args = ["--gzip"] if seed % 4 == 1 else ["--zstd"] if seed % 4 == 3 else []
    out = str(tmp_path / "layer.tar")
    with unionfs_mount(lowers, upper, mnt):
        specials(mnt, rng)
        ops.run(N_OPS)
        want = capture(mnt)
        if live:
            digest, diffid, _ = export(mnt, out, *args)
            again = export(mnt, str(tmp_path / "again.tar"), *args)
    if not live:
        digest, diffid, _ = export(upper, out, *args)
        again = export(upper, str(tmp_path / "again.tar"), *args)
    assert again[:2] == (digest, diffid), "the same union must give the same bytes"
    with open(out, "rb") as f, open(str(tmp_path / "again.tar"), "rb") as g:
        assert f.read() == g.read()
    names = [m.name for m in members(out)]
    assert names == sorted(names, key=_entry_key), "entries are sorted"
    assert not any("trusted.overlay" in k for m in members(out) for k in m.pax_headers)
    comp = "gzip" if "--gzip" in args else None
    if "--zstd" in args:
        # Debian's umoci (0.4.7) knows no zstd layers: the zstd command unpacks the blob,
        # whose tar must be what the diffID names
        plain = str(tmp_path / "layer.plain.tar")
        with open(plain, "wb") as f:
            subprocess.run(["zstd", "-dc", out], stdout=f, check=True)
        assert tar_diffid(plain) == diffid
        out = plain
    ref = oci_layout(str(tmp_path / "oci"), "t", [(base_tar, None, tar_diffid(base_tar)),
                                                   (out, comp, diffid)])
    got = capture(umoci_unpack(ref, str(tmp_path / "bundle")))
    diffs = differences(got, want)
    assert not diffs, "umoci's result differs from the union:\n" + "\n".join(diffs[:40]) + \
        "\nops:\n" + "\n".join(ops.log)


def _entry_key(name: str) -> tuple:
    out = []
    for part in name.rstrip("/").split("/"):
        if part == ".wh..wh..opq":
            out.append((0, "", 0))
        elif part.startswith(".wh."):
            out.append((1, os.fsencode(part[4:]), 0))
        else:
            out.append((1, os.fsencode(part), 1))
    return tuple(out)


def test_export_format_details(tmp_path):
    """Whiteouts, the opaque marker where something is hidden, a renamed directory as a
    whiteout plus its whole tree, links, numeric owners, --mtime, the socket warning."""
    lowers = build_lowers(str(tmp_path / "layers"))
    upper, mnt = str(tmp_path / "upper"), str(tmp_path / "mnt")
    os.makedirs(upper)
    os.makedirs(mnt)
    out = str(tmp_path / "l.tar")
    import socket
    with unionfs_mount(lowers, upper, mnt):
        os.unlink(f"{mnt}/x")
        os.rename(f"{mnt}/a", f"{mnt}/a2")
        shutil.rmtree(f"{mnt}/deep")
        os.makedirs(f"{mnt}/deep")
        os.makedirs(f"{mnt}/fresh")               # new and empty: no opaque marker needed
        with open(f"{mnt}/y", "ab") as f:          # copy-up of one name of a linked pair
            f.write(b"!")
        os.chown(f"{mnt}/y", 1234, 5678)
        s = socket.socket(socket.AF_UNIX)
        s.bind(f"{mnt}/sock")
        s.close()
        digest, diffid, err = export(mnt, out, "--mtime", "1000")
    assert digest == diffid and digest.startswith("sha256:")
    assert "skipping socket '/sock'" in err
    by = {m.name.rstrip("/"): m for m in members(out)}
    assert ".wh.x" in by and ".wh.a" in by
    assert "deep/.wh..wh..opq" in by
    assert "fresh/.wh..wh..opq" not in by
    assert {"a2", "a2/f1", "a2/sub", "a2/sub/g", "a2/hl"} <= set(by)
    assert "sock" not in by
    assert (by["y"].uid, by["y"].gid, by["y"].uname) == (1234, 5678, "")
    assert all(m.mtime <= 1000 for m in by.values())
    with tarfile.open(out) as t:
        assert t.extractfile("y").read() == b"y" * 100 + b"!"


def test_export_refuses_a_name_a_layer_cannot_hold(tmp_path):
    """A '.wh.' name would read as a whiteout: one line, exit 1, no file left."""
    lowers = build_lowers(str(tmp_path / "layers"))
    upper, mnt = str(tmp_path / "upper"), str(tmp_path / "mnt")
    os.makedirs(upper)
    os.makedirs(mnt)
    out = tmp_path / "out"
    out.mkdir()
    with unionfs_mount(lowers, upper, mnt):
        with open(f"{mnt}/.wh.trick", "w") as f:
            f.write("not a whiteout\n")
        proc = subprocess.run(unionfs_cmd("export", "-o", str(out / "l.tar"), mnt),
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("unionfs: error: '/.wh.trick'") and proc.stderr.count("\n") == 1
    assert os.listdir(out) == []
