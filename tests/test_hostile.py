"""Hostile input from inside the mount (and from the backing side): nothing escapes (issue 8).

* No path leads outside SOURCE: backing symlinks to the outside (absolute,
  relative with ``..``) are never followed by the daemon, also when they are
  swapped in behind a cached negative entry or in place of a known directory;
  a view rooted at the mount (chroot) resolves them inside the view.
* Rename races between directories while other processes walk the tree.
* Hard links to files the caller does not own.
* Records cannot be forged or removed through the mount: every spelling of
  the record names, every user; the side table and temporary names are out
  of reach.
* View permission bits are enforced for every user.
* A setuid file in the view never gives privilege on the host.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from asuser import py_as, run_as, start_py
from fsutil import Mount
from records import LEGACY, RECORD, record, side_table_rows
from rel_util import TMP_PREFIX, check_consistent, make_pair, work
from sysx import errno_of

MODES = ["table", "xattr"]
U1, U2, U3, G1 = 1000, 1001, 2000, 1100

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, chroot, other users)")


def _tree_state(root: Path) -> dict:
    """Names, types, sizes, contents and mtimes below ``root`` (to prove nothing changed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            data = Path(p).read_bytes() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, data)
    st = os.lstat(root)
    out["."] = (st.st_mode, st.st_uid, st.st_mtime_ns)
    return out


def _outside(work: Path) -> Path:
    o = work / "outside"
    o.mkdir()
    (o / "secret").write_text("SECRET")
    (o / "sub").mkdir()
    (o / "sub" / "x").write_text("X")
    return o


def _assert_clean(m: Mount) -> None:
    assert m.alive(), "the daemon died"
    bad = m.bad_log_lines()
    assert not bad, "\n".join(bad[:20])


# -- symlinks out of SOURCE -----------------------------------------------------------------------
_IN_CHROOT = r"""
import errno, json, os, sys
mp = sys.argv[1]
os.chroot(mp)
os.chdir("/")
res = {}
def t(name, fn):
    try:
        v = fn()
        res[name] = ["ok", v]
    except OSError as e:
        res[name] = [errno.errorcode[e.errno], None]
t("read_abs", lambda: open("/abs/secret").read())
t("read_rel", lambda: open("/d/rel/secret").read())
t("read_file_link", lambda: open("/f").read())
t("list_deep", lambda: sorted(os.listdir("/d/deep")))
t("write_deep", lambda: open("/d/deep/escaped", "w").write("x"))
t("write_abs", lambda: open("/abs/new", "w").write("x"))
t("mkdir_rel", lambda: os.mkdir("/d/rel/newdir"))
t("realpath", lambda: os.path.realpath("/d/deep/d/rel"))
print(json.dumps(res))
"""


@pytest.mark.parametrize("mode", MODES)
def test_symlinks_out_of_source_resolve_inside_the_view(work, mode):
    """Backing symlinks to the outside (absolute, relative with ..): a view rooted at the
    mount resolves them inside the view; nothing outside SOURCE is read or written."""
    outside = _outside(work)
    before = _tree_state(outside)
    src, mp = make_pair(work)
    (src / "d").mkdir()
    os.symlink(str(outside), src / "abs")
    os.symlink("../../outside", src / "d" / "rel")  # from SRC/d: really leads to work/outside
    os.symlink("../" * 12 + "etc", src / "d" / "deep")
    os.symlink(str(outside / "secret"), src / "f")
    with Mount(src, mp, mode=mode) as m:
        r = subprocess.run([sys.executable, "-c", _IN_CHROOT, str(mp)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res["read_abs"][0] == "ENOENT", res
        assert res["read_rel"][0] == "ENOENT", res
        assert res["read_file_link"][0] == "ENOENT", res
        # ../../../etc from /d climbs to the view root and stops there; no etc in the view
        assert res["list_deep"][0] == "ENOENT", res
        assert res["write_deep"][0] == "ENOENT", res
        assert res["write_abs"][0] == "ENOENT", res
        assert res["mkdir_rel"][0] == "ENOENT", res
        # the daemon shows the links as they are
        assert os.readlink(mp / "abs") == str(outside)
        assert os.readlink(mp / "d" / "deep") == "../" * 12 + "etc"
        # operations on the link itself stay on the link
        if mode == "table":
            os.chown(mp / "abs", 5, 5, follow_symlinks=False)
            assert os.lstat(src / "abs").st_uid == 100005
        else:
            os.chown(mp / "abs", 5, 5, follow_symlinks=False)
            assert os.lstat(mp / "abs").st_uid == 5
        assert errno_of(lambda: os.setxattr(mp / "abs", "user.x", b"1", follow_symlinks=False)) == errno.EPERM
        os.utime(mp / "abs", ns=(10**9, 10**9), follow_symlinks=False)
        _assert_clean(m)
    assert _tree_state(outside) == before
    assert not (work / "escaped").exists() and not Path("/escaped").exists()


def in_view(mp: Path, fn):
    """Run ``fn()`` in a child process whose root is the mount (as a container sees the view);
    returns its value, or the errno name it failed with."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            os.chroot(str(mp))
            os.chdir("/")
            try:
                res = ["ok", fn()]
            except OSError as e:
                res = [errno.errorcode.get(e.errno, str(e.errno)), None]
            os.write(w, json.dumps(res).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    status, value = json.loads(data)
    return value if status == "ok" else status


@pytest.mark.parametrize("mode,maps", [("table", None), ("table", ["b:0:0:65536"]), ("xattr", None)])
def test_symlink_swapped_in_behind_cached_entries(work, mode, maps):
    """A backing symlink to the outside put where the kernel has cached 'no such name', or in
    place of a directory it knows: creating through the mount never follows it.

    (The operations run in a process rooted at the mount: from the host, a path through a
    symlink in the view is resolved by the caller's kernel like any other symlink.)"""
    outside = _outside(work)
    before = _tree_state(outside)
    src, mp = make_pair(work)
    (src / "known").mkdir()
    # with b:0:0:65536 root's files are created directly (no temporary name), the path that
    # once followed such a link out of SOURCE
    with Mount(src, mp, mode=mode, maps=maps, nofile=256) as m:
        names = ["c1", "c2", "c3", "c4", "c5", "c6", "c7"]
        for n in names:
            assert errno_of(lambda: os.lstat(mp / n)) == errno.ENOENT  # cached negative entry
        os.listdir(mp / "known")
        for n in names:
            os.symlink(str(outside / "secret") if n != "c6" else str(outside / "sub"), src / n)
        (mp / "plain").write_text("plain")

        def creat(p, flags):
            return lambda: os.close(os.open(p, os.O_CREAT | os.O_WRONLY | flags, 0o644))

        assert in_view(mp, creat("/c1", os.O_TRUNC)) in ("ELOOP", "EEXIST")
        assert in_view(mp, creat("/c2", os.O_EXCL)) == "EEXIST"
        assert in_view(mp, lambda: os.mkdir("/c3")) == "EEXIST"
        assert in_view(mp, lambda: os.mkfifo("/c4")) == "EEXIST"
        assert in_view(mp, lambda: os.symlink("x", "/c5")) == "EEXIST"
        assert in_view(mp, lambda: os.link("/plain", "/c6")) == "EEXIST"
        assert in_view(mp, lambda: os.rename("/plain", "/c7")) is None  # replaces the link itself
        assert (src / "c7").read_text() == "plain" and not (src / "c7").is_symlink()
        # a known directory replaced by a symlink to the outside
        os.rename(src / "known", src / "known.old")
        os.symlink(str(outside / "sub"), src / "known")
        assert in_view(mp, lambda: open("/known/new1", "w").write("n")) in (1, "ESTALE", "ENOENT")
        for i in range(300):  # push the directory's descriptor out of the daemon's table
            (mp / f"filler{i}").write_text("f")
        assert in_view(mp, lambda: open("/known/new2", "w").write("n")) in (1, "ESTALE", "ENOENT")
        assert not (outside / "sub" / "new1").exists() and not (outside / "sub" / "new2").exists()
        assert m.alive()
        _assert_clean(m)
    assert _tree_state(outside) == before


# -- rename races -----------------------------------------------------------------------------------
_WALKER = r"""
import errno, os, sys, time
mp, seconds = sys.argv[1], float(sys.argv[2])
root = os.stat(mp)
end = time.monotonic() + seconds
bad = []
walks = climbs = 0
OK = {errno.ENOENT}
def onerror(e):
    if e.errno not in OK:
        bad.append(f"walk: {e!r}")
while time.monotonic() < end and len(bad) < 20:
    try:
        for dirpath, dirnames, filenames in os.walk(mp, onerror=onerror):
            for f in filenames:
                p = os.path.join(dirpath, f)
                try:
                    with open(p, "rb") as fh:
                        data = fh.read()
                    if not data.startswith(b"file "):
                        bad.append(f"{p}: content {data[:40]!r}")
                except OSError as e:
                    if e.errno not in OK:
                        bad.append(f"read {p}: {e!r}")
        walks += 1
    except OSError as e:
        if e.errno not in OK:
            bad.append(f"walk: {e!r}")
    # climb with .. from deep inside while directories move: must reach the mount root
    # without ever leaving the mount
    for start in ("a/b/c/d", "z/c/d", "a/b2/c/d", "a/d"):
        try:
            os.chdir(os.path.join(mp, start))
        except OSError:
            continue
        for step in range(40):
            st = os.stat(".")
            if (st.st_dev, st.st_ino) == (root.st_dev, root.st_ino):
                climbs += 1
                break
            if st.st_dev != root.st_dev:
                bad.append(f"climbing from {start}: left the mount at step {step} ({os.getcwd()})")
                break
            try:
                os.chdir("..")
            except OSError as e:
                bad.append(f"chdir ..: {e!r}")
                break
        else:
            bad.append(f"climbing from {start}: never reached the root")
        os.chdir("/")
print(walks, climbs)
for b in bad:
    print(b, file=sys.stderr)
sys.exit(1 if bad else 0)
"""

_MOVER = r"""
import errno, os, sys, time
base, seconds = sys.argv[1], float(sys.argv[2])
end = time.monotonic() + seconds
moves = 0
P = lambda *a: os.path.join(base, *a)
pairs = [("a/b/c", "z/c"), ("z/c", "a/b/c"), ("a/b", "a/b2"), ("a/b2", "a/b"), ("a/b/c/d", "a/d"), ("a/d", "a/b/c/d")]
bad = []
while time.monotonic() < end:
    for s, d in pairs:
        try:
            os.rename(P(s), P(d))
            moves += 1
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST, errno.EINVAL, errno.EBUSY):
                bad.append(f"rename {s} {d}: {e!r}")
    try:  # a directory into its own subdirectory
        os.rename(P("a"), P("a/b/c/inside"))
        bad.append("moved a directory into itself")
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOENT):
            bad.append(f"rename into itself: {e!r}")
print(moves)
for b in bad[:20]:
    print(b, file=sys.stderr)
sys.exit(1 if bad else 0)
"""


def _race_tree(root: Path) -> None:
    for d in ["a/b/c/d/e", "z"]:
        (root / d).mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(["a", "a/b", "a/b/c", "a/b/c/d", "a/b/c/d/e", "z"]):
        for j in range(5):
            (root / d / f"f{j}").write_text(f"file {i}.{j}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "mode,opts,nofile,side",
    [
        ("table", [], None, "view"),
        ("xattr", [], 256, "view"),
        ("table", ["cache=never"], 256, "backing"),
    ],
)
def test_rename_races_between_directories(work, mode, opts, nofile, side):
    """Directories moved between parents (through the mount, or behind it with cache=never)
    while two processes walk the tree and climb out with '..': no escape, no unexpected errno,
    a consistent tree afterwards."""
    rename_race(work, mode, opts, nofile, side, seconds=5, walkers=2)


def rename_race(work, mode, opts, nofile, side: str, seconds: float, walkers: int, timeout: float = 120) -> None:
    """Directories moved between parents through the mount (``side="view"``) or behind it, while
    ``walkers`` processes walk the tree and climb out with '..', for ``seconds``: no escape, no
    unexpected errno, a consistent tree and a clean log afterwards."""
    outside = _outside(work)
    before = _tree_state(outside)
    src, mp = make_pair(work)
    with Mount(src, mp, mode=mode, opts=opts, nofile=nofile) as m:
        _race_tree(mp)
        base = mp if side == "view" else src
        procs = [start_py(_WALKER, str(mp), str(seconds)) for _ in range(walkers)]
        mover = subprocess.run(
            [sys.executable, "-c", _MOVER, str(base), str(seconds)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert mover.returncode == 0, mover.stderr
        for w in procs:
            out, err = w.communicate(timeout=timeout)
            if side == "backing":
                # behind the mount's back a walk may meet a name that moved away: ESTALE is
                # allowed there, nothing else
                err = "\n".join(ln for ln in err.splitlines() if "Stale file handle" not in ln)
            assert w.returncode == 0 or not err.strip(), err
            walks, climbs = map(int, out.split())
            assert walks > 0 and climbs > 0, out
        assert int(mover.stdout) > 10
        check_consistent(m)
        _assert_clean(m)
    assert _tree_state(outside) == before


# -- hard links -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_hard_links_to_files_we_do_not_own(work, mode):
    src, mp = make_pair(work)
    with Mount(src, mp, mode=mode) as m:
        (mp / "secret").write_text("root only")
        os.chmod(mp / "secret", 0o600)
        (mp / "tmp").mkdir()
        os.chmod(mp / "tmp", 0o1777)
        with open("/proc/sys/fs/protected_hardlinks") as f:
            protected = f.read().strip() == "1"
        r = run_as(U1, U1, f"ln {mp}/secret {mp}/tmp/mine")
        if protected:
            assert r.returncode != 0 and "not permitted" in r.stderr, r
            assert not (mp / "tmp" / "mine").exists()
        # a link root made for the user is still root's file, for everyone
        os.link(mp / "secret", mp / "tmp" / "given")
        st = os.lstat(mp / "tmp" / "given")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_nlink) == (0, 0, 0o600, 2)
        for cmd in (
            f"cat {mp}/tmp/given",
            f"echo x >> {mp}/tmp/given",
            f"chmod 666 {mp}/tmp/given",
            f"chown {U1} {mp}/tmp/given",
            f"rm -f {mp}/tmp/given",
            f"mv {mp}/tmp/given {mp}/tmp/other",
        ):
            r = run_as(U1, U1, cmd)
            assert r.returncode != 0, (cmd, r)
        assert (mp / "secret").read_text() == "root only"
        # the user's own hard links share the user's ownership and one record
        run_as(
            U1, U1, f"echo mine > {mp}/tmp/own && ln {mp}/tmp/own {mp}/tmp/own2 && chmod 640 {mp}/tmp/own2", check=True
        )
        a, b = os.lstat(mp / "tmp" / "own"), os.lstat(mp / "tmp" / "own2")
        assert (a.st_ino, a.st_uid, a.st_mode) == (b.st_ino, b.st_uid, b.st_mode) and a.st_uid == U1
        assert stat.S_IMODE(a.st_mode) == 0o640
        assert run_as(U2, U2, f"chown {U2} {mp}/tmp/own2").returncode != 0
        run_as(U1, U1, f"rm {mp}/tmp/own", check=True)
        st = os.lstat(mp / "tmp" / "own2")
        assert (st.st_uid, stat.S_IMODE(st.st_mode), st.st_nlink) == (U1, 0o640, 1)
        check_consistent(m)
        m.remount()
        st = os.lstat(mp / "tmp" / "own2")
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (U1, 0o640)
        check_consistent(m)
        _assert_clean(m)


# -- records cannot be forged ----------------------------------------------------------------------
_FORGE = r"""
import errno, json, os, sys
mp = sys.argv[1]
names = json.loads(sys.argv[2])
targets = ["pub", "mine", "dir", "lnk", "fifo"]
res = {}
for t in targets:
    p = os.path.join(mp, t)
    for n in names:
        for what, fn in (("set", lambda: os.setxattr(p, n, b"0:0:104755", follow_symlinks=False)),
                         ("replace", lambda: os.setxattr(p, n, b"0:0:40777", os.XATTR_REPLACE, follow_symlinks=False)),
                         ("remove", lambda: os.removexattr(p, n, follow_symlinks=False))):
            try:
                fn()
                res[f"{t} {what} {n}"] = "ok"
            except OSError as e:
                res[f"{t} {what} {n}"] = errno.errorcode.get(e.errno, str(e.errno))
    try:
        listed = os.listxattr(p, follow_symlinks=False)
    except OSError as e:
        listed = []
    res[f"{t} list"] = sorted(listed)
# the side table and temporary names are out of reach: names we use ourselves are either
# refused or stored escaped, never meeting the real ones
u = os.getuid()
own = os.path.join(mp, "dir", f"own{u}")
open(own, "w").close()
J = lambda *a: os.path.join(mp, *a)
for what, fn in (
    ("stat store", lambda: os.stat(J(".shiftfs", "records.db"))),
    ("open db", lambda: open(J(".shiftfs", "records.db"), "rb").read(16).decode(errors="replace")),
    ("follow link to db", lambda: open(J("dir", "todb"), "rb").read(16).decode(errors="replace")),
    ("mkdir store", lambda: os.mkdir(J(".shiftfs"))),
    ("symlink store", lambda: os.symlink("x", J(".shiftfs"))),
    ("create db", lambda: open(J(".shiftfs", "records.db"), "w").write("forged")),
    ("create tmp", lambda: open(J("dir", f".shiftfs~t0123456789abcde{u}"), "w")),
    ("mkdir tmp", lambda: os.mkdir(J("dir", f".shiftfs~x{u}"))),
    ("rename to tmp", lambda: os.rename(own, J("dir", f".shiftfs~t{u}"))),
    ("rename to esc", lambda: os.rename(J("dir", f".shiftfs~t{u}"), J("dir", f".shiftfs~e{u}"))),
    ("link to store", lambda: os.link(J("dir", f".shiftfs~e{u}"), J(".shiftfs", f"l{u}"))),
):
    try:
        v = fn()
        res[what] = "ok" if not isinstance(v, str) else "ok:" + v
    except OSError as e:
        res[what] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(res))
"""

_SPELLINGS = [
    RECORD,
    LEGACY,
    RECORD + ".x",
    "user.containers.override_" + RECORD,
    "user.containers.override_",
    RECORD.replace("override", "Override"),
    LEGACY + "2",
    "user.fuseoverlayfs.",
    "trusted.overlay.opaque",
    "trusted" + RECORD.removeprefix("user"),
    "security" + RECORD.removeprefix("user"),
    RECORD + " ",
    RECORD.replace("user.", "user..", 1),
]


def _records(src: Path) -> dict:
    """The records of the objects the test made: raw xattrs on files/dirs, side-table rows."""
    out: dict = {}
    for n in ["pub", "mine", "dir"]:
        out[n] = {x: v for x in (RECORD, LEGACY) if (v := record(src / n, x)) is not None}
    for n in ["lnk", "fifo", "dir/todb"]:
        out[n] = side_table_rows(src, os.lstat(src / n).st_ino)
        assert out[n], f"no side-table row for {n}"
    return out


def _view_owners(mp: Path) -> dict:
    out = {}
    for n in ["pub", "mine", "dir", "lnk", "fifo", "dir/todb"]:
        st = os.lstat(mp / n)
        out[n] = (st.st_uid, st.st_gid, st.st_mode)
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("opts", [[], ["legacy_xattr"]])
def test_records_cannot_be_forged_or_removed(work, opts):
    """Every spelling of the record names, set/replaced/removed by root, the owner and another
    user on files, dirs, symlinks and FIFOs: the records on disk and the view stay the same."""
    src, mp = make_pair(work)
    with Mount(src, mp, mode="xattr", opts=opts) as m:
        (mp / "pub").write_text("p")
        os.chmod(mp / "pub", 0o666)
        (mp / "mine").write_text("m")
        (mp / "dir").mkdir(mode=0o777)
        os.chmod(mp / "dir", 0o777)
        os.symlink("pub", mp / "lnk")
        os.mkfifo(mp / "fifo", 0o666)
        os.symlink("../.shiftfs/records.db", mp / "dir" / "todb")
        for n in ["pub", "mine", "dir", "lnk", "fifo", "dir/todb"]:
            os.chown(mp / n, U1, U1, follow_symlinks=False)
        os.chmod(mp / "mine", 0o644)
        records = _records(src)
        owners = _view_owners(mp)
        assert owners["pub"][:2] == (U1, U1)
        for uid in (0, U1, U3):
            r = py_as(uid, uid, _FORGE, mp, json.dumps(_SPELLINGS), script=True)
            assert r.returncode == 0, r.stderr
            res = json.loads(r.stdout)
            assert _records(src) == records, f"uid {uid} changed a record: {res}"
            assert _view_owners(mp) == owners, f"uid {uid} changed the view: {res}"
            for t in ["pub", "mine", "dir", "lnk", "fifo"]:
                assert RECORD not in res[f"{t} list"] and LEGACY not in res[f"{t} list"], res[f"{t} list"]
                # what a user set under a record name is kept under an escaped name: removing it
                # again works, and never removes the real record
            # the view's /.shiftfs is never the real store: absent, or what root made in its name
            for what in ("stat store", "open db", "follow link to db"):
                assert res[what] in ("ENOENT", "ok", "ok:forged"), (uid, what, res[what])
                assert "SQLite" not in res[what], (uid, what, res[what])
            # the real store keeps exactly its own files, whatever was made in its name
            assert sorted(os.listdir(src / ".shiftfs")) <= ["records.db", "records.db-shm", "records.db-wal"]
            assert (src / ".shiftfs" / "records.db").read_bytes()[:16] == b"SQLite format 3\0"
            if uid == 0:
                assert res["mkdir store"] in ("ok", "EPERM"), res["mkdir store"]
                assert res["create db"] in ("ok", "EPERM", "ENOENT"), res["create db"]
            # names of ours made through the view are stored escaped, never as real temporaries
            for n in os.listdir(src / "dir"):
                assert not n.startswith(TMP_PREFIX) or n.startswith(TMP_PREFIX + "e"), n
        # and they read back as made
        names = set(os.listdir(mp / "dir"))
        assert {f".shiftfs~e{u}" for u in (0, U1, U3)} <= names, names
        m.remount()
        assert _view_owners(mp) == owners
        assert _records(src) == records
        check_consistent(m)
        _assert_clean(m)


def test_backing_temporary_names_are_hidden_and_cleaned(work):
    """Names with the reserved prefix in the backing tree (a killed daemon's leftovers) are never
    shown and are removed when their directory is listed."""
    src, mp = make_pair(work)
    (src / "d").mkdir()
    (src / "d" / (TMP_PREFIX + "0011223344556677")).write_text("half made")
    (src / "d" / (TMP_PREFIX + "dir")).mkdir()
    os.symlink("x", src / "d" / (TMP_PREFIX + "lnk"))
    (src / "d" / "real").write_text("r")
    with Mount(src, mp, mode="xattr") as m:
        assert errno_of(lambda: os.lstat(mp / "d" / (TMP_PREFIX + "0011223344556677"))) == errno.ENOENT
        assert os.listdir(mp / "d") == ["real"]
        assert sorted(os.listdir(src / "d")) == ["real"]
        _assert_clean(m)


# -- view permissions for every user -------------------------------------------------------------------
_PERM_SCRIPT = r"""
import json, os, subprocess, sys
mp = sys.argv[1]
A = os.path.join(mp, "area")
res = {}
def t(name, fn):
    try:
        fn()
        res[name] = True
    except OSError:
        res[name] = False
def run(path):
    r = subprocess.run([path], capture_output=True)
    if r.returncode != 0:
        raise PermissionError()
t("read own", lambda: open(f"{A}/own").read())
t("write own", lambda: open(f"{A}/own", "a").write("x"))
t("list grp", lambda: os.listdir(f"{A}/grp"))
t("read grp/inside", lambda: open(f"{A}/grp/inside").read())
t("create in grp", lambda: open(f"{A}/grp/new{os.getuid()}", "w").close())
t("read pub", lambda: open(f"{A}/pub").read())
t("exec", lambda: run(f"{A}/exec"))
t("unlink in sticky", lambda: os.unlink(f"{A}/sticky/byu1"))
t("chmod own", lambda: os.chmod(f"{A}/own", 0o777))
t("chown own", lambda: os.chown(f"{A}/own", 2000, -1))
t("chgrp own to 1100", lambda: os.chown(f"{A}/own", -1, 1100))
t("setuid on own", lambda: os.chmod(f"{A}/own", 0o4640))
t("utime own", lambda: os.utime(f"{A}/own", (1, 1)))
t("truncate own", lambda: os.truncate(f"{A}/own", 0))
print(json.dumps(res))
"""

# expected access for: owner U1, group member U2 (in G1), other U3
_PERM_EXPECT = {
    "read own": (True, True, False),
    "write own": (True, False, False),
    "list grp": (True, True, False),
    "read grp/inside": (True, True, False),
    "create in grp": (True, False, False),
    "read pub": (True, False, True),  # 0604: the group class gets nothing even though 'other' may read
    "exec": (True, True, False),
    "unlink in sticky": (True, False, False),
    "chmod own": (True, False, False),
    "chown own": (False, False, False),
    "chgrp own to 1100": (True, False, False),
    "setuid on own": (True, False, False),
    "utime own": (True, False, False),
    "truncate own": (True, False, False),
}


def _perm_setup(mp: Path) -> None:
    a = mp / "area"
    a.mkdir()
    os.chmod(a, 0o755)
    (a / "own").write_text("own")
    (a / "grp").mkdir()
    (a / "grp" / "inside").write_text("in")
    (a / "pub").write_text("pub")
    (a / "exec").write_text("#!/bin/sh\nexit 0\n")
    (a / "sticky").mkdir()
    (a / "sticky" / "byu1").write_text("s")
    for n, mode in [
        ("own", 0o640),
        ("grp", 0o750),
        ("grp/inside", 0o644),
        ("pub", 0o604),
        ("exec", 0o750),
        ("sticky/byu1", 0o666),
    ]:
        os.chown(a / n, U1, G1)
        os.chmod(a / n, mode)
    os.chmod(a / "sticky", 0o1777)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_view_permission_bits_enforced_for_every_user(work, mode):
    src, mp = make_pair(work)
    with Mount(src, mp, mode=mode) as m:
        users = [(U1, [U1]), (U2, [U2, G1]), (U3, [U3])]
        results = {}
        for uid, groups in users:
            # each user gets a fresh copy so one user's changes do not decide the next one's
            if (mp / "area").exists():
                shutil.rmtree(mp / "area")
            _perm_setup(mp)
            r = py_as(uid, groups[0], _PERM_SCRIPT, mp, groups=groups, script=True)
            assert r.returncode == 0, r.stderr
            results[uid] = json.loads(r.stdout)
        wrong = []
        for what, want in _PERM_EXPECT.items():
            got = tuple(results[u][what] for u, _ in users)
            if got != want:
                wrong.append(f"{what}: got {got}, want {want} (owner, group, other)")
        assert not wrong, "\n".join(wrong)
        _assert_clean(m)


# -- setuid ----------------------------------------------------------------------------------------------
def _euid_line(out: str) -> str:
    return out.strip()


@pytest.mark.parametrize("mode,maps", [("table", ["b:0:0:65536"]), ("table", None), ("xattr", None)])
def test_setuid_view_file_gives_no_host_privilege(work, mode, maps):
    """A setuid-root executable in the view, run by an unprivileged user, does not run as root:
    table mode mounted by root is nosuid by default; xattr mode never puts the bit on disk."""
    idbin = shutil.which("id")
    assert idbin
    src, mp = make_pair(work)
    with Mount(src, mp, mode=mode, maps=maps) as m:
        opts = [ln for ln in open("/proc/self/mountinfo") if f" {mp} " in ln]
        assert opts and "nosuid" in opts[0].split()[5], opts
        shutil.copy(idbin, mp / "id")
        os.chown(mp / "id", 0, 0)
        os.chmod(mp / "id", 0o6755)
        st = os.lstat(mp / "id")
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o6755)
        r = run_as(U1, U1, [str(mp / "id")])
        assert r.returncode == 0, r
        assert "euid=0" not in r.stdout and "egid=0" not in r.stdout and r.stdout.startswith(f"uid={U1}"), r.stdout
        bst = os.lstat(src / "id")
        if mode == "xattr":
            assert not bst.st_mode & (stat.S_ISUID | stat.S_ISGID), oct(bst.st_mode)
            # run straight from the backing tree: still no privilege
            r = run_as(U1, U1, [str(src / "id")])
            assert "euid=0" not in r.stdout, r.stdout
        elif maps is None:
            # view root is disk uid 100000: even a suid mount would not give root
            assert bst.st_uid == 100000
        _assert_clean(m)
