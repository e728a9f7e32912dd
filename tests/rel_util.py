"""Helpers for the reliability, hostile-input and bad-input tests (issue 8).

Real mounts only, through ``fsutil.Mount`` (``mode="table"`` or ``"xattr"``),
whose daemon pid tests may kill. :func:`view_tree` / :func:`expected_view` /
:func:`compare_trees` check what the mount shows against what the backing
tree says (backing ownership through the table, or records). The
fsstress-style driver lives in ``stressmix.py``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

import fsutil  # the shared helpers: scratch dirs, daemons tracked as our children
import pytest
from records import read_record

TMP_PREFIX = ".shiftfs~"
ESC_PREFIX = ".shiftfs~e"  # view names that collide with ours are stored as ESC_PREFIX + name
STRESS = os.environ.get("SHIFTFS_STRESS") == "1"


@pytest.fixture
def work():
    """A world-searchable scratch dir; anything left mounted below it is unmounted."""
    d = fsutil.make_scratch(prefix="shiftfs-rel-")
    try:
        yield d
    finally:
        fsutil.remove_scratch(d)  # unmounts below it first, lifts chattr +i


def make_pair(work: Path, name="t") -> tuple[Path, Path]:
    src, mp = work / f"{name}-src", work / f"{name}-mp"
    src.mkdir(mode=0o755)
    mp.mkdir(mode=0o755)
    return src, mp


# -- what the view shows vs what the backing tree says --------------------------------------
def user_xattrs(path: str, prefix="user.k") -> dict[str, bytes]:
    out = {}
    try:
        for n in os.listxattr(path, follow_symlinks=False):
            if n.startswith(prefix):
                out[n] = os.getxattr(path, n, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.ENODATA, errno.EPERM):
            raise
    return out


def _digest(path: str) -> str:
    h = hashlib.sha1()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            h.update(b)
    finally:
        os.close(fd)
    return h.hexdigest()


def _entry(path: str, st: os.stat_result, mode: int, uid: int, gid: int, rdev: int, content=True) -> dict:
    e = {"mode": mode, "uid": uid, "gid": gid, "nlink": st.st_nlink}
    if stat.S_ISREG(mode):
        e["size"] = st.st_size
        if content and stat.S_ISREG(st.st_mode):
            e["sha"] = _digest(path)
    elif stat.S_ISLNK(mode):
        e["target"] = os.readlink(path)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        e["rdev"] = rdev
    if (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) and (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        e["xattrs"] = {k: v.hex() for k, v in user_xattrs(path).items()}
    return e


def _walk(root: str, skip_top=(), backing=False):
    """(rel, full, lstat) of everything below root, root excluded; never follows links.

    ``backing``: ``rel`` is the view path (escaped names unescaped); leftover temporary
    names are yielded with ``rel`` None.
    """
    stack = [("", root)]
    while stack:
        rel, full = stack.pop()
        with os.scandir(full) as it:
            for de in it:
                if not rel and de.name in skip_top:
                    continue
                name = de.name
                if backing and name.startswith(TMP_PREFIX):
                    if not name.startswith(ESC_PREFIX):
                        yield None, de.path, None
                        continue
                    name = name[len(ESC_PREFIX) :]
                r = f"{rel}/{name}" if rel else name
                st = os.lstat(de.path)
                yield r, de.path, st
                if stat.S_ISDIR(st.st_mode):
                    stack.append((r, de.path))


def view_tree(mp, content=True) -> dict[str, dict]:
    """What the mount shows: rel path -> attributes."""
    out = {}
    for rel, full, st in _walk(str(mp)):
        out[rel] = _entry(full, st, st.st_mode, st.st_uid, st.st_gid, st.st_rdev, content)
    return out


def table_view_id(disk: int) -> int:
    return disk - fsutil.MAP_BASE if fsutil.MAP_BASE <= disk < fsutil.MAP_BASE + fsutil.MAP_COUNT else 65534


def expected_view(src, mode: str, content=True) -> tuple[dict[str, dict], list[str]]:
    """What the backing tree says the view should be, and problems found on the way.

    Problems: leftover temporary names, entries without a record (xattr mode),
    records that do not decode.
    """
    out, problems = {}, []
    for rel, full, st in _walk(str(src), skip_top=(".shiftfs",), backing=True):
        if rel is None:
            problems.append(f"{os.path.relpath(full, src)}: temporary name left in the backing tree")
            continue
        if mode == "table":
            out[rel] = _entry(
                full, st, st.st_mode, table_view_id(st.st_uid), table_view_id(st.st_gid), st.st_rdev, content
            )
            continue
        try:
            rec = read_record(src, full, st)
        except ValueError as e:
            problems.append(f"{rel}: malformed record: {e}")
            continue
        if rec is None:
            problems.append(f"{rel}: no record")
            out[rel] = _entry(full, st, st.st_mode, st.st_uid, st.st_gid, st.st_rdev, content)
            continue
        vmode = rec.mode if stat.S_IFMT(rec.mode) else rec.mode | stat.S_IFMT(st.st_mode)
        out[rel] = _entry(full, st, vmode, rec.uid, rec.gid, rec.rdev, content)
    return out, problems


def compare_trees(view: dict, expect: dict, limit=30) -> list[str]:
    out = []
    for k in sorted(set(view) | set(expect)):
        a, b = view.get(k), expect.get(k)
        if a != b:
            if a is None or b is None:
                out.append(f"{k}: view {a} vs backing {b}")
            else:
                diff = {f: (a.get(f), b.get(f)) for f in set(a) | set(b) if a.get(f) != b.get(f)}
                out.append(f"{k}: view/backing differ: {diff}")
            if len(out) >= limit:
                out.append("...")
                break
    return out


def check_consistent(m: fsutil.Mount, content=True) -> None:
    """The mount shows exactly what the backing tree (and its records) say."""
    assert m.mode is not None, "check_consistent needs a Mount made with mode='table' or mode='xattr'"
    view = view_tree(m.mountpoint, content)
    exp, problems = expected_view(m.source, m.mode, content)
    diffs = compare_trees(view, exp)
    assert not problems and not diffs, "\n".join(problems[:30] + diffs)
