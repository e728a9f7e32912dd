"""The listener side of a seccomp user-notification filter: three ioctls.

The filter itself is built and loaded with libseccomp's Python binding
(python3-seccomp, in :mod:`shiftfs.container.seccomp_notify`). That binding
receives and answers notifications only on the listener of a filter loaded by
the *same* process (libseccomp keeps the listener in process-global state),
while shiftfs's supervisor is another process that got the listener over a
socket. So the supervisor talks to the kernel directly, with the three
ioctls of ``linux/seccomp.h`` on the descriptor it holds.
"""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass

from .libc import check, libc

__all__ = ["Notification", "receive", "respond", "id_valid", "FLAG_CONTINUE"]

#: ``SECCOMP_USER_NOTIF_FLAG_CONTINUE``: let the kernel run the call as if there were no filter.
FLAG_CONTINUE = 1


class _Data(ctypes.Structure):
    _fields_ = [
        ("nr", ctypes.c_int),
        ("arch", ctypes.c_uint32),
        ("ip", ctypes.c_uint64),
        ("args", ctypes.c_uint64 * 6),
    ]


class _Notif(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("pid", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("data", _Data)]


class _Resp(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("val", ctypes.c_int64), ("error", ctypes.c_int32), ("flags", ctypes.c_uint32)]


def _iowr(nr: int, size: int, read: bool = True) -> int:
    direction = 3 if read else 1  # _IOC_READ|_IOC_WRITE, or _IOC_WRITE
    return (direction << 30) | (size << 16) | (ord("!") << 8) | nr


_RECV = _iowr(0, ctypes.sizeof(_Notif))
_SEND = _iowr(1, ctypes.sizeof(_Resp))
_ID_VALID = _iowr(2, 8, read=False)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


@dataclass(frozen=True)
class Notification:
    id: int
    pid: int  # in the receiver's pid namespace
    nr: int
    arch: int
    args: tuple[int, ...]


def receive(fd: int) -> Notification | None:
    """The next notification (blocks); None when it went away before we read it (ENOENT)."""
    n = _Notif()
    if libc.ioctl(fd, _RECV, ctypes.byref(n)) < 0:
        if ctypes.get_errno() in (errno.ENOENT, errno.EINTR):
            return None
        check(-1, "seccomp notification receive")
    return Notification(n.id, n.pid, n.data.nr, n.data.arch, tuple(n.data.args))


def respond(fd: int, id: int, error: int = 0, val: int = 0, flags: int = 0) -> None:
    """Answer notification ``id``: -``error`` (0 for success, with ``val``), or continue it with FLAG_CONTINUE.

    A target that died meanwhile (ENOENT) is not an error."""
    r = _Resp(id, val, -error if error else 0, flags)
    if libc.ioctl(fd, _SEND, ctypes.byref(r)) < 0 and ctypes.get_errno() != errno.ENOENT:
        check(-1, "seccomp notification response")


def id_valid(fd: int, id: int) -> bool:
    """Whether notification ``id`` is still pending: its process has not died and
    been replaced by another with the same pid since we read the notification."""
    v = ctypes.c_uint64(id)
    return libc.ioctl(fd, _ID_VALID, ctypes.byref(v)) == 0
