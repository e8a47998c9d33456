"""Computing a union's changes: what `unionfs diff` prints.

The changes log (changes.py) says *where* to look; this module decides *what*
changed there by resolving each of those paths twice, offline, with the
union's own rules (merge.Resolver): once in the merged view (upper + lowers,
"new") and once in the lowers alone ("old"), and comparing the two objects.
The upper directory is therefore the truth; the log only keeps the work
proportional to the number of changed paths.

Rules (docker diff's format and meaning, done exactly):

* ``A`` a path that exists now and not in the old view; children of a new
  directory are A too (the whole subtree is listed).
* ``D`` a path that existed and is gone now, listed only where its parent is
  still a directory (deleting a directory lists the directory only).
* ``C`` a path in both whose object differs: type, content (data, symlink
  target, device number), mode, owner, mtime (non-directories; directory
  times change with every entry and are not compared, atime and ctime never
  are), xattrs (without the union's private ones), link count (non-directories:
  a new name of a file, or one removed, changes the object its other names
  show). Every directory of the old
  view that contains (at any depth) an A or D is C too; its changes include
  ``content`` when such an entry is directly in it.

A path removed and made again is one C line (or nothing, if the new object is
the same in every compared respect); a path made and removed again is not
listed.

Completeness: a path can differ between the views only if something at it or
above it is in the upper. Every such object came from a logged change, except
the other names of a hard-linked file (copy-up links them all): those are
found by inode from the logged name. A directory whose lower stack differs
between the views (opaque, redirected, replaced) has its whole subtree
compared, since no record names what is under it.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import resource
import stat
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from . import format, syscalls
from .changes import UNKNOWN_PATH, escape, scan_upper, unescape
from .format import Format
from .layers import FdCache, walk_tree
from .merge import Entry, Resolver
from .nodes import ROOT_ID, Node
from .stack import LayerStack
from .workdir import MARKS, path_of

TYPE_NAMES = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket", stat.S_IFCHR: "char-device", stat.S_IFBLK: "block-device",
}
TYPE_CODES = {v: k for k, v in TYPE_NAMES.items()}
CHANGE_ORDER = ("type", "content", "mode", "owner", "times", "xattrs", "links")


def parent_of(path: bytes) -> bytes:
    head = path.rpartition(b"/")[0]
    return head or b"/"


def child_of(path: bytes, name: bytes) -> bytes:
    return (b"" if path == b"/" else path) + b"/" + name


def ancestors(path: bytes) -> Iterator[bytes]:
    """Proper ancestors of a path, nearest first, without the root."""
    while True:
        path = path.rpartition(b"/")[0]
        if not path:
            return
        yield path


def normalize(path: bytes) -> bytes:
    """An absolute view path without empty, '.' or trailing components ('..' is refused)."""
    parts = [p for p in path.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise ValueError(f"'..' in path {os.fsdecode(path)!r}")
    return b"/" + b"/".join(parts)


# --------------------------------------------------------------------------
# Objects: one path's object in one view (live), or as saved in a mark
# --------------------------------------------------------------------------

class Obj:
    """What the comparison needs to know about an object."""

    mode: int

    @property
    def fmt(self) -> int:
        return stat.S_IFMT(self.mode)

    @property
    def is_dir(self) -> bool:
        return self.fmt == stat.S_IFDIR

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.fmt, "unknown")

    def report_size(self) -> int:
        return 0 if self.is_dir or self.fmt in (stat.S_IFCHR, stat.S_IFBLK) else self.size

    # filled in by subclasses
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev: int
    nlink: int | None   # None: not known (a mark saved before link counts were)

    def target(self) -> bytes: raise NotImplementedError
    def xattrs(self) -> dict[bytes, bytes]: raise NotImplementedError
    def digest(self) -> str: raise NotImplementedError
    def identity(self) -> tuple | None: return None

    def to_json(self) -> dict:
        d: dict = {"type": self.type_name, "mode": stat.S_IMODE(self.mode), "uid": self.uid,
                   "gid": self.gid, "size": self.size, "mtime_ns": self.mtime_ns}
        if self.fmt == stat.S_IFREG:
            d["sha256"] = self.digest()
        elif self.fmt == stat.S_IFLNK:
            d["target"] = escape(self.target()).decode()
        elif self.fmt in (stat.S_IFCHR, stat.S_IFBLK):
            d["rdev"] = self.rdev
        if self.nlink is not None:
            d["nlink"] = self.nlink
        d["xattrs"] = {escape(k).decode(): v.hex() for k, v in sorted(self.xattrs().items())}
        return d


class Live(Obj):
    """An object resolved in a View; reads what it needs lazily, through fresh fds."""

    def __init__(self, view: "View", parent: Node, entry: Entry) -> None:
        assert entry.st is not None
        self.view = view
        self.parent = parent
        self.entry = entry
        st = entry.st
        self.st = st
        self.mode, self.uid, self.gid = st.st_mode, st.st_uid, st.st_gid
        self.size, self.mtime_ns, self.rdev = st.st_size, st.st_mtime_ns, st.st_rdev
        self.nlink = st.st_nlink
        self._digest: str | None = None
        self._xattrs: dict[bytes, bytes] | None = None

    @property
    def upper(self) -> bool:
        return self.entry.upper

    def loc(self) -> tuple[int, bytes]:
        r = self.view.r
        if self.entry.upper:
            return r.upper_fd(self.parent), self.entry.name
        return r.lower_loc(*self.entry.lowers[0])

    def identity(self) -> tuple:
        return (self.st.st_dev, self.st.st_ino)

    def stack(self) -> tuple:
        """Where a directory's lower contents come from (empty: none merge in)."""
        if self.entry.opaque:
            return ()
        return tuple((layer.index, path) for layer, path in self.entry.lowers)

    def target(self) -> bytes:
        return syscalls.readlink_at(*self.loc())

    def xattrs(self) -> dict[bytes, bytes]:
        if self._xattrs is None:
            out = {}
            for attr in syscalls.listxattr(*self.loc()):
                if self.view.r.fmt.is_private(attr):
                    continue
                value = syscalls.getxattr(*self.loc(), attr)
                if value is not None:
                    out[attr] = value
            self._xattrs = out
        return self._xattrs

    def digest(self) -> str:
        if self._digest is None:
            h = hashlib.sha256()
            fd = syscalls.open_at(*self.loc(), os.O_RDONLY | os.O_NONBLOCK)
            try:
                while chunk := os.read(fd, 1 << 20):
                    h.update(chunk)
            finally:
                os.close(fd)
            self._digest = h.hexdigest()
        return self._digest


class Saved(Obj):
    """An object as a mark recorded it (see Obj.to_json)."""

    def __init__(self, d: dict) -> None:
        self.d = d
        self.mode = TYPE_CODES.get(d["type"], 0) | d["mode"]
        self.uid, self.gid, self.size = d["uid"], d["gid"], d["size"]
        self.mtime_ns, self.rdev = d["mtime_ns"], d.get("rdev", 0)
        self.nlink = d.get("nlink")

    def target(self) -> bytes:
        return unescape(self.d.get("target", "").encode())

    def xattrs(self) -> dict[bytes, bytes]:
        return {unescape(k.encode()): bytes.fromhex(v) for k, v in self.d.get("xattrs", {}).items()}

    def digest(self) -> str:
        return self.d.get("sha256", "")


def compare(old: Obj, new: Obj) -> list[str]:
    """What differs between two objects at one path (in CHANGE_ORDER)."""
    if old.fmt != new.fmt:
        return ["type"]  # nothing else compares across types
    out = []
    if old.identity() is None or old.identity() != new.identity():  # else: the very same object
        if old.fmt == stat.S_IFREG:
            if old.size != new.size or old.digest() != new.digest():
                out.append("content")
        elif old.fmt == stat.S_IFLNK:
            if old.target() != new.target():
                out.append("content")
        elif old.fmt in (stat.S_IFCHR, stat.S_IFBLK):
            if old.rdev != new.rdev:
                out.append("content")
    if old.fmt != stat.S_IFLNK and stat.S_IMODE(old.mode) != stat.S_IMODE(new.mode):
        out.append("mode")
    if (old.uid, old.gid) != (new.uid, new.gid):
        out.append("owner")
    if not old.is_dir and old.mtime_ns != new.mtime_ns:
        out.append("times")
    if old.xattrs() != new.xattrs():
        out.append("xattrs")
    # a directory's count follows its subdirectories, which are listed themselves
    if not old.is_dir and None not in (old.nlink, new.nlink) and old.nlink != new.nlink:
        out.append("links")
    return out


# --------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------

class View:
    """The view a resolver's layers make (see stack.LayerStack.resolver: the merged view,
    or the lowers alone), looked up by absolute path offline with the union's own rules."""

    _ids = itertools.count(ROOT_ID + 1)

    def __init__(self, resolver: Resolver) -> None:
        self.r = resolver
        self.upper = resolver.upper
        self.root = root = resolver.root_node()
        self._dirs: dict[bytes, Node | None] = {b"/": root}
        self._objs: dict[bytes, Live | None] = {}

    def dir_node(self, path: bytes) -> Node | None:
        if path in self._dirs:
            return self._dirs[path]
        obj = self.lookup(path)
        node = self._node(obj) if obj is not None and obj.is_dir else None
        self._dirs[path] = node
        return node

    def _node(self, obj: "Live") -> Node:
        """The directory node of a directory object, for resolving names in it."""
        e = obj.entry
        node = Node(next(self._ids), stat.S_IFDIR, obj.parent, e.name)
        node.upper, node.lowers, node.opaque = e.upper, e.lowers, e.opaque
        return node

    def walk(self, top: bytes = b"/") -> Iterator[tuple[bytes, "Live"]]:
        """(path, object) for everything below directory *top*, depth first. Nothing is
        remembered, so a walk of a large view holds only the directories still to visit."""
        node = self.dir_node(top)
        if node is None:
            return
        stack = [(top, node)]
        while stack:
            path, node = stack.pop()
            for name in self.r.list_names(node):
                e = self.r.resolve(node, name)
                if e.st is None:
                    continue
                obj = Live(self, node, e)
                child = child_of(path, name)
                yield child, obj
                if obj.is_dir:
                    stack.append((child, self._node(obj)))

    def lookup(self, path: bytes) -> Live | None:
        """The object at an absolute view path (not the root), or None."""
        if path in self._objs:
            return self._objs[path]
        parent = self.dir_node(parent_of(path))
        obj = None
        if parent is not None:
            e = self.r.resolve(parent, path.rpartition(b"/")[2])
            if e.st is not None:
                obj = Live(self, parent, e)
        self._objs[path] = obj
        return obj

    def children(self, path: bytes) -> list[bytes]:
        node = self.dir_node(path)
        return [] if node is None else self.r.list_names(node)

    def forget(self) -> None:
        """Drop cached lookups (memory) — safe between whole passes."""
        self._objs.clear()
        self._dirs = {b"/": self.root}


def hardlink_index(upper: str) -> dict[tuple[int, int], list[bytes]]:
    """(dev, ino) → view paths, for non-directories in the upper with several names (a
    symlink, fifo or device can be hard-linked too; whiteouts are not objects of the view)."""
    index: dict[tuple[int, int], list[bytes]] = {}
    try:
        root = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return index
    try:
        for _fd, rel, _name, de in walk_tree(root):
            if not de.is_dir(follow_symlinks=False):
                st = de.stat(follow_symlinks=False)
                if st.st_nlink > 1 and not format.is_whiteout(st):
                    index.setdefault((st.st_dev, st.st_ino), []).append(b"/" + rel)
    finally:
        os.close(root)
    return index


# --------------------------------------------------------------------------
# The diff
# --------------------------------------------------------------------------

@dataclass
class Change:
    kind: str                      # "A", "C" or "D"
    path: bytes
    old: Obj | None
    new: Obj | None
    changes: list[str] = field(default_factory=list)

    @property
    def obj(self) -> Obj:
        obj = self.new if self.kind != "D" else self.old
        assert obj is not None
        return obj

    def to_json(self) -> dict:
        d = {"kind": self.kind, "path": os.fsdecode(self.path), "type": self.obj.type_name,
             "size": self.obj.report_size()}
        if self.kind == "C":
            d["changes"] = list(self.changes)
            if "type" in self.changes and self.old is not None:
                d["old_type"] = self.old.type_name
        return d


Relevant = Callable[[bytes], bool]


def make_filter(prefixes: Iterable[bytes]) -> tuple[Relevant, Relevant]:
    """(relevant, inside) for path filters: *inside* selects output; *relevant* also lets
    through the ancestors of a filter, whose subtrees may reach into it."""
    prefixes = [normalize(p) for p in prefixes]
    if not prefixes or b"/" in prefixes:
        def everything(p: bytes) -> bool:
            return True
        return everything, everything

    def inside(p: bytes) -> bool:
        return any(p == f or p.startswith(f + b"/") for f in prefixes)

    def relevant(p: bytes) -> bool:
        return inside(p) or any(f.startswith(p + b"/") for f in prefixes)

    return relevant, inside


def classify(candidates: Iterable[bytes], old_state: Callable[[bytes], Obj | None], new: View,
             *, old_view: View | None = None, aliases: Callable[[Live], list[bytes]] | None = None,
             relevant: Relevant = lambda p: True) -> dict[bytes, Change]:
    """The changes at (and found from) *candidates*, before the directory rule is applied.

    *old_view*, when the old state is a View, lets directories whose lower stacks differ
    have their subtrees compared in full. *aliases* gives the other names of a hard-linked
    upper file."""
    out: dict[bytes, Change] = {}
    seen: set[bytes] = set()
    queue = [p for p in candidates if p != UNKNOWN_PATH]
    while queue:
        path = queue.pop()
        if path in seen or path == b"/" or not relevant(path):
            continue
        seen.add(path)
        old, cur = old_state(path), new.lookup(path)
        if old is None and cur is None:
            continue
        if old is None:
            out[path] = Change("A", path, None, cur)
        elif cur is None:
            parent = parent_of(path)
            if parent != b"/":
                pobj = new.lookup(parent)
                if pobj is None or not pobj.is_dir:
                    continue  # the D (or type change) is listed higher up
            out[path] = Change("D", path, old, None)
        else:
            changes = compare(old, cur)
            if changes:
                out[path] = Change("C", path, old, cur, changes)
        if cur is not None and cur.is_dir:
            if old is None or not old.is_dir:
                queue.extend(child_of(path, n) for n in new.children(path))
            elif old_view is not None and isinstance(old, Live) and old.stack() != cur.stack():
                names = set(new.children(path)) | set(old_view.children(path))
                queue.extend(child_of(path, n) for n in names)
        elif cur is not None and aliases is not None and cur.upper and cur.st.st_nlink > 1:
            queue.extend(aliases(cur))
    return out


def add_directories(out: dict[bytes, Change], old_state: Callable[[bytes], Obj | None],
                    new: View) -> None:
    """Every directory of the old view holding an A or D (at any depth) is C."""
    done: set[bytes] = set()
    for change in [c for c in out.values() if c.kind in "AD"]:
        direct = True
        for anc in ancestors(change.path):
            existing = out.get(anc)
            if existing is not None and existing.kind == "A":
                break  # a new directory: its ancestors are handled from it
            if existing is None:
                old, cur = old_state(anc), new.lookup(anc)
                if old is None or cur is None or not old.is_dir or not cur.is_dir:
                    break
                existing = out[anc] = Change("C", anc, old, cur, [])
            if direct and existing.old is not None and existing.old.is_dir \
                    and "content" not in existing.changes:
                existing.changes.append("content")
                existing.changes.sort(key=CHANGE_ORDER.index)
            direct = False
            if anc in done:
                break
            done.add(anc)


@dataclass
class Layers:
    """The layers of one union, opened for reading."""

    upper_path: str
    lower_paths: list[str]
    fmt: Format = format.OVERLAY

    def __post_init__(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
        self.stack = LayerStack(self.upper_path, self.lower_paths, self.fmt,
                                cache=FdCache(capacity=max(64, min(16384, soft // 2))))
        self.upper, self.lowers = self.stack.upper, self.stack.lowers
        self.new = View(self.stack.resolver())
        self.base = View(self.stack.resolver(upper=False))

    def close(self) -> None:
        self.stack.close()


def compute(layers: Layers, candidates: Iterable[bytes], relevant: Relevant = lambda p: True,
            since: dict[bytes, Obj | None] | None = None) -> list[Change]:
    """The changes, sorted by path: relative to the lowers, or to a mark's *since* state."""
    index: dict[tuple[int, int], list[bytes]] | None = None

    def aliases(obj: Live) -> list[bytes]:
        nonlocal index
        if index is None:
            index = hardlink_index(layers.upper_path)
        return index.get((obj.st.st_dev, obj.st.st_ino), [])

    base_state = layers.base.lookup
    out = classify(candidates, base_state, layers.new, old_view=layers.base, aliases=aliases,
                   relevant=relevant)
    add_directories(out, base_state, layers.new)
    if since is not None:
        now = out
        marked = since

        def mark_state(path: bytes) -> Obj | None:
            if path in marked:
                return marked[path]
            for anc in ancestors(path):
                if anc in marked:
                    o = marked[anc]
                    if o is None or not o.is_dir:
                        return None
            return base_state(path)

        out = classify(set(marked) | set(now), mark_state, layers.new, relevant=relevant)
        add_directories(out, mark_state, layers.new)
    return [out[p] for p in sorted(out)]


# --------------------------------------------------------------------------
# Marks: the full change state at a named point, for `diff --since`
# --------------------------------------------------------------------------

def mark_path(workdir: str, name: str) -> str:
    return os.path.join(path_of(workdir, MARKS), name + ".json")


def save_mark(workdir: str, name: str, changes: list[Change]) -> None:
    entries = []
    for c in changes:
        entries.append({"path": escape(c.path).decode(), "kind": c.kind,
                        "state": None if c.new is None else c.new.to_json()})
    doc = {"version": 1, "name": name, "time": time.time(), "entries": entries}
    os.makedirs(path_of(workdir, MARKS), mode=0o700, exist_ok=True)
    path = mark_path(workdir, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_mark(workdir: str, name: str) -> dict[bytes, Obj | None]:
    """path → saved object (None: absent) at the mark; raises OSError/ValueError."""
    with open(mark_path(workdir, name)) as f:
        doc = json.load(f)
    if doc.get("version") != 1:
        raise ValueError("unknown mark format")
    out: dict[bytes, Obj | None] = {}
    for e in doc["entries"]:
        out[unescape(e["path"].encode())] = None if e["state"] is None else Saved(e["state"])
    return out


def list_marks(workdir: str) -> list[tuple[str, float, int]]:
    """(name, time, number of changes) of each mark, oldest first."""
    out = []
    try:
        names = os.listdir(path_of(workdir, MARKS))
    except FileNotFoundError:
        return []
    for fn in names:
        if not fn.endswith(".json"):
            continue
        try:
            with open(os.path.join(path_of(workdir, MARKS), fn)) as f:
                doc = json.load(f)
            out.append((doc["name"], float(doc["time"]), len(doc["entries"])))
        except (OSError, ValueError, KeyError):
            continue
    return sorted(out, key=lambda t: t[1])


def upper_candidates(upper: str, fmt: Format) -> list[bytes]:
    return [p for _, p in scan_upper(upper, fmt)]
