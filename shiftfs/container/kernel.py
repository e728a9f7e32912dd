"""
Linux system calls for building containers: unshare, mount helpers,
open_tree/move_mount, pivot_root and path resolution inside a root.

Python 3.11 has no ``os.unshare``, so the system calls go through libc with
ctypes. Nothing in here knows about shiftfs itself; :mod:`.launcher` builds
the namespaces of ``shiftfs run`` and ``shiftfs exec`` out of these pieces.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import platform
import signal
import stat

from ..errors import SetupError

# --- constants (linux/sched.h, linux/mount.h, linux/prctl.h) ----------------

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_RELATIME = 0x200000

MNT_FORCE = 0x1
MNT_DETACH = 0x2

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4

_SYSCALLS = {
    # machine: (pivot_root, mount_setattr)
    "x86_64": (155, 442),
    "aarch64": (41, 442),
    "riscv64": (41, 442),
    "ppc64le": (203, 442),
    "s390x": (217, 442),
    "i686": (217, 442),
    "armv7l": (218, 442),
}


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                        ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long


def _enc(path: str | bytes | None) -> bytes | None:
    return os.fsencode(path) if path is not None else None


def _raise(what: str, path: str | None = None) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}", path)


def _syscall_no(index: int) -> int:
    try:
        return _SYSCALLS[platform.machine()][index]
    except KeyError:
        raise SetupError(
            f"unsupported machine {platform.machine()!r}: add its syscall numbers "
            "to shiftfs/namespaces.py") from None


# --- namespaces ---------------------------------------------------------------


def unshare(flags: int) -> None:
    """unshare(2): move the calling process into new namespaces."""
    if _libc.unshare(flags) != 0:
        _raise("unshare")


def setns(fd: int, nstype: int = 0) -> None:
    """setns(2): join the namespace behind ``fd`` (an open /proc/PID/ns/* file)."""
    if _libc.setns(fd, nstype) != 0:
        _raise("setns")


def set_dumpable() -> None:
    """Keep /proc/self owned by us after an id change, so the parent can
    still read /proc/PID/ns/* and write the maps."""
    if _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) != 0:
        _raise("prctl(PR_SET_DUMPABLE)")


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to us when our parent exits."""
    if _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        _raise("prctl(PR_SET_PDEATHSIG)")


# --- mounts -------------------------------------------------------------------


def mount(source: str | None, target: str, fstype: str | None = None,
          flags: int = 0, data: str | None = None) -> None:
    """mount(2)."""
    if _libc.mount(_enc(source), _enc(target), _enc(fstype), flags, _enc(data)) != 0:
        _raise(f"mount {fstype or source or ''} on {target}".replace("  ", " "), target)


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    if _libc.umount2(_enc(target), flags) != 0:
        _raise(f"umount {target}", target)


def make_rprivate(path: str = "/") -> None:
    """Stop mount events propagating between this namespace and the host."""
    mount(None, path, None, MS_REC | MS_PRIVATE)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(path: str, attr_set: int, attr_clr: int = 0,
                  recursive: bool = True) -> None:
    """mount_setattr(2) (Linux 5.12): change the flags of a mount tree."""
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    ret = _libc.syscall(ctypes.c_long(_syscall_no(1)), ctypes.c_int(-100),
                        ctypes.c_char_p(os.fsencode(path)), ctypes.c_uint(flags),
                        ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    if ret != 0:
        _raise(f"mount_setattr {path}", path)


#: open_tree(2) and move_mount(2) (Linux 5.2) have the same numbers on every
#: architecture (the unified table that starts at 424).
_OPEN_TREE, _MOVE_MOUNT = 428, 429
OPEN_TREE_CLONE = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4


def open_tree(path: str, recursive: bool = False) -> int:
    """open_tree(OPEN_TREE_CLONE): a descriptor holding a detached copy of
    the mount at ``path``, to be attached elsewhere with :func:`move_mount`
    even after ``path`` itself is gone from the namespace."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    fd = _libc.syscall(ctypes.c_long(_OPEN_TREE), ctypes.c_int(-100),
                       ctypes.c_char_p(os.fsencode(path)), ctypes.c_uint(flags))
    if fd < 0:
        _raise(f"open_tree {path}", path)
    return fd


def move_mount(fd: int, target: str) -> None:
    """Attach the detached mount held by ``fd`` (from :func:`open_tree`) on
    ``target``."""
    ret = _libc.syscall(ctypes.c_long(_MOVE_MOUNT), ctypes.c_int(fd), ctypes.c_char_p(b""),
                        ctypes.c_int(-100), ctypes.c_char_p(os.fsencode(target)),
                        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))
    if ret != 0:
        _raise(f"move_mount on {target}", target)


_LOCKABLE = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
             (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
             (os.ST_RELATIME, MS_RELATIME))


def make_readonly(path: str) -> None:
    """Make the mount tree at ``path`` read-only (recursively where the kernel
    has mount_setattr, else the top mount only)."""
    try:
        mount_setattr(path, MOUNT_ATTR_RDONLY)
        return
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
    # A remount inside a user namespace must repeat the flags the kernel locked.
    st = os.statvfs(path)
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    for st_flag, ms_flag in _LOCKABLE:
        if st.f_flag & st_flag:
            flags |= ms_flag
    mount(None, path, None, flags)


def bind(source: str, target: str, readonly: bool = False, recursive: bool = True) -> None:
    """Bind-mount ``source`` on ``target`` (recursively, optionally read-only)."""
    mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))
    if readonly:
        make_readonly(target)


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2)."""
    ret = _libc.syscall(ctypes.c_long(_syscall_no(0)), ctypes.c_char_p(os.fsencode(new_root)),
                        ctypes.c_char_p(os.fsencode(put_old)))
    if ret != 0:
        _raise(f"pivot_root {new_root}", new_root)


def pivot_into(new_root: str) -> None:
    """Make the mount at ``new_root`` this mount namespace's ``/`` and drop
    the old root entirely, without needing a spare directory in the new root
    (the ``pivot_root(".", ".")`` idiom of pivot_root(2))."""
    os.chdir(new_root)
    pivot_root(".", ".")
    umount2(".", MNT_DETACH)
    os.chdir("/")


def resolve_in_root(root: str, path: str) -> str:
    """The host path of ``path`` as seen from a process whose ``/`` is
    ``root``: symlinks (absolute ones included) are followed inside ``root``
    and ``..`` never leaves it. Missing trailing components are kept as is."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    hops = 0
    missing = False
    while parts:
        name = parts.pop(0)
        if name == "..":
            if done:
                done.pop()
            continue
        here = os.path.join(root, *done, name)
        if not missing:
            try:
                st = os.lstat(here)
            except FileNotFoundError:
                missing = True
            else:
                if stat.S_ISLNK(st.st_mode):
                    hops += 1
                    if hops > 40:
                        raise SetupError(f"{path}: too many symlinks inside the root")
                    target = os.readlink(here)
                    if target.startswith("/"):
                        done = []
                    parts = [p for p in target.split("/") if p not in ("", ".")] + parts
                    continue
        done.append(name)
    return os.path.join(root, *done)


def make_mountpoint(root: str, path: str, directory: bool = True) -> str:
    """Resolve ``path`` inside ``root`` and create it (and its parents) if it
    is missing: a directory, or an empty file to bind a file on. Returns the
    host path to mount on."""
    target = resolve_in_root(root, path)
    if os.path.lexists(target):
        return target
    parent = os.path.dirname(target)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    if directory:
        with contextlib.suppress(FileExistsError):  # another run made it meanwhile
            os.mkdir(target, 0o755)
    else:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
    return target
