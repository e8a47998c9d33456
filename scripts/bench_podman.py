#!/usr/bin/env python3
"""Benchmark `podman build` on unionfs, on fuse-overlayfs and on podman's native kernel
overlay driver, in one run.

Run as root. Each implementation gets a podman of its own (tests/helpers/engines.py: storage,
runroot and configuration under a temporary directory, never the machine's default; the
unionfs mount program is this interpreter's `-m unionfs`), the suite's debootstrap root
(tests/helpers/debian_root.py) imported as an image (not timed), and then, --repeat times and
interleaved in a rotating order, a timed `podman build --no-cache` of CONTAINERFILE: its
RUN steps install packages from a local file: repo (many small files written through
dpkg's rename-into-place, its database rewritten), purge and reinstall some, hard-link a
lower tree (a copy-up per file) and rename and delete it. Each build's image is removed
(not timed) before the next.

    sudo .venv/bin/python scripts/bench_podman.py --repeat 3

It prints the median seconds of each and the ratios to kernel overlayfs and to
fuse-overlayfs. Everything it made is removed at the end, errors included.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
sys.path.insert(0, TESTS)
from helpers.debian_root import debian_layers  # noqa: E402
from helpers.engines import RUN_FLAGS, missing_tools, podman  # noqa: E402
from test_rootfs_debian import write_packages_index  # noqa: E402

IMPLS = {"kernel": None, "fuse-overlayfs": "fuse-overlayfs", "unionfs": "unionfs"}
PACKAGES = "sudo bc netbase less"

CONTAINERFILE = f"""\
FROM localhost/debian:1
RUN rm -f /etc/apt/sources.list && echo 'deb [trusted=yes] file:/repo ./' > /etc/apt/sources.list.d/local.list \\
    && apt-get update -q && apt-get install -y -q --no-install-recommends {PACKAGES}
RUN apt-get purge -y -q bc && apt-get autoremove -y -q --purge && apt-get install -y -q --no-install-recommends bc
RUN cp -al /usr/share /srv/linked && mv /srv/linked /srv/renamed && rm -rf /srv/renamed/doc \\
    && find /srv/renamed -type f | wc -l
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--impl", default=",".join(IMPLS), help="comma list of " + ", ".join(IMPLS))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_podman: run as root", file=sys.stderr)
        return 1
    if missing := missing_tools():
        print(f"bench_podman: not installed: {' '.join(missing)} (run scripts/setup)", file=sys.stderr)
        return 1
    impls = args.impl.split(",")
    cache = debian_layers()
    top = Path(tempfile.mkdtemp(prefix="bench-podman-"))
    times: dict[str, list[float]] = {i: [] for i in impls}
    try:
        repo = top / "repo"
        shutil.copytree(os.path.join(cache, "debs"), repo)
        write_packages_index(str(repo))
        repo.chmod(0o755)
        ctx = top / "ctx"
        ctx.mkdir()
        (ctx / "Containerfile").write_text(CONTAINERFILE)
        with contextlib.ExitStack() as stack:
            engines = {}
            for name in impls:
                p = stack.enter_context(podman(top / name, IMPLS[name]))
                p("import", os.path.join(cache, "base.tar"), "localhost/debian:1", timeout=900)
                engines[name] = p
            for rep in range(args.repeat):
                order = impls[rep % len(impls):] + impls[:rep % len(impls)]
                for name in order:
                    p = engines[name]
                    start = time.monotonic()
                    p("build", "--no-cache", *RUN_FLAGS, "-v", f"{repo}:/repo:ro", "-t", "localhost/bench:1",
                      str(ctx), timeout=1800)
                    times[name].append(time.monotonic() - start)
                    print(f"rep {rep + 1} {name}: {times[name][-1]:.1f} s", file=sys.stderr)
                    p("rmi", "localhost/bench:1")
    finally:
        shutil.rmtree(top, ignore_errors=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"\npodman build (--no-cache, {args.repeat} runs each, median)\n")
    cols = [c for c in ("kernel", "fuse-overlayfs") if c in med]
    print("| implementation | seconds | " + " | ".join(f"/ {c}" for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for name in impls:
        ratios = " | ".join(f"{med[name] / med[c]:.2f}" for c in cols)
        print(f"| {name} | {med[name]:.1f} | {ratios} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
