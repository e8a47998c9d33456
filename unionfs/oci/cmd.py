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


def _number(convert, low: float, high: float | None, what: str):
    """An argparse type: *convert* (int or float) of the text, within [low, high]."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: '{text}'") from None
        if value < low or (high is not None and value > high):
            span = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"'{text}' is not {span}")
        return value
    return parse


_epoch = _number(int, 0, None, "a number of seconds")
#: efficiency is a score in [0, 1]
_ratio = _number(float, 0, 1, "a number")
#: wasted bytes over the user layers' bytes can pass 1 (most waste may lie in the bottom layer)
_fraction = _number(float, 0, None, "a number")


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


# -- inspect --------------------------------------------------------------------------

def add_inspect(p: argparse.ArgumentParser) -> None:
    p.usage = ("unionfs inspect [--json] [--html FILE] [--which PATH] [--top N] "
               "[--lowest-efficiency F] [--highest-wasted-bytes N] "
               "[--highest-user-wasted-percent F] MOUNTPOINT|L1:L2:...")
    p.add_argument("source", metavar="MOUNTPOINT|L1:L2:...",
                   help="a unionfs mountpoint, or layer directories top-most first")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page")
    p.add_argument("--which", metavar="PATH", help="which layer provides PATH, and which it shadows")
    p.add_argument("--top", metavar="N", type=int, default=20, help="wasted paths listed (default 20)")
    p.add_argument("--lowest-efficiency", metavar="F", type=_ratio,
                   help="fail (exit 1) if the efficiency is below F (0..1)")
    p.add_argument("--highest-wasted-bytes", metavar="N", type=_size,
                   help="fail (exit 1) if more than N bytes are wasted (suffixes KB, MB, GB, KiB, MiB, GiB)")
    p.add_argument("--highest-user-wasted-percent", metavar="F", type=_fraction,
                   help="fail (exit 1) if the wasted bytes are more than F (a fraction: 0.1 is "
                        "10%%) of the bytes of the layers above the bottom one")


_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
          "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}


def _size(text: str) -> int:
    import re
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: '{text}'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _inspect_layers(source: str) -> list[str]:
    """The layer directories of SOURCE, top-most first."""
    from .. import diffcmd, runstate
    from ..config import FSTYPE, split_lowers

    path = os.path.realpath(source)
    if ":" not in source and os.path.isdir(path):
        entry = runstate.top_mount(path)
        if entry is not None and entry.fstype == FSTYPE:
            t = diffcmd.locate(path, None, None)
            t.close()
            return [t.upper, *t.lowers]
    paths = split_lowers(source)
    for p in paths:
        if not os.path.isdir(p):
            raise ConfigError(f"layer '{p}' is not a directory")
    return [os.path.realpath(p) for p in paths]


def run_inspect(args: argparse.Namespace) -> int:
    import json
    from .inspect import Stack, analyse, which

    try:
        stack = Stack(_inspect_layers(args.source))
    except OSError as e:
        raise ConfigError(f"cannot open the layers: {e.filename or ''} {e.strerror}") from None
    try:
        if args.which is not None:
            from ..diff import normalize
            try:
                path = normalize(os.fsencode(args.which))
            except ValueError as e:
                raise ConfigError(str(e)) from None
            w = which(stack, path)
            if args.json:
                print(json.dumps(w.to_json()))
            else:
                print(f"{w.path}: {'provided by ' + w.layer if w.layer else 'not in the view'}")
                for s in w.shadows:
                    print(f"  shadows {s}")
            return 0
        report = analyse(stack)
    except OSError as e:
        raise ConfigError(f"inspect failed: {e.filename or ''} {e.strerror}") from None
    finally:
        stack.close()
    if args.html:
        from .html import render
        from .tarstream import AtomicFile
        try:
            out = AtomicFile(args.html)
        except OSError as e:
            raise ConfigError(f"cannot create '{args.html}': {e.strerror}") from None
        try:
            out.f.write(render(report, f"unionfs inspect {args.source}").encode())
            out.commit()
        except BaseException:
            out.abort()
            raise
    if args.json:
        print(json.dumps(report.to_json(args.top)))
    else:
        _print_report(report, args.top)
    failed = []
    if args.lowest_efficiency is not None and report.efficiency < args.lowest_efficiency:
        failed.append(f"efficiency {report.efficiency:.4f} is below --lowest-efficiency "
                      f"{args.lowest_efficiency}")
    if args.highest_wasted_bytes is not None and report.wasted_bytes > args.highest_wasted_bytes:
        failed.append(f"{report.wasted_bytes} wasted bytes are more than --highest-wasted-bytes "
                      f"{args.highest_wasted_bytes}")
    if (args.highest_user_wasted_percent is not None
            and report.user_wasted_percent > args.highest_user_wasted_percent):
        failed.append(f"user wasted {report.user_wasted_percent:.4f} is more than "
                      f"--highest-user-wasted-percent {args.highest_user_wasted_percent}")
    for line in failed:
        print(f"unionfs: inspect: FAIL: {line}", file=sys.stderr)
    return 1 if failed else 0


def _print_report(report, top: int) -> None:
    w = max([len(lr.path) for lr in report.layers] + [5])
    print(f"{'LAYER':<{w}} {'FILES':>8} {'BYTES':>14} {'ADDED':>7} {'MODIFIED':>8} {'REMOVED':>7} "
          f"{'SHADOWED':>8} {'SHADOWED_BYTES':>14}")
    for lr in report.layers:
        print(f"{lr.path:<{w}} {lr.files:>8} {lr.bytes:>14} {lr.added:>7} {lr.modified:>8} "
              f"{lr.removed:>7} {lr.shadowed_files:>8} {lr.shadowed_bytes:>14}")
    print(f"wasted_bytes: {report.wasted_bytes}")
    print(f"efficiency: {report.efficiency:.4f}")
    print(f"user_wasted_percent: {report.user_wasted_percent:.4f}")
    if report.wasted_paths:
        print("largest wasted paths:")
        for wp in report.wasted_paths[:top]:
            print(f"  {wp['bytes']:>14}  {len(wp['layers']):>2}  {wp['path']}")
