"""
Linux system calls for namespaces and mounts: unshare, setns, prctl, mount,
umount2, the new mount API (open_tree, move_mount, mount_setattr),
pivot_root, and reading /proc/self/mountinfo.

Three callers share them: the kernel backend (:mod:`shiftfs.fs.idmapped`),
the daemon's private namespace (:mod:`shiftfs.fs.isolate`) and the container
launcher (:mod:`shiftfs.container`). Python 3.11 has no ``os.unshare`` and
no mount API, so the calls go through libc with ctypes. Each raises OSError
whose ``strerror`` names the call and its object; nothing in here knows
about shiftfs itself.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
from dataclasses import dataclass

from ..errors import SetupError
from .libc import AT_EMPTY_PATH, AT_FDCWD, check, libc

# --- constants (linux/sched.h, linux/mount.h, linux/prctl.h) ----------------

CLONE_FS = 0x00000200
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
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000

MNT_FORCE = 0x1
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR__ATIME = 0x70
MOUNT_ATTR_RELATIME = 0x0
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80
MOUNT_ATTR_IDMAP = 0x100000
MOUNT_ATTR_NOSYMFOLLOW = 0x200000

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4

#: open_tree(2), move_mount(2) (Linux 5.2) and mount_setattr(2) (5.12) come
#: from the unified table that starts at 424: one number on every architecture.
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
FSCONFIG_CMD_CREATE = 6
#: pivot_root(2) is older: its number differs per architecture.
SYS_PIVOT_ROOT = {
    "x86_64": 155,
    "aarch64": 41,
    "riscv64": 41,
    "loongarch64": 41,
    "i686": 217,
    "i386": 217,
    "armv7l": 218,
    "armv6l": 218,
    "ppc64le": 203,
    "ppc64": 203,
    "s390x": 217,
}

libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.unshare.argtypes = [ctypes.c_int]
libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

_CLONE_NAMES = {
    CLONE_FS: "CLONE_FS",
    CLONE_NEWNS: "CLONE_NEWNS",
    CLONE_NEWCGROUP: "CLONE_NEWCGROUP",
    CLONE_NEWUTS: "CLONE_NEWUTS",
    CLONE_NEWIPC: "CLONE_NEWIPC",
    CLONE_NEWUSER: "CLONE_NEWUSER",
    CLONE_NEWPID: "CLONE_NEWPID",
    CLONE_NEWNET: "CLONE_NEWNET",
}


def _enc(path: str | bytes | None) -> bytes | None:
    return os.fsencode(path) if path is not None else None


def _clone_names(flags: int) -> str:
    return "|".join(name for bit, name in _CLONE_NAMES.items() if flags & bit) or hex(flags)


# --- namespaces ---------------------------------------------------------------


def unshare(flags: int) -> None:
    """unshare(2): move the calling process (or thread, for CLONE_FS) into new namespaces."""
    check(libc.unshare(flags), f"unshare({_clone_names(flags)})")


def setns(fd: int, nstype: int = 0) -> None:
    """setns(2): join the namespace behind ``fd`` (an open /proc/PID/ns/* file)."""
    check(libc.setns(fd, nstype), f"setns({_clone_names(nstype) if nstype else 'any'})")


def in_init_userns() -> bool:
    """Whether we run in the initial user namespace (its uid_map is the full identity)."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True


def set_dumpable(dumpable: bool = True) -> None:
    """``True``: keep /proc/self owned by us after an id change, so the parent
    can still read /proc/PID/ns/* and write the maps. ``False``: a process
    that a container's root can see (its pid 1, a joining helper before it
    execs) is made non-dumpable, so ``/proc/PID/{fd,cwd,root,exe,mem,environ}``
    and ptrace need CAP_SYS_PTRACE in the user namespace of its memory, which
    for a process forked from the host's ``shiftfs`` is the initial one."""
    check(libc.prctl(PR_SET_DUMPABLE, 1 if dumpable else 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")


def close_fds_except(keep: set[int] | frozenset[int] = frozenset()) -> None:
    """Close every descriptor above 2 but those in ``keep`` (close_range(2)
    through :func:`os.closerange`): what a process keeps before it enters a
    container is exactly what its caller lists."""
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 0x7FFFFFFF)


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to us when our parent exits."""
    check(libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


# --- mounts -------------------------------------------------------------------


def mount(
    source: str | bytes | None,
    target: str | bytes,
    fstype: str | bytes | None = None,
    flags: int = 0,
    data: str | bytes | None = None,
) -> None:
    """mount(2)."""
    what = f"mount {os.fsdecode(fstype or source or '')} on {os.fsdecode(target)}".replace("  ", " ")
    check(libc.mount(_enc(source), _enc(target), _enc(fstype), flags, _enc(data)), what, os.fsdecode(target))


def umount2(target: str | bytes, flags: int = 0) -> None:
    """umount2(2)."""
    check(libc.umount2(_enc(target), flags), f"umount {os.fsdecode(target)}", os.fsdecode(target))


def make_rprivate(path: str = "/") -> None:
    """Stop mount events propagating between this namespace and the host."""
    mount(None, path, None, MS_REC | MS_PRIVATE)


class MountAttr(ctypes.Structure):
    """``struct mount_attr`` of mount_setattr(2) (MOUNT_ATTR_SIZE_VER0: 32 bytes)."""

    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_setattr(
    path: str | bytes, attr_set: int, attr_clr: int = 0, recursive: bool = True, dfd: int = AT_FDCWD, userns_fd: int = 0
) -> None:
    """mount_setattr(2) (Linux 5.12): change the flags of a mount (tree).

    ``path`` empty: the mount held by ``dfd`` (e.g. a clone from
    :func:`open_tree`). ``userns_fd`` goes with MOUNT_ATTR_IDMAP.
    """
    attr = MountAttr(attr_set, attr_clr, 0, userns_fd)
    flags = (AT_RECURSIVE if recursive else 0) | (0 if path else AT_EMPTY_PATH)
    name = os.fsdecode(path) or f"fd {dfd}"
    ret = libc.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR),
        ctypes.c_int(dfd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.c_uint(flags),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    check(ret, f"mount_setattr {name}", name)


def open_tree(path: str | bytes, recursive: bool = False, dfd: int = AT_FDCWD) -> int:
    """open_tree(OPEN_TREE_CLONE): a descriptor holding a detached copy of
    the mount at ``path`` (``path`` empty: the one ``dfd`` names), to be
    attached elsewhere with :func:`move_mount` even after ``path`` itself is
    gone from the namespace. Close-on-exec."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | (AT_RECURSIVE if recursive else 0) | (0 if path else AT_EMPTY_PATH)
    name = os.fsdecode(path) or f"fd {dfd}"
    fd = libc.syscall(
        ctypes.c_long(SYS_OPEN_TREE), ctypes.c_int(dfd), ctypes.c_char_p(os.fsencode(path)), ctypes.c_uint(flags)
    )
    return check(fd, f"open_tree {name}", name)


def move_mount(fd: int, target: str | bytes) -> None:
    """Attach the detached mount held by ``fd`` (from :func:`open_tree`) on
    ``target``."""
    ret = libc.syscall(
        ctypes.c_long(SYS_MOVE_MOUNT),
        ctypes.c_int(fd),
        ctypes.c_char_p(b""),
        ctypes.c_int(AT_FDCWD),
        ctypes.c_char_p(os.fsencode(target)),
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
    )
    check(ret, f"move_mount on {os.fsdecode(target)}", os.fsdecode(target))


def open_own_proc() -> int:
    """A descriptor of a new, detached procfs of our pid namespace (fsopen,
    fsconfig, fsmount: Linux 5.2), attached nowhere: a namespace's pid 1
    reaches its children's /proc entries through it without changing its
    mount namespace. Close-on-exec."""
    fs = check(libc.syscall(ctypes.c_long(SYS_FSOPEN), ctypes.c_char_p(b"proc"), ctypes.c_uint(1)), "fsopen proc")
    try:
        check(
            libc.syscall(
                ctypes.c_long(SYS_FSCONFIG),
                ctypes.c_int(fs),
                ctypes.c_uint(FSCONFIG_CMD_CREATE),
                ctypes.c_char_p(None),
                ctypes.c_char_p(None),
                ctypes.c_int(0),
            ),
            "fsconfig proc",
        )
        attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC
        return check(
            libc.syscall(ctypes.c_long(SYS_FSMOUNT), ctypes.c_int(fs), ctypes.c_uint(1), ctypes.c_uint(attrs)),
            "fsmount proc",
        )
    finally:
        os.close(fs)


def can_pivot_root() -> bool:
    """Whether :func:`pivot_root` knows this machine's system call number."""
    return platform.machine() in SYS_PIVOT_ROOT


def pivot_root(new_root: str | bytes, put_old: str | bytes) -> None:
    """pivot_root(2)."""
    nr = SYS_PIVOT_ROOT.get(platform.machine())
    if nr is None:
        raise SetupError(
            f"unsupported machine {platform.machine()!r}: add its pivot_root number "
            "to SYS_PIVOT_ROOT in shiftfs/sys/mounts.py"
        )
    ret = libc.syscall(ctypes.c_long(nr), ctypes.c_char_p(os.fsencode(new_root)), ctypes.c_char_p(os.fsencode(put_old)))
    check(ret, f"pivot_root {os.fsdecode(new_root)}", os.fsdecode(new_root))


# --- the mount table -------------------------------------------------------------


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/PID/mountinfo (the fields shiftfs reads)."""

    dev: str  # major:minor of the filesystem
    mountpoint: str  # octal escapes (\\040 …) undone, undecodable bytes surrogate-escaped
    options: tuple[str, ...]  # per-mount options: rw/ro, nosuid, idmapped …
    fstype: str
    super_options: tuple[str, ...] = ()  # the filesystem's: rw/ro, sync, dirsync, user_id= …


def _unescape(field: bytes) -> str:
    return field.decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")


def mountinfo(path: str = "/proc/self/mountinfo", dir_fd: int | None = None) -> list[MountEntry]:
    """The mounts we can see, in mount order (later entries are on top).

    ``dir_fd``: ``path`` is relative to it (a daemon isolated in its own
    namespace reads another's table through a /proc descriptor). Returns []
    when the table cannot be read.
    """
    out = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        with os.fdopen(fd, "rb") as f:
            for line in f:
                left, _, right = line.partition(b" - ")
                parts = left.split()
                tail = [field.decode(errors="replace") for field in right.split()]
                fstype = tail[0] if tail else ""
                sb_opts = tuple(tail[2].split(",")) if len(tail) > 2 else ()
                out.append(
                    MountEntry(
                        parts[2].decode(), _unescape(parts[4]), tuple(parts[5].decode().split(",")), fstype, sb_opts
                    )
                )
    except (OSError, IndexError, ValueError):
        return []
    return out
