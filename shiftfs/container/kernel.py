"""
Linux namespace plumbing for running commands on a shiftfs view: unshare,
user-namespace id maps, mount helpers, pivot_root and signal relaying.

Python 3.11 has no ``os.unshare``, so the system calls go through libc with
ctypes. Nothing in here knows about shiftfs itself; ``shiftfs run`` builds a
container out of these pieces, and ``shiftfs exec`` is meant to reuse them.

Id maps follow the usual rule that the namespace's root (*view id* 0) is the
invoking user, so everything the shiftfs daemon writes on the backing
filesystem is owned by that user:

* as root, view ids 1..65535 go to a 65536-id block that no running namespace
  and no /etc/subuid entry uses (see :func:`free_block`);
* as an unprivileged user, view ids 1.. go to the user's ranges in /etc/subuid
  and /etc/subgid, written with the setuid helpers newuidmap/newgidmap, like
  rootless podman;
* otherwise only view id 0 exists (a *single-id* namespace), and the kernel
  refuses chown to any other id with EINVAL before the filesystem sees it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import fcntl
import os
import platform
import pwd
import random
import signal
import stat
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

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

SI_KERNEL = 0x80  # si_code of signals the kernel sends itself (tty ^C, ^\)

#: Size of the id block a full namespace gets, and the range root picks it
#: from (the one systemd-nspawn uses for containers).
BLOCK = 0x10000
CONTAINER_RANGE = (0x00080000, 0x6FFFFFFF)

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


class NamespaceError(Exception):
    """A one-line, user-facing reason why a namespace operation failed."""


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
        raise NamespaceError(
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


def userns_unavailable_hint() -> str:
    """The sysctl that most likely forbids unprivileged user namespaces."""
    checks = [
        ("/proc/sys/kernel/unprivileged_userns_clone", "0",
         "sysctl -w kernel.unprivileged_userns_clone=1"),
        ("/proc/sys/user/max_user_namespaces", "0",
         "sysctl -w user.max_user_namespaces=15000"),
        ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1",
         "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"),
    ]
    for path, bad, fix in checks:
        try:
            with open(path) as f:
                if f.read().strip() == bad:
                    return f"{path} is {bad}; as root run '{fix}'"
        except OSError:
            pass
    return "check that the kernel allows unprivileged user namespaces"


# --- id maps ------------------------------------------------------------------

Extent = tuple[int, int, int]  # (view id, host id, count)


@dataclass(frozen=True)
class IdMap:
    """The uid and gid maps of one user namespace.

    ``kind`` is ``"full"`` or ``"single"``; ``helper`` says whether the maps
    are written by newuidmap/newgidmap (subordinate ranges) or directly.
    """

    kind: str
    uid_map: tuple[Extent, ...]
    gid_map: tuple[Extent, ...]
    helper: bool = False
    base: int | None = None
    base_fixed: bool = False

    def maps_uid(self, view_id: int) -> bool:
        return any(v <= view_id < v + n for v, _, n in self.uid_map)

    def maps_gid(self, view_id: int) -> bool:
        return any(v <= view_id < v + n for v, _, n in self.gid_map)

    @property
    def setgroups_allowed(self) -> bool:
        # Unprivileged direct writes need setgroups=deny first.
        return self.helper or os.geteuid() == 0

    def describe(self) -> str:
        def fmt(extents: Sequence[Extent]) -> str:
            return ", ".join(f"{v}-{v + n - 1}->{h}" if n > 1 else f"{v}->{h}"
                             for v, h, n in extents)
        return f"uid {fmt(self.uid_map)}; gid {fmt(self.gid_map)}"


def parse_subid_file(path: str, user: str | None, uid: int) -> list[tuple[int, int]]:
    """The (start, count) ranges /etc/subuid or /etc/subgid gives to a user,
    matched by name or by numeric uid, in file order."""
    ranges = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) != 3 or line.lstrip().startswith("#"):
            continue
        owner, start, count = fields
        if owner not in (user, str(uid)):
            continue
        try:
            start_i, count_i = int(start), int(count)
        except ValueError:
            continue
        if count_i > 0:
            ranges.append((start_i, count_i))
    return ranges


def _all_subid_ranges() -> list[tuple[int, int]]:
    out = []
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            with open(path) as f:
                for line in f:
                    fields = line.strip().split(":")
                    if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                        out.append((int(fields[1]), int(fields[2])))
        except OSError:
            pass
    return out


def ranges_in_use() -> list[tuple[int, int]]:
    """Host id ranges (start, count) taken by running user namespaces
    (/proc/*/uid_map and gid_map) and by /etc/subuid and /etc/subgid."""
    used = set(_all_subid_ranges())
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        for name in ("uid_map", "gid_map"):
            try:
                with open(f"/proc/{pid}/{name}") as f:
                    text = f.read()
            except OSError:
                continue
            for line in text.splitlines():
                fields = line.split()
                if len(fields) != 3:
                    continue
                _, outside, count = (int(x) for x in fields)
                if count >= 0xFFFFFFFF:  # the initial namespace's identity map
                    continue
                used.add((outside, count))
    return sorted(used)


def _overlaps(start: int, count: int, used: Iterable[tuple[int, int]]) -> bool:
    return any(start < s + n and s < start + count for s, n in used)


def free_block(used: Sequence[tuple[int, int]] | None = None,
               rng: random.Random | None = None) -> int:
    """A 65536-aligned block inside :data:`CONTAINER_RANGE` that overlaps no
    range in ``used`` (default: :func:`ranges_in_use`). The search starts at a
    random block so that parallel runs rarely race for the same one."""
    if used is None:
        used = ranges_in_use()
    first = CONTAINER_RANGE[0] // BLOCK
    last = (CONTAINER_RANGE[1] + 1) // BLOCK - 1
    nblocks = last - first + 1
    start = (rng or random).randrange(nblocks)
    for i in range(nblocks):
        base = (first + (start + i) % nblocks) * BLOCK
        if not _overlaps(base, BLOCK, used):
            return base
    raise NamespaceError("no free 65536-id block left in 0x80000-0x6fffffff; "
                         "pass --userns-base N with a free block")


def _block_map(view0: int, base: int) -> tuple[Extent, ...]:
    return ((0, view0, 1), (1, base + 1, BLOCK - 1))


def _subid_map(view0: int, ranges: Sequence[tuple[int, int]]) -> tuple[Extent, ...]:
    extents: list[Extent] = [(0, view0, 1)]
    view = 1
    for start, count in ranges:
        extents.append((view, start, count))
        view += count
    return tuple(extents)


def suggest_subid_range() -> tuple[int, int]:
    """A 65536-id range after every range in /etc/subuid and /etc/subgid."""
    start = max([100000] + [s + n for s, n in _all_subid_ranges()])
    return start, start + BLOCK - 1


def single_id_note(user: str) -> str:
    """The one-time notice for a single-id namespace."""
    lo, hi = suggest_subid_range()
    return (f"note: single-id namespace ({user} has no range in /etc/subuid and "
            f"/etc/subgid, or newuidmap is missing): chown to any id but 0 fails with "
            f"EINVAL; to get 65536 ids, as root run 'usermod --add-subuids {lo}-{hi} "
            f"--add-subgids {lo}-{hi} {user}' (newuidmap comes with package uidmap)")


def choose_idmap(mode: str = "auto", base: int | None = None) -> tuple[IdMap, str | None]:
    """Pick the id map for a new namespace of the calling user.

    ``mode`` is ``auto``, ``full`` or ``single``; ``base`` forces root's
    block. Returns the map and, for an automatic single-id fallback, the
    note to print once.
    """
    uid, gid = os.getuid(), os.getgid()
    if mode not in ("auto", "full", "single"):
        raise NamespaceError(f"--userns {mode!r} is not a mode; use auto, full or single")
    if base is not None and uid != 0:
        raise NamespaceError("--userns-base needs root; unprivileged runs take their "
                             "range from /etc/subuid and /etc/subgid")
    if base is not None and mode == "single":
        raise NamespaceError("--userns-base conflicts with --userns single; drop one")
    if mode == "single":
        return IdMap("single", ((0, uid, 1),), ((0, gid, 1),)), None
    cfg_base = base
    if uid == 0 and base is None and not in_initial_userns():
        # Nested: hand the ids of this namespace on unchanged.
        return IdMap("full", _own_extents("uid_map"), _own_extents("gid_map")), None
    if uid == 0:
        if base is None:
            base = free_block()
        else:
            if base < 1 or base % BLOCK or base + BLOCK > 0xFFFFFFFF:
                raise NamespaceError(f"--userns-base {base} must be a positive multiple of "
                                     f"65536 below {0xFFFFFFFF - BLOCK + 1}; e.g. 524288")
            if _overlaps(base, BLOCK, ranges_in_use()):
                raise NamespaceError(f"--userns-base {base} overlaps ids of a running "
                                     "namespace or /etc/subuid; pick another block or "
                                     "omit --userns-base")
        return IdMap("full", _block_map(0, base), _block_map(0, base), base=base,
                     base_fixed=cfg_base is not None), None
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = None
    subuids = parse_subid_file("/etc/subuid", user, uid)
    subgids = parse_subid_file("/etc/subgid", user, uid)
    helpers = all(_which(t) for t in ("newuidmap", "newgidmap"))
    if subuids and subgids and helpers:
        return IdMap("full", _subid_map(uid, subuids), _subid_map(gid, subgids),
                     helper=True), None
    name = user or str(uid)
    if mode == "full":
        if not helpers:
            raise NamespaceError("--userns full needs newuidmap and newgidmap; as root "
                                 "run 'apt-get install uidmap' (or use --userns single)")
        lo, hi = suggest_subid_range()
        raise NamespaceError(f"--userns full needs ranges for {name} in /etc/subuid and "
                             f"/etc/subgid; as root run 'usermod --add-subuids {lo}-{hi} "
                             f"--add-subgids {lo}-{hi} {name}'")
    return IdMap("single", ((0, uid, 1),), ((0, gid, 1),)), single_id_note(name)


def in_initial_userns() -> bool:
    """Whether we run in the initial user namespace (identity map of all ids)."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True


def _own_extents(name: str) -> tuple[Extent, ...]:
    with open(f"/proc/self/{name}") as f:
        return tuple((int(line.split()[0]), int(line.split()[0]), int(line.split()[2]))
                     for line in f if line.strip())


def _which(tool: str) -> str | None:
    for d in ("/usr/bin", "/usr/sbin", "/bin", "/sbin"):
        p = os.path.join(d, tool)
        if os.access(p, os.X_OK):
            return p
    return None


@contextlib.contextmanager
def id_block_lock() -> Iterator[None]:
    """Serialise root's final block check and map write with other runs (a
    no-op for unprivileged users). Fork nothing while holding it: a child
    would inherit the lock."""
    try:
        if os.geteuid() != 0:
            raise PermissionError
        fd = os.open("/run/shiftfs-userns.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def claim_idmap(pid: int, idmap: IdMap) -> IdMap:
    """Write the maps of ``pid``; root's block is checked again under
    :func:`id_block_lock` first and moved if a namespace started since
    :func:`choose_idmap` took it. Returns the map written."""
    if idmap.base is None:
        write_idmap(pid, idmap)
        return idmap
    with id_block_lock():
        if _overlaps(idmap.base, BLOCK, ranges_in_use()):
            if idmap.base_fixed:
                raise NamespaceError(f"--userns-base {idmap.base} was taken by another "
                                     "namespace meanwhile; pick another block")
            base = free_block()
            idmap = dataclasses.replace(idmap, uid_map=_block_map(0, base),
                                        gid_map=_block_map(0, base), base=base)
        write_idmap(pid, idmap)
    return idmap


def write_idmap(pid: int, idmap: IdMap) -> None:
    """Write the uid and gid maps of process ``pid``, which has just called
    ``unshare(CLONE_NEWUSER)``."""
    if idmap.helper:
        for tool, extents in (("newuidmap", idmap.uid_map), ("newgidmap", idmap.gid_map)):
            argv = [_which(tool) or tool, str(pid)]
            argv += [str(x) for ext in extents for x in ext]
            res = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
            if res.returncode != 0:
                msg = " ".join(res.stdout.split()) or f"exit status {res.returncode}"
                raise NamespaceError(f"{tool} failed: {msg}; check /etc/subuid, /etc/subgid "
                                     f"and that {tool} is setuid root (package uidmap)")
        return
    try:
        if not idmap.setgroups_allowed:
            with open(f"/proc/{pid}/setgroups", "w") as f:
                f.write("deny")
        for name, extents in (("uid_map", idmap.uid_map), ("gid_map", idmap.gid_map)):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write("".join(f"{v} {h} {n}\n" for v, h, n in extents))
    except OSError as e:
        raise NamespaceError(f"cannot write the id map of process {pid}: "
                             f"{e.strerror}") from None


def become_root(idmap: IdMap) -> None:
    """Inside a freshly mapped namespace: switch to view id 0 with all the
    namespace's capabilities, and stay dumpable. Supplementary groups are
    kept: through them the user may reach files a daemon has to serve."""
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    set_dumpable()


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
                        raise NamespaceError(f"{path}: too many symlinks inside the root")
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


# --- processes and signals ----------------------------------------------------

#: Signals a supervisor passes on to its child. Those the kernel generates for
#: the terminal's foreground process group (^C, ^\, window size) reach the
#: command directly, so supervisors drop those copies (si_code SI_KERNEL).
RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
           signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)
_WAITED = set(RELAYED) | {signal.SIGCHLD}


def _noop(signo: int, frame: object) -> None:
    pass


def block_signals() -> set[int]:
    """Install handlers (so that a namespace's pid 1 is not immune to them)
    and block the relayed signals and SIGCHLD; :func:`supervise` collects
    them. Returns the previous mask. Call before forking the child."""
    for sig in RELAYED:
        signal.signal(sig, _noop)
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED))


def reset_signals(mask: Iterable[int] = ()) -> None:
    """In a child about to exec: default dispositions and an open mask."""
    for sig in (*RELAYED, signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def supervise(pid: int, reap_any: bool = False) -> int:
    """Wait for child ``pid`` while relaying signals to it; return its wait
    status. With ``reap_any`` (a namespace's pid 1) every other exiting
    child is reaped too. Signals must be blocked with :func:`block_signals`."""
    while True:
        info = signal.sigwaitinfo(_WAITED)
        if info.si_signo != signal.SIGCHLD:
            if info.si_code != SI_KERNEL:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, info.si_signo)
            continue
        while True:
            try:
                wpid, status = os.waitpid(-1 if reap_any else pid, os.WNOHANG)
            except ChildProcessError:
                return 255 << 8
            if wpid == 0:
                break
            if wpid == pid:
                return status


def reap_all(timeout: float) -> list[int]:
    """As a namespace's pid 1: reap children until none is left or
    ``timeout`` seconds pass. Returns the wait statuses collected."""
    statuses = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            wpid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return statuses
        if wpid:
            statuses.append(status)
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            return statuses
        signal.sigtimedwait({signal.SIGCHLD}, min(left, 0.5))


def exit_code(status: int) -> int:
    """A shell-style exit code for a wait status (128+N for signal N)."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code
