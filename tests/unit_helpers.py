"""Helpers shared by the FUSE-free unit tests: drive a Union the way the kernel would."""
from __future__ import annotations

import errno
import inspect

import trio


def do(fn, *args):
    """Call a Union method, under trio.run when it is a coroutine function."""
    if inspect.iscoroutinefunction(fn):
        return trio.run(fn, *args)
    res = fn(*args)
    if inspect.iscoroutine(res):
        async def wait():
            return await res
        return trio.run(wait)
    return res


def walk(u, path: str):
    """Look a view path up component by component, counting references like the kernel."""
    node = u.root
    for part in [p for p in path.split("/") if p]:
        child, _ = u.lookup(node, part.encode())
        if child is None:
            raise FileNotFoundError(errno.ENOENT, "not in the view", path)
        node = u.nodes.ref(child)
    return node
