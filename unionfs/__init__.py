"""unionfs: a union-mount filesystem with a kernel-overlayfs-compatible upper directory."""

__version__ = "0.1.0"
