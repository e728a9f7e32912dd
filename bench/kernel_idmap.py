"""Kernel idmapped bind mounts through ctypes (open_tree, mount_setattr, move_mount).

Python 3.11 has no os.unshare, so the user namespace that carries the mapping is
made by a forked child calling libc unshare(CLONE_NEWUSER); the parent writes the
child's uid_map/gid_map and keeps an fd to /proc/CHILD/ns/user.

Mapping direction: an idmapped mount shows an on-disk id k as the id that the
namespace maps k to *from the inside*.  To show disk 100000+i as i we therefore
need a namespace whose inside ids 100000.. map to outside ids 0.., i.e. the
uid_map line "100000 0 65536".  Host root (fsuid 0) then creates files that are
stored as 100000.
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWUSER = 0x10000000
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = 0o2000000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_IDMAP = 0x00100000
MOUNT_ATTR_SIZE_VER0 = 32

# x86_64 and the generic syscall table agree on these numbers.
SYS_open_tree = 428
SYS_move_mount = 429
SYS_mount_setattr = 442

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(rc: int, what: str) -> int:
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return rc


def make_userns(disk: int, view: int, count: int) -> int:
    """Return an O_RDONLY fd of a fresh user namespace mapping disk..+count <-> view..+count.

    In /proc/PID/uid_map terms the inside id is the disk id and the outside id is
    the view id (see module docstring).
    """
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: unshare, report, wait for the parent, exit
        try:
            os.close(ready_r)
            os.close(go_w)
            rc = _libc.unshare(CLONE_NEWUSER)
            os.write(ready_w, b"1" if rc == 0 else b"0")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise OSError("unshare(CLONE_NEWUSER) failed in the helper child")
        line = f"{disk} {view} {count}\n"
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(line)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.write(go_w, b"x")
        os.close(go_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def idmapped_bind(src: str, dst: str, userns_fd: int) -> None:
    """Bind-mount src on dst with the idmap of userns_fd (not recursive)."""
    fd = _check(
        _libc.syscall(
            ctypes.c_long(SYS_open_tree),
            ctypes.c_long(AT_FDCWD),
            ctypes.c_char_p(os.fsencode(src)),
            ctypes.c_ulong(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
        ),
        "open_tree",
    )
    try:
        attr = MountAttr(attr_set=MOUNT_ATTR_IDMAP, attr_clr=0, propagation=0, userns_fd=userns_fd)
        _check(
            _libc.syscall(
                ctypes.c_long(SYS_mount_setattr),
                ctypes.c_long(fd),
                ctypes.c_char_p(b""),
                ctypes.c_ulong(AT_EMPTY_PATH),
                ctypes.byref(attr),
                ctypes.c_size_t(MOUNT_ATTR_SIZE_VER0),
            ),
            "mount_setattr(MOUNT_ATTR_IDMAP)",
        )
        _check(
            _libc.syscall(
                ctypes.c_long(SYS_move_mount),
                ctypes.c_long(fd),
                ctypes.c_char_p(b""),
                ctypes.c_long(AT_FDCWD),
                ctypes.c_char_p(os.fsencode(dst)),
                ctypes.c_ulong(MOVE_MOUNT_F_EMPTY_PATH),
            ),
            "move_mount",
        )
    finally:
        os.close(fd)
