"""``-o remount``: change the flags of a live shiftfs mount.

``mount -o remount,ro MOUNTPOINT`` makes mount(8) run ``mount.fuse3``, which
runs ``shiftfs SOURCE MOUNTPOINT -o ro,nosuid,…,remount,user_id=0,…`` with the
mount's current options from the mount table. The kernel can change a live
FUSE mount's read-only state and its per-mount flags (``nosuid``, ``nodev``,
``noexec``, atime); everything else is the daemon's and stays as mounted. A
remount that names one of those is refused, except when mount(8) built the
list (it carries the mount table's ``user_id=``): mount(8) merges an fstab
line's options into every remount, so those are left as mounted with a
one-line notice. A daemon option whose value equals the live one is no
change and is accepted silently (harnesses repeat the whole original list):
the live options are the serving daemon's own command line, found through
the note it leaves for its SOURCE lock (shiftfs.fs.sourcelock). The remount
itself is one ``mount(2)`` with ``MS_REMOUNT``; the daemon is not involved.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import sys
from collections.abc import Callable

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

#: A ``shiftfs`` mount command line (either form) → its options; raises UsageError.
ParseArgv = Callable[[list[str]], MountConfig]

__all__ = ["remount", "LATE_FLAGS", "apply_late_flags"]

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


#: a daemon option (as it appears in ``MountConfig.daemon_opts``) → the fields it sets
_FIELDS = {
    "--xattr": ("xattr",),
    "xattr": ("xattr",),
    "--map": ("uids", "gids"),
    "uidmap": ("uids",),
    "gidmap": ("gids",),
    "cache": ("cache",),
    "default_owner": ("default_owner",),
    "legacy_xattr": ("legacy_xattr",),
    "fuseoverlayfs_compat": ("legacy_xattr",),
    "fsname": ("fsname",),
    "debug": ("debug",),
    "log": ("logfile",),
    "stats": ("stats",),
    "writeback": ("writeback",),
    "nowriteback": ("writeback",),
    "read_ahead_kb": ("read_ahead_kb",),
    "backend": ("backend",),
    "shared": ("shared",),
    "coherent": ("shared",),
    "allow_shared_source": ("allow_shared_source",),
    "xattr_probes": ("xattr_probes",),
    "acl": ("acl",),
    "spin": ("spin_us",),
    "single_id": ("single_id",),
}


#: atime flags libfuse's mount does not take ("fuse: unknown option(s)"): the daemon sets them
#: on the live mount right after making it, with the same MS_REMOUNT a remount uses
LATE_FLAGS = ("relatime", "strictatime", "nodiratime")


def apply_late_flags(mp: str, opts: list[str]) -> None:
    """Give the mount just made on ``mp`` the atime flags of ``opts`` (in order) that
    it does not have yet; raises MountError (an unprivileged FUSE mount cannot be remounted)."""
    if not any(o in LATE_FLAGS for o in opts):
        return
    mp = os.path.abspath(mp)
    now = _current_flags(mp)
    flags = now
    for opt in opts:
        if opt in LATE_FLAGS or opt in ("noatime", "atime", "norelatime"):
            on, off = _FLAGS[opt]
            flags = (flags & ~off) | on
    if flags == now:
        return  # relatime alone: the kernel's default for a new mount
    try:
        mounts.mount(None, mp, None, MS_REMOUNT | flags)
    except OSError as e:
        late = ",".join(o for o in opts if o in LATE_FLAGS)
        raise MountError(
            f"cannot set -o {late} on the new mount: {os.strerror(e.errno or 0)} (they are set by a remount "
            f"right after mounting, which needs root or root of the user namespace); drop them"
        ) from None


def _daemon_argv(pid: int) -> list[str] | None:
    """The shiftfs arguments of process ``pid`` (its command line after the script or ``-m shiftfs``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="surrogateescape") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return None
    for i, a in enumerate(argv):
        if os.path.basename(a) == "shiftfs" or (a == "shiftfs" and i > 0 and argv[i - 1] == "-m"):
            return argv[i + 1 :]
    return None


def _live_config(mp: str, parse_mount_argv: ParseArgv) -> MountConfig | None:
    """The options the daemon serving ``mp`` was started with, or None if unknown
    (another user's daemon, the kernel backend, a daemon of ``shiftfs run``)."""
    from .sourcelock import notes_in, runtime_dir

    for h in notes_in(runtime_dir(create=False), None):
        if h.kind != "mount" or h.mountpoint != mp:
            continue
        argv = _daemon_argv(h.pid)
        if argv is None:
            continue
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # argparse says why on stderr
                return parse_mount_argv(argv)
        except (UsageError, SystemExit):
            return None
    return None


def _value(cfg: MountConfig, name: str) -> object:
    v = getattr(cfg, name)
    if name in ("uids", "gids"):
        return [(r.disk, r.view, r.count) for r in v.ranges]
    if name == "backend":
        return "fuse" if v in ("auto", "fuse") else v  # a live daemon is the FUSE backend
    return v


def _changed(cfg: MountConfig, live: MountConfig | None) -> list[str]:
    """The daemon options of a remount that differ from the live mount's (all of them when unknown)."""
    given = list(dict.fromkeys(cfg.daemon_opts))
    if live is None:
        return given
    return [k for k in given if k not in _FIELDS or any(_value(cfg, f) != _value(live, f) for f in _FIELDS[k])]


def remount(cfg: MountConfig, parse_mount_argv: ParseArgv) -> int:
    """Apply the ro/rw and per-mount flags of ``cfg`` to the live mount on ``cfg.mountpoint``.

    ``parse_mount_argv`` reads the serving daemon's command line into its
    options: the command line's parser (:func:`shiftfs.cli.parse_mount_argv`,
    handed down by the command line, which sits above this package).
    """
    mp = os.path.abspath(cfg.mountpoint)
    changed = _changed(cfg, _live_config(mp, parse_mount_argv)) if cfg.daemon_opts else []
    if changed:
        given = ", ".join(changed)
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
