"""`unionfs inspect`: what a stack of layers holds, and what it wastes (dive's analysis).

Every layer is read as a lower layer is (the upper's format is a lower's too), with
the union's own rules (diff.View over merge.Resolver):

* per layer: ``files`` (entries that are not directories or markers), ``bytes``
  (each regular file once however many names it has); ``added`` / ``modified``
  (its entries, directories included, that the layers below do / do not show),
  ``removed`` (names the layers below show and this layer hides: whiteouts, and the
  names under its opaque directories); ``shadowed_files`` / ``shadowed_bytes``:
  its regular files none of whose names the union shows (overridden above, whited
  out, under an opaque directory); a file counts once however many names it has;
* ``wasted_bytes``: the sum of the shadowed bytes; ``user_wasted_percent``: that
  over the bytes of every layer but the bottom one (dive's "user" layers);
* ``efficiency``: dive's: for every path, each layer that has a leaf there (a
  non-directory, an empty directory or a whiteout) adds its size (a whiteout: the
  bytes of what it removes from the layers below); the score is the sum over paths
  of the smallest of those sizes over the sum of all of them (1 with nothing).

"Shown" is decided by object, not by name: the merged view is walked once and
every object it shows marks (its layer, its inode); a renamed directory's
contents are shown under the new name, so they are not wasted.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from .. import format as fmtmod, syscalls
from ..diff import View, child_of
from ..format import OCI_OPAQUE, OCI_WHITEOUT, Format
from ..layers import FdCache, Layer, walk_tree
from ..stack import LayerStack

REGULAR, DIRECTORY, OTHER, WHITEOUT, OPAQUE = "file", "dir", "other", "whiteout", "opaque"


@dataclass
class Entry:
    path: bytes        # view path, b"/a/b" (a whiteout: the path it hides)
    kind: str
    size: int = 0      # regular files: st_size for the first name of an inode, else 0
    ino: int = 0


@dataclass
class LayerReport:
    path: str
    files: int = 0
    bytes: int = 0
    added: int = 0
    modified: int = 0
    removed: int = 0
    shadowed_files: int = 0
    shadowed_bytes: int = 0
    entries: list[Entry] = field(default_factory=list, repr=False)
    opaque_dirs: list[bytes] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("path", "files", "bytes", "added", "modified",
                                               "removed", "shadowed_files", "shadowed_bytes")}


@dataclass
class Report:
    layers: list[LayerReport]       # top-most first
    wasted_bytes: int
    efficiency: float
    user_wasted_percent: float
    wasted_paths: list[dict]        # {"path", "bytes", "layers"}, largest first

    def to_json(self, top: int | None = None) -> dict:
        return {"layers": [lr.to_json() for lr in self.layers], "wasted_bytes": self.wasted_bytes,
                "efficiency": self.efficiency, "user_wasted_percent": self.user_wasted_percent,
                "wasted_paths": self.wasted_paths[:top] if top else self.wasted_paths}


class Stack:
    """The layers (top-most first, all read as lowers), opened by stack.LayerStack, and
    the views over them."""

    def __init__(self, paths: list[str], fmt: Format = fmtmod.OVERLAY) -> None:
        self.paths = paths
        self.fmt = fmt
        self.stack = LayerStack(None, paths, fmt, cache=FdCache(capacity=1024))
        self.layers: list[Layer] = self.stack.lowers
        self.full = View(self.stack.resolver())

    def below(self, k: int) -> View:
        """The view of the layers below the k-th (0: the top-most)."""
        return View(self.stack.resolver(lowers=slice(k + 1, None)))

    def close(self) -> None:
        self.stack.close()


def read_layer(layer: Layer, fmt: Format) -> LayerReport:
    """One layer's own entries, from a walk of its directory (never through a symlink)."""
    lr = LayerReport(layer.path)
    seen: set[int] = set()
    found = []
    for fd, rel, name, de in walk_tree(layer.fd):
        st = de.stat(follow_symlinks=False)
        opaque = stat.S_ISDIR(st.st_mode) and fmt.lower_opaque(fd, name)
        found.append((b"/" + rel, name, st, opaque, fmt.whiteout_at(fd, name, st, lower=True)))
    # in path order, so the name that carries a linked file's size is the same every time
    # (the first, as in an exported layer)
    found.sort(key=lambda f: f[0].split(b"/"))
    for path, name, st, opaque, whiteout in found:
        fmt_ = stat.S_IFMT(st.st_mode)
        if name == OCI_OPAQUE:
            continue                  # found with its directory, below
        if name.startswith(OCI_WHITEOUT):
            lr.entries.append(Entry(path.rpartition(b"/")[0] + b"/" + name[len(OCI_WHITEOUT):],
                                    WHITEOUT))
            continue
        if whiteout:
            lr.entries.append(Entry(path, WHITEOUT))
            continue
        if fmt_ == stat.S_IFDIR:
            lr.entries.append(Entry(path, DIRECTORY))
            if opaque:
                lr.opaque_dirs.append(path)
            continue
        lr.files += 1
        if fmt_ == stat.S_IFREG:
            first = st.st_ino not in seen
            seen.add(st.st_ino)
            size = st.st_size if first else 0
            lr.bytes += size
            lr.entries.append(Entry(path, REGULAR, size, st.st_ino))
        else:
            lr.entries.append(Entry(path, OTHER))
    return lr


def shown_objects(view: View) -> set[tuple[int, int]]:
    """(layer index, inode) of every regular file the merged view shows."""
    return {(obj.entry.lowers[0][0].index, obj.st.st_ino) for _, obj in view.walk()
            if obj.fmt == stat.S_IFREG}


def _whiteout_size(view: View, top: bytes) -> int:
    """What a whiteout of *top* weighs in dive's score: the bytes of the regular files below
    a directory it removes (each inode once); a removed non-directory weighs nothing (its
    own layer's leaf already counts its size, and the whiteout's 0 becomes the minimum)."""
    obj = view.lookup(top)
    if obj is None or not obj.is_dir:
        return 0
    files = {o.identity(): o.size for _, o in view.walk(top) if o.fmt == stat.S_IFREG}
    return sum(files.values())


def analyse(stack: Stack) -> Report:
    reports = [read_layer(layer, stack.fmt) for layer in stack.layers]
    shown = shown_objects(stack.full)
    cumulative: dict[bytes, int] = {}
    minimum: dict[bytes, int] = {}
    wasted: dict[bytes, dict] = {}

    def leaf(path: bytes, size: int) -> None:
        cumulative[path] = cumulative.get(path, 0) + size
        minimum[path] = min(minimum.get(path, size), size)

    n = len(stack.layers)
    for k in range(n - 1, -1, -1):            # bottom first, as dive stacks them
        lr, layer = reports[k], stack.layers[k]
        below = stack.below(k)
        has_children = {e.path.rpartition(b"/")[0] or b"/" for e in lr.entries}
        own = {e.path for e in lr.entries if e.kind != WHITEOUT}
        by_ino: dict[int, tuple[bytes, int]] = {}
        for e in lr.entries:
            if e.kind == WHITEOUT:
                if below.lookup(e.path) is not None and e.path not in own:
                    lr.removed += 1
                    leaf(e.path, _whiteout_size(below, e.path))
                continue
            if below.lookup(e.path) is not None:
                lr.modified += 1
            else:
                lr.added += 1
            if e.kind != DIRECTORY or e.path not in has_children:
                leaf(e.path, e.size)
            if e.kind == REGULAR:
                by_ino.setdefault(e.ino, (e.path, e.size))   # the first name carries the size
        for d in lr.opaque_dirs:
            for name in below.children(d):
                path = child_of(d, name)
                if path not in own:
                    lr.removed += 1
                    leaf(path, _whiteout_size(below, path))
        for ino, (path, size) in by_ino.items():
            if (layer.index, ino) in shown:
                continue
            lr.shadowed_files += 1
            lr.shadowed_bytes += size
            w = wasted.setdefault(path, {"path": os.fsdecode(path), "bytes": 0, "layers": []})
            w["bytes"] += size
            w["layers"].append(lr.path)
        below.forget()
    total = sum(cumulative.values())
    efficiency = 1.0 if total == 0 else sum(minimum.values()) / total
    wasted_bytes = sum(lr.shadowed_bytes for lr in reports)
    user = sum(lr.bytes for lr in reports[:-1])
    return Report(reports, wasted_bytes, efficiency, wasted_bytes / user if user else 0.0,
                  sorted(wasted.values(), key=lambda w: (-w["bytes"], w["path"])))


@dataclass
class Which:
    path: str
    layer: str | None
    shadows: list[str]

    def to_json(self) -> dict:
        return {"path": self.path, "layer": self.layer, "shadows": self.shadows}


def which(stack: Stack, path: bytes) -> Which:
    """The layer that provides *path* in the view, and the layers whose own objects at that
    path the view does not show."""
    obj = stack.full.lookup(path) if path != b"/" else None
    provider = obj.entry.lowers[0][0] if obj is not None else None
    shadows = []
    parent, _, name = path.rpartition(b"/")
    for layer in stack.layers:
        if layer is provider:
            continue
        try:
            fd = stack.full.r.lower_fd(layer, parent.lstrip(b"/"))
        except OSError:
            continue
        st = syscalls.lstat_at(fd, name)
        if st is not None and not stack.full.r.fmt.whiteout_at(fd, name, st, lower=True) \
                and not name.startswith(OCI_WHITEOUT):
            shadows.append(layer.path)
    return Which(os.fsdecode(path), provider.path if provider else None, shadows)


def layer_tree(lr: LayerReport, shown_paths: set[bytes] | None = None) -> dict:
    """A layer's entries as a nested tree for the HTML page: name -> [kind, size, children]."""
    root: dict = {}
    for e in sorted(lr.entries, key=lambda e: e.path):
        node = root
        parts = e.path.split(b"/")[1:]
        for part in parts[:-1]:
            node = node.setdefault(os.fsdecode(part), ["dir", 0, {}])[2]
        name = os.fsdecode(parts[-1])
        if e.kind == DIRECTORY:
            node.setdefault(name, ["dir", 0, {}])
        else:
            node[name] = [e.kind, e.size, None]
    return root
