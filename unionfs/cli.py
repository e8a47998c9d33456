"""The `unionfs` command: subcommands plus the mount(8) helper form.

Every failure is one line on stderr (`unionfs: error: ...`) and a non-zero
exit: 2 for usage mistakes, 1 for everything else. Nothing on disk is touched
until the whole request has been validated.

Adding a subcommand: write `add_X(parser)` and `run_X(args) -> int` and add
one entry to COMMANDS.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable, NoReturn, Sequence

from . import __version__, diffcmd
from .oci import cmd as oci
from .config import ConfigError, build_config, check_dev_fuse, parse_options, split_lowers

PROG = "unionfs"
# mount(8) runs helpers without PATH; libfuse and we may still run fusermount3/umount.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class UsageError(Exception):
    """A malformed command line (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# -- mount ------------------------------------------------------------------

def add_mount(p: argparse.ArgumentParser) -> None:
    p.usage = (f"{PROG} mount [-o OPTS] [--rootfs] [--workdir DIR] [-f] [--debug] "
               "LOWER[:LOWER...] [UPPER] MOUNTPOINT")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                   help="comma-separated mount options (see README), may repeat")
    p.add_argument("--rootfs", action="store_true",
                   help="same as -o rootfs: allow_other,dev,suid,default_permissions (given first, "
                        "so -o nosuid etc. still override it)")
    p.add_argument("--workdir", metavar="DIR", help="work directory (default: .UPPER.unionfs-work beside UPPER)")
    p.add_argument("-f", "--foreground", action="store_true", help="do not daemonise; log to stderr")
    p.add_argument("--debug", action="store_true", help="log every request")
    p.add_argument("--fsname", help=argparse.SUPPRESS)  # set by the mount-helper form
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="lower layers (top-most first), optional upper layer, mountpoint")


def run_mount(args: argparse.Namespace) -> int:
    from . import mount

    opts = parse_options((["rootfs"] if args.rootfs else []) + args.options)
    if args.fsname and not opts.fsname:
        opts.fsname = args.fsname
    lowers, upper, mountpoint = _layers_from(args.paths, opts)
    config, create_workdir = build_config(lowers, upper, mountpoint, opts, workdir=args.workdir,
                                          foreground=args.foreground, debug=args.debug)
    check_dev_fuse()
    if create_workdir and config.workdir:
        try:
            os.mkdir(config.workdir, 0o700)
        except OSError as e:
            raise ConfigError(f"cannot create workdir '{config.workdir}': {e.strerror}") from None
    mount.start(config, created_workdir=create_workdir)
    return 0


def _layers_from(paths: list[str], opts) -> tuple[list[str], str | None, str]:
    """Positional arguments and lowerdir=/upperdir= options → (lowers, upper, mountpoint)."""
    if opts.lowerdir is not None:
        if len(paths) != 1:
            raise UsageError("with -o lowerdir= give only the MOUNTPOINT as argument"
                             if paths else "missing MOUNTPOINT")
        return opts.lowerdir, opts.upperdir, paths[0]
    if len(paths) < 2:
        raise UsageError("too few arguments: need LOWER[:LOWER...] [UPPER] MOUNTPOINT")
    if len(paths) > 3:
        raise UsageError(f"too many arguments: {' '.join(paths[3:])}")
    lowers = split_lowers(paths[0])
    if len(paths) == 3:
        if opts.upperdir is not None:
            raise UsageError("upper layer given twice (argument and -o upperdir=)")
        return lowers, paths[1], paths[2]
    return lowers, opts.upperdir, paths[1]


# -- umount -----------------------------------------------------------------

def add_umount(p: argparse.ArgumentParser) -> None:
    p.add_argument("-R", "--recursive", action="store_true",
                   help="first unmount what is mounted below MOUNTPOINT (e.g. /proc of a root), deepest first")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")


def run_umount(args: argparse.Namespace) -> int:
    from . import mount

    mount.unmount(args.mountpoint, recursive=args.recursive)
    return 0


COMMANDS: dict[str, Command] = {
    "mount": Command("mount a union", add_mount, run_mount),
    "umount": Command("unmount a union and wait for its daemon to exit", add_umount, run_umount),
    "diff": Command("list what a union changed relative to its lower layers (like docker diff)",
                    diffcmd.add_diff, diffcmd.run_diff),
    "mark": Command("name the union's current state, for `diff --since NAME`",
                    diffcmd.add_mark, diffcmd.run_mark),
    "export": Command("write a union's changes as an OCI image layer (tar, tar+gzip, tar+zstd)",
                      oci.add_export, oci.run_export),
    "import": Command("unpack an OCI layer or image (docker save, OCI layout) into layer directories",
                      oci.add_import, oci.run_import),
    "inspect": Command("show what each layer of a union holds and wastes (like dive)",
                       oci.add_inspect, oci.run_inspect),
}


# -- dispatch ---------------------------------------------------------------

class VersionAction(argparse.Action):
    """`--version`: ours, whether the modules are compiled, and which FUSE binding a mount
    would run on (loaded only here)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from . import binding, describe_modules

        try:
            fuse = binding.load().describe()
        except ImportError as e:
            fuse = f"none ({str(e).removeprefix('no FUSE binding: ')})"
        sys.stdout.write(f"{PROG} {__version__}\nFUSE binding: {fuse}\n"
                         f"modules: {describe_modules()}\n")
        parser.exit()


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="Union-mount filesystem (overlayfs-compatible) on FUSE.",
        epilog="Mount-helper form (used by mount(8) and /etc/fstab): "
               f"{PROG} SOURCE MOUNTPOINT -o lowerdir=L1:L2[,upperdir=U,workdir=W,...]. "
               "Mount-program form (fuse-overlayfs's, used by podman and buildah): "
               f"{PROG} [-f] [-d] -o lowerdir=L1:L2,upperdir=U,workdir=W[,...] MOUNTPOINT")
    parser.add_argument("--version", action=VersionAction, nargs=0,
                        help="show the version and the FUSE binding, then exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        cmd.add_arguments(sub.add_parser(name, help=cmd.help, description=cmd.help))
    return parser


def helper_argv(argv: Sequence[str]) -> list[str] | None:
    """Rewrite `unionfs SOURCE MOUNTPOINT -o OPTS ...` (mount.fuse3's call) as `mount`.

    It is recognised by a first word that is no subcommand, a second that is
    no option, and a `-o` somewhere; SOURCE becomes the fsname shown by mount(8).
    """
    if (len(argv) >= 3 and argv[0] not in COMMANDS and not argv[0].startswith("-")
            and not argv[1].startswith("-") and any(a.startswith("-o") for a in argv[2:])):
        rest = [a for a in argv[2:] if a not in ("-n", "-s", "-v")]  # mount(8) flags we ignore
        if not any("lowerdir=" in a for a in rest):
            raise UsageError("mount helper form needs -o lowerdir=...")
        return ["mount", "--fsname", argv[0], *rest, argv[1]]
    return None


#: what fuse-overlayfs adds in front of its options when run as root: a container's
#: root filesystem is used by every user in it (allow_other) and has setuid binaries
MOUNT_PROGRAM_ROOT_DEFAULTS = "allow_other,suid,noatime"


def mount_program_argv(argv: Sequence[str]) -> list[str] | None:
    """Rewrite `unionfs [-f] [-d] [-o OPTS]... MOUNTPOINT` as `mount`.

    This is fuse-overlayfs's command line, which containers/storage (podman, buildah,
    CRI-O) runs as its overlay `mount_program`: every layer in -o, the mountpoint the
    only argument. It is recognised by a first word that is one of those flags.
    """
    if not argv or not (argv[0] in ("-f", "-d", "--debug") or argv[0].startswith("-o")):
        return None
    options: list[str] = []
    flags: list[str] = []
    paths: list[str] = []
    words = iter(argv)
    for word in words:
        if word == "-o":
            value = next(words, None)
            if value is None:
                raise UsageError("option -o needs a value")
            options.append(value)
        elif word.startswith("-o"):
            options.append(word[2:])
        elif word == "-f":
            flags.append("-f")
        elif word in ("-d", "--debug"):  # as in libfuse: debug output, in the foreground
            flags += ["-f", "--debug"]
        elif word.startswith("-") and word != "-":
            raise UsageError(f"unknown option '{word}' (this form takes -f, -d and -o OPTS)")
        else:
            paths.append(word)
    if not paths:
        raise UsageError("missing MOUNTPOINT")
    if len(paths) > 1:
        raise UsageError(f"too many arguments: {' '.join(paths)} (give only the MOUNTPOINT; "
                         "the layers go in -o lowerdir=,upperdir=,workdir=)")
    if not any("lowerdir=" in o for o in options):
        raise UsageError("missing -o lowerdir=...")
    defaults = [MOUNT_PROGRAM_ROOT_DEFAULTS] if os.geteuid() == 0 else []
    return ["mount", *(f"-o{o}" for o in defaults + options), *dict.fromkeys(flags), "--", paths[0]]


def dispatch(argv: Sequence[str]) -> int:
    argv = list(argv)
    argv = helper_argv(argv) or mount_program_argv(argv) or argv
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        raise UsageError(f"unknown command '{argv[0]}' (choose from {', '.join(COMMANDS)})")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        raise UsageError(f"missing command (try '{PROG} --help')")
    return COMMANDS[args.command].run(args)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point: run and exit; errors become exactly one line, never a traceback."""
    os.environ.setdefault("PATH", DEFAULT_PATH)
    from .mount import MountError

    try:
        code = dispatch(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        code = _fail(str(e), 2)
    except (ConfigError, MountError) as e:
        code = _fail(str(e), 1)
    except KeyboardInterrupt:
        code = 130
    except SystemExit:  # argparse --help/--version
        raise
    except BaseException as e:  # noqa: BLE001 - last resort, still one line
        code = _fail(f"internal error: {type(e).__name__}: {e}", 1)
    sys.exit(code)


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return code
