"""What a mount is: the validated description handed from the CLI to the daemon.

Kept free of FUSE and of argument parsing so that the filesystem core, the
daemon and the tests can all build one directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MountConfig:
    """A validated mount request. All paths are absolute and resolved."""

    lowers: list[str]                 # top-most first, as overlayfs lowerdir
    upper: str | None                 # None: read-only union of the lowers
    workdir: str | None               # None only when upper is None
    mountpoint: str
    readonly: bool = False            # `ro`: EROFS on every write, even with an upper
    allow_other: bool = False
    default_permissions: bool = True  # the kernel checks mode bits; always on
    dev: bool = False                 # honour device nodes (mount(8) `dev`)
    suid: bool = False                # honour setuid bits (mount(8) `suid`)
    fsync: bool = True                # fsync copied-up data before it becomes visible
    foreground: bool = False
    debug: bool = False
    fsname: str = "unionfs"
    extra: dict[str, str] = field(default_factory=dict)  # unrecognised-but-harmless mount options

    @property
    def writable(self) -> bool:
        return self.upper is not None and not self.readonly
