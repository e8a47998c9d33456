"""Unprivileged users for the rootless tests: made by the test, removed after it.

`unprivileged_user()` adds a system user (useradd) with a home of its own in a fresh
directory under /var/tmp (pytest's tmp_path is under a root-only /tmp/pytest-of-root),
optionally with /etc/subuid and /etc/subgid ranges (for a user namespace that maps more
than one uid, as rootless podman makes), and removes the user, its lines and its files
when the test ends, whatever happened. `User.run` runs a command as that user, in a
user namespace of its own (`unshare`) if asked. Everything the user runs is started from
the test's own Python (`sys.executable -m unionfs`), never from an installed command.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Iterator, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUBID_FILES = ("/etc/subuid", "/etc/subgid")
SUBID_LOCK = "/run/lock/unionfs-tests-subid.lock"
SUBID_COUNT = 65536
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class User:
    name: str
    uid: int
    gid: int
    home: str           # also the place for the test's directories: owned by the user
    runtime_dir: str    # XDG_RUNTIME_DIR, 0700
    subid: int | None = None   # first subordinate uid and gid, SUBID_COUNT of them
    env: dict[str, str] = field(default_factory=dict)

    def path(self, *parts: str) -> str:
        return os.path.join(self.home, *parts)

    def argv(self, args: Sequence[str], userns: bool = False,
             env: dict[str, str] | None = None) -> list[str]:
        """*args* as this user, in *env* (default: environ()); with *userns*, as root of a
        new user and mount namespace (`unshare -r -m`; with subordinate ids, uids and gids
        1..65536 mapped to them)."""
        env = self.environ() if env is None else env
        prefix = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
                  "--reset-env", "env", *(f"{k}={v}" for k, v in env.items())]
        if userns:
            prefix += ["unshare", "--map-root-user", "--mount"]
            if self.subid is not None:
                prefix += [f"--map-users={self.subid},1,{SUBID_COUNT}",
                           f"--map-groups={self.subid},1,{SUBID_COUNT}"]
            prefix += ["--"]
        return prefix + list(args)

    def environ(self) -> dict[str, str]:
        # PYTHONHASHSEED passes: a run whose outcome hung on set order repeats with it
        keep = {k: os.environ[k] for k in ("PYTHONHASHSEED",) if k in os.environ}
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name, "PATH": PATH,
                "XDG_RUNTIME_DIR": self.runtime_dir, "PYTHONPATH": REPO, **keep, **self.env}

    def run(self, args: Sequence[str], userns: bool = False, check: bool = False,
            timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.argv(args, userns), capture_output=True, text=True,
                              timeout=timeout, cwd=self.home, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} as {self.name} exited {proc.returncode}:"
                                 f"\n{proc.stdout}\n{proc.stderr}")
        return proc

    def unionfs(self, *args: str, userns: bool = False, **kw) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-m", "unionfs", *args], userns=userns, **kw)

    def python(self, code: str, *args: str, userns: bool = False, **kw) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-c", code, *args], userns=userns, **kw)


def _free_uid(start: int = 23000) -> int:
    uid = start + os.getpid() % 1000
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            try:
                import grp
                grp.getgrgid(uid)
            except KeyError:
                return uid
        uid += 1


@contextlib.contextmanager
def _subid_lock() -> Iterator[None]:
    os.makedirs(os.path.dirname(SUBID_LOCK), exist_ok=True)
    with open(SUBID_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _subid_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def _write_lines(path: str, lines: list[str]) -> None:
    tmp = f"{path}.unionfs-tests.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in lines))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _add_subids(name: str) -> int:
    """Append NAME:START:65536 to /etc/subuid and /etc/subgid, START past every range there."""
    with _subid_lock():
        end = 200_000
        for path in SUBID_FILES:
            for line in _subid_lines(path):
                parts = line.split(":")
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    end = max(end, int(parts[1]) + int(parts[2]))
        start = -(-end // SUBID_COUNT) * SUBID_COUNT
        for path in SUBID_FILES:
            _write_lines(path, _subid_lines(path) + [f"{name}:{start}:{SUBID_COUNT}"])
    return start


def _remove_subids(name: str) -> None:
    with _subid_lock():
        for path in SUBID_FILES:
            lines = _subid_lines(path)
            kept = [line for line in lines if not line.startswith(name + ":")]
            if kept != lines:
                _write_lines(path, kept)


def _kill_user_processes(uid: int) -> None:
    """What the test's own user left running (a daemon of a failed test), by pid."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    os.kill(int(entry), 9)


def _unmount_under(base: str) -> None:
    base = os.path.realpath(base) + "/"
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    for mnt in reversed(mounts):
        if mnt.startswith(base):
            subprocess.run(["umount", "-l", mnt], capture_output=True)


@contextlib.contextmanager
def unprivileged_user(tag: str = "u", subids: bool = False) -> Iterator[User]:
    """A fresh user with a home under /var/tmp; removed, with everything it made, after."""
    base = tempfile.mkdtemp(prefix="unionfs-rootless-", dir="/var/tmp")
    os.chmod(base, 0o755)
    uid = _free_uid()
    name = f"ufs{tag}{os.getpid() % 100000}"[:31]
    home = os.path.join(base, "home")
    added = False
    try:
        subprocess.run(["groupadd", "--system", "--gid", str(uid), name], check=True,
                       capture_output=True)
        added = True
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", home,
                        "--shell", "/bin/sh", "--uid", str(uid), "--gid", str(uid), name],
                       check=True, capture_output=True)
        os.mkdir(home, 0o755)
        os.chown(home, uid, uid)
        run = os.path.join(base, "run")
        os.mkdir(run, 0o700)
        os.chown(run, uid, uid)
        user = User(name, uid, uid, home, run)
        if subids:
            user.subid = _add_subids(name)
        _check_python(user)
        yield user
    finally:
        if added:
            _kill_user_processes(uid)
            _unmount_under(base)
            _remove_subids(name)
            subprocess.run(["userdel", name], capture_output=True)
            subprocess.run(["groupdel", name], capture_output=True)
        _unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)


def _check_python(user: User) -> None:
    """The venv must be usable by every user (scripts/setup makes it from /usr/bin/python3)."""
    proc = user.python("import trio, unionfs.fs")
    if proc.returncode != 0:
        raise AssertionError(f"{sys.executable} cannot be run by an unprivileged user "
                             f"(run scripts/setup): {proc.stderr.strip()[-300:]}")
