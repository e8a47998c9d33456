"""One differential case in the userxattr flavor, run by the root of a user namespace.

    python -m difftest.rootless SEED N_OPS SHRINK_SECONDS ROOT

tests/test_differential.py starts this as an unprivileged user the test made, inside
`unshare --map-root-user --mount` with the user's subordinate ids mapped (uids and gids
1..65536, so the fixture's other owners and the ops' other users exist), as rootless podman
runs its mount program. Side A is kernel overlayfs `-o userxattr`, side B unionfs, which
picks the userxattr format by itself there. The fixture is built once under ROOT (in the
userxattr format) and reused by later seeds. Prints the report and exits 1 on a divergence.
"""
from __future__ import annotations

import os
import sys
import time

from . import SIDES, USERXATTR, report, run_case, shrink
from .layers import build_layers


def main(argv: list[str]) -> int:
    seed, n_ops, budget, root = int(argv[0]), int(argv[1]), float(argv[2]), argv[3]
    pristine = os.path.join(root, "pristine")
    if not os.path.isdir(pristine):
        tmp = f"{pristine}.{os.getpid()}"
        build_layers(tmp, userxattr=True)
        os.rename(tmp, pristine)
    side = SIDES["unionfs"]
    result = run_case(pristine, os.path.join(root, f"seed-{seed}"), side, seed=seed, n_ops=n_ops,
                      flavor=USERXATTR)
    for note in result.notes:
        print(f"note: seed {seed}: {note}")
    if result.divergence is None:
        return 0
    shrunk = None
    if budget > 0:
        t = time.monotonic()
        shrunk = shrink(pristine, os.path.join(root, f"shrink-{seed}"), side, result.ops,
                        result.divergence, budget, result.outcomes, flavor=USERXATTR)
        budget -= time.monotonic() - t
    print(report(seed, side, n_ops, result, shrunk))
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
