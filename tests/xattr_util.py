"""Helpers for the xattr-mode tests: remountable mounts, fuse-overlayfs, raw records, tree snapshots.

Mounting and acting as other users go through the shared helpers in
``tests/fsutil.py`` (``mount_shiftfs``, ``run_as``); this adds what
``tests/test_xattr.py`` needs on top: a mount that can be unmounted and
mounted again, the backing records and side table, and whole-tree snapshots.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

from fsutil import have, mount_shiftfs, run_as  # noqa: F401  (re-exported for the tests)

RECORD = "user.containers.override_stat"
LEGACY = "user.fuseoverlayfs.override_stat"


def sh(cmd: str, check=True, cwd=None, timeout=300):
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, errors="replace", cwd=cwd, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd!r} failed ({r.returncode}): {r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r


class ShiftMount:
    """``shiftfs mount --xattr src mp -o OPTS`` that can be unmounted and mounted again.

    Each mount is a :func:`fsutil.mount_shiftfs`: unmounting detaches the mount
    and waits for the daemon to exit (so the side table is closed before a
    test looks at the backing tree), and an unexpected error in the daemon's
    log fails the test.
    """

    def __init__(self, src, mp, opts=(), xattr=True, as_uid=None, log=None):
        self.src = str(src)
        self.mp = str(mp)
        self.opts = list(opts)
        self.xattr = xattr
        self.as_uid = as_uid
        self.log = str(log) if log else f"{self.mp}.log"
        self._stack: contextlib.ExitStack | None = None

    @property
    def mounted(self) -> bool:
        return self._stack is not None

    def mount(self):
        args = (["--xattr"] if self.xattr else []) + (["-o", ",".join(self.opts)] if self.opts else [])
        stack = contextlib.ExitStack()
        stack.enter_context(mount_shiftfs(self.src, self.mp, *args, as_uid=self.as_uid, log=self.log))
        self._stack = stack
        return self

    def umount(self):
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def remount(self):
        self.umount()
        return self.mount()

    def log_text(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def __enter__(self):
        return self.mount()

    def __exit__(self, *exc):
        self.umount()


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


def record(path) -> bytes | None:
    """The backing record xattr of a regular file or directory (None when absent)."""
    try:
        return os.getxattr(path, RECORD, follow_symlinks=False)
    except OSError:
        return None


def backing_xattrs(path) -> dict[str, bytes]:
    out = {}
    for n in os.listxattr(path, follow_symlinks=False):
        out[n] = os.getxattr(path, n, follow_symlinks=False)
    return out


def side_rows(src) -> dict[int, bytes]:
    db = Path(src) / ".shiftfs" / "records.db"
    if not db.exists():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT ino, value FROM records").fetchall()
        return {ino: bytes(v) for ino, v in rows}
    finally:
        con.close()


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
