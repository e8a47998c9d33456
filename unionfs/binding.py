"""Which FUSE binding the daemon runs on, and which of its fast paths it has.

The built-in binding is unionfs._pyfuse3: pyfuse3 3.5.0 with the patch series in
patches/pyfuse3, compiled by pip from this tree (docs/binding.md). Where it is not built
(a tree used without `pip install`), or where UNIONFS_BINDING=pyfuse3 asks for it, a
stock pyfuse3 serves instead: the same filesystem, with more requests and more time
per request. Nothing here imports the binding before `load()` is called, so the CLI's
errors never need it.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType

BUILTIN = "unionfs._pyfuse3"
STOCK = "pyfuse3"
#: the environment variable that picks one: "builtin", "pyfuse3", or unset (built-in if built)
CHOICE = "UNIONFS_BINDING"

#: the fast paths unionfs uses, each with the UNIONFS_PATCH level that brings it
#: (patches/pyfuse3/series; a stock pyfuse3 has none)
FAST_PATHS = (
    ("cache_readdir", 1),    # the kernel keeps directory listings
    ("cache_symlinks", 1),   # ... and symlink targets
    ("dont_mask", 1),        # the umask left to the daemon (a default ACL overrides it)
    ("no_opendir", 2),       # no OPENDIR/RELEASEDIR round trips
    ("queued_requests", 3),  # a queued request taken without a trip through epoll
    ("poll_us", 4),          # a short poll for the next request before sleeping
    ("read_fds", 5),         # READs answered by libfuse from an fd, without Python
    ("idle_tasks", 6),       # no cascade of ending tasks before the first request after a burst
    ("fallocate", 7),        # fallocate(2) modes: preallocate, punch holes, KEEP_SIZE
    ("lseek", 7),            # SEEK_DATA / SEEK_HOLE see the holes of sparse files
)


@dataclass(frozen=True)
class Binding:
    module: ModuleType
    name: str              # BUILTIN or STOCK
    fast_paths: tuple[str, ...]
    fallback_reason: str   # why the built-in one does not serve ("" when it does)

    @property
    def builtin(self) -> bool:
        return self.name == BUILTIN

    def describe(self) -> str:
        """One line for `--version` and the daemon's log."""
        what = (f"built-in pyfuse3 {self.module.__version__} ({BUILTIN}, patches/pyfuse3)"
                if self.builtin else
                f"{'patched' if self.fast_paths else 'stock'} pyfuse3 "
                f"{getattr(self.module, '__version__', '?')} "
                f"({os.path.dirname(self.module.__file__ or '?')})")
        return f"{what}; fast paths: {', '.join(self.fast_paths) or 'none'}"

    def missing(self) -> tuple[str, ...]:
        return tuple(name for name, _ in FAST_PATHS if name not in self.fast_paths)


#: the FUSE passthrough data path (patch 0010): the binding registers backing files
PASSTHROUGH = "passthrough"


def fast_paths(module: ModuleType) -> tuple[str, ...]:
    level = getattr(module, "UNIONFS_PATCH", 0)
    found = tuple(name for name, needs in FAST_PATHS if level >= needs)
    return found + ((PASSTHROUGH,) if hasattr(module, "backing_open") else ())


_loaded: Binding | None = None


def load() -> Binding:
    """The binding this process uses (chosen once). ImportError says why there is none."""
    global _loaded
    if _loaded is None:
        _loaded = _choose(os.environ.get(CHOICE, ""))
    return _loaded


def _choose(choice: str) -> Binding:
    if choice not in ("", "builtin", STOCK):
        raise ImportError(f"{CHOICE}={choice!r}: choose 'builtin' or '{STOCK}'")
    reason = f"{CHOICE}={STOCK}"
    if choice != STOCK:
        try:
            module = importlib.import_module(BUILTIN)
            if getattr(module, "__file__", None) is None:
                # the unbuilt source directory, imported as a namespace package
                raise ImportError(f"no compiled {BUILTIN} module")
            return Binding(module, BUILTIN, fast_paths(module), "")
        except ImportError as e:
            if choice == "builtin":
                raise ImportError(f"the built-in FUSE binding is not built ({e}); "
                                  "build it with `pip install .`") from None
            reason = f"the built-in binding is not built ({e})"
    try:
        module = importlib.import_module(STOCK)
    except ImportError as e:
        raise ImportError(f"no FUSE binding: {reason}, and pyfuse3 is not installed ({e})") from None
    return Binding(module, STOCK, fast_paths(module), reason)
