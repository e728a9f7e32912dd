"""The kernel backend for table mode: an idmapped bind mount of SOURCE.

A table mount and a kernel idmapped mount mean the same thing (table mode
copies the kernel's semantics), so when the caller may make one the kernel
does the shifting and no daemon runs: ``open_tree(OPEN_TREE_CLONE)`` clones
SOURCE's mount, ``mount_setattr(MOUNT_ATTR_IDMAP)`` attaches a user namespace
that carries the table, ``move_mount`` puts the clone on MOUNTPOINT.

Direction: through an idmapped mount an on-disk id *k* is shown as what the
attached namespace maps *k* to from the inside, i.e. the namespace's
``uid_map`` line ``INSIDE OUTSIDE COUNT`` shows disk ``INSIDE+i`` as
``OUTSIDE+i``. shiftfs's ``DISK:VIEW:COUNT`` therefore becomes the line
``DISK VIEW COUNT`` unchanged (checked against the FUSE backend by
tests/test_table.py, which runs every case on both backends).

``-o backend=`` picks: ``fuse`` (the daemon), ``kernel`` (this, or fail),
``auto`` (default: this when the kernel allows it, else FUSE, saying which
in one line on stderr). See docs/kernel-backend.md for how the two differ.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys

from ..ownership.idmap import IdMap
from ..sys import mounts
from ..sys.mounts import (
    CLONE_NEWUSER,
    MNT_DETACH,
    MOUNT_ATTR__ATIME,
    MOUNT_ATTR_IDMAP,
    MOUNT_ATTR_NOATIME,
    MOUNT_ATTR_NODEV,
    MOUNT_ATTR_NODIRATIME,
    MOUNT_ATTR_NOEXEC,
    MOUNT_ATTR_NOSUID,
    MOUNT_ATTR_RDONLY,
    MOUNT_ATTR_RELATIME,
    MOUNT_ATTR_STRICTATIME,
    UMOUNT_NOFOLLOW,
    in_init_userns,
)

__all__ = [
    "BACKENDS",
    "KernelRefused",
    "wanted",
    "try_mount",
    "is_kernel_mount",
    "unmount",
    "userns_fd",
    "idmapped_bind",
]

BACKENDS = ("auto", "kernel", "fuse")

#: Lines a uid_map/gid_map may hold (kernel 4.15+).
MAX_MAP_LINES = 340

#: Options that tune or observe the FUSE daemon; a kernel mount has no daemon,
#: so they are ignored there, with one warning line naming them.
FUSE_ONLY = {
    "cache",
    "writeback",
    "nowriteback",
    "read_ahead_kb",
    "xattr_probes",
    "acl",
    "early_writeback",
    "log",
    "stats",
    "debug",
    "fsname",
    "allow_other",
    "auto_unmount",
    "default_owner",
    "legacy_xattr",
    "fuseoverlayfs_compat",
    "shared",
    "coherent",
}
#: Options whose meaning a bind mount cannot carry (they are superblock flags):
#: ``auto`` picks FUSE for them, ``backend=kernel`` refuses them.
NEEDS_FUSE = {"sync", "dirsync"}


class KernelRefused(Exception):
    """The kernel (or the caller's privileges) did not allow the idmapped mount.

    ``str()`` is the one-line reason; ``errno`` the error behind it.
    """

    def __init__(self, reason: str, err: int = 0):
        super().__init__(reason)
        self.errno = err


# -- the user namespace that carries the table ------------------------------------------


def map_lines(m: IdMap) -> str:
    """``/proc/PID/uid_map`` text for a table (identity: the full range)."""
    if m.identity:
        return "0 0 4294967295\n"
    if len(m.ranges) > MAX_MAP_LINES:
        raise KernelRefused(
            f"the {m.what} table has {len(m.ranges)} ranges; a kernel idmap holds at most {MAX_MAP_LINES}"
        )
    return "".join(f"{r.disk} {r.view} {r.count}\n" for r in m.ranges)


def userns_fd(uids: IdMap, gids: IdMap) -> int:
    """An fd of a fresh user namespace whose uid_map/gid_map are the tables.

    A forked child unshares CLONE_NEWUSER (Python 3.11 has no os.unshare) and
    waits; we write its maps (as the privileged parent, so gid_map needs no
    ``setgroups deny``), open /proc/CHILD/ns/user and let it exit. The fd
    keeps the namespace alive as long as the mount needs it (the mount takes
    its own reference).
    """
    ulines, glines = map_lines(uids), map_lines(gids)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into the caller's code
        try:
            os.close(ready_r)
            os.close(go_w)
            try:
                mounts.unshare(CLONE_NEWUSER)
                os.write(ready_w, b"1")
            except OSError as err:
                os.write(ready_w, str(err.errno).encode())
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    try:
        said = os.read(ready_r, 16)
        if said != b"1":
            e = int(said or b"0") or errno.EPERM
            raise KernelRefused(
                f"cannot create the user namespace that carries the map: unshare(CLONE_NEWUSER): {os.strerror(e)}", e
            )
        for name, text in (("uid_map", ulines), ("gid_map", glines)):
            try:
                with open(f"/proc/{pid}/{name}", "w") as f:
                    f.write(text)
            except OSError as e:
                raise KernelRefused(
                    f"cannot write the {name} of the idmap namespace: {e.strerror}", e.errno or 0
                ) from None
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(go_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


# -- mount attributes ----------------------------------------------------------------------


def mount_attrs(kernel_opts: list[str], in_init_userns: bool) -> tuple[int, int]:
    """(attr_set, attr_clr) for the clone from the ``-o`` mount flags.

    The clone starts with SOURCE's mount flags. Like the FUSE backend,
    ``nosuid,nodev`` are added unless ``suid``/``dev`` is given (a setuid
    file owned by view root is a real-root setuid file here); ``suid``,
    ``dev``, ``exec`` clear the flag on the clone. ``rw`` never clears a
    read-only SOURCE mount.
    """
    opts = set(kernel_opts)
    aset = aclr = 0
    if "ro" in opts:
        aset |= MOUNT_ATTR_RDONLY
    for on, off, bit in (
        ("nosuid", "suid", MOUNT_ATTR_NOSUID),
        ("nodev", "dev", MOUNT_ATTR_NODEV),
        ("noexec", "exec", MOUNT_ATTR_NOEXEC),
    ):
        if on in opts or (bit != MOUNT_ATTR_NOEXEC and in_init_userns and off not in opts):
            aset |= bit
        elif off in opts:
            aclr |= bit
    for word, value in (
        ("noatime", MOUNT_ATTR_NOATIME),
        ("strictatime", MOUNT_ATTR_STRICTATIME),
        ("relatime", MOUNT_ATTR_RELATIME),
    ):
        if word in opts:
            aset = (aset & ~MOUNT_ATTR__ATIME) | value
            aclr |= MOUNT_ATTR__ATIME
    if "nodiratime" in opts:
        aset |= MOUNT_ATTR_NODIRATIME
    return aset, aclr


# -- the mount ---------------------------------------------------------------------------------


def _fstype_of(path: str) -> str:
    """The filesystem type holding ``path`` (for messages)."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return "?"
    want = f"{os.major(dev)}:{os.minor(dev)}"
    return next((m.fstype for m in mounts.mountinfo() if m.dev == want and m.fstype), "?")


def idmapped_bind(source: str, mountpoint: str, uids: IdMap, gids: IdMap, attr_set: int = 0, attr_clr: int = 0) -> None:
    """Bind SOURCE on MOUNTPOINT with the tables; raises :class:`KernelRefused`.

    Not recursive: mounts below SOURCE are not carried over (a submount of a
    filesystem without idmap support would make the whole call fail).
    """
    try:
        tree = mounts.open_tree(source)
    except OSError as e:
        if e.errno == errno.ENOSYS:
            raise KernelRefused("this kernel has no open_tree (idmapped mounts need Linux 5.12+)", e.errno) from None
        if e.errno == errno.EPERM:
            raise KernelRefused("cloning a mount needs CAP_SYS_ADMIN (open_tree: EPERM)", e.errno) from None
        raise KernelRefused(
            f"cannot clone the mount of SOURCE (open_tree: {os.strerror(e.errno or 0)})", e.errno or 0
        ) from None
    try:
        ns = userns_fd(uids, gids)
        try:
            mounts.mount_setattr("", MOUNT_ATTR_IDMAP | attr_set, attr_clr, recursive=False, dfd=tree, userns_fd=ns)
        except OSError as e:
            fstype = _fstype_of(source)
            if e.errno == errno.EINVAL:
                why = f"SOURCE's filesystem ({fstype}) does not support idmapped mounts (mount_setattr: EINVAL)"
            elif e.errno == errno.EPERM:
                why = (
                    f"not privileged over SOURCE's filesystem ({fstype}): its superblock belongs to another "
                    "user namespace, a mount flag is locked, or SOURCE is already idmapped (mount_setattr: EPERM)"
                )
            elif e.errno == errno.ENOSYS:
                why = "this kernel has no mount_setattr (idmapped mounts need Linux 5.12+)"
            else:
                why = f"the kernel refused to idmap SOURCE ({fstype}): mount_setattr: {os.strerror(e.errno or 0)}"
            raise KernelRefused(why, e.errno or 0) from None
        finally:
            os.close(ns)
        try:
            mounts.move_mount(tree, mountpoint)
        except OSError as e:
            raise KernelRefused(
                f"cannot attach the mount on MOUNTPOINT (move_mount: {os.strerror(e.errno or 0)})", e.errno or 0
            ) from None
    finally:
        os.close(tree)


# -- finding and removing our mounts ---------------------------------------------------------


def _mounts_below(source: str) -> list[str]:
    """Mount points strictly below SOURCE (resolved), in mount order."""
    prefix = os.path.realpath(source).rstrip("/") + "/"
    return [m.mountpoint for m in mounts.mountinfo() if m.mountpoint.startswith(prefix)]


def is_kernel_mount(path: str) -> bool:
    """Whether the topmost mount on ``path`` is an idmapped bind mount.

    Every kernel-backend mount is idmapped (even an identity table gets a
    namespace carrying the full range), so ``idmapped`` in mountinfo is
    what marks one. Another tool's idmapped mount looks the same.
    """
    path = os.path.abspath(path)
    top = [m for m in mounts.mountinfo() if m.mountpoint == path][-1:]
    return bool(top) and not top[0].fstype.startswith("fuse") and "idmapped" in top[0].options


def unmount(mountpoint: str, lazy: bool = False) -> None:
    """umount2 the kernel mount on ``mountpoint``; raises MountError."""
    from ..errors import MountError

    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
    try:
        mounts.umount2(os.path.abspath(mountpoint), flags)
    except OSError as e:
        if e.errno == errno.EBUSY:
            hint = "close programs using it or use 'shiftfs umount --lazy'"
        elif e.errno == errno.EPERM:
            hint = "a kernel-backend mount is unmounted by root (the user who made it)"
        else:
            hint = "check 'findmnt " + mountpoint + "'"
        raise MountError(f"cannot unmount {mountpoint}: {os.strerror(e.errno or 0)}; {hint}") from None


# -- choosing the backend -------------------------------------------------------------------


def _say(line: str) -> None:
    print(f"shiftfs: {line}", file=sys.stderr, flush=True)


def _unmapped_root_note(src: str, uids: IdMap, gids: IdMap) -> str:
    """A note for the backend line when the table does not map SOURCE's own owner.

    Through an idmapped mount the kernel gives nobody, root included, any
    override over an inode whose owner it cannot map: a root directory owned
    by disk 0 under ``--map b:100000:0:65536`` shows as 65534 and every create
    in it fails EACCES (the FUSE backend lets root's capabilities apply).
    """
    try:
        st = os.stat(src)
    except OSError:
        return ""
    bad = [
        f"{what} {disk}"
        for what, disk, table in (("uid", st.st_uid, uids), ("gid", st.st_gid, gids))
        if table.to_disk(table.to_view(disk)) != disk
    ]
    if not bad:
        return ""
    root_u, root_g = uids.to_disk(0), gids.to_disk(0)
    fix = f"'chown {root_u}:{root_g} {src}' (view root's disk ids)" if root_u is not None and root_g is not None else ""
    fix = f"{fix} or " if fix else ""
    return (
        f"; note: SOURCE is owned by disk {' and '.join(bad)}, outside the table, so it shows as "
        f"{uids.overflow} and nobody, root included, can create in it through this mount: {fix}use -o backend=fuse"
    )


def wanted(cfg) -> bool:
    """Whether ``cfg`` asks for the kernel backend (or ``auto`` allows it), by its options alone.

    False: use the FUSE daemon (said in one line where the user could expect
    otherwise). Raises UsageError when ``backend=kernel`` cannot be honoured.
    True: the caller checks SOURCE and MOUNTPOINT
    (:func:`shiftfs.fs.mount.check` with ``fuse=False``), then calls
    :func:`try_mount`. (The check lives with the mount, which imports this
    module; this module does not import it back.)
    """
    from ..errors import UsageError

    backend = getattr(cfg, "backend", "auto")
    if backend == "fuse":
        return False
    if cfg.xattr:
        if backend == "kernel":
            raise UsageError(
                "-o backend=kernel works in table mode only (xattr mode keeps ownership in records "
                "only the FUSE daemon applies); drop --xattr or use backend=fuse"
            )
        return False  # xattr mode has no choice to report
    given = list(dict.fromkeys(getattr(cfg, "option_keys", [])))
    blockers = [k for k in given if k in NEEDS_FUSE]
    if blockers:
        if backend == "kernel":
            raise UsageError(
                f"-o {','.join(blockers)} is a filesystem flag a bind mount cannot carry; drop it or use backend=fuse"
            )
        _say(f"backend fuse: -o {','.join(blockers)} needs the FUSE backend")
        return False
    return True


def try_mount(cfg) -> bool:
    """Make the kernel mount :func:`wanted` asked for, on checked SOURCE and MOUNTPOINT.

    True: mounted (with ``-f``, also unmounted again on a signal); the caller
    is done. False: use the FUSE daemon. Raises MountError when
    ``backend=kernel`` cannot be honoured.
    """
    from ..errors import MountError

    backend = getattr(cfg, "backend", "auto")
    given = list(dict.fromkeys(getattr(cfg, "option_keys", [])))
    src, mp = os.path.abspath(cfg.source), os.path.abspath(cfg.mountpoint)
    below = _mounts_below(src)
    if below and backend == "auto":
        # FUSE shows them; a non-recursive bind would hide them: auto never changes what is seen
        _say(
            f"backend fuse: SOURCE has mounts below it ({below[0]}{', ...' if len(below) > 1 else ''}), "
            "which the kernel backend's bind mount does not carry"
        )
        return False
    aset, aclr = mount_attrs(cfg.kernel_opts, in_init_userns())
    try:
        idmapped_bind(src, mp, cfg.uids, cfg.gids, aset, aclr)
    except KernelRefused as e:
        if backend == "kernel":
            raise MountError(
                f"cannot mount {cfg.source} on {cfg.mountpoint} with the kernel backend: {e}; use -o backend=fuse"
            ) from None
        _say(f"backend fuse: no kernel idmapped mount: {e}")
        return False
    ignored = [k for k in given if k in FUSE_ONLY]
    extra = f"; ignoring FUSE-only -o {','.join(ignored)}" if ignored else ""
    extra += _unmapped_root_note(src, cfg.uids, cfg.gids)
    if backend == "auto":
        _say(f"backend kernel: idmapped bind mount of {src} ({_fstype_of(src)}){extra}")
    elif extra:
        _say(f"backend kernel{extra}")
    if cfg.foreground:
        _stay_in_foreground(mp)
    return True


def _stay_in_foreground(mp: str) -> None:
    """``-f``: keep the mount's lifetime tied to this process, as with FUSE.

    Waits for SIGINT/SIGTERM/SIGHUP (then detaches the mount) or for the
    mount to go away (someone ran ``shiftfs umount``).
    """
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        while is_kernel_mount(mp):
            if signal.sigtimedwait(sigs, 1.0) is not None:
                if is_kernel_mount(mp):
                    with contextlib.suppress(OSError):
                        mounts.umount2(mp, UMOUNT_NOFOLLOW | MNT_DETACH)
                return
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
