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
in one line on stderr). See KERNEL_LIMITS.md for how the two differ.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import signal
import sys

from ..ownership.idmap import IdMap

__all__ = ["BACKENDS", "KernelRefused", "try_mount", "is_kernel_mount", "unmount", "userns_fd", "idmapped_bind"]

BACKENDS = ("auto", "kernel", "fuse")

# Linux's unified syscall numbers (the same on every architecture since 5.1).
SYS_open_tree = 428
SYS_move_mount = 429
SYS_mount_setattr = 442

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = 0o2000000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
CLONE_NEWUSER = 0x10000000
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

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
MOUNT_ATTR_SIZE_VER0 = 32

#: Lines a uid_map/gid_map may hold (kernel 4.15+).
MAX_MAP_LINES = 340

#: Options that tune or observe the FUSE daemon; a kernel mount has no daemon,
#: so they are ignored there, with one warning line naming them.
FUSE_ONLY = {
    "cache", "writeback", "nowriteback", "read_ahead_kb", "xattr_probes", "log", "stats", "debug",
    "fsname", "allow_other", "auto_unmount", "default_owner", "legacy_xattr", "fuseoverlayfs_compat",
}
#: Options whose meaning a bind mount cannot carry (they are superblock flags):
#: ``auto`` picks FUSE for them, ``backend=kernel`` refuses them.
NEEDS_FUSE = {"sync", "dirsync"}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.unshare.argtypes = [ctypes.c_int]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class KernelRefused(Exception):
    """The kernel (or the caller's privileges) did not allow the idmapped mount.

    ``str()`` is the one-line reason; ``errno`` the error behind it.
    """

    def __init__(self, reason: str, err: int = 0):
        super().__init__(reason)
        self.errno = err


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _sys(what: str, *args) -> int:
    rc = _libc.syscall(*args)
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return rc


# -- the user namespace that carries the table ------------------------------------------

def map_lines(m: IdMap) -> str:
    """``/proc/PID/uid_map`` text for a table (identity: the full range)."""
    if m.identity:
        return "0 0 4294967295\n"
    if len(m.ranges) > MAX_MAP_LINES:
        raise KernelRefused(f"the {m.what} table has {len(m.ranges)} ranges; a kernel idmap holds at most "
                            f"{MAX_MAP_LINES}")
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
            ok = _libc.unshare(CLONE_NEWUSER) == 0
            os.write(ready_w, b"1" if ok else str(ctypes.get_errno()).encode())
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    try:
        said = os.read(ready_r, 16)
        if said != b"1":
            e = int(said or b"0") or errno.EPERM
            raise KernelRefused(f"cannot create the user namespace that carries the map: "
                                f"unshare(CLONE_NEWUSER): {os.strerror(e)}", e)
        for name, text in (("uid_map", ulines), ("gid_map", glines)):
            try:
                with open(f"/proc/{pid}/{name}", "w") as f:
                    f.write(text)
            except OSError as e:
                raise KernelRefused(f"cannot write the {name} of the idmap namespace: {e.strerror}",
                                    e.errno or 0) from None
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
    for on, off, bit in (("nosuid", "suid", MOUNT_ATTR_NOSUID), ("nodev", "dev", MOUNT_ATTR_NODEV),
                         ("noexec", "exec", MOUNT_ATTR_NOEXEC)):
        if on in opts or (bit != MOUNT_ATTR_NOEXEC and in_init_userns and off not in opts):
            aset |= bit
        elif off in opts:
            aclr |= bit
    for word, value in (("noatime", MOUNT_ATTR_NOATIME), ("strictatime", MOUNT_ATTR_STRICTATIME),
                        ("relatime", MOUNT_ATTR_RELATIME)):
        if word in opts:
            aset = (aset & ~MOUNT_ATTR__ATIME) | value
            aclr |= MOUNT_ATTR__ATIME
    if "nodiratime" in opts:
        aset |= MOUNT_ATTR_NODIRATIME
    return aset, aclr


def _in_init_userns() -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True


# -- the mount ---------------------------------------------------------------------------------

def _fstype_of(path: str) -> str:
    """The filesystem type holding ``path`` (for messages)."""
    try:
        dev = os.stat(path).st_dev
        want = f"{os.major(dev)}:{os.minor(dev)}"
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if left.split()[2] == want and right:
                    return right.split()[0]
    except (OSError, IndexError):
        pass
    return "?"


def idmapped_bind(source: str, mountpoint: str, uids: IdMap, gids: IdMap, attr_set: int = 0,
                  attr_clr: int = 0) -> None:
    """Bind SOURCE on MOUNTPOINT with the tables; raises :class:`KernelRefused`.

    Not recursive: mounts below SOURCE are not carried over (a submount of a
    filesystem without idmap support would make the whole call fail).
    """
    try:
        tree = _sys("open_tree", SYS_open_tree, ctypes.c_int(AT_FDCWD), os.fsencode(source),
                    ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC))
    except OSError as e:
        if e.errno == errno.ENOSYS:
            raise KernelRefused("this kernel has no open_tree (idmapped mounts need Linux 5.12+)", e.errno) from None
        if e.errno == errno.EPERM:
            raise KernelRefused("cloning a mount needs CAP_SYS_ADMIN (open_tree: EPERM)", e.errno) from None
        raise KernelRefused(f"cannot clone the mount of SOURCE ({e.strerror})", e.errno or 0) from None
    try:
        ns = userns_fd(uids, gids)
        try:
            attr = _MountAttr(attr_set=MOUNT_ATTR_IDMAP | attr_set, attr_clr=attr_clr, propagation=0, userns_fd=ns)
            _sys("mount_setattr", SYS_mount_setattr, ctypes.c_int(tree), b"", ctypes.c_uint(AT_EMPTY_PATH),
                 ctypes.byref(attr), ctypes.c_size_t(MOUNT_ATTR_SIZE_VER0))
        except OSError as e:
            fstype = _fstype_of(source)
            if e.errno == errno.EINVAL:
                why = f"SOURCE's filesystem ({fstype}) does not support idmapped mounts (mount_setattr: EINVAL)"
            elif e.errno == errno.EPERM:
                why = (f"not privileged over SOURCE's filesystem ({fstype}): its superblock belongs to another "
                       "user namespace, a mount flag is locked, or SOURCE is already idmapped (mount_setattr: EPERM)")
            elif e.errno == errno.ENOSYS:
                why = "this kernel has no mount_setattr (idmapped mounts need Linux 5.12+)"
            else:
                why = f"the kernel refused to idmap SOURCE ({fstype}): mount_setattr: {e.strerror}"
            raise KernelRefused(why, e.errno or 0) from None
        finally:
            os.close(ns)
        try:
            _sys("move_mount", SYS_move_mount, ctypes.c_int(tree), b"", ctypes.c_int(AT_FDCWD),
                 os.fsencode(mountpoint), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))
        except OSError as e:
            raise KernelRefused(f"cannot attach the mount on MOUNTPOINT (move_mount: {e.strerror})",
                                e.errno or 0) from None
    finally:
        os.close(tree)


# -- finding and removing our mounts ---------------------------------------------------------

def _topmost(path: str) -> tuple[str, list[str]] | None:
    """(fs type, per-mount options) of the topmost mount on ``path``."""
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                parts = left.split()
                if parts[4].encode().decode("unicode_escape") == path:
                    found = (right.split()[0] if right else "", parts[5].split(","))
    except (OSError, IndexError):
        return None
    return found


def _mounts_below(source: str) -> list[str]:
    """Mount points strictly below SOURCE (resolved), in mount order."""
    try:
        real = os.path.realpath(source)
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    except (OSError, IndexError):
        return []
    prefix = real.rstrip("/") + "/"
    return [p for p in points if p.startswith(prefix)]


def is_kernel_mount(path: str) -> bool:
    """Whether the topmost mount on ``path`` is an idmapped bind mount.

    Every kernel-backend mount is idmapped (even an identity table gets a
    namespace carrying the full range), so ``idmapped`` in mountinfo is
    what marks one. Another tool's idmapped mount looks the same.
    """
    top = _topmost(os.path.abspath(path))
    return top is not None and not top[0].startswith("fuse") and "idmapped" in top[1]


def unmount(mountpoint: str, lazy: bool = False) -> None:
    """umount2 the kernel mount on ``mountpoint``; raises MountError."""
    from ..errors import MountError

    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
    if _libc.umount2(os.fsencode(os.path.abspath(mountpoint)), flags) != 0:
        e = ctypes.get_errno()
        if e == errno.EBUSY:
            hint = "close programs using it or use 'shiftfs umount --lazy'"
        elif e == errno.EPERM:
            hint = "a kernel-backend mount is unmounted by root (the user who made it)"
        else:
            hint = "check 'findmnt " + mountpoint + "'"
        raise MountError(f"cannot unmount {mountpoint}: {os.strerror(e)}; {hint}")


# -- choosing the backend -------------------------------------------------------------------

def _say(line: str) -> None:
    print(f"shiftfs: {line}", file=sys.stderr, flush=True)


def try_mount(cfg) -> bool:
    """Make the kernel mount if ``cfg`` asks for it (or ``auto`` allows it).

    True: mounted (with ``-f``, also unmounted again on a signal); the caller
    is done. False: use the FUSE daemon. Raises UsageError/MountError when
    ``backend=kernel`` cannot be honoured.
    """
    from ..errors import MountError, UsageError
    from .mount import check

    backend = getattr(cfg, "backend", "auto")
    if backend == "fuse":
        return False
    if cfg.xattr:
        if backend == "kernel":
            raise UsageError("-o backend=kernel works in table mode only (xattr mode keeps ownership in records "
                             "only the FUSE daemon applies); drop --xattr or use backend=fuse")
        return False  # xattr mode has no choice to report
    given = list(dict.fromkeys(getattr(cfg, "option_keys", [])))
    blockers = [k for k in given if k in NEEDS_FUSE]
    if blockers:
        if backend == "kernel":
            raise UsageError(f"-o {','.join(blockers)} is a filesystem flag a bind mount cannot carry; "
                             "drop it or use backend=fuse")
        _say(f"backend fuse: -o {','.join(blockers)} needs the FUSE backend")
        return False
    check(cfg, fuse=False)
    src, mp = os.path.abspath(cfg.source), os.path.abspath(cfg.mountpoint)
    below = _mounts_below(src)
    if below and backend == "auto":
        # FUSE shows them; a non-recursive bind would hide them: auto never changes what is seen
        _say(f"backend fuse: SOURCE has mounts below it ({below[0]}{', ...' if len(below) > 1 else ''}), "
             "which the kernel backend's bind mount does not carry")
        return False
    aset, aclr = mount_attrs(cfg.kernel_opts, _in_init_userns())
    try:
        idmapped_bind(src, mp, cfg.uids, cfg.gids, aset, aclr)
    except KernelRefused as e:
        if backend == "kernel":
            raise MountError(f"cannot mount {cfg.source} on {cfg.mountpoint} with the kernel backend: {e}; "
                             "use -o backend=fuse") from None
        _say(f"backend fuse: no kernel idmapped mount: {e}")
        return False
    ignored = [k for k in given if k in FUSE_ONLY]
    extra = f"; ignoring FUSE-only -o {','.join(ignored)}" if ignored else ""
    if backend == "auto":
        _say(f"backend kernel: idmapped bind mount of {src} ({_fstype_of(src)}){extra}")
    elif ignored:
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
                    _libc.umount2(os.fsencode(mp), UMOUNT_NOFOLLOW | MNT_DETACH)
                return
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
