"""Mounting and unmounting: checks before forking, the kernel options, the operations.

``shiftfs mount`` itself (forking the daemon, serving) is :mod:`shiftfs.fs.daemon`.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import subprocess
import sys

from ..errors import MountError, UsageError
from ..ownership import trust
from ..ownership.policy import OwnershipPolicy
from ..ownership.record import RecordError
from ..ownership.single_id import SingleIdPresentation
from ..ownership.store import RecordStore
from ..ownership.table import TablePolicy
from ..ownership.xattr import XattrPolicy
from ..sys.mounts import in_init_userns, mountinfo
from . import holders, sourcelock
from .connection import require_patched
from .ops import CacheConfig, Operations
from .options import MountConfig

__all__ = ["is_shiftfs_mount", "unmount", "check", "kernel_options", "build_operations"]

log = logging.getLogger("shiftfs")


def is_shiftfs_mount(path: str) -> bool:
    from . import idmapped

    path = os.path.abspath(path)
    return any(e.mountpoint == path and e.fstype == "fuse.shiftfs" for e in mountinfo()) or idmapped.is_kernel_mount(
        path
    )


def unmount(mountpoint: str, lazy: bool = False) -> None:
    """Unmount a shiftfs mount (``fusermount3 -u`` or umount2 as root).

    Says in one line (on stderr) when other mount namespaces still hold a
    copy, and explains a locked copy instead of "not mounted"; see
    :mod:`shiftfs.fs.holders`.
    """
    mp = os.path.abspath(mountpoint)
    # Decide from the mount table alone: a stat of the mount point would ask
    # the daemon, and a hung (or stopped) daemon would hang us with it.
    if not is_shiftfs_mount(mp):
        try:
            os.lstat(mp)
        except FileNotFoundError:
            raise UsageError(
                f"mount point {mountpoint} does not exist; give the directory shiftfs is mounted on"
            ) from None
        except OSError:
            pass
        raise UsageError(f"{mountpoint} is not a shiftfs mount; see 'findmnt -t fuse.shiftfs' for mounts")
    from . import idmapped

    if idmapped.is_kernel_mount(mp):  # the kernel backend: no daemon, just the mount
        idmapped.unmount(mp, lazy)
        return
    entry = holders.entry_of(mp)
    daemon = _daemon_of(mp)
    err = _detach(mp, lazy)
    if err is None:
        if not _say_other_holders(mp, entry) and not lazy:
            _wait_for_exit(daemon)
        return
    if os.geteuid() == 0 and holders.entry_of(mp) == entry and _umount2(mp, lazy) == errno.EINVAL:
        # Root of a user namespace, the mount is right there, and still the kernel says
        # "not mounted": a locked copy (MNT_LOCKED) that came from outside the user namespace.
        raise MountError(
            f"cannot unmount {mountpoint}: it was mounted outside this user namespace (e.g. before "
            f"'podman unshare' or 'unshare --user'), and the kernel lets no one unmount such a locked "
            f"copy in here, not even lazily; run 'shiftfs umount {mountpoint}' outside (this copy may then "
            f"stay until this namespace's processes exit)"
        )
    raise MountError(f"cannot unmount {mountpoint}: {err}; close programs using it or use 'shiftfs umount --lazy'")


def _detach(mp: str, lazy: bool) -> str | None:
    """Unmount in our namespace; None on success, else what the tools said."""
    fm = shutil.which("fusermount3")
    if fm:
        cmd = [fm, "-u"] + (["-z"] if lazy else []) + [mp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            return None
        err = r.stderr.strip()
    else:
        err = "fusermount3 not found"
    if os.geteuid() == 0:
        r = subprocess.run(["umount"] + (["-l"] if lazy else []) + [mp], capture_output=True, text=True)
        if r.returncode == 0:
            return None
        err = r.stderr.strip() or err
    return err


def _umount2(mp: str, lazy: bool) -> int:
    """umount2(2) itself, for its errno (0 on success)."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    flags = 8 | (2 if lazy else 0)  # UMOUNT_NOFOLLOW | MNT_DETACH
    if libc.umount2(os.fsencode(mp), flags) == 0:
        return 0
    return ctypes.get_errno()


def _say_other_holders(mp: str, entry: holders.MountEntry | None) -> bool:
    """After our copy is gone: one line if other namespaces keep the daemon serving (then True)."""
    if entry is None:
        return False
    try:
        found = holders.other_holders(entry.dev, {entry.mount_id}, entry.fstype)
    except OSError:
        return False
    if found:
        print(f"shiftfs umount: {holders.describe(mp, found)}", file=sys.stderr)
    return bool(found)


def check(cfg: MountConfig, fuse: bool = True) -> None:
    """Validate inputs before forking; raises :class:`UsageError`.

    ``fuse=False``: SOURCE and MOUNTPOINT only (the kernel backend needs no /dev/fuse).
    """
    src, mp = cfg.source, cfg.mountpoint
    if fuse:
        require_patched()
    if not os.path.exists(src):
        raise UsageError(f"SOURCE {src} does not exist; give an existing directory to shift")
    if not os.path.isdir(src):
        raise UsageError(f"SOURCE {src} is not a directory; give a directory to shift")
    if not os.access(src, os.R_OK | os.X_OK):
        raise UsageError(
            f"SOURCE {src} is not readable by uid {os.geteuid()}; fix its permissions or mount as its owner"
        )
    try:
        st = os.stat(mp)
        if is_shiftfs_mount(mp):
            # stat may be answered from the kernel's cache; statfs always asks
            # the daemon, so a dead one shows as ENOTCONN here
            os.statvfs(mp)
    except FileNotFoundError:
        raise UsageError(f"MOUNTPOINT {mp} does not exist; create it with 'mkdir -p {mp}'") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN and is_shiftfs_mount(mp):
            log.info("%s is a stale shiftfs mount (daemon gone); unmounting it first", mp)
            try:
                unmount(mp, lazy=True)
            except (MountError, UsageError) as e2:
                raise UsageError(f"MOUNTPOINT {mp} is a stale mount that cannot be cleared: {e2}") from None
            st = os.stat(mp)
        else:
            raise UsageError(f"MOUNTPOINT {mp} is not usable ({e.strerror}); unmount or recreate it") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"MOUNTPOINT {mp} is not a directory; mount on a directory")
    if is_shiftfs_mount(mp):
        raise UsageError(f"{mp} is already a shiftfs mount; unmount it first with 'shiftfs umount {mp}'")
    # One daemon per SOURCE (shiftfs.fs.sourcelock); the kernel backend only must not
    # hide its changes from an exclusive daemon. The daemon takes the real lock.
    try:
        held = sourcelock.probe(src, shared=cfg.shared or not fuse)
    except OSError:
        held = None  # unreadable: the daemon's own open says why
    if held:
        held, elsewhere = _settle(src, held, cfg.shared or not fuse)
        if held:
            raise UsageError(sourcelock.describe(src, held, elsewhere))
    if not fuse:
        return
    if not os.path.exists("/dev/fuse"):
        raise UsageError("/dev/fuse is missing; load the fuse module ('modprobe fuse') or give the container /dev/fuse")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise UsageError(
            "/dev/fuse is not accessible to this user; run 'make setup' as root "
            "(makes it 0666 as udev does) or 'chmod 0666 /dev/fuse'"
        )
    if os.geteuid() != 0 and not shutil.which("fusermount3"):
        raise UsageError("fusermount3 is missing; install it with 'apt-get install fuse3'")
    if cfg.xattr and not cfg.allow_shared_source and not cfg.source_checked:
        # Records on inodes others could write would be believed: SOURCE must be private.
        problem = trust.source_problem(src, os.geteuid())
        if problem:
            raise UsageError(problem)


#: How long a mount waits for a daemon whose mount is gone everywhere to let go of SOURCE
#: (umount(8) returns when the kernel has detached the mount, before the daemon has exited).
LEAVE_WAIT = 5.0


def _settle(src: str, held: list[sourcelock.Holder], shared: bool) -> tuple[list[sourcelock.Holder], str]:
    """Wait for daemons of SOURCE whose mount was unmounted and is held nowhere else: they
    are exiting. Returns who still holds SOURCE, and, when that is a daemon whose mount is
    gone here but copies in other mount namespaces keep it serving, which namespaces."""
    import time

    deadline = time.monotonic() + LEAVE_WAIT
    while True:
        elsewhere: list[holders.Holder] = []
        for h in held:
            if h.kind != "mount" or not h.mountpoint or not h.pid or is_shiftfs_mount(h.mountpoint):
                return held, ""  # a live mount (here or another user's): the plain refusal
            if h.dev:
                elsewhere += [c for c in holders.other_holders(h.dev, (), "fuse.shiftfs") if h.pid not in c.pids]
        if elsewhere:
            return held, holders.held_by(elsewhere)
        if time.monotonic() > deadline:
            return held, ""
        time.sleep(0.05)
        try:
            now = sourcelock.probe(src, shared=shared)
        except OSError:
            now = None
        if not now:
            return [], ""
        held = now


def _daemon_of(mp: str) -> sourcelock.Holder | None:
    """Our user's daemon serving ``mp`` (from the note it left for its SOURCE lock)."""
    for h in sourcelock.notes_in(sourcelock.runtime_dir(create=False), None):
        if h.kind == "mount" and h.mountpoint == mp:
            return h
    return None


def _wait_for_exit(daemon: sourcelock.Holder | None) -> None:
    """After the last copy of the mount is gone: return once the daemon has exited (and so
    dropped its SOURCE lock), so that a mount right after umount is not refused; at most LEAVE_WAIT."""
    import time

    if daemon is None:
        return
    deadline = time.monotonic() + LEAVE_WAIT
    while _running(daemon) and time.monotonic() < deadline:
        time.sleep(0.02)


def _running(daemon: sourcelock.Holder) -> bool:
    """The daemon still runs: its pid is the same process and not a zombie (a zombie has let go
    of everything; its reaping is up to the parent it was orphaned to)."""
    try:
        with open(f"/proc/{daemon.pid}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rindex(b")") + 2 :].split()
        return int(fields[19]) == daemon.start and fields[0] not in (b"Z", b"X")
    except (OSError, ValueError, IndexError):
        return False


def kernel_options(cfg: MountConfig) -> set[str]:
    opts = {"default_permissions", "subtype=shiftfs", f"fsname={cfg.fsname or os.path.abspath(cfg.source)}"}
    flags = list(cfg.kernel_opts)
    if os.geteuid() == 0 and "allow_other" not in flags:
        flags.append("allow_other")
    # Outside a user namespace a setuid file shown as view uid 0 would be
    # real root: nosuid,nodev unless asked. Inside one, ids are the namespace's.
    if not in_init_userns():
        if "nosuid" not in flags and "suid" not in flags:
            flags.append("suid")
    for f in flags:
        if f == "rw":
            continue
        if f in ("nosuid", "nodev", "exec", "atime", "norelatime", "async"):
            continue  # libfuse's defaults already
        if f in ("relatime", "strictatime", "nodiratime"):
            continue  # unknown to libfuse: set on the live mount (shiftfs.fs.remount.apply_late_flags)
        opts.add(f)
    return opts


def _secure_backing(policy: XattrPolicy, store: RecordStore, fix: bool, keep_root: bool = False) -> list[str]:
    """Before serving: close backing modes older versions left open to others
    (shiftfs.ownership.trust, rule 1). Returns log lines.

    A read-only mount (``fix=False``) changes nothing on disk: records others
    could have written are then simply not believed. ``keep_root``
    (``allow_shared_source``): SOURCE itself keeps its mode, as shared as we
    were told it is.
    """
    notes: list[str] = []
    if not fix:
        return notes
    unrecorded = policy.rule.unrecorded_record
    try:
        fixed, more = trust.fix_backing_modes(store, policy.trusted_uid, unrecorded, keep_root)
    except RecordError as e:  # the default owner has no disk ids in the table
        return notes + [f"backing modes left as they are: {e}"]
    except OSError as e:
        if e.errno != errno.EROFS:
            raise
        return notes + [f"backing modes left as they are: {e.strerror}"]
    if fixed:
        notes.append(
            f"fixed the backing mode of {fixed} inode(s) that others could write or that carried "
            f"setuid/setgid/sticky on disk (the view keeps them in records); " + "; ".join(more)
        )
    return notes


def build_operations(cfg: MountConfig, root_fd: int) -> Operations:
    """The operations of a mount of ``cfg``: its policy, configured once, and the FUSE plumbing."""
    policy: OwnershipPolicy
    cache = CacheConfig(cfg.cache)
    # -o shared: records and ACLs are read again on every request; -o single_id: presented ids
    single_id = SingleIdPresentation.of_this_namespace() if cfg.single_id else None
    if cfg.xattr:
        # A read-only mount changes nothing on disk: no records for the root and .shiftfs.
        ro = "ro" in cfg.kernel_opts
        store = RecordStore(root_fd, create=True, write_legacy=cfg.legacy_xattr, stamp=not ro, trusted_uid=os.geteuid())
        # Before anything opens the side table (SQLite would replay a planted -wal).
        side = store.check_private(os.geteuid(), fix=not ro)
        policy = XattrPolicy(
            cfg.uids,
            cfg.gids,
            store,
            cfg.default_owner,
            stamp_root=not ro,
            xnames_trusted=cache.xattr_cache,
            reread=cfg.shared,
            single_id=single_id,
        )
        cfg.notes = [f"side table: {n}" for n in side] + _secure_backing(
            policy, store, fix=not ro, keep_root=cfg.allow_shared_source
        )
    else:
        policy = TablePolicy(
            cfg.uids, cfg.gids, xnames_trusted=cache.xattr_cache, reread=cfg.shared, single_id=single_id
        )
    # acl: let the kernel enforce POSIX ACLs (FUSE_POSIX_ACL): without it,
    # default_permissions checks the mode bits only, and a named-user entry
    # that denies access (u:1000:---) is ignored through the mount. The
    # backing filesystem (table mode) or the policy (xattr mode) keeps the
    # mask in step with chmod. -o acl=off leaves enforcement out: the kernel
    # then stops fetching system.posix_acl_access after every attribute
    # refresh of a directory (one GETXATTR per create or unlink in it).
    ops = Operations(
        root_fd,
        policy,
        cache,
        trace=cfg.debug,
        writeback=cfg.writeback,
        xattr_probes=cfg.xattr_probes,
        acl=cfg.acl,
        early_writeback=cfg.early_writeback,
    )
    ops.table.defer_closes = cfg.closer
    return ops
