"""What a mount is: the validated description handed from the CLI to the daemon.

Kept free of FUSE and of argument parsing so that the filesystem core, the
daemon and the tests can all build one directly.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Iterable


@dataclass
class MountConfig:
    """A validated mount request. All paths are absolute and resolved."""

    lowers: list[str]                 # top-most first, as overlayfs lowerdir
    upper: str | None                 # None: read-only union of the lowers
    workdir: str | None               # None only when upper is None
    mountpoint: str
    readonly: bool = False            # `ro`: EROFS on every write, even with an upper
    allow_other: bool = False         # see allow_other_default()
    default_permissions: bool = True  # the kernel checks mode bits; always on
    dev: bool = False                 # honour device nodes (mount(8) `dev`)
    suid: bool = False                # honour setuid bits (mount(8) `suid`)
    fsync: bool = True                # copy-ups made durable (deferred: see durable.py)
    volatile: bool = False            # no durability work at all: the upper is thrown away
    timeout: float = 86400.0          # seconds the kernel may trust an entry or attributes
    squash_uid: int | None = None     # every object shown as owned by this uid (squash_to_*)
    squash_gid: int | None = None
    static_nlink: bool = False        # every directory shown with st_nlink 1
    xattrs: bool = True               # noxattrs=1: no xattrs at all through the mount
    acl: bool = True                  # noacl: the kernel does not enforce POSIX ACLs
    writeback: bool = True            # the kernel's writeback cache (writeback=0: off)
    # FUSE passthrough: "auto" asks the kernel where the binding and privileges allow it
    # (then no writeback cache), "on" insists, "off" never asks (see fs.passthrough_plan);
    # lower files pass through only where nothing can copy them up (a read-only mount),
    # unless "all": then also on a writable mount, where a read-only fd opened on a lower
    # file keeps reading it after a copy-up (files.py)
    passthrough: str = "auto"
    poll_us: int = 200                # poll this long for the next request before sleeping
    foreground: bool = False
    debug: bool = False
    fsname: str = "unionfs"
    # the upper's xattrs under user.overlay. (kernel overlayfs's userxattr format) instead
    # of trusted.overlay.: asked for with -o userxattr, and the only one a mount without
    # CAP_SYS_ADMIN in the initial user namespace can write
    userxattr: bool = False
    # uidmapping=/gidmapping=: (id on disk, id shown, count) ranges (see owners.IdMap)
    uid_map: tuple[tuple[int, int, int], ...] | None = None
    gid_map: tuple[tuple[int, int, int], ...] | None = None
    # xattr_permissions=2: owners and modes kept in user.containers.override_stat (owners.py)
    override_stat: bool = False
    extra: dict[str, str] = field(default_factory=dict)  # unrecognised-but-harmless mount options

    @property
    def writable(self) -> bool:
        return self.upper is not None and not self.readonly


# ---------------------------------------------------------------------------
# Mount options and validation (used by the CLI; no side effects here, so a
# bad request can be rejected before anything on disk is touched).
# ---------------------------------------------------------------------------

FSTYPE = "fuse.unionfs"          # what /proc/self/mountinfo shows for our mounts
SUBTYPE = "unionfs"
DEV_FUSE_ENV = "UNIONFS_DEV_FUSE"  # tests point this at a missing path


MAX_POLL_US = 100_000


class ConfigError(ValueError):
    """A mistake in the mount request, reported to the user as one line."""


# Flags libfuse turns into kernel mount flags (verified against libfuse 3.14);
# we pass them through so `noexec` etc. in fstab behave as on any filesystem.
KERNEL_FLAGS = frozenset({"exec", "noexec", "sync", "async", "dirsync", "atime", "noatime"})

# Accepted and ignored: mount(8)/fstab bookkeeping, atime variants libfuse
# cannot pass on (FUSE mounts are relatime anyway), and kernel-overlayfs
# tuning options whose on-disk effect the core decides by itself.
IGNORED_FLAGS = frozenset({
    "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group",
    "_netdev", "nofail", "loud", "silent", "relatime", "norelatime",
    "strictatime", "nostrictatime", "diratime", "nodiratime", "lazytime",
    "nolazytime", "symfollow", "nosymfollow",
})
IGNORED_VALUED = {
    "redirect_dir": {"on", "off", "follow", "nofollow"},
    "index": {"on", "off"},
    "xino": {"on", "off", "auto"},
    "nfs_export": {"on", "off"},
    "uuid": {"on", "off", "null", "auto"},
    "metacopy": {"off"},
}
UNSUPPORTED = {
    "metacopy": "metacopy=on is not supported",
    "plugins": "plugins= is not supported (fuse-overlayfs's lower-layer plugins have no "
               "counterpart in unionfs)",
}


@dataclass
class MountOptions:
    """The parsed `-o` list. Later options override earlier ones, as in mount(8)."""

    lowerdir: list[str] | None = None
    upperdir: str | None = None
    workdir: str | None = None
    readonly: bool = False
    allow_other: bool | None = None   # None: allow_other_default()
    dev: bool = False
    suid: bool = False
    fsync: bool = True
    volatile: bool = False
    timeout: float = MountConfig.timeout
    squash_root: bool = False
    squash_uid: int | None = None
    squash_gid: int | None = None
    static_nlink: bool = False
    xattrs: bool = True
    acl: bool = True
    writeback: bool | None = None     # None: not given (on, unless passthrough is used)
    passthrough: str = MountConfig.passthrough
    poll_us: int = MountConfig.poll_us
    debug: bool = False
    fsname: str | None = None
    userxattr: bool = False
    uid_map: tuple[tuple[int, int, int], ...] | None = None
    gid_map: tuple[tuple[int, int, int], ...] | None = None
    override_stat: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    def squashed(self) -> tuple[int | None, int | None]:
        """squash_to_uid/gid win over squash_to_root, whatever their order (fuse-overlayfs)."""
        root = 0 if self.squash_root else None
        return (root if self.squash_uid is None else self.squash_uid,
                root if self.squash_gid is None else self.squash_gid)


def parse_id_map(name: str, value: str) -> tuple[tuple[int, int, int], ...]:
    """fuse-overlayfs's `ID:MAPPED:COUNT[:ID:MAPPED:COUNT...]`, all colon-separated (a comma
    would end the option): ids ID.. on disk are shown as MAPPED.., COUNT of them."""
    parts = value.split(":")
    if len(parts) % 3 or not all(p.isdigit() for p in parts):
        raise ConfigError(f"{name} must be ID:MAPPED-ID:COUNT[:ID:MAPPED-ID:COUNT...], not '{value}'")
    nums = [int(p) for p in parts]
    ranges = tuple((nums[i], nums[i + 1], nums[i + 2]) for i in range(0, len(nums), 3))
    for first, mapped, count in ranges:
        if count == 0 or first + count > 2**32 - 1 or mapped + count > 2**32 - 1:
            raise ConfigError(f"{name}: the range {first}:{mapped}:{count} is empty or past "
                              "the last id")
    return ranges


def split_escaped(text: str, sep: str) -> list[str]:
    """Split on *sep* unless backslash-escaped (overlayfs allows `\\:` in lowerdir)."""
    parts: list[str] = []
    cur: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            cur.append(nxt if nxt in (sep, "\\") else ch + nxt)
        elif ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def split_lowers(text: str) -> list[str]:
    """`L1:L2:...` → paths; empty entries are an error, not silently dropped."""
    lowers = split_escaped(text, ":")
    if lowers == [""]:
        raise ConfigError("the lower layer list is empty")
    if "" in lowers:
        raise ConfigError(f"empty path in lower layer list '{text}'")
    return lowers


def split_option_list(text: str) -> list[str]:
    """Split a comma list; a comma may be escaped (`\\,`) or inside double quotes, as
    containers/storage quotes an SELinux label: `context="u:r:t:s0:c1,c2"`. The quotes go."""
    items: list[str] = []
    cur: list[str] = []
    quoted = False
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            cur.append(nxt if nxt in (",", "\\") else ch + nxt)
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if quoted:
        raise ConfigError(f"unbalanced double quote in mount options '{text}'")
    items.append("".join(cur))
    return items


def parse_options(option_strings: Iterable[str]) -> MountOptions:
    """Parse mount(8)-style comma lists; unknown options are errors, never ignored.
    Empty fields (`a,,b`, which containers/storage writes) are skipped."""
    opts = MountOptions()
    for option_string in option_strings:
        for item in split_option_list(option_string):
            if item:
                _apply_option(opts, item)
    return opts


_FLAG_FIELDS: dict[str, tuple[str | None, bool]] = {
    "ro": ("readonly", True), "rw": ("readonly", False),
    "dev": ("dev", True), "nodev": ("dev", False),
    "suid": ("suid", True), "nosuid": ("suid", False),
    "allow_other": ("allow_other", True), "noallow_other": ("allow_other", False),
    "debug": ("debug", True), "userxattr": ("userxattr", True),
    "default_permissions": (None, True),  # always on
    # fuse-overlayfs's options, which containers/storage passes to its mount program
    "volatile": ("volatile", True),
    "noacl": ("acl", False),
    "static_nlink": ("static_nlink", True),
    "squash_to_root": ("squash_root", True),
}

# fuse-overlayfs options whose values only tune its own implementation (how many threads
# serve, how inode numbers are checked): accepted when well-formed, no effect on what the
# mount shows or stores. unionfs serves every request on one thread.
TUNING_INTS = frozenset({"threaded", "fast_ino"})
_STRING_FIELDS = {"upperdir", "workdir", "fsname"}
# name=0|1 options → (MountOptions field, the field's value for 1)
_BOOLS: dict[str, tuple[str, bool]] = {
    "fsync": ("fsync", True), "noxattrs": ("xattrs", False), "writeback": ("writeback", True),
}
PASSTHROUGH = ("auto", "on", "all", "off")
_VALUED = {"lowerdir", "poll_us", "passthrough", "squash_to_uid", "squash_to_gid", "timeout", "uidmapping", "gidmapping",
           "xattr_permissions", "context", *_BOOLS}


def selinux_enabled() -> bool:
    """Whether an SELinux policy is loaded (selinuxfs mounted with an enforce file)."""
    return os.path.exists("/sys/fs/selinux/enforce")


# Shorthands: one word for a usual set. `rootfs` is what a root filesystem
# needs (other users, device nodes, setuid binaries, mode-bit checks); it is
# expanded in place, so a later `nosuid` still wins.
SHORTHANDS: dict[str, tuple[str, ...]] = {
    "rootfs": ("allow_other", "dev", "suid", "default_permissions"),
}


def _apply_option(opts: MountOptions, item: str) -> None:
    name, has_value, value = item.partition("=")
    if name in SHORTHANDS:
        if has_value:
            raise ConfigError(f"mount option '{name}' takes no value")
        for expanded in SHORTHANDS[name]:
            _apply_option(opts, expanded)
        return
    if name in UNSUPPORTED and item != "metacopy=off":
        raise ConfigError(UNSUPPORTED[name])
    if name.startswith("x-") or name == "comment" or (name == "user" and has_value):
        opts.extra[name] = value  # userspace notes for mount(8)/systemd; mount.fuse3 passes user=NAME
        return
    if name in _FLAG_FIELDS or name in KERNEL_FLAGS or name in IGNORED_FLAGS:
        if has_value:
            raise ConfigError(f"mount option '{name}' takes no value")
        if name in _FLAG_FIELDS:
            attr, val = _FLAG_FIELDS[name]
            if attr:
                setattr(opts, attr, val)
        else:
            opts.extra[name] = ""
        return
    if (name not in _STRING_FIELDS and name not in IGNORED_VALUED and name not in _VALUED
            and name not in TUNING_INTS):
        raise ConfigError(f"unknown mount option '{item}'")
    if not value:
        raise ConfigError(f"mount option '{name}' needs a value")
    if name == "lowerdir":
        opts.lowerdir = split_lowers(value)
    elif name in _BOOLS:
        if value not in ("0", "1"):
            raise ConfigError(f"{name} must be 0 or 1, not '{value}'")
        setattr(opts, _BOOLS[name][0], (value == "1") is _BOOLS[name][1])
    elif name in ("squash_to_uid", "squash_to_gid"):
        if not value.isdigit() or int(value) >= 2**32 - 1:
            raise ConfigError(f"{name} must be a numeric id, not '{value}'")
        setattr(opts, "squash_" + name[-3:], int(value))
    elif name in ("uidmapping", "gidmapping"):
        setattr(opts, name[0] + "id_map", parse_id_map(name, value))
    elif name == "timeout":
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds < float("inf"):
            raise ConfigError(f"timeout must be a number of seconds, not '{value}'")
        opts.timeout = seconds
    elif name in TUNING_INTS:
        if not value.lstrip("-").isdigit():
            raise ConfigError(f"{name} must be a number, not '{value}'")
        opts.extra[name] = value
    elif name == "xattr_permissions":
        if value not in ("0", "2"):
            raise ConfigError("xattr_permissions=1 (owners and modes kept in "
                              "security.fuseoverlayfs.override_stat) is not supported; 2 "
                              "(user.containers.override_stat) is")
        opts.override_stat = value == "2"
    elif name == "context":
        if selinux_enabled():
            raise ConfigError("context= is not supported: unionfs does not label files for SELinux")
        opts.extra[name] = value  # no LSM here to apply the label: nothing to do
    elif name == "passthrough":
        if value not in PASSTHROUGH:
            raise ConfigError(f"passthrough must be auto, on, all or off, not '{value}'")
        opts.passthrough = value
    elif name == "poll_us":
        if not value.isdigit() or int(value) > MAX_POLL_US:
            raise ConfigError(f"poll_us must be a number of microseconds from 0 to {MAX_POLL_US},"
                              f" not '{value}'")
        opts.poll_us = int(value)
    elif name in IGNORED_VALUED:
        if value not in IGNORED_VALUED[name]:
            raise ConfigError(f"unsupported value in mount option '{item}'")
        opts.extra[name] = value
    else:
        setattr(opts, name, value)


def allow_other_default() -> bool:
    """Whether a mount lets in users other than the mounter when neither `allow_other` nor
    `noallow_other` is given: yes for root, as kernel overlayfs (which has no such rule)
    and fuse-overlayfs do. The kernel checks every access against the mode bits
    (default_permissions is always on), so other users get what the modes give them.
    Others may not ask for it unless /etc/fuse.conf has user_allow_other, so not for them."""
    return os.geteuid() == 0


def kernel_flag_options(config: MountConfig) -> set[str]:
    """The KERNEL_FLAGS given with -o (noexec, noatime, ...), for pyfuse3.init."""
    return {name for name in config.extra if name in KERNEL_FLAGS}


def escape_fuse_option(option: str) -> str:
    """libfuse splits option strings at commas; escape them inside a value (e.g. fsname)."""
    name, eq, value = option.partition("=")
    if not eq:
        return option
    return name + eq + value.replace("\\", "\\\\").replace(",", "\\,")


def default_workdir(upper: str) -> str:
    """Beside the upper (same filesystem, usually) but never inside it."""
    parent, base = os.path.split(upper.rstrip("/") or "/")
    return os.path.join(parent, f".{base}.unionfs-work")


def _within(path: str, top: str) -> bool:
    """True if *path* is *top* or below it (both resolved)."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def _resolve_dir(what: str, path: str) -> tuple[str, os.stat_result]:
    if not path:
        raise ConfigError(f"{what} path is empty")
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise ConfigError(f"{what} '{path}' does not exist") from None
    except OSError as e:
        raise ConfigError(f"{what} '{path}': {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what} '{path}' is not a directory")
    return real, st


def build_config(lowers: list[str], upper: str | None, mountpoint: str,
                 opts: MountOptions, workdir: str | None = None,
                 foreground: bool = False, debug: bool = False) -> tuple[MountConfig, bool]:
    """Validate a mount request without touching the disk.

    Returns the config and whether its workdir still has to be created (the
    default one is made by the caller only after every check passed).
    """
    if not lowers:
        raise ConfigError("the lower layer list is empty")
    layers: list[tuple[str, str, os.stat_result]] = []   # (role, realpath, stat)
    for lower in lowers:
        real, st = _resolve_dir("lower layer", lower)
        layers.append(("lower layer", real, st))
    if upper is not None:
        real, st = _resolve_dir("upper layer", upper)
        layers.append(("upper layer", real, st))
    mnt, mnt_st = _resolve_dir("mountpoint", mountpoint)

    for i, (role_a, a, st_a) in enumerate(layers):
        for role_b, b, st_b in layers[i + 1:]:
            if a == b or (st_a.st_dev, st_a.st_ino) == (st_b.st_dev, st_b.st_ino):
                raise ConfigError(f"directory '{a}' is used twice as a layer")
            if _within(a, b) or _within(b, a):
                inner, outer = (a, b) if _within(a, b) else (b, a)
                raise ConfigError(f"layers overlap: '{inner}' is inside '{outer}'")
        if _within(mnt, a):
            raise ConfigError(f"mountpoint '{mnt}' is inside {role_a} '{a}'"
                              if mnt != a else f"mountpoint '{mnt}' is also the {role_a}")
        if _within(a, mnt):
            raise ConfigError(f"{role_a} '{a}' is inside the mountpoint '{mnt}'")

    passthrough = _passthrough(opts)
    work, create = _check_workdir(layers, upper, mnt, opts.workdir, workdir)
    squash_uid, squash_gid = opts.squashed()
    config = MountConfig(
        lowers=[real for role, real, _ in layers if role == "lower layer"],
        upper=layers[-1][1] if upper is not None else None,
        workdir=work, mountpoint=mnt, readonly=opts.readonly,
        allow_other=allow_other_default() if opts.allow_other is None else opts.allow_other,
        dev=opts.dev, suid=opts.suid,
        fsync=opts.fsync and not opts.volatile, volatile=opts.volatile, timeout=opts.timeout,
        squash_uid=squash_uid, squash_gid=squash_gid, static_nlink=opts.static_nlink,
        xattrs=opts.xattrs, acl=opts.acl, writeback=opts.writeback is not False,
        passthrough=passthrough, poll_us=opts.poll_us, foreground=foreground, debug=debug or opts.debug,
        fsname=opts.fsname or MountConfig.fsname,
        userxattr=opts.userxattr or not privileged(), uid_map=opts.uid_map,
        gid_map=opts.gid_map, override_stat=opts.override_stat, extra=dict(opts.extra))
    return config, create


def _passthrough(opts: MountOptions) -> str:
    """passthrough= as the mount will try it. The kernel does not do passthrough and the
    writeback cache together: writeback=1, given, means no passthrough under auto and is
    a contradiction under on; on also needs what the kernel's backing files need."""
    if opts.passthrough == "on":
        if opts.writeback:
            raise ConfigError("passthrough=on and writeback=1 exclude each other (the kernel "
                              "does not do both)")
        if not privileged():
            raise ConfigError("passthrough=on needs CAP_SYS_ADMIN in the initial user "
                              "namespace (root); passthrough=auto falls back without it")
    return "off" if opts.writeback else opts.passthrough


def _check_workdir(layers: list[tuple[str, str, os.stat_result]], upper: str | None,
                   mnt: str, from_opts: str | None, from_flag: str | None) -> tuple[str | None, bool]:
    if from_opts and from_flag and os.path.realpath(from_opts) != os.path.realpath(from_flag):
        raise ConfigError("workdir given twice with different values (--workdir and -o workdir=)")
    given = from_flag or from_opts
    if upper is None:
        if given:
            raise ConfigError("a workdir needs an upper layer")
        return None, False
    upper_real, upper_st = layers[-1][1], layers[-1][2]
    if given:
        work, work_st = _resolve_dir("workdir", given)
        create = False
    else:
        work = default_workdir(upper_real)
        try:
            work_st = os.stat(work)
            create = False
        except FileNotFoundError:
            work_st = os.stat(os.path.dirname(work))
            create = True
        except OSError as e:
            raise ConfigError(f"workdir '{work}': {e.strerror}") from None
        if not create and not stat.S_ISDIR(work_st.st_mode):
            raise ConfigError(f"workdir '{work}' is not a directory")
    for role, layer, _ in layers:
        if _within(work, layer) or _within(layer, work):
            raise ConfigError(f"workdir '{work}' overlaps {role} '{layer}'")
    if _within(mnt, work) or _within(work, mnt):
        raise ConfigError(f"workdir '{work}' overlaps the mountpoint '{mnt}'")
    if work_st.st_dev != upper_st.st_dev:
        hint = "" if given else " (use --workdir)"
        raise ConfigError(f"workdir '{work}' is not on the same filesystem as the upper layer{hint}")
    return work, create


CAP_SYS_ADMIN = 21


def privileged() -> bool:
    """CAP_SYS_ADMIN in the initial user namespace: what trusted.* xattrs and /run need.
    The root of a user namespace (`unshare -r`, `podman unshare`) has the capability only
    over its own namespace: the kernel refuses it trusted.* names like any user, and the
    host's /run is not its own."""
    try:
        with open("/proc/self/status") as f:
            caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
        with open("/proc/self/uid_map") as f:
            ranges = [line.split() for line in f if line.strip()]
    except (OSError, StopIteration, ValueError, IndexError):
        return os.geteuid() == 0
    initial = ranges == [["0", "0", "4294967295"]]
    return initial and bool(caps >> CAP_SYS_ADMIN & 1)


def outer_uid() -> int:
    """Our uid as the initial user namespace sees it (in a user namespace, the uid that
    made it): per-user state of several users' namespaces must not meet under one uid 0."""
    uid = os.getuid()
    try:
        with open("/proc/self/uid_map") as f:
            for line in f:
                inner, outer, count = (int(x) for x in line.split())
                if inner <= uid < inner + count:
                    return outer + uid - inner
    except (OSError, ValueError):
        pass
    return uid


def check_dev_fuse() -> None:
    """Fail early and clearly when FUSE is unavailable (no module, no device)."""
    path = os.environ.get(DEV_FUSE_ENV, "/dev/fuse")
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"cannot use FUSE: {path}: {e.strerror}") from None
    if not stat.S_ISCHR(st.st_mode):
        raise ConfigError(f"cannot use FUSE: {path} is not a character device")
