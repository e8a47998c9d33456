"""Open a stack of layers and resolve paths in it: the one constructor of a layer stack.

The daemon (union.Union) opens its layers here, and so does everything that reads
a union or its layers without the daemon: `unionfs diff` and `mark` (diff.Layers),
the layer commands (unionfs/oci: export, import, inspect). They need no FUSE and
no mount::

    stack = LayerStack(upper, [lower1, lower2])      # upper may be None
    try:
        r = stack.resolver()                         # merge.Resolver: the union's rules
        root = r.root_node()
        entry = r.resolve(root, b"etc")              # what the view shows at /etc
        ...
        base = stack.resolver(upper=False)           # the lowers alone, the same fds
        below = stack.resolver(upper=False, lowers=slice(1, None))
    finally:
        stack.close()

diff.View turns a resolver into path lookups (``View(stack.resolver()).lookup(b"/etc")``).
The on-disk format the layers are read in is the stack's Format (format.py).
"""
from __future__ import annotations

from typing import Sequence

from .format import OVERLAY, Format
from .layers import FdCache, Layer
from .merge import Resolver


class LayerStack:
    """Layer directories, opened: an optional upper (index 0), then the lowers, top-most
    first (index 1 on), with one cache of directory fds that every resolver over them
    shares. *writable*: the upper is the daemon's to change. *noatime_lowers*: the lowers
    are opened through mounts that never update access times, where the kernel allows
    (layers.Layer: for the daemon's FUSE passthrough)."""

    def __init__(self, upper: str | None, lowers: Sequence[str], fmt: Format = OVERLAY, *,
                 writable: bool = False, cache: FdCache | None = None,
                 noatime_lowers: bool = False) -> None:
        self.fmt = fmt
        self.cache = cache if cache is not None else FdCache()
        self.upper: Layer | None = None
        self.lowers: list[Layer] = []
        try:
            if upper:
                self.upper = Layer(upper, 0, writable)
            for i, path in enumerate(lowers):
                self.lowers.append(Layer(path, i + 1, False, noatime=noatime_lowers))
        except BaseException:
            self.close()
            raise

    def resolver(self, upper: bool = True, lowers: slice | None = None) -> Resolver:
        """A resolver over the stack, or over part of it: without the upper, or with only
        a slice of the lowers (their layer numbers stay those of the whole stack)."""
        return Resolver(self.upper if upper else None,
                        self.lowers if lowers is None else self.lowers[lowers],
                        self.cache, self.fmt)

    def close(self) -> None:
        self.cache.clear()
        for layer in self.lowers + ([self.upper] if self.upper else []):
            layer.close()
        self.lowers = []
        self.upper = None
