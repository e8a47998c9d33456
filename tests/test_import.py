"""`unionfs import`: layers and images (OCI layout as directory and tar, docker-archive)
become layer directories that kernel overlayfs and unionfs mount as the image's tree (umoci's
unpack of the same image is the oracle), and exporting an imported layer gives back its
diffID; hostile archives are refused, one line each, with nothing written anywhere."""
from __future__ import annotations

import gzip
import io
import os
import random
import shutil
import stat
import subprocess
import tarfile

import pytest

from helpers.mounting import kernel_view, unionfs_cmd, unionfs_mount
from helpers.oci_helpers import capture, differences, oci_layout, run, tar_diffid, tar_tree, umoci_unpack
from test_diff_property import Ops, build_lowers

pytestmark = [
    pytest.mark.mount,
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, whiteouts, devices)"),
]


def uf(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(unionfs_cmd(*args), capture_output=True, text=True, timeout=300, **kw)


def exported(target: str, out: str, *args: str) -> str:
    proc = uf("export", "-o", out, *args, target)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines())["diffid"]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """Three layers: a base tree (GNU tar), and two exports of seeded random changes, the
    second over the first; as an OCI layout (middle layer gzipped), a docker-archive and an
    oci-archive (both by skopeo)."""
    root = tmp_path_factory.mktemp("image")
    lowers = build_lowers(str(root / "layers"))
    os.makedirs(root / "view")
    base = str(root / "base.tar")
    with kernel_view(lowers, str(root / "view")) as v:
        tar_tree(v, base)
    tars, ids = [base], [tar_diffid(base)]
    below = list(lowers)
    rng = random.Random(7)
    for n in (1, 2):
        upper, mnt = str(root / f"upper{n}"), str(root / f"mnt{n}")
        os.makedirs(upper)
        os.makedirs(mnt)
        with unionfs_mount(below, upper, mnt):
            if n == 1:
                os.rename(f"{mnt}/deep", f"{mnt}/deep2")
                shutil.rmtree(f"{mnt}/b")
                os.makedirs(f"{mnt}/b")
                with open(f"{mnt}/b/new", "w") as f:
                    f.write("b made again\n")
            Ops(mnt, upper, rng).run(40)
        ids.append(exported(upper, str(root / f"l{n}.tar"), "--lower", ":".join(below)))
        if n == 1:
            ids_gz = exported(upper, str(root / "l1.tar.gz"), "--gzip", "--lower", ":".join(below))
            assert ids_gz == ids[-1]
            tars.append(str(root / "l1.tar.gz"))
        else:
            tars.append(str(root / f"l{n}.tar"))
        below = [upper] + below
    comps = [None, "gzip", None]
    layout = str(root / "oci")
    ref = oci_layout(layout, "t", list(zip(tars, comps, ids)),
                     history=["base tree", "RUN first changes", "RUN second changes"])
    want = capture(umoci_unpack(ref, str(root / "bundle")))
    run("skopeo", "copy", "--quiet", f"oci:{ref}", f"docker-archive:{root}/docker.tar:img:t")
    run("skopeo", "copy", "--quiet", f"oci:{ref}", f"oci-archive:{root}/oci.tar:t")
    return {"root": root, "layout": layout, "docker": f"{root}/docker.tar", "ocitar": f"{root}/oci.tar",
            "ids": ids, "want": want, "l2": str(root / "l2.tar")}


@pytest.mark.parametrize("kind", ["layout", "docker", "ocitar"])
def test_image_imports_as_its_tree(image, tmp_path, kind):
    dest = str(tmp_path / "img")
    proc = uf("import", image[kind], dest)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    lowerdir = lines[0]
    assert lowerdir == ":".join(os.path.join(dest, str(i)) for i in (2, 1, 0))
    assert [line.split("\t")[0] for line in lines[1:]] == lowerdir.split(":")
    assert [line.split("\t")[1] for line in lines[1:]] == list(reversed(image["ids"]))
    assert lines[1].endswith("RUN second changes") and lines[3].endswith("base tree")
    os.makedirs(tmp_path / "k")
    with kernel_view(lowerdir.split(":"), str(tmp_path / "k")) as k:
        diffs = differences(capture(k), image["want"])
    assert not diffs, "kernel overlayfs over the import differs from umoci:\n" + "\n".join(diffs[:30])
    os.makedirs(tmp_path / "u")
    with unionfs_mount(lowerdir.split(":"), None, str(tmp_path / "u")) as u:
        diffs = differences(capture(u), image["want"])
    assert not diffs, "unionfs over the import differs from umoci:\n" + "\n".join(diffs[:30])
    if kind == "layout":
        # each imported layer exported over the ones below gives back the layer's diffID
        for i in (1, 2):
            lower = ":".join(os.path.join(dest, str(j)) for j in range(i - 1, -1, -1))
            got = exported(os.path.join(dest, str(i)), str(tmp_path / f"re{i}.tar"), "--lower", lower)
            assert got == image["ids"][i]
        with open(image["l2"], "rb") as f, open(str(tmp_path / "re2.tar"), "rb") as g:
            assert f.read() == g.read()


def test_layer_import_with_digest(image, tmp_path):
    dest = str(tmp_path / "one")
    proc = uf("import", "--digest", image["ids"][2], image["l2"], dest)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == dest
    assert stat.S_ISDIR(os.lstat(dest).st_mode)


# -- hostile archives ---------------------------------------------------------------------

def _tar(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for e in entries:
            ti = tarfile.TarInfo(e["name"])
            ti.type = e.get("type", tarfile.REGTYPE)
            ti.linkname = e.get("link", "")
            ti.mode = e.get("mode", 0o644)
            ti.pax_headers = e.get("pax", {})
            data = e.get("data", b"")
            if ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                ti.devmajor, ti.devminor = 1, 3
            ti.size = len(data) if ti.type == tarfile.REGTYPE else 0
            t.addfile(ti, io.BytesIO(data) if ti.type == tarfile.REGTYPE else None)
    return buf.getvalue()


def F(name, data=b"x\n", **kw):
    return dict(name=name, data=data, **kw)


def L(name, link):
    return dict(name=name, type=tarfile.SYMTYPE, link=link)


def H(name, link):
    return dict(name=name, type=tarfile.LNKTYPE, link=link)


GOOD = _tar([dict(name="d", type=tarfile.DIRTYPE, mode=0o755), F("d/f", b"a" * 5000), F("g")])

HOSTILE = {
    "dotdot": (_tar([F("../evil")]), "'..'"),
    "dotdot-deep": (_tar([dict(name="d", type=tarfile.DIRTYPE), F("d/../../evil")]), "'..'"),
    "absolute": (_tar([F("/evil")]), "absolute"),
    "through-symlink": (_tar([L("s", "OUTSIDE"), F("s/evil")]), "symlink"),
    "through-symlink-dotdot": (_tar([L("s", ".."), F("s/evil")]), "symlink"),
    "symlink-replaces-dir": (_tar([dict(name="d", type=tarfile.DIRTYPE), L("d", "OUTSIDE"),
                                   F("d/evil")]), "symlink"),
    "through-file": (_tar([F("f"), F("f/evil")]), "not a directory"),
    "hardlink-dotdot": (_tar([H("h", "../../etc/passwd")]), "'..'"),
    "hardlink-absolute": (_tar([H("h", "/etc/passwd")]), "absolute"),
    "hardlink-not-in-archive": (_tar([H("h", "etc/passwd")]), "not a non-directory of this archive"),
    "private-xattr-redirect": (_tar([dict(name="d", type=tarfile.DIRTYPE,
                                          pax={"SCHILY.xattr.trusted.overlay.redirect": "/etc"})]),
                               "overlay format's own xattr"),
    "private-xattr-opaque": (_tar([F("f", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"})]),
                             "overlay format's own xattr"),
    "private-xattr-ours": (_tar([F("f", pax={"SCHILY.xattr.trusted.overlay.unionfs.ino": "1"})]),
                           "overlay format's own xattr"),
    "truncated-data": (GOOD[:1536], "truncated or corrupt"),
    "truncated-at-header": (GOOD[:512 * 3 + 512 * 10], "truncated or corrupt"),
    "no-end-marker": (None, "truncated or corrupt"),
    "garbage-header": (GOOD[:2048] + b"\x7f" * 512 + b"\0" * 1024, "truncated or corrupt"),
    "gzip-truncated": (gzip.compress(GOOD, mtime=0)[:-40], "truncated or corrupt"),
    "gzip-corrupt": (None, "truncated or corrupt"),
    "zstd-truncated": (None, "truncated or corrupt"),
    "empty": (b"", "truncated or corrupt"),
}


def _special(name: str, data: bytes | None) -> bytes:
    if data is not None:
        return data
    if name == "no-end-marker":
        with tarfile.open(fileobj=io.BytesIO(GOOD)) as t:
            last = t.getmembers()[-1]
        return GOOD[:last.offset_data + 512]     # every entry, no end-of-archive blocks
    if name == "gzip-corrupt":
        z = bytearray(gzip.compress(GOOD, mtime=0))
        z[len(z) // 2] ^= 0xFF
        return bytes(z)
    if name == "zstd-truncated":
        return subprocess.run(["zstd", "-c", "-q"], input=GOOD, capture_output=True, check=True).stdout[:-9]
    raise AssertionError(name)


def _listing(path: str) -> list[str]:
    out = []
    for dirpath, dirs, files in os.walk(path):
        out += [os.path.join(dirpath, n) for n in dirs + files]
    return sorted(out)


def _refused(tmp_path, archive: str, *args: str, expect: str, user: int | None = None) -> None:
    dest_parent = tmp_path / "dest"
    dest_parent.mkdir(exist_ok=True)
    if user is not None:
        os.chown(dest_parent, user, user)
    before = _listing(str(tmp_path))
    cmd = unionfs_cmd("import", *args, archive, str(dest_parent / "layer"))
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("unionfs: error: "), proc.stderr
    assert expect in lines[0], lines[0]
    assert proc.stdout == ""
    assert _listing(str(tmp_path)) == before, "the refused import left something behind"
    assert os.listdir(tmp_path / "outside") == []


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_archive_refused(tmp_path, name):
    data, expect = HOSTILE[name]
    os.makedirs(tmp_path / "outside")
    data = _retarget(name, str(tmp_path / "outside")) if b"OUTSIDE" in (data or b"") \
        else _special(name, data)
    path = str(tmp_path / "archive")
    with open(path, "wb") as f:
        f.write(data)
    _refused(tmp_path, path, expect=expect)


def _retarget(name: str, outside: str) -> bytes:
    """Rebuild an archive whose symlinks point at OUTSIDE with the test's real directory."""
    table = {
        "through-symlink": [L("s", outside), F("s/evil")],
        "symlink-replaces-dir": [dict(name="d", type=tarfile.DIRTYPE), L("d", outside), F("d/evil")],
    }
    return _tar(table[name])


@pytest.mark.parametrize("then_file", [False, True], ids=["link", "link-then-file"])
def test_hardlink_to_symlink_links_the_symlink_itself(tmp_path, then_file):
    """A tar hard link to a symlink (a union's hard-linked symlink exports as one) is a second
    name of the symlink, never of what it points to; a file entry at that name later replaces
    the name, it does not write through it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    entries = [L("s", str(outside / "x")), H("h", "s")] + ([F("h", b"evil")] if then_file else [])
    archive = str(tmp_path / "a.tar")
    with open(archive, "wb") as f:
        f.write(_tar(entries))
    dest = str(tmp_path / "layer")
    proc = subprocess.run(unionfs_cmd("import", archive, dest), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    s, h = os.lstat(os.path.join(dest, "s")), os.lstat(os.path.join(dest, "h"))
    assert stat.S_ISLNK(s.st_mode) and os.readlink(os.path.join(dest, "s")) == str(outside / "x")
    if then_file:
        assert stat.S_ISREG(h.st_mode) and h.st_ino != s.st_ino and s.st_nlink == 1
        with open(os.path.join(dest, "h"), "rb") as f:
            assert f.read() == b"evil"
    else:
        assert h.st_ino == s.st_ino and s.st_nlink == 2
    assert os.listdir(outside) == []


def test_digest_mismatch_refused(tmp_path):
    os.makedirs(tmp_path / "outside")
    path = str(tmp_path / "good.tar")
    with open(path, "wb") as f:
        f.write(GOOD)
    _refused(tmp_path, path, "--digest", "sha256:" + "0" * 64, expect="has digest sha256:")


@pytest.mark.parametrize("entry,expect", [
    (dict(name="null", type=tarfile.CHRTYPE), "only root may import device nodes"),
    (F(".wh.gone", b""), "only root may make overlay whiteouts"),
    (F("d/.wh..wh..opq", b""), "only root may make overlay whiteouts"),
], ids=["device", "whiteout", "opaque"])
def test_root_only_entries_refused_for_users(entry, expect):
    """As an unprivileged user, in a directory of its own (the test's tmp_path is root's only)."""
    import pathlib
    import tempfile
    top = pathlib.Path(tempfile.mkdtemp(prefix="unionfs-import-"))
    try:
        os.chmod(top, 0o755)
        os.makedirs(top / "outside")
        path = str(top / "layer.tar")
        with open(path, "wb") as f:
            f.write(_tar([F("ok"), entry]))
        os.chmod(path, 0o644)
        _refused(top, path, expect=expect, user=65534)
    finally:
        shutil.rmtree(top)


def test_image_with_a_bad_blob_refused(image, tmp_path):
    os.makedirs(tmp_path / "outside")
    layout = str(tmp_path / "oci")
    shutil.copytree(image["layout"], layout)
    blobs = os.path.join(layout, "blobs", "sha256")
    # the largest blob is a layer: change one byte of it, keep its name
    victim = max(os.listdir(blobs), key=lambda n: os.path.getsize(os.path.join(blobs, n)))
    with open(os.path.join(blobs, victim), "r+b") as f:
        f.seek(600)
        b = f.read(1)
        f.seek(600)
        f.write(bytes([b[0] ^ 1]))
    _refused(tmp_path, layout, expect="layer")


def test_padding_after_the_end_is_accepted(tmp_path):
    """Writers pad archives to their block size; a megabyte of zeros after the two end
    blocks is still a whole archive (the end is checked where tarfile stopped)."""
    path = str(tmp_path / "padded.tar")
    with open(path, "wb") as f:
        f.write(GOOD + b"\0" * (1 << 20))
    proc = uf("import", path, str(tmp_path / "layer"))
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "layer" / "d" / "f", "rb") as f:
        assert f.read() == b"a" * 5000
