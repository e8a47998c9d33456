"""`unionfs inspect`: every figure checked against what kernel overlayfs shows of the same
layers (which objects the view shows, by inode; what the layers below each layer show);
--which, the CI gates, and the HTML page loaded in headless Chromium (its screenshot is kept
as inspect.png in the test's tmp dir)."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess

import pytest

from helpers.snapshot import snapshot
from helpers.mounting import kernel_view, unionfs_cmd, unionfs_mount

pytestmark = [
    pytest.mark.mount,
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, whiteouts)"),
]


def _file(path: str, size: int, fill: bytes = b"x") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(fill * size)


@pytest.fixture
def stack(tmp_path):
    """bottom, mid (kernel whiteout, opaque dir, override), and an upper made through a
    unionfs mount (override, new file, a removed name of a hard-linked pair, a renamed
    directory, a removed file): top-most first."""
    bottom, mid = str(tmp_path / "bottom"), str(tmp_path / "mid")
    _file(f"{bottom}/a", 1000)
    _file(f"{bottom}/b", 2000)
    _file(f"{bottom}/d/c", 3000)
    _file(f"{bottom}/d/e", 500)
    _file(f"{bottom}/hl1", 700)
    os.link(f"{bottom}/hl1", f"{bottom}/hl2")
    _file(f"{bottom}/keep/k", 10)
    _file(f"{bottom}/r/inner", 400)
    _file(f"{mid}/a", 1500, b"m")
    os.mknod(f"{mid}/b", stat.S_IFCHR, os.makedev(0, 0))
    _file(f"{mid}/d/new", 100)
    os.setxattr(f"{mid}/d", "trusted.overlay.opaque", b"y")
    upper, mnt = str(tmp_path / "upper"), str(tmp_path / "mnt")
    os.makedirs(upper)
    os.makedirs(mnt)
    with unionfs_mount([mid, bottom], upper, mnt):
        with open(f"{mnt}/a", "wb") as f:
            f.write(b"t" * 50)
        _file(f"{mnt}/f", 60)
        os.unlink(f"{mnt}/hl1")
        os.rename(f"{mnt}/r", f"{mnt}/r2")
        os.unlink(f"{mnt}/keep/k")
    return [upper, mid, bottom]


def inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(unionfs_cmd("inspect", *args), capture_output=True, text=True, timeout=300)


def _walk(root: str):
    """("/path", lstat) of everything below *root*."""
    return [("/" + rel, st) for rel, st in snapshot(root, lambda _p, st: st).items()]


def _opaque(path: str) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def _is_whiteout(st) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def expected(layers: list[str], tmp_path) -> dict:
    """The figures from kernel overlayfs's views and plain walks of the layer directories."""
    os.makedirs(tmp_path / "kv", exist_ok=True)
    with kernel_view(layers, str(tmp_path / "kv")) as v:
        shown = {st.st_ino for _, st in _walk(v) if stat.S_ISREG(st.st_mode)}
    out = []
    cumulative: dict[str, int] = {}
    minimum: dict[str, int] = {}
    for k in range(len(layers) - 1, -1, -1):
        layer, below_layers = layers[k], layers[k + 1:]
        fig = dict(path=layer, files=0, bytes=0, added=0, modified=0, removed=0,
                   shadowed_files=0, shadowed_bytes=0)
        inos: dict[int, int] = {}
        entries = sorted(_walk(layer), key=lambda e: e[0].split("/"))
        parents = {os.path.dirname(p) for p, _ in entries}
        mnt = str(tmp_path / f"below{k}")
        os.makedirs(mnt, exist_ok=True)
        view_cm = kernel_view(below_layers, mnt) if len(below_layers) > 1 else None
        below = view_cm.__enter__() if view_cm else (below_layers[0] if below_layers else None)
        try:
            def shows(p):
                return below is not None and os.path.lexists(below + p)

            def size_below(p):
                full = below + p
                if not os.path.isdir(full) or os.path.islink(full):
                    return 0  # dive: a removed file's whiteout weighs nothing
                return sum(st.st_size for _, st in _walk(full) if stat.S_ISREG(st.st_mode))

            def leaf(p, size):
                cumulative[p] = cumulative.get(p, 0) + size
                minimum[p] = min(minimum.get(p, size), size)

            for p, st in entries:
                if _is_whiteout(st):
                    if shows(p):
                        fig["removed"] += 1
                        leaf(p, size_below(p))
                    continue
                fig["modified" if shows(p) else "added"] += 1
                size = 0
                if stat.S_ISREG(st.st_mode) and st.st_ino not in inos:
                    inos[st.st_ino] = size = st.st_size
                if not stat.S_ISDIR(st.st_mode):
                    fig["files"] += 1
                if not stat.S_ISDIR(st.st_mode) or p not in parents:
                    leaf(p, size)
                if stat.S_ISDIR(st.st_mode) and below is not None and _opaque(layer + p) \
                        and os.path.isdir(below + p):
                    for n in os.listdir(below + p):
                        if not os.path.lexists(f"{layer}{p}/{n}"):
                            fig["removed"] += 1
                            leaf(f"{p}/{n}", size_below(f"{p}/{n}"))
        finally:
            if view_cm:
                view_cm.__exit__(None, None, None)
        fig["bytes"] = sum(inos.values())
        for ino, size in inos.items():
            if ino not in shown:
                fig["shadowed_files"] += 1
                fig["shadowed_bytes"] += size
        out.insert(0, fig)
    total = sum(cumulative.values())
    wasted = sum(f["shadowed_bytes"] for f in out)
    user = sum(f["bytes"] for f in out[:-1])
    return {"layers": out, "wasted_bytes": wasted,
            "efficiency": 1.0 if not total else sum(minimum.values()) / total,
            "user_wasted_percent": wasted / user if user else 0.0}


def test_figures_match_kernel_overlayfs(stack, tmp_path):
    proc = inspect("--json", ":".join(stack))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    want = expected(stack, tmp_path)
    assert got["layers"] == want["layers"]
    assert got["wasted_bytes"] == want["wasted_bytes"] > 0
    assert got["efficiency"] == pytest.approx(want["efficiency"])
    assert got["user_wasted_percent"] == pytest.approx(want["user_wasted_percent"])
    assert list(got["layers"][0])[0] == "path"
    # the renamed directory's contents are shown under its new name: not wasted
    assert "/r/inner" not in {w["path"] for w in got["wasted_paths"]}
    sizes = [w["bytes"] for w in got["wasted_paths"]]
    assert sizes == sorted(sizes, reverse=True) and sum(sizes) == got["wasted_bytes"]


def test_mountpoint_source_is_its_stack(stack, tmp_path):
    upper, mid, bottom = stack
    mnt = str(tmp_path / "mnt")
    with unionfs_mount([mid, bottom], upper, mnt):
        proc = inspect("--json", mnt)
    assert proc.returncode == 0, proc.stderr
    assert [lr["path"] for lr in json.loads(proc.stdout)["layers"]] == stack


def test_which(stack, tmp_path):
    os.makedirs(tmp_path / "kv")
    for path in ("/a", "/d/c", "/hl2", "/r2/inner"):
        with kernel_view(stack, str(tmp_path / "kv")) as v:
            ino = os.lstat(v + path).st_ino if os.path.lexists(v + path) else None
        provider = next((lay for lay in stack if os.path.lexists(lay + path.replace("/r2/", "/r/"))
                         and os.lstat(lay + path.replace("/r2/", "/r/")).st_ino == ino), None)
        shadows = [lay for lay in stack if lay != provider and os.path.lexists(lay + path)
                   and not _is_whiteout(os.lstat(lay + path))]
        proc = inspect("--json", "--which", path, ":".join(stack))
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == {"path": path, "layer": provider, "shadows": shadows}
    # /a: the upper's, over mid's and bottom's; /d/c: under mid's opaque d, in no view
    assert json.loads(inspect("--json", "--which", "/a", ":".join(stack)).stdout)["shadows"] == stack[1:]
    assert json.loads(inspect("--json", "--which", "/d/c", ":".join(stack)).stdout)["layer"] is None


def test_ci_gates(stack):
    src = ":".join(stack)
    report = json.loads(inspect("--json", src).stdout)
    eff, wasted, user = report["efficiency"], report["wasted_bytes"], report["user_wasted_percent"]
    assert 0 < eff < 1 and 0 < user
    ok = inspect("--lowest-efficiency", str(eff - 0.001), "--highest-wasted-bytes", str(wasted),
                 "--highest-user-wasted-percent", str(user + 0.001), src)
    assert ok.returncode == 0, ok.stderr
    for args, what in ((["--lowest-efficiency", str(eff + 0.001)], "--lowest-efficiency"),
                       (["--highest-wasted-bytes", str(wasted - 1)], "--highest-wasted-bytes"),
                       (["--highest-user-wasted-percent", str(user - 0.001)], "--highest-user-wasted-percent")):
        bad = inspect(*args, src)
        assert bad.returncode == 1
        assert bad.stderr.startswith("unionfs: inspect: FAIL:") and what in bad.stderr
    assert inspect("--highest-wasted-bytes", "1KiB", src).returncode == (1 if wasted > 1024 else 0)
    bad = inspect("--lowest-efficiency", "2", src)
    assert bad.returncode == 2 and bad.stderr.startswith("unionfs: error:")


CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_html_page_in_chromium(stack, tmp_path):
    page = str(tmp_path / "inspect.html")
    proc = inspect("--json", "--html", page, ":".join(stack))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    with open(page) as f:
        text = f.read()
    # self-contained: no address to load anything from
    assert not re.search(r"""(src|href)\s*=|url\(|https?://|@import""", text)
    profile = str(tmp_path / "chromium-profile")

    def dom(fragment: str) -> str:
        p = subprocess.run(CHROMIUM + [f"--user-data-dir={profile}", "--dump-dom",
                                       f"file://{page}#{fragment}"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout

    d = dom("expand&sort=path")
    assert 'data-ready="yes"' in d
    bars = re.findall(r'<div class="layer" id="layer-(\d+)" data-bytes="(\d+)" data-shadowed="(\d+)"', d)
    assert [(int(b), int(s)) for _, b, s in bars] == \
        [(lr["bytes"], lr["shadowed_bytes"]) for lr in report["layers"]]
    rows = re.findall(r'<td class="path">([^<]*)</td><td class="num" data-bytes="(\d+)"', d)
    assert [r[0] for r in rows] == sorted(w["path"] for w in report["wasted_paths"])
    d = dom("")
    rows = re.findall(r'<td class="path">([^<]*)</td><td class="num" data-bytes="(\d+)"', d)
    assert [int(r[1]) for r in rows] == sorted((w["bytes"] for w in report["wasted_paths"]), reverse=True)
    # the trees: every entry of every layer, whiteouts struck through, shadowed files marked
    d = dom("expand")
    for i, layer in enumerate(stack):
        assert f'id="tree-{i}"' in d
    assert re.search(r'class="entry whiteout" data-path="/b"', d)
    assert re.search(r'class="entry shadowed" data-path="/d/c"', d)
    assert 'data-path="/r2"' in d and 'data-path="/r/inner"' in d
    shot = str(tmp_path / "inspect.png")
    p = subprocess.run(CHROMIUM + [f"--user-data-dir={profile}", "--window-size=1200,900",
                                   f"--screenshot={shot}", f"file://{page}#expand"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    with open(shot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(shot) > 10_000
