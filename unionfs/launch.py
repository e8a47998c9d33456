"""The `unionfs` command's first step: restart a mount on the C allocator, cheaply.

CPython's own allocator keeps an arena while one object in it lives, so after the
kernel forgets a million nodes the daemon would keep most of their memory; on the
C allocator (PYTHONMALLOC=malloc, plus malloc_trim after a large forget, nodes.py)
it goes back near where it started. The variable only works at interpreter start, so a mount
starts once more with it, here, before anything but os and sys is imported (the
restart costs only a bare interpreter start) and before anything has changed.
"""
from __future__ import annotations

import os
import sys
from typing import NoReturn

#: every command but `mount` (which, like the mount-helper form, gets the restart);
#: tests/test_cli.py checks this against cli.COMMANDS
OTHER_COMMANDS = frozenset({"umount", "diff", "mark", "export", "import", "inspect"})


def wants_restart(argv: list[str], environ: dict[str, str] | os._Environ[str]) -> bool:
    """A mount (command, helper or mount-program form) not yet on a chosen allocator.
    A PYTHONMALLOC already set (by the restart, or by a user debugging) is kept."""
    if environ.get("PYTHONMALLOC") or not argv:
        return False
    return argv[0] not in OTHER_COMMANDS and argv[0] not in ("-h", "--help", "--version")


def main() -> NoReturn:
    orig = list(getattr(sys, "orig_argv", []))
    if orig and wants_restart(sys.argv[1:], os.environ):
        os.execve(sys.executable, orig, dict(os.environ, PYTHONMALLOC="malloc"))
    from .cli import main as cli_main
    cli_main()
