"""Thin ctypes wrappers for the \\*at() system calls Python 3.11 lacks.

Every call here works relative to a held file descriptor and never resolves a
backing path string: ``renameat2`` (with ``RENAME_NOREPLACE`` and
``RENAME_EXCHANGE``), ``utimensat`` on an ``O_PATH`` descriptor, ``fchownat``
and ``linkat`` with ``AT_EMPTY_PATH``, ``statx`` for birth times, and
``fallocate`` with a mode (Python has only ``posix_fallocate``), and
``sync_file_range`` (Python has none).
"""

from __future__ import annotations

import ctypes
import os

from .libc import AT_EMPTY_PATH, AT_FDCWD, check, libc

__all__ = [
    "DIR_PATH_FLAGS",
    "open_beneath",
    "AT_EMPTY_PATH",
    "AT_SYMLINK_NOFOLLOW",
    "AT_SYMLINK_FOLLOW",
    "RENAME_NOREPLACE",
    "RENAME_EXCHANGE",
    "RENAME_WHITEOUT",
    "UTIME_NOW",
    "UTIME_OMIT",
    "renameat2",
    "utimens_fd",
    "fchown_fd",
    "link_fd",
    "birth_time",
    "fallocate",
    "start_writeback",
    "proc_fd",
    "O_PATH_NOFOLLOW",
]

AT_SYMLINK_NOFOLLOW = 0x100
AT_SYMLINK_FOLLOW = 0x400
AT_STATX_DONT_SYNC = 0x4000
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
STATX_BTIME = 0x800
#: How every backing inode is held: a descriptor that names it, never following a symlink.
O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def proc_fd(fd: int) -> str:
    """The magic link naming a descriptor we hold (not a backing path)."""
    return f"/proc/self/fd/{fd}"


libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int = 0) -> None:
    check(libc.renameat2(olddirfd, oldname, newdirfd, newname, flags))


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]


def _ts(ns: int | None, special: int | None) -> _Timespec:
    if special is not None:
        return _Timespec(0, special)
    assert ns is not None
    return _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)


def utimens_fd(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Set times on the inode of ``fd`` (O_PATH is fine, symlinks included).

    ``None`` means UTIME_OMIT (leave that time alone).
    """
    times = (_Timespec * 2)(
        _ts(atime_ns, UTIME_OMIT if atime_ns is None else None),
        _ts(mtime_ns, UTIME_OMIT if mtime_ns is None else None),
    )
    check(libc.utimensat(fd, b"", times, AT_EMPTY_PATH))


libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]


def fchown_fd(fd: int, uid: int, gid: int) -> None:
    """chown the inode of ``fd`` itself (O_PATH fine; never follows a symlink). -1 keeps."""
    check(libc.fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))


def touch_ctime(fd: int) -> None:
    """Set the ctime of the inode of ``fd`` to now and change nothing else.

    ``chown(-1, -1)`` is a change of nothing, which the kernel still stamps
    with a new ctime and allows without ownership of the inode.
    """
    fchown_fd(fd, -1, -1)


libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]


def link_fd(fd: int, newdirfd: int, newname: bytes) -> None:
    """Give the inode of ``fd`` a new name (works for O_TMPFILE and O_PATH fds).

    The ``/proc/self/fd`` magic link with AT_SYMLINK_FOLLOW links the object
    the descriptor refers to (a symlink itself, never its target) and, unlike
    AT_EMPTY_PATH, needs no CAP_DAC_READ_SEARCH.
    """
    check(libc.linkat(AT_FDCWD, proc_fd(fd).encode(), newdirfd, newname, AT_SYMLINK_FOLLOW))


class _StatxTs(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_uint32), ("_res", ctypes.c_int32)]


class _Statx(ctypes.Structure):
    """``struct statx`` (linux/stat.h), 256 bytes; only the mask and btime are read."""

    _u16, _u32, _u64 = ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
    _fields_ = [
        ("stx_mask", _u32),
        ("stx_blksize", _u32),
        ("stx_attributes", _u64),
        ("stx_nlink", _u32),
        ("stx_uid", _u32),
        ("stx_gid", _u32),
        ("stx_mode", _u16),
        ("_spare0", _u16),
        ("stx_ino", _u64),
        ("stx_size", _u64),
        ("stx_blocks", _u64),
        ("stx_attributes_mask", _u64),
        ("stx_atime", _StatxTs),
        ("stx_btime", _StatxTs),
        ("stx_ctime", _StatxTs),
        ("stx_mtime", _StatxTs),
        ("stx_rdev_major", _u32),
        ("stx_rdev_minor", _u32),
        ("stx_dev_major", _u32),
        ("stx_dev_minor", _u32),
        ("_spare", _u64 * 14),
    ]


libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_Statx)]


def birth_time(fd: int) -> int:
    """Birth time of the inode of ``fd`` in ns, or 0 if the filesystem has none."""
    buf = _Statx()
    flags = AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW | AT_STATX_DONT_SYNC
    check(libc.statx(fd, b"", flags, STATX_BTIME, ctypes.byref(buf)))
    if not buf.stx_mask & STATX_BTIME:
        return 0
    return buf.stx_btime.tv_sec * 1_000_000_000 + buf.stx_btime.tv_nsec


libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) on an open file: ``mode`` 0 or FALLOC_FL_* flags."""
    check(libc.fallocate(fd, mode, offset, length))


SYNC_FILE_RANGE_WRITE = 2
libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def start_writeback(fd: int) -> None:
    """Start writing the whole file's dirty pages to disk, waiting for none of them
    (``sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)``)."""
    check(libc.sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE))


#: a directory opened for *at() calls only, its last component not followed
DIR_PATH_FLAGS = O_PATH_NOFOLLOW | os.O_DIRECTORY


def open_beneath(root_fd: int, rel: str, flags: int = O_PATH_NOFOLLOW) -> int:
    """Open ``rel`` below ``root_fd`` without following any symlink.

    One component at a time, each directory closed once the next is open: a
    path of any depth costs two descriptors at most.
    """
    parts = [p for p in rel.split("/") if p]
    if not parts:
        return os.open(".", flags | os.O_DIRECTORY, dir_fd=root_fd)
    cur = root_fd
    try:
        for p in parts[:-1]:
            sub = os.open(p, DIR_PATH_FLAGS, dir_fd=cur)
            if cur != root_fd:
                os.close(cur)
            cur = sub
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
    finally:
        if cur != root_fd:
            os.close(cur)
