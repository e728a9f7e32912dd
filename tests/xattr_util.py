"""Helpers for the xattr-mode tests: fuse-overlayfs over a tree, whole-tree snapshots.

Mounting goes through ``fsutil.Mount`` (``mode="xattr"``: it can be unmounted
and mounted again), acting as other users through ``asuser``, and the
backing records are read with ``records``.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import time


@contextlib.contextmanager
def fuse_overlayfs(upper, work, lower, mp):
    """Debian's fuse-overlayfs (1.10) with ``xattr_permissions=2`` over one empty lower layer."""
    r = subprocess.run(
        ["fuse-overlayfs", "-o", f"lowerdir={lower},upperdir={upper},workdir={work},xattr_permissions=2", str(mp)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
    )
    if r.returncode != 0:
        raise AssertionError(f"fuse-overlayfs failed: {r.stderr}")
    try:
        yield
    finally:
        for _ in range(50):
            if subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


def snapshot(root, skip_store=True) -> dict[str, tuple]:
    """``rel path -> (st_mode, uid, gid, rdev, nlink, size or link target)`` of a whole tree (lstat)."""
    root = str(root)
    out = {}

    def one(rel, st, full):
        extra = os.readlink(full) if stat.S_ISLNK(st.st_mode) else (st.st_size if stat.S_ISREG(st.st_mode) else None)
        out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_rdev, st.st_nlink, extra)

    one(".", os.lstat(root), root)
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if skip_store and rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d != ".shiftfs"]
        for n in dirnames + filenames:
            full = os.path.join(dirpath, n)
            rel = os.path.normpath(os.path.join(rel_dir, n))
            one(rel, os.lstat(full), full)
    return out


def fmt(entry) -> str:
    mode, uid, gid, rdev, nlink, extra = entry
    return f"{stat.filemode(mode)} {uid}:{gid} rdev={os.major(rdev)},{os.minor(rdev)} n={nlink} {extra!r}"


def diff_snapshots(a: dict, b: dict, keys=None, fields=(0, 1, 2, 3, 4, 5)) -> list[str]:
    out = []
    for k in sorted(keys if keys is not None else set(a) | set(b)):
        ea, eb = a.get(k), b.get(k)
        if ea is None or eb is None:
            out.append(f"{k}: {'missing' if ea is None else fmt(ea)} vs {'missing' if eb is None else fmt(eb)}")
            continue
        if any(ea[i] != eb[i] for i in fields):
            out.append(f"{k}: {fmt(ea)} vs {fmt(eb)}")
    return out
