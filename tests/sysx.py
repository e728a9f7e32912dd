"""The syscalls Python's ``os`` module lacks, for the tests: ``renameat2``, ``utimensat`` with
``UTIME_NOW``/``UTIME_OMIT``, ``lchown`` with raw 32-bit ids; and :func:`errno_of`."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def renameat2(old, new, flags: int = 0) -> None:
    """``renameat2(AT_FDCWD, old, AT_FDCWD, new, flags)``; raises OSError."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(old), None, str(new))


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]


def _timespec(v) -> _Timespec:
    if v in (UTIME_NOW, UTIME_OMIT):
        return _Timespec(0, v)
    return _Timespec(v // 1_000_000_000, v % 1_000_000_000)


def utimensat(path, atime_ns, mtime_ns, follow: bool = True) -> None:
    """``utimensat`` with ns times; pass :data:`UTIME_NOW` or :data:`UTIME_OMIT` as a time."""
    ts = (_Timespec * 2)(_timespec(atime_ns), _timespec(mtime_ns))
    flags = 0 if follow else AT_SYMLINK_NOFOLLOW
    if _libc.utimensat(AT_FDCWD, os.fsencode(path), ts, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))


def errno_of(fn, *args, **kw) -> int:
    """Call ``fn``; return the errno of the OSError it raises (0 if none)."""
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno
    return 0


def lchown_raw(path, uid: int, gid: int) -> int:
    """lchown(2) with raw 32-bit ids (so (uid_t)-1 can be passed); returns 0 or the errno."""
    res = _libc.lchown(os.fsencode(str(path)), ctypes.c_uint32(uid), ctypes.c_uint32(gid))
    return 0 if res == 0 else ctypes.get_errno()
