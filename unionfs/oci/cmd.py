"""The command-line side of `unionfs export`, `unionfs import` and `unionfs inspect`.

Only argparse and the standard library are imported at module level, so the CLI
stays quick to start for its other commands.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from ..config import ConfigError


# -- export ---------------------------------------------------------------------------

def add_export(p: argparse.ArgumentParser) -> None:
    p.usage = ("unionfs export [-o FILE|-] [--gzip|--zstd] [--mtime EPOCH] [--rescan] "
               "[--lower L1:L2] [--workdir DIR] MOUNTPOINT|UPPER")
    p.add_argument("target", metavar="MOUNTPOINT|UPPER")
    p.add_argument("-o", "--output", metavar="FILE", default="-",
                   help="where to write the layer (default: standard output)")
    z = p.add_mutually_exclusive_group()
    z.add_argument("--gzip", action="store_true", help="gzip the layer (media type ...tar+gzip)")
    z.add_argument("--zstd", action="store_true", help="zstd the layer (media type ...tar+zstd)")
    p.add_argument("--mtime", metavar="EPOCH", type=_epoch,
                   help="clamp every time to at most EPOCH (as SOURCE_DATE_EPOCH does)")
    p.add_argument("--rescan", action="store_true",
                   help="walk the upper directory instead of trusting the changes log")
    p.add_argument("--workdir", metavar="DIR",
                   help="work directory of an unmounted union (default: .UPPER.unionfs-work beside UPPER)")
    p.add_argument("--lower", metavar="L1:L2",
                   help="lower layers, top-most first (default: those the last mount recorded)")


def _epoch(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a negative time: '{text}'")
    return value


def run_export(args: argparse.Namespace) -> int:
    from .. import diffcmd
    from .export import ExportError, Progress, plan, write_tar
    from .tarstream import AtomicFile, LayerWriter, StreamError

    to_stdout = args.output == "-"
    if to_stdout and sys.stdout.isatty():
        raise ConfigError("refusing to write an archive to a terminal (give -o FILE)")
    compression = "gzip" if args.gzip else "zstd" if args.zstd else None
    with diffcmd.opened(args) as t:
        cand = diffcmd.candidates(t, args.rescan)
        if cand.note:
            print(f"unionfs: note: {cand.note}; rebuilt it from the upper directory", file=sys.stderr)
        layers = diffcmd.open_layers(t)
        try:
            items = plan(layers, cand.paths)
            out = None
            if not to_stdout:
                try:
                    out = AtomicFile(args.output)
                except OSError as e:
                    raise ConfigError(f"cannot create '{args.output}': {e.strerror}") from None
            try:
                lw = LayerWriter(out.f if out else sys.stdout.buffer, compression)
                write_tar(items, lw, args.mtime, Progress(sys.stderr.isatty()))
                lw.close()
                if out:
                    out.commit()
            except BaseException:
                if out:
                    out.abort()
                raise
        except (ExportError, StreamError) as e:
            raise ConfigError(str(e)) from None
        except OSError as e:
            raise ConfigError(f"export failed: {e.filename or ''} {e.strerror}") from None
        finally:
            layers.close()
    report = sys.stderr if to_stdout else sys.stdout
    print(f"digest {lw.digest}", file=report)
    print(f"diffid {lw.diff_id}", file=report)
    return 0


# -- import ---------------------------------------------------------------------------

def add_import(p: argparse.ArgumentParser) -> None:
    p.usage = "unionfs import [--digest sha256:HEX] ARCHIVE DIR"
    p.add_argument("archive", metavar="ARCHIVE",
                   help="a layer (tar, tar.gz, tar.zst), a `docker save` tar, or an OCI image "
                        "layout (directory or tar)")
    p.add_argument("dest", metavar="DIR", help="the new layer directory (images: DIR/0, DIR/1, ...)")
    p.add_argument("--digest", metavar="sha256:HEX",
                   help="refuse a layer archive whose sha256 is not this")


def run_import(args: argparse.Namespace) -> int:
    from .importer import Refused, import_archive

    try:
        result = import_archive(args.archive, args.dest, args.digest)
    except Refused as e:
        raise ConfigError(str(e)) from None
    if result.skipped_xattrs:
        print("unionfs: warning: left out xattrs a layer does not carry: "
              + ", ".join(sorted(result.skipped_xattrs)), file=sys.stderr)
    top_first = list(reversed(result.layers))
    print(":".join(d for d, *_ in top_first))
    if result.is_image:
        for d, diff_id, created, created_by in top_first:
            print(f"{d}\t{diff_id}\t{created}\t{created_by}")
    return 0
