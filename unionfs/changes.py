"""The changes log: which view paths a mount has changed, for `unionfs diff`.

Format (an interface: other tools may read it): ``WORKDIR/changes.log`` is a
text file of records, one per line::

    <kind> <path>

where kind is ``A`` (a name was made), ``C`` (an object changed in place:
data, mode, owner, times, xattrs), ``D`` (a name was removed) or ``T`` (a
name was made and everything below it is new too: a directory moved there),
and path is the absolute view path with ``\\``, newline and bytes outside
printable ASCII escaped as ``\\xHH``. A record is written (write(2) on an
O_APPEND fd) before the request is answered, so a killed daemon loses none.

The log only says *where* to look; what changed is decided by comparing the
upper directory with the lowers at those paths, so the upper stays the truth.
"""
from __future__ import annotations

import os

LOG_NAME = "changes.log"


def escape(path: bytes) -> bytes:
    out = bytearray()
    for b in path:
        if b == 0x5C or b < 0x21 or b > 0x7E:
            out += b"\\x%02x" % b
        else:
            out.append(b)
    return bytes(out)


def unescape(text: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] == 0x5C and i + 3 < len(text) + 0 and text[i + 1:i + 2] == b"x":
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return bytes(out)


class Journal:
    """Appends change records; a no-op without a workdir (read-only mounts)."""

    def __init__(self, workdir: str | None) -> None:
        self.fd: int | None = None
        if workdir:
            self.fd = os.open(os.path.join(workdir, LOG_NAME),
                              os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def record(self, kind: bytes, path: bytes, tree: bool = False) -> None:
        if self.fd is None or not path:
            return
        if tree and kind == b"A":
            kind = b"T"
        os.write(self.fd, kind + b" " + escape(path) + b"\n")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
