"""`unionfs diff` / `unionfs mark`: scenarios with exact expected output, JSON schema, log.

Every scenario mounts a fresh union over a small lower tree, makes changes
through the mount, and checks `unionfs diff` line for line; most also check
that `--rescan` (computed from the upper directory alone) and a diff of the
unmounted upper say exactly the same.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from helpers.libc import RENAME_EXCHANGE, renameat2
from helpers.mounting import daemon_pid, force_unmount, is_mounted, unionfs_cmd, unionfs_mount, wait_daemon_gone
from unionfs import changes

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, chown, trusted xattrs)"),
]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(unionfs_cmd(*args), capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"unionfs {' '.join(args)} failed: {proc.stderr}")
    return proc


def diff(target: str, *args: str) -> str:
    return run("diff", target, *args).stdout


def lines(text: str) -> list[str]:
    return text.splitlines()


def write(path: str, data: str = "", mode: str = "w") -> None:
    with open(path, mode) as f:
        f.write(data)


@pytest.fixture
def lower(tmp_path):
    low = tmp_path / "lower"
    low.mkdir()
    write(str(low / "x"), "hello\n")
    write(str(low / "keep"), "keep\n")
    (low / "d" / "sub").mkdir(parents=True)
    write(str(low / "d" / "f"), "f\n")
    write(str(low / "d" / "sub" / "g"), "g\n")
    (low / "etc").mkdir()
    write(str(low / "etc" / "hosts"), "127.0.0.1 localhost\n")
    write(str(low / "h1"), "linked\n")
    os.link(low / "h1", low / "h2")
    os.symlink("x", low / "ln")
    for p in low.rglob("*"):
        os.utime(p, (1_600_000_000, 1_600_000_000), follow_symlinks=False)
    return str(low)


class Union:
    def __init__(self, tmp_path, lowers: list[str]) -> None:
        self.lowers = lowers
        self.upper = str(tmp_path / "upper")
        self.mnt = str(tmp_path / "mnt")
        self.workdir = str(tmp_path / ".upper.unionfs-work")
        os.makedirs(self.upper, exist_ok=True)
        os.makedirs(self.mnt, exist_ok=True)

    def p(self, rel: str) -> str:
        return os.path.join(self.mnt, rel.lstrip("/"))

    def check(self, expected: list[str], *args: str) -> None:
        """The diff, its --rescan and (after unmount) the unmounted diff all say *expected*."""
        assert lines(diff(self.mnt, *args)) == expected
        assert lines(diff(self.mnt, "--rescan", *args)) == expected


@pytest.fixture
def union(tmp_path, lower):
    u = Union(tmp_path, [lower])
    with unionfs_mount(u.lowers, u.upper, u.mnt):
        yield u
    # unmounted: the compacted log, and the upper alone, must still say the same
    after = run("diff", u.upper)
    assert "note" not in after.stderr, after.stderr
    if hasattr(u, "final"):
        assert lines(after.stdout) == u.final


def final(u: Union, expected: list[str], *args: str) -> None:
    u.check(expected, *args)
    u.final = expected


# -- the rules, one at a time ------------------------------------------------------------------

def test_nothing_changed(union):
    final(union, [])


def test_modified_file(union):
    write(union.p("x"), "more\n", "a")
    final(union, ["C /x"])


def test_new_file_in_existing_dir_makes_it_changed(union):
    write(union.p("etc/new"), "n")
    final(union, ["C /etc", "A /etc/new"])


def test_new_tree_lists_every_child(union):
    os.makedirs(union.p("n/a/b"))
    write(union.p("n/a/file"), "1")
    os.makedirs(union.p("d/sub/deep/er"))
    final(union, ["C /d", "C /d/sub", "A /d/sub/deep", "A /d/sub/deep/er",
                  "A /n", "A /n/a", "A /n/a/b", "A /n/a/file"])


def test_deleted_dir_lists_only_the_top(union):
    subprocess.run(["rm", "-r", union.p("d")], check=True)
    final(union, ["D /d"])


def test_deleted_file_whiteout_over_lower(union):
    os.unlink(union.p("etc/hosts"))
    final(union, ["C /etc", "D /etc/hosts"])
    assert os.path.exists(os.path.join(union.upper, "etc", "hosts"))  # the whiteout


def test_created_then_deleted_is_not_listed(union):
    write(union.p("tmp1"), "x")
    os.makedirs(union.p("tmpdir/a"))
    os.unlink(union.p("tmp1"))
    subprocess.run(["rm", "-r", union.p("tmpdir")], check=True)
    final(union, [])


def test_deleted_and_recreated_is_one_change(union):
    os.unlink(union.p("x"))
    write(union.p("x"), "other\n")
    os.unlink(union.p("keep"))
    write(union.p("keep"), "keep\n")
    os.utime(union.p("keep"), (1_600_000_000, 1_600_000_000))  # identical again: not listed
    final(union, ["C /x"])


def test_rename_file(union):
    os.rename(union.p("x"), union.p("y"))
    os.rename(union.p("keep"), union.p("etc/hosts"))  # over a lower file
    final(union, ["C /etc/hosts", "D /keep", "D /x", "A /y"])  # /etc: no entry added or removed


def test_rename_dir(union):
    os.rename(union.p("d"), union.p("e"))
    final(union, ["D /d", "A /e", "A /e/f", "A /e/sub", "A /e/sub/g"])


def test_rename_dir_away_and_back(union):
    os.rename(union.p("d"), union.p("e"))
    os.rename(union.p("e"), union.p("d"))
    final(union, [])


def test_replace_dir_by_renamed_dir_compares_the_subtree(union):
    os.makedirs(union.p("e/sub"))
    write(union.p("e/f"), "f\n")
    os.utime(union.p("e/f"), (1_600_000_000, 1_600_000_000))
    write(union.p("e/new"), "")
    subprocess.run(["rm", "-r", union.p("d")], check=True)
    os.rename(union.p("e"), union.p("d"))
    # /d/f is the same as below (content, mode, owner, mtime): not listed
    final(union, ["C /d", "A /d/new", "C /d/sub", "D /d/sub/g"])


def test_replace_file_by_dir(union):
    os.unlink(union.p("x"))
    os.mkdir(union.p("x"))
    write(union.p("x/inside"), "")
    final(union, ["C /x", "A /x/inside"])
    rec = [json.loads(line) for line in lines(diff(union.mnt, "--json"))]
    assert rec[0] == {"kind": "C", "path": "/x", "type": "dir", "size": 0, "changes": ["type"],
                      "old_type": "file"}


def test_replace_dir_by_file(union):
    subprocess.run(["rm", "-r", union.p("d")], check=True)
    write(union.p("d"), "now a file")
    final(union, ["C /d"])


def test_opaque_dir(union):
    subprocess.run(["rm", "-r", union.p("d")], check=True)
    os.mkdir(union.p("d"))
    write(union.p("d/new"), "")
    assert os.getxattr(os.path.join(union.upper, "d"), "trusted.overlay.opaque") == b"y"
    final(union, ["C /d", "D /d/f", "A /d/new", "D /d/sub"])


def test_hard_links(union):
    write(union.p("h2"), "more\n", "a")          # both names are one inode
    os.link(union.p("x"), union.p("x2"))         # a new name, and x's link count changed
    os.link(union.p("ln"), union.p("ln2"), follow_symlinks=False)   # a symlink has links too
    final(union, ["C /h1", "C /h2", "C /ln", "A /ln2", "C /x", "A /x2"])
    recs = {r["path"]: r for r in map(json.loads, lines(diff(union.mnt, "--json")))}
    assert recs["/x"]["changes"] == ["links"] and recs["/h2"]["changes"] == ["content", "times"]
    assert recs["/ln"]["changes"] == ["links"] and recs["/ln"]["type"] == "symlink"


def test_hard_link_other_name_removed_then_written(union):
    os.unlink(union.p("h1"))
    write(union.p("h2"), "more\n", "a")
    final(union, ["D /h1", "C /h2"])
    assert json.loads(diff(union.mnt, "/h2", "--json"))["changes"] == ["content", "times", "links"]


@pytest.mark.parametrize("known", [True, False], ids=["other-name-looked-up", "other-name-unseen"])
def test_hard_link_written_then_that_name_removed(union, known):
    """The log names a hard-linked file by one name; diff finds the others by inode from
    it. When that name goes, the name left (or, if the daemon never saw it, a rescan)
    must still lead diff to the change."""
    write(union.p("h1"), "more\n", "a")
    if known:
        os.stat(union.p("h2"))
    os.unlink(union.p("h1"))
    final(union, ["D /h1", "C /h2"])


def test_xattr_only(union):
    os.setxattr(union.p("keep"), "user.note", b"hi")
    final(union, ["C /keep"])
    assert json.loads(diff(union.mnt, "--json"))["changes"] == ["xattrs"]


def test_chmod_only(union):
    os.chmod(union.p("keep"), 0o600)
    os.chmod(union.p("d"), 0o700)
    final(union, ["C /d", "C /keep"])
    recs = [json.loads(line) for line in lines(diff(union.mnt, "--json"))]
    assert [r["changes"] for r in recs] == [["mode"], ["mode"]]


def test_chown_and_touch(union):
    os.chown(union.p("keep"), 123, 456)
    os.utime(union.p("x"), (1_700_000_000, 1_700_000_000))
    final(union, ["C /keep", "C /x"])
    recs = [json.loads(line) for line in lines(diff(union.mnt, "--json"))]
    assert [r["changes"] for r in recs] == [["owner"], ["times"]]


def test_copy_up_without_change_is_not_listed(union):
    fd = os.open(union.p("keep"), os.O_RDWR)
    os.close(fd)
    os.chmod(union.p("x"), 0o644)  # the mode it has
    os.setxattr(union.p("etc"), "user.a", b"1")
    os.removexattr(union.p("etc"), "user.a")
    final(union, [])


def test_symlink_retarget(union):
    os.unlink(union.p("ln"))
    os.symlink("keep", union.p("ln"))
    final(union, ["C /ln"])
    assert json.loads(diff(union.mnt, "--json"))["changes"][0] == "content"


def test_path_filters(union):
    write(union.p("etc/new"), "")
    write(union.p("x"), "y", "a")
    write(union.p("d/sub/n"), "")
    assert lines(diff(union.mnt, "/etc")) == ["C /etc", "A /etc/new"]
    assert lines(diff(union.mnt, "/d/sub", "/x/")) == ["C /d/sub", "A /d/sub/n", "C /x"]
    assert lines(diff(union.mnt, "/nothing")) == []
    final(union, ["C /d", "C /d/sub", "A /d/sub/n", "C /etc", "A /etc/new", "C /x"])


def test_stat(union):
    write(union.p("new"), "12345")
    write(union.p("x"), "123", "w")
    os.unlink(union.p("keep"))
    out = json.loads(diff(union.mnt, "--stat", "--json"))
    assert out == {"A": {"count": 1, "bytes": 5}, "C": {"count": 1, "bytes": 3},
                   "D": {"count": 1, "bytes": 5}, "total": {"count": 3, "bytes": 13}}
    text = lines(diff(union.mnt, "--stat"))
    assert [t.split() for t in text] == [["added", "1", "paths", "5", "bytes"],
                                         ["changed", "1", "paths", "3", "bytes"],
                                         ["deleted", "1", "paths", "5", "bytes"],
                                         ["total", "3", "paths", "13", "bytes"]]
    final(union, ["D /keep", "A /new", "C /x"])


def test_marks(union):
    write(union.p("x"), "1", "a")
    os.mkdir(union.p("build"))
    write(union.p("build/step1"), "")
    run("mark", union.mnt, "step1")
    write(union.p("build/step2"), "")
    write(union.p("x"), "2", "a")
    os.unlink(union.p("build/step1"))
    os.unlink(union.p("keep"))
    run("mark", union.mnt, "step2")
    os.mkdir(union.p("etc/conf.d"))
    assert lines(diff(union.mnt, "--since", "step1")) == [
        "C /build", "D /build/step1", "A /build/step2", "C /etc", "A /etc/conf.d", "D /keep", "C /x"]
    assert lines(diff(union.mnt, "--since", "step2")) == ["C /etc", "A /etc/conf.d"]
    assert lines(run("diff", "--since", "step2", union.mnt, "/build").stdout) == []
    listed = [line.split("\t")[0] for line in lines(run("mark", union.mnt).stdout)]
    assert listed == ["step1", "step2"]
    err = run("mark", union.mnt, "step1", check=False)
    assert err.returncode == 1 and err.stderr.startswith("unionfs: error: mark 'step1' exists")
    run("mark", "--force", union.mnt, "step1")  # moved to now
    assert lines(diff(union.mnt, "--since", "step1")) == []
    os.rmdir(union.p("etc/conf.d"))
    assert lines(diff(union.mnt, "--since", "step1")) == ["C /etc", "D /etc/conf.d"]
    assert lines(diff(union.mnt, "--since", "step2")) == []
    final(union, ["A /build", "A /build/step2", "D /keep", "C /x"])


# -- the log ----------------------------------------------------------------------------------

def _records(workdir: str) -> list[str]:
    with open(os.path.join(workdir, "changes.log"), "rb") as f:
        data = f.read().decode()
    assert data.startswith("# unionfs changes log v1\n")
    return data.splitlines()[1:]


@pytest.mark.slow
def test_log_stays_compact(tmp_path, lower):
    u = Union(tmp_path, [lower])
    with unionfs_mount(u.lowers, u.upper, u.mnt):
        # about 5 records an iteration: well past SLACK, so the log must have been
        # compacted on the way (else it would hold them all)
        for i in range(changes.SLACK // 3 + 200):
            write(u.p("x"), str(i))          # a file rewritten many times
            os.mkdir(u.p("dir"))             # a directory made and removed many times
            os.rmdir(u.p("dir"))
            write(u.p(f"tmp{i}"), "")       # distinct names made and removed
            os.unlink(u.p(f"tmp{i}"))
        assert len(_records(u.workdir)) < changes.SLACK + 100
        assert lines(diff(u.mnt)) == ["C /x"]
    # an unmount does not compact (the layers stay busy until the daemon lets go): the next
    # mount does; meanwhile the unmounted diff reads the log as it is
    assert os.path.exists(os.path.join(u.workdir, "changes.clean"))
    assert lines(diff(u.upper)) == ["C /x"]
    with unionfs_mount(u.lowers, u.upper, u.mnt):
        recs = _records(u.workdir)
    assert [r.split(" ")[0] + " " + r.split(" ")[2] for r in recs] == ["C /x"]


def test_log_format(tmp_path, lower):
    u = Union(tmp_path, [lower])
    with unionfs_mount(u.lowers, u.upper, u.mnt):
        before = time.time()
        write(u.p("with space\\and\nnewline"), "")
        os.rename(u.p("d"), u.p("e"))
        recs = _records(u.workdir)
        assert not os.path.exists(os.path.join(u.workdir, "changes.clean"))
        for r in recs:
            kind, stamp, path = r.split(" ")
            assert kind in "ACDT" and before - 1 < float(stamp) < time.time() + 1
        paths = {r.split(" ")[2]: r.split(" ")[0] for r in recs}
        assert paths["/with\\x20space\\x5cand\\x0anewline"] == "A"
        assert paths["/e"] == "T" and paths["/d"] == "D"
        out = diff(u.mnt)
        assert "A /with space\\x5cand\\x0anewline\n" in out
        assert json.loads(lines(diff(u.mnt, "--json"))[-1])["path"] == "/with space\\and\nnewline"


def test_a_write_open_and_its_close_record_one_change(tmp_path, lower):
    """The write open records C; the writeback cache's time flush at close would
    record the same again, and a repeat of the previous record is not written."""
    u = Union(tmp_path, [lower])
    with unionfs_mount(u.lowers, u.upper, u.mnt):
        n0 = len(_records(u.workdir))
        with open(u.p("x"), "ab") as f:
            f.write(b"+")
        os.stat(u.p("x"))
        recs = _records(u.workdir)[n0:]
        assert [r.split(" ")[0] + " " + r.split(" ")[2] for r in recs] == ["C /x"]
        os.chmod(u.p("x"), 0o600)   # C again, twice: repeats, not written
        os.chmod(u.p("x"), 0o640)
        os.unlink(u.p("x"))
        recs = _records(u.workdir)[n0:]
        assert [r.split(" ")[0] + " " + r.split(" ")[2] for r in recs] == ["C /x", "D /x"]
        assert lines(diff(u.mnt)) == ["D /x"]


def test_unmounted_upper_and_lower_override(tmp_path, lower):
    u = Union(tmp_path, [lower])
    with unionfs_mount(u.lowers, u.upper, u.mnt):
        write(u.p("x"), "changed")
    assert lines(diff(u.upper)) == ["C /x"]
    empty = tmp_path / "empty"
    empty.mkdir()
    # against an empty lower, everything in the upper is new
    assert lines(diff(u.upper, "--lower", str(empty))) == ["A /x"]


def test_damaged_or_missing_log_is_rebuilt_and_said(tmp_path, lower):
    u = Union(tmp_path, [lower])
    with unionfs_mount(u.lowers, u.upper, u.mnt):
        write(u.p("x"), "changed")
        os.unlink(u.p("keep"))
    log = os.path.join(u.workdir, "changes.log")
    write(log, "garbage\n")
    out = run("diff", u.upper)
    assert lines(out.stdout) == ["D /keep", "C /x"]
    assert out.stderr.startswith("unionfs: note: the changes log is damaged")
    out = run("diff", u.upper)  # rebuilt: no note any more
    assert lines(out.stdout) == ["D /keep", "C /x"] and out.stderr == ""
    os.unlink(log)
    out = run("diff", u.upper)
    assert lines(out.stdout) == ["D /keep", "C /x"] and "no changes log" in out.stderr
    # edited behind the mount's back: --rescan picks it up
    write(os.path.join(u.upper, "sneaky"), "")
    assert lines(diff(u.upper)) == ["D /keep", "C /x"]
    assert lines(diff(u.upper, "--rescan")) == ["D /keep", "A /sneaky", "C /x"]
    assert lines(diff(u.upper)) == ["D /keep", "A /sneaky", "C /x"]


def test_sigkill_then_diff_and_remount(tmp_path, lower):
    u = Union(tmp_path, [lower])
    proc = run("mount", ":".join(u.lowers), u.upper, u.mnt)
    try:
        write(u.p("x"), "changed")
        os.mkdir(u.p("newdir"))
        pid = daemon_pid(u.mnt)
        os.kill(pid, signal.SIGKILL)
        # recorded before the replies: the log alone already names both
        named = {r.split(" ")[2] for r in _records(u.workdir)}
        assert {"/x", "/newdir"} <= named
    finally:
        wait_daemon_gone(pid)   # a daemon still in a disk wait holds the workdir's lock
        force_unmount(u.mnt)
    assert not is_mounted(u.mnt) and proc.returncode == 0
    out = run("diff", u.upper)
    assert lines(out.stdout) == ["A /newdir", "C /x"]
    assert "not clean" in out.stderr
    with unionfs_mount(u.lowers, u.upper, u.mnt):
        out = run("diff", u.mnt)
        assert lines(out.stdout) == ["A /newdir", "C /x"] and out.stderr == ""


# -- errors ---------------------------------------------------------------------------------

def test_errors_are_one_line(tmp_path, lower):
    def fails(*args: str) -> str:
        proc = run(*args, check=False)
        assert proc.returncode != 0 and proc.stdout == ""
        assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("unionfs: error: ")
        return proc.stderr

    assert "not a directory" in fails("diff", str(tmp_path / "missing"))
    upper = tmp_path / "u2"
    upper.mkdir()
    assert "--lower" in fails("diff", str(upper))
    assert "no mark" in fails("diff", "--since", "nope", "--lower", lower, str(upper))
    assert "bad mark name" in fails("mark", str(upper), "../x")
    assert "'..'" in fails("diff", "--lower", lower, str(upper), "/a/../b")


# -- JSON schema ------------------------------------------------------------------------------

# The documented schema of `unionfs diff --json` (README, "unionfs diff"): one object per line.
CHANGE_SCHEMA = {
    "kind": (str, {"A", "C", "D"}),
    "path": (str, None),
    "type": (str, {"file", "dir", "symlink", "fifo", "socket", "char-device", "block-device"}),
    "size": (int, None),
}
ORDER = ["type", "content", "mode", "owner", "times", "xattrs", "links"]
CHANGES = set(ORDER)


def validate_change(obj: object) -> None:
    assert isinstance(obj, dict), obj
    required = set(CHANGE_SCHEMA)
    allowed = required | {"changes", "old_type"}
    assert required <= set(obj) <= allowed, obj
    for key, (typ, values) in CHANGE_SCHEMA.items():
        assert isinstance(obj[key], typ) and not isinstance(obj[key], bool), (key, obj)
        if values is not None:
            assert obj[key] in values, (key, obj)
    assert obj["path"].startswith("/") and obj["size"] >= 0
    if obj["kind"] == "C":
        ch = obj["changes"]
        assert isinstance(ch, list) and len(set(ch)) == len(ch) and set(ch) <= CHANGES, obj
        assert ch == sorted(ch, key=ORDER.index), obj
        assert ("old_type" in obj) == ("type" in ch), obj
        if "old_type" in obj:
            assert obj["old_type"] in CHANGE_SCHEMA["type"][1] and obj["old_type"] != obj["type"]
    else:
        assert "changes" not in obj and "old_type" not in obj, obj


def validate_stat(obj: object) -> None:
    assert isinstance(obj, dict) and set(obj) == {"A", "C", "D", "total"}, obj
    for v in obj.values():
        assert set(v) == {"count", "bytes"} and all(isinstance(x, int) and x >= 0 for x in v.values())
    for k in ("count", "bytes"):
        assert obj["total"][k] == obj["A"][k] + obj["C"][k] + obj["D"][k]


def test_json_schema(union):
    write(union.p("x"), "1", "a")
    os.chmod(union.p("keep"), 0o600)
    os.mkdir(union.p("nd"))
    os.mkfifo(union.p("nd/fifo"))
    os.symlink("t", union.p("nd/sl"))
    subprocess.run(["rm", "-r", union.p("d")], check=True)
    write(union.p("d"), "")
    os.setxattr(union.p("etc/hosts"), "user.a", b"1")
    os.unlink(union.p("h1"))
    out = lines(diff(union.mnt, "--json"))
    assert out == [line for line in out if line.strip()]
    objs = [json.loads(line) for line in out]
    for obj in objs:
        validate_change(obj)
    assert [o["kind"] + " " + o["path"] for o in objs] == lines(diff(union.mnt))
    kinds = {o["path"]: o for o in objs}
    assert kinds["/nd/fifo"]["type"] == "fifo" and kinds["/nd/sl"]["type"] == "symlink"
    assert kinds["/d"]["changes"] == ["type"] and kinds["/keep"]["changes"] == ["mode"]
    assert kinds["/h2"]["changes"] == ["links"]
    validate_stat(json.loads(diff(union.mnt, "--json", "--stat")))
    final(union, ["C /d", "C /etc/hosts", "D /h1", "C /h2", "C /keep", "A /nd", "A /nd/fifo",
                  "A /nd/sl", "C /x"])


def test_exchange(union):
    renameat2(union.p("d"), union.p("etc"), RENAME_EXCHANGE)   # fails the test if refused
    final(union, ["C /d", "D /d/f", "A /d/hosts", "D /d/sub",
                  "C /etc", "A /etc/f", "D /etc/hosts", "A /etc/sub", "A /etc/sub/g"])
