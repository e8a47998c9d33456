"""Byte streams for layer archives: hashing, compression, atomic output files.

An OCI layer is named twice: by the digest of the blob as stored (compressed or
not) and by its diffID, the digest of the uncompressed tar. A chain of writers
computes both in one pass: tar -> HashingWriter (diffID) -> compressor ->
HashingWriter (blob digest) -> the output.

gzip is the standard library's, with a zero mtime and no file name in its
header so the same tar always gives the same bytes. zstd is the `zstd` command
(Debian's zstd package, installed by scripts/setup), run single-threaded so its
output does not depend on the number of cores.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import threading
from typing import BinaryIO, Callable

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class StreamError(Exception):
    """A compressor failed, or is missing."""


class HashingWriter:
    """Counts and sha256-hashes what passes through to *sink*."""

    def __init__(self, sink) -> None:
        self.sink = sink
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += len(data)
        self.sink.write(data)
        return len(data)

    def flush(self) -> None:
        self.sink.flush()

    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class _ZstdWriter:
    """Pipes what is written through `zstd -c`; a thread copies its output to *sink*."""

    def __init__(self, sink, level: int = 3) -> None:
        exe = shutil.which("zstd")
        if exe is None:
            raise StreamError("--zstd needs the zstd command (Debian package zstd)")
        self.proc = subprocess.Popen([exe, "-q", "-c", f"-{level}", "-T1", "--no-progress"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.sink = sink
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._copy, daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        assert self.proc.stdout is not None
        try:
            while chunk := self.proc.stdout.read(1 << 16):
                self.sink.write(chunk)
        except BaseException as e:  # noqa: BLE001 - re-raised by close()
            self.error = e

    def write(self, data) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.thread.join()
        code = self.proc.wait()
        if self.error is not None:
            raise self.error
        if code != 0:
            raise StreamError(f"zstd failed (exit status {code})")


class LayerWriter:
    """The writer chain for one layer: write the tar into it, close, read the digests."""

    def __init__(self, out: BinaryIO, compression: str | None) -> None:
        self.blob = HashingWriter(out)
        self._closer: Callable[[], None] | None = None
        if compression == "gzip":
            z = gzip.GzipFile(filename="", mode="wb", fileobj=self.blob, mtime=0, compresslevel=6)
            self._closer, inner = z.close, z
        elif compression == "zstd":
            zw = _ZstdWriter(self.blob)
            self._closer, inner = zw.close, zw
        elif compression is None:
            inner = self.blob
        else:
            raise ValueError(compression)
        self.tar = HashingWriter(inner) if compression else self.blob

    def write(self, data) -> int:
        return self.tar.write(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None
        self.blob.flush()

    @property
    def size(self) -> int:
        """Bytes of tar written so far."""
        return self.tar.size

    @property
    def digest(self) -> str:
        return self.blob.digest()

    @property
    def diff_id(self) -> str:
        return self.tar.digest()


class HashingReader:
    """sha256 of everything read through it, e.g. a blob while it is unpacked."""

    def __init__(self, src) -> None:
        self.src = src
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class ZstdReader:
    """`zstd -dc` over a file object; a thread feeds it so neither side blocks."""

    def __init__(self, src) -> None:
        exe = shutil.which("zstd")
        if exe is None:
            raise StreamError("a zstd archive needs the zstd command (Debian package zstd)")
        self.proc = subprocess.Popen([exe, "-q", "-d", "-c"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.src = src
        self.thread = threading.Thread(target=self._feed, daemon=True)
        self.thread.start()

    def _feed(self) -> None:
        assert self.proc.stdin is not None
        try:
            while chunk := self.src.read(1 << 16):
                self.proc.stdin.write(chunk)
        except (BrokenPipeError, OSError, ValueError):
            pass
        finally:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def read(self, n: int = -1) -> bytes:
        assert self.proc.stdout is not None
        data = self.proc.stdout.read(n)
        if not data:
            if self.proc.wait() != 0:
                raise StreamError("the zstd stream is corrupt or truncated")
        return data

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.thread.join()


def sniff(head: bytes) -> str | None:
    """The compression of a blob from its first bytes: "gzip", "zstd" or None."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return None


class AtomicFile:
    """A new file written beside its final name and renamed there only when complete, so a
    failed export leaves no partial archive under the name asked for."""

    def __init__(self, path: str) -> None:
        self.path = path
        d = os.path.dirname(os.path.abspath(path))
        self.tmp = os.path.join(d, f".{os.path.basename(path)}.unionfs-tmp-{os.getpid()}")
        self.f = open(self.tmp, "xb")

    def commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass
