"""Records as the tests read them: the record names (imported from the package, never spelled in a
test) and the one reader of what lies on the backing tree.

* :func:`record` — the raw record xattr of a backing file or directory (None when absent).
* :func:`side_rows` / :func:`side_table_rows` — the side table's rows (symlinks, FIFOs,
  sockets: the kernel refuses ``user.*`` xattrs on them), read-only.
* :func:`read_record` — the decoded record of any backing inode, through the package's own
  store (xattr or side table), for comparing a whole tree against its mount.
* :func:`backing_xattrs` — every xattr of a backing inode, records included.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

from shiftfs.ownership import record as _record

#: ``user.containers.override_stat``, the record podman's containers/storage writes.
RECORD = _record.RECORD_NAME
#: ``user.fuseoverlayfs.override_stat``, what fuse-overlayfs before 1.14 writes (``-o legacy_xattr``).
LEGACY = _record.LEGACY_RECORD_NAME


def record(path, name: str = RECORD) -> bytes | None:
    """The backing record xattr ``name`` of a regular file or directory (None when absent)."""
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def backing_xattrs(path) -> dict[str, bytes]:
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in os.listxattr(path, follow_symlinks=False)}


def side_table_rows(src, ino: int | None = None) -> list[tuple]:
    """Every row (``ino, btime, value``) of SOURCE's side table, or those of inode ``ino``; sorted."""
    db = Path(src) / ".shiftfs" / "records.db"
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        if ino is None:
            rows = con.execute("SELECT ino, btime, value FROM records").fetchall()
        else:
            rows = con.execute("SELECT ino, btime, value FROM records WHERE ino=?", (ino,)).fetchall()
        return sorted(tuple(r) for r in rows)
    finally:
        con.close()


def side_rows(src) -> dict[int, bytes]:
    """The side table as ``inode number -> record value``."""
    return {r[0]: bytes(r[2]) for r in side_table_rows(src)}


def read_record(src, full: str, st: os.stat_result) -> _record.Record | None:
    """The decoded record of a backing inode (via the package's store), or None; raises ValueError if malformed."""
    from shiftfs.ownership.store import RecordStore

    root_fd = os.open(str(src), os.O_PATH | os.O_DIRECTORY)
    fd = os.open(full, os.O_PATH | os.O_NOFOLLOW)
    try:
        store = RecordStore(root_fd, create=False)
        try:
            raw = store.read(fd, st)
        finally:
            store.close()
    finally:
        os.close(fd)
        os.close(root_fd)
    if raw is None:
        return None
    return _record.decode(raw, stat.S_IFMT(st.st_mode))
