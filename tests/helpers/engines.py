"""Container engines for the tests and the benchmark: podman with its own storage, and a
docker-registry on loopback, both confined to one directory and stopped at the end.

Podman runs with everything under ROOT: --root (images, layers), --runroot, --tmpdir,
a containers.conf (cgroupfs, file events, runc) and a registries.conf of its own, so the
machine's default storage is never touched. The mount program is a two-line script that
runs `sys.executable -m unionfs`, so the checkout under test serves, whatever
/usr/local/sbin/unionfs points at. Without one, podman's native kernel overlay driver;
with "fuse-overlayfs", Debian's fuse-overlayfs.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

# the hard limit on these machines is 20000; podman's default asks for more (and runc fails)
RUN_FLAGS = ["--network", "none", "--ulimit", "nofile=10000:10000", "--ulimit", "nproc=10000:10000"]
TOOLS = ("podman", "runc", "docker-registry", "fuse-overlayfs")

CONTAINERS_CONF = """\
[containers]
netns = "none"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
"""


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def unionfs_wrapper(path: Path) -> str:
    """A mount program that is the unionfs of this interpreter (the checkout's .venv)."""
    path.write_text(f'#!/bin/sh\nexec {sys.executable} -m unionfs "$@"\n')
    path.chmod(0o755)
    return str(path)


def mounts_under(path: Path) -> list[str]:
    prefix = os.path.realpath(path) + "/"
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


def unionfs_daemons_under(path: Path) -> list[int]:
    """Live unionfs processes whose mountpoint argument (the last) is below *path*."""
    prefix = os.path.realpath(path) + "/"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = [os.fsdecode(a) for a in f.read().split(b"\0") if a]
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if ("unionfs" in args and args[-1].startswith(prefix) and state not in ("Z", "X")):
            found.append(int(entry))
    return found


class Podman:
    """`podman` on a storage of its own below *top*."""

    def __init__(self, top: Path, mount_program: str | None, registry: str | None = None) -> None:
        self.top = top
        top.mkdir(parents=True, exist_ok=True)
        for d in ("root", "tmp", "home"):
            (top / d).mkdir(exist_ok=True)
        # podman refuses a runroot path longer than 50 characters: a short one beside
        self.runroot = tempfile.mkdtemp(prefix="unionfs-podman-", dir="/tmp")
        (top / "containers.conf").write_text(CONTAINERS_CONF)
        (top / "home/auth.json").write_text('{"auths": {}}\n')
        insecure = f'[[registry]]\nlocation = "{registry}"\ninsecure = true\n' if registry else ""
        (top / "registries.conf").write_text(f"unqualified-search-registries = []\n{insecure}")
        # what / of a container is mounted as, to check the engine used what it was given
        self.fstype = {None: "overlay", "unionfs": "fuse.unionfs",
                       "fuse-overlayfs": "fuse.fuse-overlayfs"}[mount_program]
        if mount_program == "unionfs":
            mount_program = unionfs_wrapper(top / "unionfs-mount-program")
        elif mount_program == "fuse-overlayfs":
            mount_program = shutil.which("fuse-overlayfs")
        self.mount_program = mount_program
        self.env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                    "HOME": str(top / "home"), "CONTAINERS_CONF": str(top / "containers.conf"),
                    "CONTAINERS_REGISTRIES_CONF": str(top / "registries.conf"),
                    "REGISTRY_AUTH_FILE": str(top / "home/auth.json"), "LC_ALL": "C"}

    def command(self, *args: str) -> list[str]:
        cmd = ["podman", "--root", str(self.top / "root"), "--runroot", self.runroot,
               "--tmpdir", str(self.top / "tmp"), "--storage-driver", "overlay",
               "--cgroup-manager", "cgroupfs", "--runtime", "runc", "--events-backend", "file"]
        if self.mount_program:
            cmd += ["--storage-opt", f"overlay.mount_program={self.mount_program}"]
        return cmd + list(args)

    def __call__(self, *args: str, check: bool = True, timeout: float = 600,
                 cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.command(*args), env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def out(self, *args: str, **kw) -> str:
        return self(*args, **kw).stdout

    def run(self, image: str, script: str, *flags: str) -> str:
        return self.out("run", "--rm", *RUN_FLAGS, *flags, image, "sh", "-c", script)

    def close(self) -> None:
        """Remove every container and image, then whatever is still mounted, then the tree."""
        with contextlib.suppress(Exception):
            self("rm", "-af", "-t", "0", check=False, timeout=120)
        with contextlib.suppress(Exception):
            self("rmi", "-af", check=False, timeout=120)
        for top in (self.top, Path(self.runroot)):
            for m in reversed(mounts_under(top)):  # the storage's own private bind mount too
                subprocess.run(["umount", m], capture_output=True)
                if m in mounts_under(top):
                    subprocess.run(["umount", "-l", m], capture_output=True)
            shutil.rmtree(top, ignore_errors=True)


class RootlessPodman(Podman):
    """`podman` run by an unprivileged *user* (tests/helpers/rootless.py, with subordinate ids) on a
    storage below *top* that the user owns. Podman makes the user's namespace from those
    ids and runs the mount program inside it, as the namespace's root."""

    def __init__(self, user, top: Path, mount_program: str | None, registry: str | None = None) -> None:
        self.user = user
        super().__init__(top, mount_program, registry)
        for path in (top, Path(self.runroot)):
            subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(path)], check=True)

    def command(self, *args: str) -> list[str]:
        env = {**self.user.environ(), **self.env, "PATH": self.user.environ()["PATH"]}
        return self.user.argv(super().command(*args), env=env)

    def __call__(self, *args: str, check: bool = True, timeout: float = 600,
                 cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return super().__call__(*args, check=check, timeout=timeout, cwd=cwd or Path(self.user.home))

    def close(self) -> None:
        super().close()
        # the user's namespace outlives the commands (podman's pause process): what is
        # mounted in it goes with it, when tests/helpers/rootless.py ends the user's processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """Debian's docker-registry on 127.0.0.1, its storage and log below *top*."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.storage = top / "storage"
        self.storage.mkdir(parents=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        (top / "config.yml").write_text(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            f"http:\n  addr: {self.address}\n")
        self.log = open(top / "registry.log", "w")
        self.proc = subprocess.Popen(["docker-registry", "serve", str(top / "config.yml")],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"docker-registry did not start:\n{self.log_text()}")
                time.sleep(0.1)

    def log_text(self) -> str:
        self.log.flush()
        return (self.top / "registry.log").read_text()

    def uploads(self) -> list[str]:
        """Digests of the blobs pushed to it, one per completed upload, in order."""
        return re.findall(r'"PUT /v2/\S+/blobs/uploads/\S*[?&]digest=sha256(?:%3A|:)([0-9a-f]{64})',
                          self.log_text())

    def blobs(self) -> set[str]:
        return {p.parent.name for p in (self.storage / "docker/registry/v2/blobs/sha256").glob("*/*/data")}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@contextlib.contextmanager
def podman(top: Path, mount_program: str | None, registry: str | None = None) -> Iterator[Podman]:
    p = Podman(top, mount_program, registry)
    try:
        yield p
    finally:
        p.close()


@contextlib.contextmanager
def registry(top: Path) -> Iterator[Registry]:
    r = Registry(top)
    try:
        yield r
    finally:
        r.close()
