"""Correctness guard: a target's tree must match what native produced.

Two views are compared after every write workload:

* the *view* through the target (what a client sees) must equal native's view
  entry by entry: type, size (non-directories), permission bits, owner, group,
  symlink target, device number and link count (non-directories);
* the *store* (the backing directory) must hold the ownership the target is
  supposed to write: native ids shifted by the map for table-style targets, or
  the override xattr (uid:gid:mode) for xattr-style targets.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

from shiftfs.ownership.record import LEGACY_RECORD_NAME, RECORD_NAME

OVERRIDE_XATTRS = (RECORD_NAME, LEGACY_RECORD_NAME)

_TYPES = {
    stat.S_IFDIR: "dir",
    stat.S_IFREG: "file",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "sock",
}


def _walk(root: str) -> Iterator[tuple[str, str]]:
    """Yield (relpath, abspath) for root's entries (root itself included as '.')."""
    yield ".", root
    stack = [""]
    while stack:
        rel = stack.pop()
        base = os.path.join(root, rel) if rel else root
        try:
            with os.scandir(base) as it:
                ents = list(it)
        except OSError:
            continue
        for e in ents:
            r = f"{rel}/{e.name}" if rel else e.name
            yield r, e.path
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(r)
            except OSError:
                pass


def _lstat_all(root: str, snap: dict[str, tuple]) -> Iterator[tuple[str, str, os.stat_result]]:
    """(relpath, abspath, lstat) of root's entries; an entry lstat fails on is noted in ``snap``."""
    if not os.path.lexists(root):
        return
    for rel, p in _walk(root):
        try:
            st = os.lstat(p)
        except OSError as e:
            snap[rel] = ("error", e.errno)
            continue
        yield rel, p, st


def view_snapshot(root: str) -> dict[str, tuple]:
    snap: dict[str, tuple] = {}
    for rel, p, st in _lstat_all(root, snap):
        t = _TYPES.get(stat.S_IFMT(st.st_mode), "other")
        snap[rel] = (
            t,
            st.st_size if t in ("file", "symlink") else None,
            oct(stat.S_IMODE(st.st_mode)),
            st.st_uid,
            st.st_gid,
            os.readlink(p) if t == "symlink" else None,
            (os.major(st.st_rdev), os.minor(st.st_rdev)) if t in ("chr", "blk") else None,
            st.st_nlink if t != "dir" else None,
        )
    return snap


VIEW_FIELDS = ("type", "size", "mode", "uid", "gid", "link", "rdev", "nlink")


def parse_override(value: bytes) -> tuple[int, int, str]:
    """'uid:gid:mode[:type]' (mode octal, may carry S_IFMT) -> (uid, gid, perm)."""
    parts = value.decode(errors="replace").strip("\0").split(":")
    return int(parts[0]), int(parts[1]), oct(int(parts[2], 8) & 0o7777)


def store_snapshot(root: str, style: str) -> dict[str, tuple]:
    """Ownership as stored.  style: 'plain' -> (uid, gid, mode) of the backing inode;
    'xattr' -> (uid, gid, mode) from the override xattr when present (else the inode),
    plus the backing inode's owner."""
    snap: dict[str, tuple] = {}
    for rel, p, st in _lstat_all(root, snap):
        perm = oct(stat.S_IMODE(st.st_mode))
        if style == "plain":
            snap[rel] = (st.st_uid, st.st_gid, perm)
            continue
        eff: tuple = (st.st_uid, st.st_gid, perm)
        if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
            for name in OVERRIDE_XATTRS:
                try:
                    eff = parse_override(os.getxattr(p, name, follow_symlinks=False))
                    break
                except OSError:
                    continue
                except (ValueError, IndexError):
                    eff = ("bad-xattr",)
                    break
        snap[rel] = eff + ((st.st_uid, st.st_gid),)
    return snap


def compare(
    name: str, native_view: dict, target_view: dict, target_store: dict | None, expect_store, limit: int = 8
) -> dict:
    """Return {'passed', 'checked', 'mismatches', 'examples'}.

    expect_store(view_entry) -> expected store tuple (or None to skip that entry).
    """
    examples: list[str] = []
    bad = 0

    def note(msg):
        nonlocal bad
        bad += 1
        if len(examples) < limit:
            examples.append(msg)

    for rel in sorted(set(native_view) | set(target_view)):
        a = native_view.get(rel)
        b = target_view.get(rel)
        if a is None:
            note(f"{rel}: extra entry in {name}")
            continue
        if b is None:
            note(f"{rel}: missing in {name}")
            continue
        if a != b:
            diffs = [f"{f} {x!r}->{y!r}" for f, x, y in zip(VIEW_FIELDS, a, b) if x != y]
            note(f"{rel}: view " + ", ".join(diffs))
            continue
        if target_store is None or expect_store is None:
            continue
        want = expect_store(a)
        if want is None:
            continue
        got = target_store.get(rel)
        if got is None:
            note(f"{rel}: missing in backing store")
            continue
        # compare only the fields the expectation names (None = don't care)
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
            note(f"{rel}: stored {got!r}, expected {want!r}")
    return {"passed": bad == 0, "checked": len(native_view), "mismatches": bad, "examples": examples}
