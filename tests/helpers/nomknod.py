"""Run a command where overlayfs whiteouts (0/0 character devices) cannot be made.

    python -m helpers.nomknod COMMAND [ARG...]

Installs a seccomp filter (the kernel's, through prctl; x86-64) and execs COMMAND under it:
mknod/mknodat of the 0/0 character device fails EPERM (what a filesystem without mknod, a
runtime's policy, or a kernel before 5.8 answers an unprivileged user), renameat2 with
RENAME_WHITEOUT fails EINVAL (what a filesystem without whiteout support answers). Other
device nodes and everything else are allowed (so a differential case's own mknod ops still
compare with the kernel's), and the filter holds for every process COMMAND starts. With no_new_privs set, a set-uid helper
(fusermount3) gains nothing: use it as root or as the root of a user namespace.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys

AUDIT_ARCH_X86_64 = 0xC000003E
NR = {"mknod": 133, "mknodat": 259, "renameat2": 316}
# struct seccomp_data: nr (0), arch (4), instruction_pointer (8), args[6] (16 + 8 i)
ARG = lambda i: 16 + 8 * i  # noqa: E731 - low 32 bits of the argument (little-endian)
LD, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06
ALLOW, ERRNO = 0x7FFF0000, 0x00050000
S_IFMT, S_IFCHR, RENAME_WHITEOUT = 0o170000, 0o020000, 4


class _Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint)]


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Insn))]


def _program() -> list[tuple[int, str | int, str | int, int]]:
    """(code, jt, jf, k) with jumps to labels (strings) or 0 (the next instruction)."""
    return [
        (LD, 0, 0, 4), (JEQ, 0, "allow", AUDIT_ARCH_X86_64),
        (LD, 0, 0, 0),
        (JEQ, "mknod", 0, NR["mknod"]), (JEQ, "mknodat", 0, NR["mknodat"]),
        (JEQ, "rename", "allow", NR["renameat2"]),
        "mknod", (LD, 0, 0, ARG(1)), (AND, 0, 0, S_IFMT), (JEQ, 0, "allow", S_IFCHR),
        (LD, 0, 0, ARG(2)), (JEQ, 0, "allow", 0), (LD, 0, 0, ARG(2) + 4),
        (JEQ, "eperm", "allow", 0),
        "mknodat", (LD, 0, 0, ARG(2)), (AND, 0, 0, S_IFMT), (JEQ, 0, "allow", S_IFCHR),
        (LD, 0, 0, ARG(3)), (JEQ, 0, "allow", 0), (LD, 0, 0, ARG(3) + 4),
        (JEQ, "eperm", "allow", 0),
        "rename", (LD, 0, 0, ARG(4)), (AND, 0, 0, RENAME_WHITEOUT),
        (JEQ, "einval", "allow", RENAME_WHITEOUT),
        "allow", (RET, 0, 0, ALLOW),
        "eperm", (RET, 0, 0, ERRNO | errno.EPERM),
        "einval", (RET, 0, 0, ERRNO | errno.EINVAL),
    ]


def install() -> None:
    if platform.machine() != "x86_64":
        raise OSError(errno.ENOSYS, "helpers.nomknod knows x86-64 syscall numbers only")
    labels, insns = {}, []
    for item in _program():
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)
    code = (_Insn * len(insns))()
    for pc, (op, jt, jf, k) in enumerate(insns):
        rel = [labels[j] - pc - 1 if isinstance(j, str) else j for j in (jt, jf)]
        code[pc] = _Insn(op, rel[0], rel[1], k)
    prog = _Prog(len(insns), code)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, MODE_FILTER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def argv(args: list[str]) -> list[str]:
    """*args* run under the filter."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return ["env", f"PYTHONPATH={here}" + (":" + os.environ["PYTHONPATH"] if
                                           os.environ.get("PYTHONPATH") else ""),
            sys.executable, "-m", "helpers.nomknod", *args]


if __name__ == "__main__":
    install()
    os.execvp(sys.argv[1], sys.argv[1:])
