"""Nodes: what the kernel knows as inodes, with lookup counts and identity.

A Node remembers where its object lives (its resolution), so no operation
re-walks paths. Identity is the st_ino the node reports, derived from the
object's origin (layer index + the layer's own inode number) and kept across
copy-up by an xattr on the upper copy: hard links share it because they are
one inode below, and a remount derives the same numbers again.

Lifetime: the kernel raises a node's lookup count with lookup/create/readdir
replies and lowers it with forget. A node also stays while a registered child
names it as its parent, so a parent looked up again is the same object whose
state (upper fd, copy-up) the child relies on.
"""
from __future__ import annotations

import ctypes
import os
import stat
from typing import Iterator

from .layers import Layer

ROOT_ID = 1
_LAYER_SHIFT = 48
# The top bit is never part of a number make_ino gives (layer indexes stay far below
# 2**15): a lower object whose number an upper object claimed falsely takes it | ALT_INO.
ALT_INO = 1 << 63
# Node ids the kernel gets for an object it must see as a new inode (NodeTable.new_kid):
# bits 63 and 62 together, which no number make_ino gives, | ALT_INO or not, has.
_KID_BASE = (1 << 63) | (1 << 62)


def make_ino(layer_index: int, st_ino: int) -> int:
    """The st_ino a union object reports, unique across layers and stable across mounts."""
    return ((layer_index + 1) << _LAYER_SHIFT) | low_ino(st_ino)


def low_ino(st_ino: int) -> int:
    """The part of a layer's inode number that make_ino keeps."""
    return st_ino & ((1 << _LAYER_SHIFT) - 1)


def split_ino(ino: int) -> tuple[int, int]:
    """make_ino undone: (layer index, the kept part of that layer's inode number)."""
    return (ino >> _LAYER_SHIFT) - 1, low_ino(ino)


def parse_ino(value: bytes | None) -> int | None:
    """An inode number kept in an xattr, or None if it is not one make_ino can give.

    The value is on-disk data anyone with access to the upper may have written:
    0 would read as a negative entry, 1 is the root's id, and anything past 64
    bits cannot be sent to the kernel, so only decimal numbers with a layer
    part (the top 16 bits) of 1 or more, below ALT_INO, are trusted.
    """
    if value:
        value = value.split(b" ", 1)[0]  # a copy-up's durability tag may follow (durable.py)
    if not value or not value.isdigit() or len(value) > 20:
        return None
    ino = int(value)
    return ino if 1 << _LAYER_SHIFT <= ino < ALT_INO else None


#: xattrs the kernel or common tools ask for again and again, mostly to hear ENODATA
#: (see Node.no_xattrs), and their bits
ABSENT_XATTRS = {b"security.capability": 1, b"security.selinux": 2}
#: what nothing gives a new object by itself (an LSM may label it, a default ACL is system.*)
NEW_OBJECT_ABSENT = ABSENT_XATTRS[b"security.capability"]


def absent_bits(names: list[bytes]) -> int:
    """The ABSENT_XATTRS bits of the names not in *names* (an object's listxattr)."""
    bits = 0
    for name, bit in ABSENT_XATTRS.items():
        if name not in names:
            bits |= bit
    return bits


class Node:
    """One object of the merged view."""

    __slots__ = ("id", "kid", "kind", "parent", "name", "upper", "lowers", "opaque", "lookups",
                 "child_refs", "pin", "lock", "registered", "aliases", "no_xattrs", "old_kids",
                 "__weakref__")

    def __init__(self, node_id: int, kind: int, parent: "Node | None", name: bytes) -> None:
        self.id = node_id                   # its identity: the st_ino it reports
        # the node id the kernel knows it by in new entries: its id, unless the kernel's
        # inode of that id must stay as it is (NodeTable.new_kid)
        self.kid = node_id
        self.old_kids: list[int] | None = None  # earlier kids, whose kernel inodes may live on
        self.kind = kind                    # stat.S_IFMT of the object
        self.parent = parent                # a directory that names it (one of them, for links)
        self.name = name
        self.upper = False                  # the object exists in the upper layer
        self.lowers: list[tuple[Layer, bytes]] = []  # dirs: merge stack; others: the top lower object
        self.opaque = False                 # dirs: nothing below the upper merges in
        self.lookups = 0
        self.child_refs = 0
        self.pin: int | None = None         # O_PATH fd, only once no name reaches the object
        self.lock: object | None = None     # created by the async layer when needed
        self.registered = False
        # other (directory, name) pairs the kernel reached this non-directory by: where
        # the node lives on when its primary name is removed or renamed away
        self.aliases: list[tuple[Node, bytes]] = []
        # xattrs known absent (bits of ABSENT_XATTRS): the kernel asks for
        # security.capability at every write, truncate and chown of a file, and ls -l for
        # security.selinux at every entry; an answer changes only by our own setxattr
        self.no_xattrs = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.kind)

    @property
    def merged(self) -> bool:
        """A directory whose view combines the upper and at least one lower."""
        return self.upper and bool(self.lowers) and not self.opaque

    def path(self) -> bytes:
        """The node's path in the view (b"/" for the root), for logs and the changes log."""
        parts: list[bytes] = []
        node: Node | None = self
        while node is not None and node.id != ROOT_ID:
            parts.append(node.name)
            node = node.parent
        if node is None:
            return b""
        return b"/" + b"/".join(reversed(parts))

    def ancestors(self) -> Iterator["Node"]:
        node = self.parent
        while node is not None:
            yield node
            node = node.parent

    def __repr__(self) -> str:
        return f"<Node {self.id:#x} {self.path()!r} upper={self.upper} lowers={len(self.lowers)}>"


class NodeTable:
    """Node ids → nodes, with the kernel's lookup counts.

    Counts rise only in lookup/create/readdir (``ref``) and fall only in
    forget (``forget``). ``on_drop`` lets the owner release per-node
    resources (cached fds) when a node leaves the table.

    A node is found by its id (its identity) and by any kernel node id it was given
    apart from that (``new_kid``); its lookup count is the sum over all of them, so it
    stays while the kernel holds an inode of any.
    """

    # A dict keeps the table it grew to: after a walk of a million names is forgotten,
    # copy it into one of the right size, and give freed heap back (_shrink).
    SHRINK_FROM = 16384

    def __init__(self, root: Node, on_drop, on_shrink=lambda: None) -> None:
        self._nodes: dict[int, Node] = {ROOT_ID: root}
        self._kids: dict[int, Node] = {}  # node ids given apart from a node's id
        self._next_kid = _KID_BASE
        self._peak = 1
        self._shrunk = 0  # the table's size at its last shrink (0: none yet)
        root.registered = True
        root.lookups = 1
        self._on_drop = on_drop
        self._on_shrink = on_shrink  # the owner lets go of what it remembered per name

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, node_id: int) -> Node | None:
        node = self._nodes.get(node_id)
        if node is None and node_id >= _KID_BASE:
            return self._kids.get(node_id)
        return node

    def __getitem__(self, node_id: int) -> Node:
        node = self.get(node_id)
        if node is None:
            raise KeyError(node_id)
        return node

    def new_kid(self, node: Node) -> int:
        """Give *node* a new kernel node id for the entries it appears in from now on: the
        kernel will take it for a new inode (its lookup of a name whose cached inode has
        another id drops that dentry), while its inodes of the old ids live on as long as
        the kernel keeps them. The old id still finds the node."""
        assert node.registered and node.id != ROOT_ID
        self._next_kid += 1
        if node.old_kids is None:
            node.old_kids = []
        node.old_kids.append(node.kid)
        node.kid = self._next_kid
        self._kids[node.kid] = node
        return node.kid

    def ref(self, node: Node) -> Node:
        """Count one more kernel reference, registering the node on its first."""
        if not node.registered:
            existing = self._nodes.get(node.id)
            if existing is not None:
                node = existing
            else:
                self._nodes[node.id] = node
                self._peak = max(self._peak, len(self._nodes))
                node.registered = True
                if node.parent is not None:
                    node.parent.child_refs += 1
        node.lookups += 1
        return node

    def forget(self, node_id: int, count: int) -> None:
        node = self.get(node_id)
        if node is None or node_id == ROOT_ID:
            return
        node.lookups = max(0, node.lookups - count)
        self._maybe_drop(node)
        left = len(self._nodes)
        # and again each time what was left at the last shrink has gone down eightfold: the
        # names the kernel forgets last hold as much heap for their number as the others
        if (self._peak >= self.SHRINK_FROM and left < self._peak // 8) or left < self._shrunk // 8:
            self._shrink()

    def _shrink(self) -> None:
        self._nodes = dict(self._nodes)
        self._peak = self._shrunk = max(1, len(self._nodes))
        self._on_shrink()
        _malloc_trim()

    def name_gone(self, node: Node, parent: Node, name: bytes) -> None:
        """One name of *node* no longer reaches it: forget it, promoting an alias when the
        primary name went."""
        node.aliases = [(p, n) for p, n in node.aliases if not (p is parent and n == name)]
        if node.parent is parent and node.name == name:
            if node.aliases:
                self.set_parent(node, *node.aliases.pop(0))
            else:
                self.set_parent(node, None, b"")

    def name_added(self, node: Node, parent: Node, name: bytes) -> None:
        """The kernel reached *node* by another name (a hard link): remember it."""
        if node.is_dir or (node.parent is parent and node.name == name):
            return
        if node.parent is None:
            self.set_parent(node, parent, name)
        elif not any(p is parent and n == name for p, n in node.aliases) and len(node.aliases) < 16:
            node.aliases.append((parent, name))

    def set_parent(self, node: Node, parent: "Node | None", name: bytes) -> None:
        """Move a node to a new (parent, name), keeping parent references right."""
        old = node.parent
        node.parent = parent
        node.name = name
        if node.registered:
            if parent is not None:
                parent.child_refs += 1
            if old is not None:
                old.child_refs -= 1
                self._maybe_drop(old)

    def close_pins(self) -> None:
        """Close every node's pinned fd (at unmount: the nodes are not used again)."""
        for node in self._nodes.values():
            if node.pin is not None:
                os.close(node.pin)
                node.pin = None

    def _maybe_drop(self, node: Node) -> None:
        while (node.registered and node.lookups == 0 and node.child_refs == 0
               and node.id != ROOT_ID):
            del self._nodes[node.id]
            node.registered = False
            if node.old_kids is not None:  # no kernel inode of any of its ids is left
                for kid in node.old_kids + [node.kid]:
                    self._kids.pop(kid, None)
                node.old_kids = None
                node.kid = node.id
            self._on_drop(node)
            if node.pin is not None:
                os.close(node.pin)
                node.pin = None
            parent = node.parent
            if parent is None:
                return
            parent.child_refs -= 1
            node = parent


def _malloc_trim() -> None:
    """Return free heap pages to the system (glibc); a no-op elsewhere."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
