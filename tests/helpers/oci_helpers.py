"""Helpers for the layer tests: OCI image layouts built and unpacked by umoci (Debian's),
an independent applier of layers, and a comparable capture of a directory tree."""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import tarfile

from helpers.snapshot import snapshot


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}): {proc.stderr!r}"
    return proc


def tar_tree(src: str, out: str) -> None:
    """A layer tar of a whole directory tree (numeric owners, user.* xattrs), by GNU tar."""
    run("tar", "--numeric-owner", "--xattrs", "--xattrs-include=user.*", "-C", src, "-cf", out, ".")


MEDIA = {None: "application/vnd.oci.image.layer.v1.tar",
         "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
         "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


def _blob(layout: str, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return "sha256:" + digest


def oci_layout(layout: str, tag: str, layers: list[tuple[str, str | None, str]],
               history: list[str] | None = None) -> str:
    """An OCI image layout written here (not by the tool under test) with these layers,
    bottom first: (blob file, compression, diffID). umoci checks every blob's digest
    against its name and size. Returns LAYOUT:TAG."""
    import json
    descs = []
    for path, comp, _ in layers:
        with open(path, "rb") as f:
            data = f.read()
        descs.append({"mediaType": MEDIA[comp], "digest": _blob(layout, data), "size": len(data)})
    config = {"architecture": "amd64", "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": [d for _, _, d in layers]},
              "history": [{"created_by": h} for h in (history or ["layer"] * len(layers))]}
    cdata = json.dumps(config).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": _blob(layout, cdata), "size": len(cdata)},
                "layers": descs}
    mdata = json.dumps(manifest).encode()
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": _blob(layout, mdata),
         "size": len(mdata), "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    return f"{layout}:{tag}"


def tar_diffid(path: str) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.sha256(f.read()).hexdigest()


def umoci_unpack(ref: str, bundle: str) -> str:
    run("umoci", "unpack", "--image", ref, bundle)
    return os.path.join(bundle, "rootfs")


def capture(root: str, times: bool = True) -> dict[str, dict]:
    """path -> what a layer carries (type, mode, owner, content, non-dir mtime seconds, user
    xattrs, device number), plus the hard-link groups under the key "" (sets of names)."""
    groups: dict[tuple[int, int], list[str]] = {}

    def describe(full: str, st: os.stat_result) -> dict:
        d: dict = {"fmt": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode),
                   "owner": (st.st_uid, st.st_gid)}
        if not stat.S_ISDIR(st.st_mode) and times:
            d["mtime"] = st.st_mtime_ns // 1_000_000_000
        if stat.S_ISREG(st.st_mode):
            with open(full, "rb") as f:
                d["content"] = hashlib.sha256(f.read()).hexdigest()
            if st.st_nlink > 1:
                groups.setdefault((st.st_dev, st.st_ino), []).append("/" + os.path.relpath(full, root))
        elif stat.S_ISLNK(st.st_mode):
            d["content"] = os.readlink(full)
            d.pop("mode")
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            d["rdev"] = st.st_rdev
        if not stat.S_ISLNK(st.st_mode):
            d["xattrs"] = {n: os.getxattr(full, n, follow_symlinks=False)
                           for n in sorted(os.listxattr(full, follow_symlinks=False))
                           if n.startswith("user.") or n == "security.capability"}
        return d

    out = {"/" + rel: d for rel, d in snapshot(root, describe).items()}
    out[""] = {"links": sorted(sorted(g) for g in groups.values() if len(g) > 1)}
    return out


def differences(got: dict, want: dict) -> list[str]:
    return [f"{p}: got {got.get(p)} want {want.get(p)}" for p in sorted(set(got) | set(want))
            if got.get(p) != want.get(p)]


def members(tar_path: str) -> list[tarfile.TarInfo]:
    """The entries of a layer (tar, tar.gz, or tar.zst through the zstd command)."""
    import io
    with open(tar_path, "rb") as f:
        head = f.read(4)
    if head == b"\x28\xb5\x2f\xfd":
        data = run("zstd", "-dc", tar_path).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            return t.getmembers()
    with tarfile.open(tar_path) as t:
        return t.getmembers()
