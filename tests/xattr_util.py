"""Helpers for the xattr-mode tests: mounts, commands as other users, tree snapshots.

Local to ``tests/test_xattr.py`` until the shared fixtures in ``tests/fsutil.py``
cover everything these tests need (an unprivileged daemon, fuse-overlayfs,
raw backing xattrs and the side table).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

SHIFTFS = str(Path(sys.executable).with_name("shiftfs"))
RECORD = "user.containers.override_stat"
LEGACY = "user.fuseoverlayfs.override_stat"


def have(*cmds: str) -> bool:
    return all(shutil.which(c) for c in cmds)


def _is_mounted(mp: str) -> bool:
    mp = os.path.abspath(mp)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4].encode().decode("unicode_escape") == mp:
                return True
    return False


def run_as(uid: int, gid: int, cmd, groups=(), check=False, input=None, cwd=None, timeout=120):
    """Run ``cmd`` (list, or a string for ``sh -c``) with the given ids and no capabilities."""
    if isinstance(cmd, str):
        cmd = ["sh", "-c", cmd]
    pre = ["setpriv", f"--reuid={uid}", f"--regid={gid}"]
    pre += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    if uid == 0:
        pre = []  # root as is (keeps its capabilities)
    r = subprocess.run(pre + ["--"] * bool(pre) + list(cmd), capture_output=True, text=True, errors="replace", input=input,
                       cwd=cwd, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} as {uid}:{gid} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def sh(cmd: str, check=True, cwd=None, timeout=300):
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd!r} failed ({r.returncode}): {r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r


class ShiftMount:
    """A ``shiftfs mount --xattr`` of ``src`` on ``mp``, optionally run by another user."""

    def __init__(self, src, mp, opts=(), xattr=True, as_uid=None, log=None):
        self.src = str(src)
        self.mp = str(mp)
        self.opts = list(opts)
        self.xattr = xattr
        self.as_uid = as_uid
        self.log = str(log) if log else f"{self.mp}.log"
        self.mounted = False

    def mount(self):
        cmd = [SHIFTFS, "mount"] + (["--xattr"] if self.xattr else [])
        cmd += [self.src, self.mp, "-o", ",".join(self.opts + [f"log={self.log}"])]
        if self.as_uid is not None:
            cmd = ["setpriv", f"--reuid={self.as_uid}", f"--regid={self.as_uid}", "--clear-groups", "--"] + cmd
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise AssertionError(f"mount failed: {r.stderr.strip()}")
        self.mounted = True
        return self

    def umount(self):
        if not self.mounted:
            return
        for _ in range(50):
            r = subprocess.run(["fusermount3", "-u", self.mp], capture_output=True, text=True)
            if r.returncode == 0 or not _is_mounted(self.mp):
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", self.mp], capture_output=True)
        self.mounted = False
        # The daemon exits once the kernel drops the connection; give it a moment
        # to close the side table before anything looks at the backing tree.
        time.sleep(0.05)

    def remount(self):
        self.umount()
        return self.mount()

    def log_text(self) -> str:
        try:
            return Path(self.log).read_text()
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
        capture_output=True, text=True, timeout=60,
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
        cols = [r[1] for r in con.execute("PRAGMA table_info(records)")]
        rows = con.execute("SELECT ino, value FROM records").fetchall()
        _ = cols
        return {ino: bytes(v) for ino, v in rows}
    finally:
        con.close()


def snapshot(root, skip_store=True) -> dict[str, tuple]:
    """``rel path -> (st_mode, uid, gid, rdev, nlink, size or link target)`` of a whole tree (lstat)."""
    root = str(root)
    out = {}

    def one(rel, st, full):
        extra = os.readlink(full) if stat.S_ISLNK(st.st_mode) else (
            st.st_size if stat.S_ISREG(st.st_mode) else None)
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
