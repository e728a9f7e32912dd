"""``-o remount``: change the flags of a live shiftfs mount.

``mount -o remount,ro MOUNTPOINT`` makes mount(8) run ``mount.fuse3``, which
runs ``shiftfs SOURCE MOUNTPOINT -o ro,nosuid,…,remount,user_id=0,…`` with the
mount's current options from the mount table. The kernel can change a live
FUSE mount's read-only state and its per-mount flags (``nosuid``, ``nodev``,
``noexec``, atime); everything else is the daemon's and stays as mounted. A
remount that names one of those is refused, except when mount(8) built the
list (it carries the mount table's ``user_id=``): mount(8) merges an fstab
line's options into every remount, so those are left as mounted with a
one-line notice. The remount itself is one ``mount(2)`` with ``MS_REMOUNT``;
the daemon is not involved.
"""

from __future__ import annotations

import errno
import os
import sys

from ..errors import MountError, UsageError
from ..sys import mounts
from ..sys.mounts import (
    MS_DIRSYNC,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_RELATIME,
    MS_REMOUNT,
    MS_STRICTATIME,
    MS_SYNCHRONOUS,
)
from .mount import is_shiftfs_mount
from .options import MountConfig

__all__ = ["remount"]

_ATIME = MS_NOATIME | MS_RELATIME | MS_STRICTATIME

#: option → (flags it sets, flags it clears)
_FLAGS = {
    "ro": (MS_RDONLY, 0),
    "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0),
    "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0),
    "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0),
    "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0),
    "async": (0, MS_SYNCHRONOUS),
    "dirsync": (MS_DIRSYNC, 0),
    "noatime": (MS_NOATIME, _ATIME),
    "relatime": (MS_RELATIME, _ATIME),
    "strictatime": (MS_STRICTATIME, _ATIME),
    "atime": (0, MS_NOATIME),
    "norelatime": (0, MS_RELATIME),
    "nodiratime": (MS_NODIRATIME, 0),
}
# what the mount table shows (per-mount and superblock options)
_SHOWN = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "sync": MS_SYNCHRONOUS,
    "dirsync": MS_DIRSYNC,
    "noatime": MS_NOATIME,
    "relatime": MS_RELATIME,
    "nodiratime": MS_NODIRATIME,
}


def _current_flags(mp: str) -> int:
    """The flags of the mount on ``mp`` now (the topmost one), from /proc/self/mountinfo."""
    flags = None
    for m in mounts.mountinfo():
        if m.mountpoint == mp:
            opts = set(m.options) | set(m.super_options)
            flags = 0
            for name, bit in _SHOWN.items():
                if name in opts:
                    flags |= bit
            if "noatime" not in opts and "relatime" not in opts:
                flags |= MS_STRICTATIME
    if flags is None:
        raise UsageError(f"{mp} is not a shiftfs mount; remount needs the mount point of a live shiftfs mount")
    return flags


def remount(cfg: MountConfig) -> int:
    """Apply the ro/rw and per-mount flags of ``cfg`` to the live mount on ``cfg.mountpoint``."""
    mp = os.path.abspath(cfg.mountpoint)
    if cfg.daemon_opts:
        given = ", ".join(dict.fromkeys(cfg.daemon_opts))
        if not cfg.from_mount_table:
            raise UsageError(
                f"cannot change {given} on a remount (a remount changes only ro/rw, nosuid, nodev, noexec and "
                f"atime); unmount {mp} and mount it again with the new options"
            )
        # mount(8) merges an fstab line's options into every remount of that
        # mount: refusing them would make its mounts impossible to remount.
        print(
            f"shiftfs: remount of {mp} leaves {given} as mounted (a remount changes only ro/rw, nosuid, "
            f"nodev, noexec and atime)",
            file=sys.stderr,
        )
    if not is_shiftfs_mount(mp):
        raise UsageError(f"{mp} is not a shiftfs mount; remount needs the mount point of a live shiftfs mount")
    flags = _current_flags(mp)
    # Flags not named stay as they are: 'shiftfs mount -o remount,ro' keeps nosuid,nodev.
    for opt in cfg.kernel_opts:
        on, off = _FLAGS.get(opt, (0, 0))
        flags = (flags & ~off) | on
    try:
        mounts.mount(None, mp, None, MS_REMOUNT | flags)
    except OSError as e:
        perm = e.errno == errno.EPERM
        hint = "remounting needs root (or root of the user namespace that mounted it)" if perm else "see dmesg"
        raise MountError(f"cannot remount {mp}: {os.strerror(e.errno or 0)}; {hint}") from None
    return 0
