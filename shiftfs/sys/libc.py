"""The one libc handle and the one rule that turns a failed call into OSError."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["libc", "check", "AT_FDCWD", "AT_EMPTY_PATH"]

#: ``use_errno``: ctypes saves errno right after each call, so :func:`check`
#: reads the error of this call even if Python ran code in between.
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.syscall.restype = ctypes.c_long

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000


def check(res: int, what: str | None = None, path: str | None = None) -> int:
    """``res`` if the call succeeded, else OSError from errno.

    ``what`` names the call (and its object) in the message, ``path`` becomes
    the error's ``filename``; without them the message is just strerror.
    """
    if res >= 0:
        return res
    err = ctypes.get_errno()
    msg = f"{what}: {os.strerror(err)}" if what else os.strerror(err)
    if path is None:
        raise OSError(err, msg)
    raise OSError(err, msg, path)
