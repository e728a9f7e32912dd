"""Where records live on the backing filesystem.

A *record* (see :mod:`shiftfs.ownership.record`) holds the view owner, group and mode of
one inode. Regular files and directories carry it in the user xattr
``user.containers.override_stat``, the name podman's containers/storage writes
and fuse-overlayfs reads, so trees move between the three tools.

Names. We read ``user.containers.override_stat`` and, failing that, the legacy
``user.fuseoverlayfs.override_stat`` that fuse-overlayfs before 1.14 (Debian
12 ships 1.10) reads and writes. With ``write_legacy`` (``-o legacy_xattr``)
every record is written under both names and the legacy one is read first,
since an old fuse-overlayfs that changed the inode since updated only that
one. Without it only the current name is written, and a legacy record that is
already there is kept in step (replaced, never created), so an old reader does
not see a stale owner.

The kernel refuses ``user.*`` xattrs on symlinks, FIFOs, sockets and device
nodes, and ext4 fits only ~4 KiB of xattrs per inode, so a per-directory xattr
keyed by name would not scale. Those inodes' records live instead in a *side
table*: an SQLite database in ``ROOT/.shiftfs/records.db`` keyed by the inode
number and its birth time. Keying by inode keeps a record right under rename,
hard links (one inode, one record) and rename-over; the birth time makes a row
left behind by an inode deleted outside the mount harmless when the inode
number is reused, and keeps inodes of different filesystems below ROOT that
share a number apart. The same table takes records for regular files and
directories on filesystems without user xattrs. ``.shiftfs`` at the root is
hidden from the view. Side-table failures surface as :class:`SideTableError`
(an OSError), so sqlite stays inside this module.

The one record path. Callers speak :class:`~shiftfs.ownership.record.Record`:
:meth:`RecordStore.read_record` decodes and checks that the record fits the
inode (a bad one is a :class:`~shiftfs.ownership.record.RecordError`, the
only error besides ``OSError``), :meth:`RecordStore.write_record` encodes,
and :meth:`RecordStore.apply_record` is "write the record, then give the
backing inode the mode that goes with it" (rule 1 of
:mod:`shiftfs.ownership.trust`), for the mount and every offline writer.
Only :mod:`shiftfs.offline.inspect` (which prints it) reads the raw value.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sqlite3
import stat
from collections.abc import Callable
from typing import Any, TypeVar, cast

from ..sys.files import O_PATH_NOFOLLOW, birth_time, proc_fd
from . import trust
from .names import SIDE_TABLE, STORE_DIR
from .record import LEGACY_RECORD_NAME, RECORD_NAME, Record, check_fits, decode, encode

__all__ = ["RecordStore", "SideTableError", "can_hold_xattr"]

log = logging.getLogger(__name__)

_XATTR_REPLACE = getattr(os, "XATTR_REPLACE", 2)
# sqlite result codes (the side table) and the errnos they stand for
_SQLITE_ERRNOS = {13: errno.ENOSPC, 8: errno.EROFS, 5: errno.EAGAIN, 6: errno.EAGAIN, 3: errno.EACCES, 23: errno.EACCES}


class SideTableError(OSError):
    """The record side table failed; an OSError with the errno the sqlite error stands for."""


_F = TypeVar("_F", bound=Callable[..., Any])


def _side_table_errors(fn: _F) -> _F:
    """Turn sqlite3 errors into :class:`SideTableError`, so no caller needs to know sqlite."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except sqlite3.Error as e:
            code = getattr(e, "sqlite_errorcode", 0) & 0xFF
            raise SideTableError(_SQLITE_ERRNOS.get(code, errno.EIO), f"record side table: {e}") from None

    return cast(_F, wrapper)


def can_hold_xattr(mode: int) -> bool:
    """Whether the kernel lets an inode of this type carry ``user.*`` xattrs."""
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)


def _open_readonly(path: str) -> sqlite3.Connection:
    for query in ("mode=ro", "immutable=1"):
        try:
            db = sqlite3.connect(f"file:{path}?{query}", uri=True, isolation_level=None, check_same_thread=False)
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return db
        except sqlite3.OperationalError:
            continue
    raise OSError(errno.EACCES, f"cannot read the record side table {path}")


class RecordStore:
    """Reads and writes raw record values for inodes under one backing root.

    ``fd`` arguments are descriptors of the inode itself (``O_PATH`` is fine);
    ``st`` is its ``os.stat(fd)``. Values are the encoded record bytes.
    """

    def __init__(
        self,
        root_fd: int,
        create: bool = True,
        write_legacy: bool = False,
        readonly: bool = False,
        stamp: bool = True,
        trusted_uid: int | None = None,
        side_table: bool = True,
    ):
        #: never write: open the side table read-only (offline readers)
        self.readonly = readonly
        #: give ``.shiftfs`` and the side table records (off for read-only mounts)
        self.stamp = stamp and not readonly
        self.root_fd = root_fd
        #: whose records count (shiftfs.ownership.trust, rule 2): by default as the offline
        #: tools believe (trust.offline_trusted_uid); the mount gives its own user
        if trusted_uid is None:
            trusted_uid = trust.offline_trusted_uid(os.fstat(root_fd))
        self.trusted_uid = trusted_uid
        self.create = create
        self.write_legacy = write_legacy
        self._db: sqlite3.Connection | None = None
        self._db_dirfd = -1
        #: side_table=False (a reader on a tree that is not the trusted user's): no row of
        #: that table is read, as none could be the trusted user's own
        self._no_side_table = not side_table
        self._db_missing = not side_table
        self._xattr_ok = True
        # Which name to try first: see the module docstring.
        self._read_names = (LEGACY_RECORD_NAME, RECORD_NAME) if write_legacy else (RECORD_NAME, LEGACY_RECORD_NAME)

    # -- side table ---------------------------------------------------------
    def check_private(self, owner_uid: int, fix: bool) -> list[str]:
        """Refuse a side table someone else could have written (``fix``: repair its modes);
        :func:`shiftfs.ownership.trust.check_side_table`."""
        return trust.check_side_table(self.root_fd, owner_uid, fix)

    def _conn(self, for_write: bool) -> sqlite3.Connection | None:
        if self._db is not None:
            return self._db
        if self._db_missing and (not for_write or self._no_side_table):
            return None
        try:
            dfd = os.open(STORE_DIR, O_PATH_NOFOLLOW | os.O_DIRECTORY, dir_fd=self.root_fd)
        except FileNotFoundError:
            if not (for_write and self.create):
                self._db_missing = True
                return None
            try:
                os.mkdir(STORE_DIR, 0o700, dir_fd=self.root_fd)
            except FileExistsError:
                pass
            dfd = os.open(STORE_DIR, O_PATH_NOFOLLOW | os.O_DIRECTORY, dir_fd=self.root_fd)
        try:
            try:
                dst = os.stat(SIDE_TABLE, dir_fd=dfd, follow_symlinks=False)
                if not stat.S_ISREG(dst.st_mode):
                    # SQLite opens it by name: never let it follow a planted symlink.
                    raise OSError(errno.ELOOP, f"{STORE_DIR}/{SIDE_TABLE} is not a regular file")
            except FileNotFoundError:
                if not (for_write and self.create):
                    os.close(dfd)
                    self._db_missing = True
                    return None
            # The descriptor path pins the directory we opened without following links.
            path = f"{proc_fd(dfd)}/{SIDE_TABLE}"
            if self.readonly:
                # Readers (offline tools, possibly root on a user's tree) must not
                # create files or change the database: open it read-only.
                db = _open_readonly(path)
                self._db_dirfd = dfd
                self._db = db
                self._db_missing = False
                return db
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # (ino, btime) together name an inode; a table made by an earlier
            # version with ino alone as the key reads and writes the same way.
            db.execute(
                "CREATE TABLE IF NOT EXISTS records ("
                "ino INTEGER NOT NULL, btime INTEGER NOT NULL, value BLOB NOT NULL, PRIMARY KEY (ino, btime))"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS xattrs (ino INTEGER NOT NULL, btime INTEGER NOT NULL, "
                "name TEXT NOT NULL, value BLOB NOT NULL, PRIMARY KEY (ino, btime, name))"
            )
        except BaseException:
            os.close(dfd)
            raise
        self._db_dirfd = dfd
        self._db = db
        self._db_missing = False
        # fuse-overlayfs fails to list a directory holding a regular file or
        # directory without a record: give our own files records.
        self._stamp_own(self.root_fd, STORE_DIR, stat.S_IFDIR | 0o700)
        self._stamp_own(dfd, SIDE_TABLE, stat.S_IFREG | 0o600)
        return db

    def has_record(self, fd: int) -> bool:
        """Whether a directory or regular file already carries the record
        fuse-overlayfs looks for: either name, or with ``write_legacy`` the
        legacy one (fuse-overlayfs 1.10 reads only that name on its upper
        layer). True as well when the filesystem takes no user xattrs, as
        there is nothing to add then."""
        for name in (LEGACY_RECORD_NAME,) if self.write_legacy else (RECORD_NAME, LEGACY_RECORD_NAME):
            try:
                os.getxattr(proc_fd(fd), name)
                return True
            except OSError as e:
                if e.errno != errno.ENODATA:
                    return True
        return False

    def stamp_own_files(self) -> None:
        """Records for ``.shiftfs`` and the side table, if they exist already
        (made by a version that did not stamp them); new ones are stamped when
        they are created."""
        try:
            dfd = os.open(STORE_DIR, O_PATH_NOFOLLOW | os.O_DIRECTORY, dir_fd=self.root_fd)
        except OSError:
            return
        try:
            self._stamp_own(self.root_fd, STORE_DIR, stat.S_IFDIR | 0o700)
            self._stamp_own(dfd, SIDE_TABLE, stat.S_IFREG | 0o600)
        finally:
            os.close(dfd)

    def _stamp_own(self, dirfd: int, name: str, mode: int) -> None:
        if not self.stamp:
            return
        try:
            fd = os.open(name, O_PATH_NOFOLLOW, dir_fd=dirfd)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if stat.S_IFMT(st.st_mode) != stat.S_IFMT(mode) or self.has_record(fd):
                return
            self.write_record(fd, st, Record(st.st_uid, st.st_gid, mode))
        except OSError as e:
            log.warning("cannot give %s/%s a record: %s", STORE_DIR, name, e)
        finally:
            os.close(fd)

    def _side_read(self, fd: int, st: os.stat_result) -> bytes | None:
        db = self._conn(False)
        if db is None:
            return None
        row = db.execute("SELECT value FROM records WHERE ino=? AND btime=?", (st.st_ino, birth_time(fd))).fetchone()
        # No row with this birth time: none, or left behind by a deleted
        # inode whose number was reused.
        return None if row is None else bytes(row[0])

    def _side_write(self, fd: int, st: os.stat_result, value: bytes) -> None:
        db = self._conn(True)
        if db is None:
            raise OSError(errno.EROFS, "no record side table and creation disabled")
        db.execute(
            "INSERT OR REPLACE INTO records (ino, btime, value) VALUES (?, ?, ?)", (st.st_ino, birth_time(fd), value)
        )

    def _side_remove(self, fd: int | None, st: os.stat_result) -> None:
        db = self._conn(False)
        if db is None:
            return
        if fd is not None:
            try:
                key = (st.st_ino, birth_time(fd))
                db.execute("DELETE FROM records WHERE ino=? AND btime=?", key)
                db.execute("DELETE FROM xattrs WHERE ino=? AND btime=?", key)
                return
            except OSError:
                pass
        # Without a descriptor the inode is gone: every row of its number on
        # this filesystem is stale. (Rows of another filesystem's inode with
        # the same number would go too; those are rare and only lose a record.)
        db.execute("DELETE FROM records WHERE ino=?", (st.st_ino,))
        db.execute("DELETE FROM xattrs WHERE ino=?", (st.st_ino,))

    def _uses_side(self, st: os.stat_result) -> bool:
        return self._uses_side_mode(st.st_mode)

    def _uses_side_mode(self, mode: int) -> bool:
        return not (can_hold_xattr(mode) and self._xattr_ok)

    # -- public API ---------------------------------------------------------
    def in_side_table(self, st: os.stat_result) -> bool:
        """Whether this inode's record lives in the side table (so writing it leaves the inode's ctime)."""
        return self._uses_side(st)

    @_side_table_errors
    def read(self, fd: int, st: os.stat_result) -> bytes | None:
        """The raw record value of an inode, or ``None`` if it has none."""
        if self._uses_side(st):
            return self._side_read(fd, st)
        path = proc_fd(fd)
        for name in self._read_names:
            try:
                return os.getxattr(path, name)
            except OSError as e:
                if e.errno == errno.ENODATA:
                    continue
                if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                    return self._side_read(fd, st)
                raise
        if not self._xattr_ok:
            return self._side_read(fd, st)
        return None

    def read_record(self, fd: int, st: os.stat_result) -> Record | None:
        """The record of an inode, or None; :class:`RecordError` if it is malformed or cannot
        describe the inode (whether it counts is :mod:`shiftfs.ownership.trust`'s business)."""
        raw = self.read(fd, st)
        if raw is None:
            return None
        rec = decode(raw, stat.S_IFMT(st.st_mode))
        check_fits(rec, st)
        return rec

    def write_record(self, fd: int, st: os.stat_result, rec: Record, legacy: bool | None = None) -> None:
        """Store the record of an inode (``legacy``: as :meth:`write`)."""
        self.write(fd, st, encode(rec), legacy)

    def apply_record(self, fd: int, st: os.stat_result, rec: Record, legacy: bool | None = None) -> None:
        """Write the record, then give the backing inode the mode that goes with it."""
        self.write_record(fd, st, rec, legacy)
        self.set_backing_mode(fd, st, rec)

    @staticmethod
    def set_backing_mode(fd: int, st: os.stat_result, rec: Record) -> None:
        """Give the backing inode the permissions that go with its record:
        :func:`shiftfs.ownership.trust.backing_perm` of its backing type and the view's
        permission bits (symlinks have none). On an inode that is not ours the chmod may be
        refused: the record is what counts there."""
        if stat.S_ISLNK(st.st_mode):
            return
        want = trust.backing_perm(stat.S_IFMT(st.st_mode) | (rec.mode & 0o777))
        if stat.S_IMODE(st.st_mode) != want:
            try:
                os.chmod(proc_fd(fd), want)
            except PermissionError:
                if st.st_uid == os.geteuid():
                    raise

    def xattr_names_written(self, mode: int) -> set[str] | None:
        """The backing xattr names :meth:`write` gives an inode of this type; None: it writes a row instead."""
        if self._uses_side_mode(mode):
            return None
        return {RECORD_NAME, LEGACY_RECORD_NAME} if self.write_legacy else {RECORD_NAME}

    @_side_table_errors
    def write(self, fd: int, st: os.stat_result, value: bytes, legacy: bool | None = None) -> None:
        """Store the record value of an inode (replacing any previous one).

        ``legacy`` says whether the inode carries the legacy name, where the
        caller knows (False for a new inode): without ``write_legacy`` a legacy
        record is only kept in step, and knowing saves probing for it.
        """
        if self._uses_side(st):
            self._side_write(fd, st, value)
            return
        path = proc_fd(fd)
        try:
            try:
                os.setxattr(path, RECORD_NAME, value)
            except PermissionError:
                # A read-only file or directory of ours made outside the mount
                # (user xattrs need write access): give ourselves the access
                # backing modes always give the daemon, and try again.
                if st.st_uid != os.geteuid():
                    raise
                os.chmod(path, stat.S_IMODE(st.st_mode) | (0o700 if stat.S_ISDIR(st.st_mode) else 0o600))
                os.setxattr(path, RECORD_NAME, value)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            log.warning("the backing filesystem takes no user xattrs; keeping all records in %s", STORE_DIR)
            self._xattr_ok = False
            self._side_write(fd, st, value)
            return
        if self.write_legacy:
            os.setxattr(path, LEGACY_RECORD_NAME, value)
        elif legacy is not False:
            try:
                os.setxattr(path, LEGACY_RECORD_NAME, value, _XATTR_REPLACE)
            except OSError as e:
                if e.errno != errno.ENODATA:
                    raise

    @_side_table_errors
    def remove(self, fd: int | None, st: os.stat_result) -> None:
        """Forget the record of an inode (used when its last link is gone)."""
        if self._uses_side(st):
            self._side_remove(fd, st)
            return
        if fd is None:
            return
        for name in (RECORD_NAME, LEGACY_RECORD_NAME):
            try:
                os.removexattr(proc_fd(fd), name)
            except OSError:
                pass

    # Xattrs of inodes that take no user.* xattrs (symlinks, FIFOs, sockets):
    # the escaped privileged names set on them through the mount (trusted.*,
    # security.*) are rows of the side table, keyed like their records.
    @_side_table_errors
    def side_xattrs(self, fd: int, st: os.stat_result) -> dict[str, bytes]:
        """The stored xattrs (backing names) of an inode whose xattrs live in the side table."""
        db = self._conn(False)
        if db is None:
            return {}
        try:
            rows = db.execute(
                "SELECT name, value FROM xattrs WHERE ino=? AND btime=?", (st.st_ino, birth_time(fd))
            ).fetchall()
        except sqlite3.OperationalError:
            return {}  # a read-only table made before xattrs were kept
        return {name: bytes(value) for name, value in rows}

    @_side_table_errors
    def side_xattr_set(self, fd: int, st: os.stat_result, name: str, value: bytes) -> None:
        db = self._conn(True)
        if db is None:
            raise OSError(errno.EROFS, "no record side table and creation disabled")
        db.execute(
            "INSERT OR REPLACE INTO xattrs (ino, btime, name, value) VALUES (?, ?, ?, ?)",
            (st.st_ino, birth_time(fd), name, value),
        )

    @_side_table_errors
    def side_xattr_remove(self, fd: int, st: os.stat_result, name: str) -> bool:
        """Remove one stored xattr; False if it was not there."""
        db = self._conn(False)
        if db is None:
            return False
        cur = db.execute("DELETE FROM xattrs WHERE ino=? AND btime=? AND name=?", (st.st_ino, birth_time(fd), name))
        return cur.rowcount > 0

    @_side_table_errors
    def forget_inode(self, st: os.stat_result) -> None:
        """Drop a side-table row of an inode that no longer exists (SideTableError when the
        table cannot: on a full disk SQLite has no room to log even a delete)."""
        if self._uses_side(st):
            self._side_remove(None, st)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
            os.close(self._db_dirfd)
            self._db_dirfd = -1
