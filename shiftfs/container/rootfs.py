"""
Building a container's file tree: bind mounts, read-only mounts, moving into
a new root, and resolving paths the way a process inside that root would.

The system calls themselves are :mod:`shiftfs.sys.mounts`; this module holds
the steps :mod:`.run` and :mod:`.exec` make out of them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from ..errors import SetupError
from ..sys import mounts

__all__ = ["make_readonly", "bind", "pivot_into", "resolve_in_root", "make_mountpoint", "mask_paths"]

#: Hidden in the container, as podman hides them by default (its MaskedPaths):
#: kernel memory, keyrings, timers and scheduler internals, firmware tables.
MASKED_PATHS = (
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/fs/selinux",
    "/sys/dev/block",
    "/sys/devices/virtual/powercap",
)
#: Read-only in the container (podman's ReadonlyPaths): kernel tunables and triggers.
READONLY_PATHS = ("/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

_LOCKABLE = (
    (os.ST_NOSUID, mounts.MS_NOSUID),
    (os.ST_NODEV, mounts.MS_NODEV),
    (os.ST_NOEXEC, mounts.MS_NOEXEC),
    (os.ST_NOATIME, mounts.MS_NOATIME),
    (os.ST_NODIRATIME, mounts.MS_NODIRATIME),
    (os.ST_RELATIME, mounts.MS_RELATIME),
)


def make_readonly(path: str) -> None:
    """Make the mount tree at ``path`` read-only (recursively where the kernel
    has mount_setattr, else the top mount only)."""
    try:
        mounts.mount_setattr(path, mounts.MOUNT_ATTR_RDONLY)
        return
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
    # A remount inside a user namespace must repeat the flags the kernel locked.
    st = os.statvfs(path)
    flags = mounts.MS_REMOUNT | mounts.MS_BIND | mounts.MS_RDONLY
    for st_flag, ms_flag in _LOCKABLE:
        if st.f_flag & st_flag:
            flags |= ms_flag
    mounts.mount(None, path, None, flags)


def bind(source: str, target: str, readonly: bool = False, recursive: bool = True) -> None:
    """Bind-mount ``source`` on ``target`` (recursively, optionally read-only)."""
    mounts.mount(source, target, None, mounts.MS_BIND | (mounts.MS_REC if recursive else 0))
    if readonly:
        make_readonly(target)


def pivot_into(new_root: str) -> None:
    """Make the mount at ``new_root`` this mount namespace's ``/`` and drop
    the old root entirely, without needing a spare directory in the new root
    (the ``pivot_root(".", ".")`` idiom of pivot_root(2))."""
    os.chdir(new_root)
    mounts.pivot_root(".", ".")
    mounts.umount2(".", mounts.MNT_DETACH)
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


def mask_paths(proc: str, sys_dir: str) -> None:
    """Hide :data:`MASKED_PATHS` (an empty read-only tmpfs on a directory,
    the host's /dev/null on a file) and make :data:`READONLY_PATHS`
    read-only, below ``proc`` and ``sys_dir``: where the container's /proc and
    /sys were mounted (:func:`make_mountpoint` resolved them inside the
    root). Below those mounts every name is the kernel's procfs or sysfs,
    never the tree's, so a symlink planted in ROOT cannot steer a mask."""
    tops = {"/proc": proc, "/sys": sys_dir}

    def under(path: str) -> str:
        top, _, rest = path[1:].partition("/")
        return os.path.join(tops["/" + top], rest)

    for path in MASKED_PATHS:
        target = under(path)
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            flags = mounts.MS_RDONLY | mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC
            mounts.mount("tmpfs", target, "tmpfs", flags, "size=0,mode=0555")
        else:
            mounts.mount("/dev/null", target, None, mounts.MS_BIND)
    for path in READONLY_PATHS:
        target = under(path)
        if not os.path.exists(target):
            continue
        mounts.mount(target, target, None, mounts.MS_BIND | mounts.MS_REC)
        make_readonly(target)
