"""Where records live on the backing filesystem.

A *record* (see :mod:`shiftfs.record`) holds the view owner, group and mode of
one inode. Regular files and directories carry it in the user xattr
``user.containers.override_stat``, the name podman's containers/storage writes
and fuse-overlayfs reads, so trees move between the three tools.

The kernel refuses ``user.*`` xattrs on symlinks, FIFOs, sockets and device
nodes, and ext4 fits only ~4 KiB of xattrs per inode, so a per-directory xattr
keyed by name would not scale. Those inodes' records live instead in a *side
table*: an SQLite database in ``ROOT/.shiftfs/records.db`` keyed by the inode
number and checked against the inode's birth time. Keying by inode keeps a
record right under rename, hard links (one inode, one record) and
rename-over; the birth time makes a row left behind by an inode deleted
outside the mount harmless when the inode number is reused. The same table
takes records for regular files and directories on filesystems without user
xattrs. ``.shiftfs`` at the root is hidden from the view.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat

from . import record as _record
from .syscalls import birth_time, proc_fd

__all__ = ["RecordStore", "STORE_DIR", "can_hold_xattr"]

#: Name of the directory at the backing root that holds the side table.
STORE_DIR = ".shiftfs"
_DB_NAME = "records.db"


def can_hold_xattr(mode: int) -> bool:
    """Whether the kernel lets an inode of this type carry ``user.*`` xattrs."""
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)


class RecordStore:
    """Reads and writes raw record values for inodes under one backing root.

    ``fd`` arguments are descriptors of the inode itself (``O_PATH`` is fine);
    ``st`` is its ``os.stat(fd)``. Values are the encoded record bytes.
    """

    def __init__(self, root_fd: int, create: bool = True, write_legacy: bool = False):
        self.root_fd = root_fd
        self.create = create
        self.write_legacy = write_legacy
        self._db: sqlite3.Connection | None = None
        self._db_missing = False
        self._dev = os.fstat(root_fd).st_dev
        self._xattr_ok = True

    @classmethod
    def open(cls, root_fd: int, create: bool = True, write_legacy: bool = False) -> "RecordStore":
        return cls(root_fd, create, write_legacy)

    # -- side table ---------------------------------------------------------
    def _conn(self, for_write: bool) -> sqlite3.Connection | None:
        if self._db is not None:
            return self._db
        if self._db_missing and not for_write:
            return None
        try:
            dfd = os.open(STORE_DIR, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=self.root_fd)
        except FileNotFoundError:
            if not (for_write and self.create):
                self._db_missing = True
                return None
            try:
                os.mkdir(STORE_DIR, 0o700, dir_fd=self.root_fd)
            except FileExistsError:
                pass
            dfd = os.open(STORE_DIR, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=self.root_fd)
        try:
            if not for_write:
                try:
                    os.stat(_DB_NAME, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    self._db_missing = True
                    return None
            # The descriptor path pins the directory we opened without following links.
            db = sqlite3.connect(f"{proc_fd(dfd)}/{_DB_NAME}", isolation_level=None, check_same_thread=False)
        finally:
            pass
        self._db_dirfd = dfd
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS records (ino INTEGER PRIMARY KEY, btime INTEGER NOT NULL, value BLOB NOT NULL)"
        )
        self._db = db
        self._db_missing = False
        return db

    def _side_read(self, fd: int, st: os.stat_result) -> bytes | None:
        db = self._conn(False)
        if db is None:
            return None
        row = db.execute("SELECT btime, value FROM records WHERE ino=?", (st.st_ino,)).fetchone()
        if row is None:
            return None
        if row[0] != birth_time(fd):
            return None  # left behind by a deleted inode whose number was reused
        return bytes(row[1])

    def _side_write(self, fd: int, st: os.stat_result, value: bytes) -> None:
        db = self._conn(True)
        if db is None:
            raise OSError(errno.EROFS, "no record side table and creation disabled")
        db.execute(
            "INSERT OR REPLACE INTO records (ino, btime, value) VALUES (?, ?, ?)",
            (st.st_ino, birth_time(fd), value),
        )

    def _side_remove(self, fd: int | None, st: os.stat_result) -> None:
        db = self._conn(False)
        if db is not None:
            db.execute("DELETE FROM records WHERE ino=?", (st.st_ino,))

    def _uses_side(self, st: os.stat_result) -> bool:
        return not (can_hold_xattr(st.st_mode) and self._xattr_ok) or st.st_dev != self._dev

    # -- public API ---------------------------------------------------------
    def read(self, fd: int, st: os.stat_result) -> bytes | None:
        """The raw record value of an inode, or ``None`` if it has none."""
        if self._uses_side(st):
            return self._side_read(fd, st)
        path = proc_fd(fd)
        for name in (_record.RECORD_NAME, _record.LEGACY_RECORD_NAME):
            try:
                return os.getxattr(path, name)
            except OSError as e:
                if e.errno == errno.ENODATA:
                    continue
                if e.errno == errno.ENOTSUP:
                    return self._side_read(fd, st)
                raise
        return None

    def write(self, fd: int, st: os.stat_result, value: bytes) -> None:
        """Store the record value of an inode (replacing any previous one)."""
        if self._uses_side(st):
            self._side_write(fd, st, value)
            return
        path = proc_fd(fd)
        try:
            os.setxattr(path, _record.RECORD_NAME, value)
            if self.write_legacy:
                os.setxattr(path, _record.LEGACY_RECORD_NAME, value)
        except OSError as e:
            if e.errno != errno.ENOTSUP:
                raise
            self._xattr_ok = False
            self._side_write(fd, st, value)

    def remove(self, fd: int | None, st: os.stat_result) -> None:
        """Forget the record of an inode (used when its last link is gone)."""
        if self._uses_side(st):
            self._side_remove(fd, st)
            return
        if fd is None:
            return
        for name in (_record.RECORD_NAME, _record.LEGACY_RECORD_NAME):
            try:
                os.removexattr(proc_fd(fd), name)
            except OSError:
                pass

    def forget_inode(self, st: os.stat_result) -> None:
        """Drop a side-table row of an inode that no longer exists."""
        if not can_hold_xattr(st.st_mode) or not self._xattr_ok:
            self._side_remove(None, st)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
            os.close(self._db_dirfd)
