"""unionfs: a union-mount filesystem with a kernel-overlayfs-compatible upper directory.

The modules a request runs through may be compiled by mypyc (setup.py, UNIONFS_MYPYC=1
at build time; off by default): each then has
an extension module beside its .py source, and the build writes _compiled.txt, the hash
of every compiled module's source. They are used only if every hash still matches its
.py and UNIONFS_PURE is unset or 0; otherwise all of them are imported from their
source (the compiled modules call one another's C functions directly, so it is all or
none), and a tree edited after its build, or run from a checkout with PYTHONPATH, runs
what it says. `compiled` names what is in use, `compiled_why` why not, `stale` whether
the extensions are there but out of date (scripts/setup reinstalls then).
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys

__version__ = "0.1.0"

_HERE = os.path.dirname(__file__)
_MANIFEST = os.path.join(_HERE, "_compiled.txt")


def _stale(lines: list[list[str]]) -> str:
    """Why the build's extensions no longer match the sources, or ""."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for module, digest in lines:
        if not os.path.exists(os.path.join(_HERE, module + suffix)):
            return f"{module}{suffix} is missing"
        try:
            with open(os.path.join(_HERE, module + ".py"), "rb") as src:
                if hashlib.sha256(src.read()).hexdigest() != digest:
                    return f"{module}.py changed since the build"
        except FileNotFoundError:
            return f"{module}.py is missing"
    return ""


def _check() -> tuple[tuple[str, ...], str, bool]:
    """(the compiled modules to use, or (); why none are, or ""; whether a reinstall would
    compile them again)."""
    if os.environ.get("UNIONFS_PURE", "") not in ("", "0"):
        return (), "UNIONFS_PURE is set", False
    try:
        with open(_MANIFEST) as f:
            lines = [line.split() for line in f if line.strip()]
    except FileNotFoundError:
        return (), "not compiled (built without UNIONFS_MYPYC=1, or mypyc failed)", False
    why = _stale(lines)
    if why:
        return (), f"{why}: reinstall to compile them again", True
    return tuple(module for module, _ in lines), "", False


class _Source(importlib.machinery.PathFinder):
    """Imports every module of the package that has a .py and is not among the compiled
    ones in use from that .py, never from an extension module beside it (one an earlier
    build left, say)."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):  # type: ignore[override]
        package, _, module = fullname.rpartition(".")
        source = os.path.join(_HERE, module + ".py")
        if package != __name__ or module in compiled or not os.path.exists(source):
            return None
        return importlib.util.spec_from_file_location(
            fullname, source, loader=importlib.machinery.SourceFileLoader(fullname, source))


compiled, compiled_why, stale = _check()
sys.meta_path.insert(0, _Source)


def describe_modules() -> str:
    """One line for `--version` and the daemon's log: compiled or not, and why not."""
    if compiled:
        return f"compiled by mypyc ({len(compiled)}: {', '.join(compiled)})"
    return f"pure Python ({compiled_why})"
