"""Differential testing of unionfs against kernel overlayfs.

One *case* = one seeded op sequence run on two mounts over identical copies of
the fixture layers:

  side A  kernel overlayfs (redirect_dir=on,index=on), the reference
  side B  the filesystem under test (unionfs; or kernel overlayfs again, to
          prove the harness itself has no false divergences)

Stages, each compared with side A's final view, the first divergence wins:

  op               every op's outcome, compared as it runs
  view             the final views (see view.py)
  remount          side B unmounted and mounted again on the same upper
  kernel-on-upper  side B's upper mounted by kernel overlayfs (for a side whose
                   upper holds whiteouts in the xattr form, read-only, as the
                   top-most lower layer: overlayfs's readdir honours that form in
                   lower layers only, its lookups in every layer)

The kernel-on-upper mount gets a fresh workdir, except that side B's
`index/` directory (if its workdir has one, in kernel layout) is moved into
it: with index=on, the index entries are what tie a copied-up lower hard link
to its other, not-yet-copied-up names, so without them any upper -- the
kernel's own included -- shows those names stale. If the kernel refuses the
mount with index=on (index=on checks that the upper's root and index agree with
the lowers: trusted.overlay.origin / .upper), it is retried with index=off for
this third mount only; the case records a note, which the test emits as a
warning (and prefixes to any divergence found on that mount).
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Sequence

try:  # tests/ is on sys.path under pytest's default (prepend) import mode
    from helpers.mounting import force_unmount, kernel_overlay, kernel_view, unionfs_mount
    from helpers import nomknod
except ImportError:  # pragma: no cover - imported as tests.difftest
    from tests.helpers.mounting import force_unmount, kernel_overlay, kernel_view, unionfs_mount
    from tests.helpers import nomknod

from .layers import copy_layers
from .ops import Generator, Op, mv_fallback, run_op
from .view import capture, diff_views

STAGES = ("op", "view", "remount", "kernel-on-upper", "side-b-on-kernel-upper")
OVL_OPTS = "redirect_dir=on,index=on"


@dataclass(frozen=True)
class Flavor:
    """Which overlayfs format a case runs in: the kernel's options for side A and for the
    kernel-on-upper mount, and whether side B also mounts side A's upper at the end."""

    name: str
    kernel_opts: str
    fallback_opts: str | None    # kernel-on-upper's retry (see the module docstring)
    cross_read: bool
    # whether st_ino identity and set-id bits are compared everywhere. Without index=on
    # (refused with userxattr) overlayfs reports different st_inos for the names of one
    # hard-linked upper file, and cannot mark a copied-up symlink or special file with its
    # origin (user.* xattrs exist only on files and directories); unionfs keeps one st_ino
    # per inode for the mount's life. Then st_inos are compared only where neither
    # happens, and set-id bits not at all (see _without_setid).
    all_identity: bool = True
    # where side A's rename gives EXDEV and side B's does not, side A is made to do what
    # mv(1) does then (ops.mv_fallback), and the outcomes compared after that
    mv_on_exdev: bool = False

    def same(self, op: Op, a: Any, b: Any) -> bool:
        """Do two outcomes of one op agree (see ops.run_op for their shape)?"""
        if a == b:
            return True
        if self.all_identity or not (isinstance(a, tuple) and isinstance(b, tuple)
                                     and len(a) == len(b) == 4):
            return False
        a = (a[0], _without_setid(a[1]), _without_setid(a[2]), a[3])
        b = (b[0], _without_setid(b[1]), _without_setid(b[2]), b[3])
        if a == b:
            return True
        loose = any(isinstance(st, dict) and (st.get("type") not in ("file", "dir")
                                              or st.get("nlink", 1) > 1 and st["type"] == "file")
                    for st in (*a[1:3], *b[1:3]))
        return loose and a[:3] == b[:3]

    def diff(self, va: dict, vb: dict) -> list[str]:
        """diff_views, without the st_ino partition where st_inos are not comparable (the
        link counts in every path's state still are)."""
        if not self.all_identity:
            va = {k: _without_setid(v) for k, v in va.items() if k != "<hardlink-groups>"}
            vb = {k: _without_setid(v) for k, v in vb.items() if k != "<hardlink-groups>"}
        return diff_views(va, vb)


# A write or truncate by the root of a user namespace (no CAP_FSETID over the initial one):
# the VFS drops a file's set-id bits before the request reaches FUSE, as on any other
# filesystem there, where overlayfs keeps them: not the daemon's choice. In that flavor the
# set-id bits of files are left out of comparisons (a user's FUSE mount is nosuid anyway).
def _without_setid(st: Any) -> Any:
    if isinstance(st, dict) and st.get("type") == "file" and "mode" in st:
        return dict(st, mode=oct(int(st["mode"], 8) & ~0o6000))
    return st


TRUSTED = Flavor("trusted", OVL_OPTS, "redirect_dir=on,index=off", False)
# the root of a user namespace: overlayfs refuses redirect_dir=on and index=on with
# userxattr (it then neither makes nor follows redirects)
USERXATTR = Flavor("userxattr", "userxattr", None, True, all_identity=False, mv_on_exdev=True)


class Side:
    name = "?"

    def mount(self, lowers: Sequence[str], upper: str, work: str, mnt: str) -> ContextManager:
        raise NotImplementedError


class KernelSide(Side):
    name = "kernel"

    def __init__(self, opts: str = OVL_OPTS) -> None:
        self.opts = opts

    def mount(self, lowers, upper, work, mnt):
        return kernel_overlay(lowers, upper, work, mnt, self.opts)


class UnionfsSide(Side):
    name = "unionfs"
    xwhiteouts = False

    def mount(self, lowers, upper, work, mnt):
        # allow_other: the unprivileged ops must reach the mount at all (FUSE
        # refuses other users otherwise); permission checks stay the kernel's
        # (default_permissions).
        return unionfs_mount(lowers, upper, mnt, workdir=work, options=["allow_other"],
                             wrapper=self.wrapper())

    def wrapper(self) -> list[str]:
        return []


class NoMknodSide(UnionfsSide):
    """unionfs where the kernel refuses device nodes and RENAME_WHITEOUT (helpers.nomknod's
    seccomp filter on the daemon): every whiteout it makes is of the xattr form."""

    name = "unionfs-nomknod"
    xwhiteouts = True

    def wrapper(self) -> list[str]:
        return nomknod.argv([])


SIDES: dict[str, Side] = {"kernel": KernelSide(), "unionfs": UnionfsSide(),
                          "unionfs-nomknod": NoMknodSide()}


@dataclass
class Divergence:
    stage: str
    detail: str
    index: int | None = None       # op stage: which op
    op: Op | None = None

    def headline(self) -> str:
        if self.stage == "op":
            return f"stage 'op': op #{self.index} {self.op!r}"
        return f"stage '{self.stage}'"


@dataclass
class CaseResult:
    ops: list[Op]
    divergence: Divergence | None
    notes: list[str] = field(default_factory=list)
    outcomes: list[Any] = field(default_factory=list)   # side A's, per op
    timings: dict[str, float] = field(default_factory=dict)


def _fmt(outcome: Any) -> str:
    s = repr(outcome)
    return s if len(s) < 2000 else s[:2000] + "..."


def _op_diff(a: Any, b: Any) -> str:
    lines = [f"    kernel: {_fmt(a)}", f"    other:  {_fmt(b)}"]
    # Point at the differing fields of the post-states.
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) == 4:
        names = ("result", "state(path)", "state(path2)", "st_ino identity (path, path2)")
        for n, x, y in zip(names, a, b):
            if x != y:
                if isinstance(x, dict) and isinstance(y, dict):
                    fs = [f"{k}: {x.get(k, '<absent>')!r} != {y.get(k, '<absent>')!r}"
                          for k in sorted(set(x) | set(y))
                          if x.get(k, "<absent>") != y.get(k, "<absent>")]
                    lines.append(f"    differs in {n}: " + "; ".join(fs))
                else:
                    lines.append(f"    differs in {n}: {_fmt(x)} != {_fmt(y)}")
    return "\n".join(lines)


def _prepare(pristine: str, base: str) -> dict[str, Any]:
    os.makedirs(base)
    d: dict[str, Any] = {"lowers": copy_layers(pristine, os.path.join(base, "lower"))}
    for sub in ("upper", "work", "mnt", "work3", "mnt3"):
        d[sub] = os.path.join(base, sub)
        os.mkdir(d[sub])
    return d


def _kernel_on_upper(b: dict[str, Any], notes: list[str], flavor: Flavor = TRUSTED) -> ContextManager:
    idx = os.path.join(b["work"], "index")
    if os.path.isdir(idx):
        os.rename(idx, os.path.join(b["work3"], "index"))

    @contextlib.contextmanager
    def cm() -> Iterator[str]:
        try:
            ctx = kernel_overlay(b["lowers"], b["upper"], b["work3"], b["mnt3"], flavor.kernel_opts)
            mnt = ctx.__enter__()
        except subprocess.CalledProcessError:
            if flavor.fallback_opts is None:
                raise
            notes.append("kernel refused side B's upper with index=on; mounted with index=off"
                         + _dmesg_overlay())
            ctx = kernel_overlay(b["lowers"], b["upper"], b["work3"], b["mnt3"],
                                 flavor.fallback_opts)
            mnt = ctx.__enter__()
        try:
            yield mnt
        finally:
            ctx.__exit__(None, None, None)

    return cm()


def _dmesg_overlay() -> str:
    """The kernel's reason for refusing a mount, best effort."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = [line for line in out.splitlines() if "overlay" in line][-2:]
    return (" (dmesg: " + " | ".join(lines) + ")") if lines else ""


def run_case(pristine: str, base: str, side_b: Side, *, ops: Sequence[Op] | None = None,
             seed: int | None = None, n_ops: int = 0, upto: str = STAGES[-1],
             flavor: Flavor = TRUSTED) -> CaseResult:
    """Run one case in the fresh directory *base* (removed afterwards).

    With *ops*, replay them; otherwise generate *n_ops* from *seed*, choosing
    each op from side A's tree as it is at that point.
    """
    last = STAGES.index(upto)
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    notes: list[str] = []
    done: list[Op] = []
    outs: list[Any] = []
    gen = None
    if ops is None:
        gen = Generator(seed if seed is not None else 0)
    try:
        a = _prepare(pristine, os.path.join(base, "A"))
        b = _prepare(pristine, os.path.join(base, "B"))
        timings["copy"] = time.monotonic() - t0
        with kernel_overlay(a["lowers"], a["upper"], a["work"], a["mnt"], flavor.kernel_opts) as ma:
            with side_b.mount(b["lowers"], b["upper"], b["work"], b["mnt"]) as mb:
                t = time.monotonic()
                if gen is not None:
                    gen.refresh(ma)
                total = n_ops if gen is not None else len(ops)
                for i in range(total):
                    op = gen.next() if gen is not None else ops[i]
                    done.append(op)
                    oa = run_op(ma, op)
                    ob = run_op(mb, op)
                    if flavor.mv_on_exdev and op.kind == "rename" and oa[0] == "E:EXDEV" \
                            and ob[0] != "E:EXDEV":
                        oa = mv_fallback(ma, op, a["upper"])
                        oa = (*oa[:3], ob[3])
                    outs.append(oa)
                    if not flavor.same(op, oa, ob):
                        return CaseResult(done, Divergence(
                            "op", f"  op #{i}: {op!r}\n{_op_diff(oa, ob)}", i, op),
                            notes, outs, timings)
                    if gen is not None:
                        gen.observe(op, oa, ma)
                timings["ops"] = time.monotonic() - t
                if last < 1:
                    return CaseResult(done, None, notes, outs, timings)
                t = time.monotonic()
                va = capture(ma)
                vb = capture(mb)
                timings["view"] = time.monotonic() - t
            d = flavor.diff(va, vb)
            if d:
                return CaseResult(done, Divergence("view", "\n".join(d)), notes, outs, timings)
            if last < 2:
                return CaseResult(done, None, notes, outs, timings)
            t = time.monotonic()
            with side_b.mount(b["lowers"], b["upper"], b["work"], b["mnt"]) as mb:
                vb = capture(mb)
            timings["remount"] = time.monotonic() - t
            d = flavor.diff(va, vb)
            if d:
                return CaseResult(done, Divergence("remount", "\n".join(d)), notes, outs, timings)
            if last < 3:
                return CaseResult(done, None, notes, outs, timings)
            t = time.monotonic()
            with (kernel_view([b["upper"], *b["lowers"]], b["mnt3"])
                  if getattr(side_b, "xwhiteouts", False) else _kernel_on_upper(b, notes, flavor)) as m3:
                vb = capture(m3)
            timings["kernel-on-upper"] = time.monotonic() - t
            d = flavor.diff(va, vb)
            if d and notes:
                d = [f"  note: {n}" for n in notes] + d
            if d:
                return CaseResult(done, Divergence("kernel-on-upper", "\n".join(d)), notes, outs,
                                  timings)
            if last < 4 or not flavor.cross_read:
                return CaseResult(done, None, notes, outs, timings)
            t = time.monotonic()
            with side_b.mount(a["lowers"], a["upper"], a["work3"], a["mnt3"]) as m4:
                vb = capture(m4)
            timings["side-b-on-kernel-upper"] = time.monotonic() - t
            d = flavor.diff(va, vb)
            if d:
                return CaseResult(done, Divergence("side-b-on-kernel-upper", "\n".join(d)),
                                  notes, outs, timings)
            return CaseResult(done, None, notes, outs, timings)
    finally:
        leftovers = _mounts_under(base)
        for m in leftovers:
            force_unmount(m)
        stuck = _mounts_under(base)
        timings["total"] = time.monotonic() - t0
        # Never rmtree through a mount that is still there.
        if not stuck and not os.environ.get("UNIONFS_DIFF_KEEP"):
            shutil.rmtree(base, ignore_errors=True)
        if leftovers:
            raise LeftoverMounts(f"mounts left behind (still mounted after cleanup: {stuck}): "
                                 f"{leftovers}")


class LeftoverMounts(AssertionError):
    pass


def _mounts_under(base: str) -> list[str]:
    base = os.path.realpath(base) + "/"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            if mp.startswith(base):
                out.append(mp)
    return out


# --- shrinking ---------------------------------------------------------------------------

def ddmin(items: list, fails: Callable[[list], list | None], deadline: float) -> list:
    """Delta debugging (complements, then single items) until *deadline*.

    *fails(candidate)* returns None when the candidate does not reproduce the
    failure, else the (possibly further truncated) list to continue from.
    """
    n = 2
    while len(items) >= 2 and time.monotonic() < deadline:
        chunk = math.ceil(len(items) / n)
        reduced = False
        for i in range(0, len(items), chunk):
            if time.monotonic() >= deadline:
                return items
            cand = items[:i] + items[i + chunk:]
            if not cand:
                continue
            r = fails(cand)
            if r is not None:
                items = r
                n = max(n - 1, 2)
                reduced = True
                break
        if not reduced:
            if n >= len(items):
                break
            n = min(n * 2, len(items))
    return items


READ_ONLY = {"stat", "read", "readdir", "getxattr", "access"}


def _failed(outcome: Any) -> bool:
    res = outcome[0] if isinstance(outcome, tuple) and outcome else outcome
    return isinstance(res, str) and res.startswith(("E:", "skip", "unsafe"))


def shrink(pristine: str, base: str, side_b: Side, ops: list[Op], div: Divergence,
           budget: float, outcomes: Sequence[Any] = (), flavor: Flavor = TRUSTED
           ) -> tuple[list[Op], Divergence, int, float]:
    """Shortest op list found within *budget* seconds that still diverges at div.stage."""
    t0 = time.monotonic()
    deadline = t0 + budget
    trials = 0
    errors: list[str] = []
    best = (list(ops), div)
    if div.stage == "op" and div.index is not None:
        best = (list(ops[: div.index + 1]), div)

    def fails(cand: list[Op]) -> list[Op] | None:
        nonlocal trials, best
        trials += 1
        try:
            r = run_case(pristine, os.path.join(base, f"shrink-{trials}"), side_b, ops=cand,
                         upto=div.stage, flavor=flavor)
        except LeftoverMounts:
            raise
        except Exception as e:  # noqa: BLE001 - a crash is not "the same" divergence
            errors.append(f"shrink run {trials}: {type(e).__name__}: {e}")
            return None
        d = r.divergence
        if d is None or d.stage != div.stage:
            return None
        cand = r.ops  # op stage: truncated at the diverging op
        if len(cand) < len(best[0]) or len(cand) == len(best[0]):
            best = (cand, d)
        return cand

    # Cheap big cuts first: ops that cannot change state (pure reads), then ops
    # that failed on the kernel side; each kept only if the divergence stays.
    if div.stage != "op" or len(best[0]) > 1:
        outs = list(outcomes[: len(best[0])])
        keep_last = div.stage == "op"
        for drop in (lambda op, o: op.kind in READ_ONLY,
                     lambda op, o: _failed(o)):
            if time.monotonic() >= deadline:
                break
            cur = best[0]
            cand = [op for i, (op, o) in enumerate(zip(cur, outs))
                    if not drop(op, o) or (keep_last and i == len(cur) - 1)]
            if len(cand) < len(cur) and fails(cand) is not None:
                kept = set(map(id, cand))
                outs = [o for op, o in zip(cur, outs) if id(op) in kept]
    ddmin(best[0], fails, deadline)
    if errors:
        best = (best[0], Divergence(best[1].stage, best[1].detail + "\n  (runs that crashed "
                                    "while shrinking: " + "; ".join(errors[:3]) + ")",
                                    best[1].index, best[1].op))
    return best[0], best[1], trials, time.monotonic() - t0


def report(seed: int, side_b: Side, n_ops: int, result: CaseResult,
           shrunk: tuple[list[Op], Divergence, int, float] | None) -> str:
    div = result.divergence
    assert div is not None
    lines = [f"seed {seed}: {side_b.name} diverges from kernel overlayfs at {div.headline()}"
             f" (after {len(result.ops)} of {n_ops} ops)", div.detail]
    if shrunk is not None:
        ops, d, trials, secs = shrunk
        lines.append(f"minimal reproduction ({len(ops)} ops, shrunk from {len(result.ops)} in "
                     f"{secs:.0f}s / {trials} runs), seed {seed}:")
        lines += [f"  {i:3d}: {op!r}" for i, op in enumerate(ops)]
        lines.append(f"which diverges at {d.headline()}:")
        lines.append(d.detail)
        lines.append("as Python: ops = [" + ", ".join(
            f"Op({op.kind!r}, {op.path!r}, {op.path2!r}, {op.args!r}, {op.user!r})"
            for op in ops) + "]")
    return "\n".join(lines)
