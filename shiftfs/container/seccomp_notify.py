"""Ownership and device nodes in a single-id namespace: a seccomp user-notification supervisor.

With one id in the user namespace, the kernel answers ``chown`` to any other
id with EINVAL and ``mknod`` of a device with EPERM, before FUSE sees it.
Xattr views could store any owner and device, so ``shiftfs run``/``exec`` in
a single-id namespace trap exactly these calls:

* pid 1 of namespace B loads a filter (built with libseccomp's Python
  binding, python3-seccomp) before anything else, so COMMAND and all it
  starts inherit it. Only ``chown``/``fchown``/``lchown``/``fchownat`` with a
  uid or gid other than 0, and ``mknod``/``mknodat`` of a character or block
  device, notify; every other call runs at full speed. The listener goes to
  the supervisor over a socket (SCM_RIGHTS).
* the supervisor, a child of pid 1 of A (outside B's pid namespace, so
  COMMAND cannot see or signal it; not under the filter), resolves each
  target as the kernel would (:mod:`.notify_target`) and re-checks that the
  notification is still pending. A target on one of the run's views (by
  ``st_dev``) goes to that view's daemon over its private socket
  (:mod:`shiftfs.fs.control`), which records the owner or makes the device
  as a privileged caller's request would; the call then returns what the
  daemon answered. Anything else continues unchanged in the kernel
  (``SECCOMP_USER_NOTIF_FLAG_CONTINUE``), which answers as it always did.
  A caller without CAP_CHOWN (CAP_MKNOD for mknod) is handed to the kernel
  too, as is any call whose arguments we cannot read.
* ``setxattr``/``lsetxattr``/``fsetxattr`` are trapped too (rare): the view
  shows the owner the kernel sees as 0 in a read-only xattr
  (``user.shiftfs.owner``), so that tools copying a file by its stat and
  xattrs (``cp -a``, ``rsync -aX``; usrmerge does) can carry it; a set of
  that xattr by a caller with CAP_CHOWN is a chown to the ids it names. A
  POSIX ACL (``system.posix_acl_access``/``_default``) that names an id the
  namespace cannot map, which the kernel refuses with EINVAL
  (systemd-tmpfiles gives ``/var/log/journal`` one for group adm), is
  stored by the daemon for a caller with CAP_FOWNER, as with a range. Any
  other xattr continues in the kernel.
* ``setgroups`` is trapped too (rare): a single-id namespace is made with
  setgroups denied, so the kernel answers EPERM even to a caller that asks
  only for its own gid (0); mkosi does exactly that before every sync and
  stops. Such a call, by a caller with CAP_SETGID, returns success and
  changes nothing: the caller keeps the supplementary groups it had, and
  gains no access it did not have. Any other list gets the kernel's EPERM.
* ``mount`` is trapped too (it is rare): a devpts mount with the tty group's
  id, which builders make in their tree, is made without it
  (:mod:`.notify_mount`); every other mount continues in the kernel.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import stat
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import SetupError
from ..ownership import acl
from ..ownership.single_id import OWNER_XATTR as _OWNER_XATTR_NAME
from ..sys import mounts
from ..sys import seccomp as notif
from ..sys.libc import AT_EMPTY_PATH, AT_FDCWD
from . import notify_mount
from .notify_target import Caller

__all__ = [
    "binding_missing",
    "load_filter",
    "install",
    "run_supervisor",
    "start_supervisor_for",
    "pid1_with_filter",
    "View",
]

CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
CAP_FOWNER = 3
CAP_FSETID = 4
CAP_SETGID = 6
CAP_MKNOD = 27
AT_SYMLINK_NOFOLLOW = 0x100
_AUDIT_ARCH_X86_64 = 0xC000003E
_S_IFMT = 0o170000
#: argument positions: (path or fd, uid, gid) / (path, mode, dev)
_CHOWN_ARGS = {"chown": (1, 2), "fchown": (1, 2), "lchown": (1, 2), "fchownat": (2, 3)}
_MKNOD_ARGS = {"mknod": 1, "mknodat": 2}
_SETXATTR = ("setxattr", "lsetxattr", "fsetxattr")
_ACL_NAMES = tuple(n.encode() for n in acl.ACL_NAMES)
#: the largest ACL value read from a caller (1024 entries; ext4 takes ~500 in a block)
_ACL_MAX = 4 + 8 * 1024
TRAPPED = (*_CHOWN_ARGS, *_MKNOD_ARGS, "mount", *_SETXATTR, "setgroups")
#: The view's read-only xattr with the owner the kernel is shown as 0 (shiftfs.ownership.single_id).
OWNER_XATTR = _OWNER_XATTR_NAME.encode()

_HINT = "install it with 'apt-get install python3-seccomp' and run 'make setup' (it links it into the venv)"


def binding_missing() -> str | None:
    """Why the filter cannot be built (libseccomp's Python binding is missing), or None."""
    try:
        import seccomp  # noqa: F401
    except ImportError:
        return f"libseccomp's Python binding (python3-seccomp) is missing; {_HINT}"
    return None


def load_filter() -> int:
    """Load the filter on this process (and so on everything it starts); return the listener."""
    import seccomp

    f = seccomp.SyscallFilter(seccomp.ALLOW)
    # Root of the namespace may load a filter without no_new_privs; leave setuid semantics alone.
    f.set_attr(seccomp.Attr.CTL_NNP, 0)
    for name, (uarg, garg) in _CHOWN_ARGS.items():
        # Ids 0 (ours) work in the kernel; anything else, -1 included, asks the supervisor.
        f.add_rule(seccomp.NOTIFY, name, seccomp.Arg(uarg, seccomp.GT, 0))
        f.add_rule(seccomp.NOTIFY, name, seccomp.Arg(garg, seccomp.GT, 0))
    for name, marg in _MKNOD_ARGS.items():
        for kind in (stat.S_IFCHR, stat.S_IFBLK):
            f.add_rule(seccomp.NOTIFY, name, seccomp.Arg(marg, seccomp.MASKED_EQ, _S_IFMT, kind))
    # Rare; only a devpts mount with the tty group's id is done for the caller (notify_mount).
    f.add_rule(seccomp.NOTIFY, "mount")
    # Rare too; only a copy of the owner xattr (cp -a, rsync -aX of a view file) becomes a chown.
    for name in _SETXATTR:
        f.add_rule(seccomp.NOTIFY, name)
    # Always EPERM in the kernel here; a list of the caller's own gid succeeds as a no-op.
    f.add_rule(seccomp.NOTIFY, "setgroups")
    f.load()
    return int(f.get_notify_fd())


def install(sock: socket.socket) -> None:
    """In pid 1 of B: load the filter, hand the listener to the supervisor, wait until it has it."""
    listener = load_filter()
    try:
        socket.send_fds(sock, [b"L"], [listener])
        if sock.recv(1) != b"k":
            raise SetupError("the seccomp supervisor did not take the listener")
    finally:
        os.close(listener)
        sock.close()


@dataclass
class View:
    """A view the supervisor serves: its device number and its daemon's control socket."""

    dev: int
    control: socket.socket


def _syscall_numbers() -> dict[int, str]:
    import seccomp

    return {seccomp.resolve_syscall(seccomp.Arch.NATIVE, name): name for name in TRAPPED}


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def _id(v: int) -> int | None:
    v &= 0xFFFFFFFF
    return None if v == 0xFFFFFFFF else v


def _ranges(name: str, proc_fd: int) -> list[tuple[int, int]]:
    """The namespace-side ranges of a ``uid_map``/``gid_map`` (read through ``proc_fd``)."""
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_fd)
    try:
        text = os.read(fd, 65536).decode()
    finally:
        os.close(fd)
    return [(int(f[0]), int(f[2])) for f in (line.split() for line in text.splitlines()) if len(f) == 3]


def _mapped(ranges: list[tuple[int, int]], xid: int) -> bool:
    return any(lo <= xid < lo + count for lo, count in ranges)


class _Continue(Exception):
    """Hand the call back to the kernel."""


class Supervisor:
    def __init__(self, listener: int, views: Sequence[View], proc_fd: int, own_root: int):
        self.listener = listener
        self.views = {v.dev: v for v in views}
        self.proc = proc_fd
        self.own_root = own_root
        self.numbers = _syscall_numbers()
        self.userns = os.stat(f"{os.getpid()}/ns/user", dir_fd=proc_fd).st_ino
        self.counts = {"notified": 0, "handled": 0, "continued": 0}
        self.uids = _ranges(f"{os.getpid()}/uid_map", proc_fd)
        self.gids = _ranges(f"{os.getpid()}/gid_map", proc_fd)

    def serve(self) -> None:
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        while True:
            events = poller.poll()
            if any(ev & (select.POLLHUP | select.POLLERR) for _, ev in events) and not any(
                ev & select.POLLIN for _, ev in events
            ):
                return  # every process under the filter is gone
            n = notif.receive(self.listener)
            if n is None:
                continue
            self.counts["notified"] += 1
            try:
                err = self.handle(n)
            except _Continue:
                self.counts["continued"] += 1
                notif.respond(self.listener, n.id, flags=notif.FLAG_CONTINUE)
                continue
            except OSError:  # the caller is gone, or its /proc is unreadable: the kernel decides
                self.counts["continued"] += 1
                notif.respond(self.listener, n.id, flags=notif.FLAG_CONTINUE)
                continue
            if err is None:
                continue  # no longer pending
            self.counts["handled"] += 1
            notif.respond(self.listener, n.id, error=err)

    def _view(self, fd: int) -> View:
        st = os.fstat(fd)
        view = self.views.get(st.st_dev)
        if view is None:
            raise _Continue
        return view

    def _ask(self, view: View, req: dict) -> int:
        view.control.send(json.dumps(req).encode())
        reply = view.control.recv(4096)
        if not reply:
            return errno.EIO
        return int(json.loads(reply)["errno"])

    def handle(self, n: notif.Notification) -> int | None:
        """errno to answer (0: success), None if the notification is no longer pending; _Continue: the kernel's."""
        name = self.numbers.get(n.nr)
        if name is None or n.arch != _AUDIT_ARCH_X86_64:
            raise _Continue
        caller = Caller(self.proc, self.own_root, n.pid)
        a = n.args
        if name in _CHOWN_ARGS:
            ui, gi = _CHOWN_ARGS[name]
            uid, gid = _id(a[ui]), _id(a[gi])
            if uid is None and gid is None:
                raise _Continue
            fd = self._chown_target(caller, name, a)
            try:
                return self._chown(caller, n, fd, uid, gid)
            finally:
                os.close(fd)
        if name == "mount":
            return self._mount(caller, n)
        if name == "setgroups":
            return self._setgroups(caller, n)
        if name in _SETXATTR:
            xname = caller.read_path(a[1])
            if xname == OWNER_XATTR:
                return self._owner_copy(caller, name, n)
            if xname in _ACL_NAMES:
                return self._acl(caller, name, xname, n)
            raise _Continue
        mi = _MKNOD_ARGS[name]
        dirfd = AT_FDCWD if name == "mknod" else _s32(a[0])
        path = caller.read_path(a[mi - 1])
        head, slash, last = path.rpartition(b"/")
        if last in (b"", b".", b".."):
            raise _Continue
        if slash and not head:
            head = b"/"
        fd = caller.resolve(dirfd, head, follow=True, directory=True)
        try:
            view = self._view(fd)
            if not notif.id_valid(self.listener, n.id):
                return None
            status = caller.status()
            if not self._capable(caller, status, CAP_MKNOD):
                raise _Continue
            if os.fstatvfs(fd).f_flag & os.ST_RDONLY:
                return errno.EROFS
            pst = os.fstat(fd)  # the directory as the kernel sees it: owner 0, the caller's fsuid
            if not self._capable(caller, status, CAP_DAC_OVERRIDE) and pst.st_mode & 0o300 != 0o300:
                return errno.EACCES
            umask = int(status.get("Umask", "0022"), 8)
            req = {
                "op": "mknod",
                "parent": os.fstat(fd).st_ino,
                "name": last.hex(),
                "mode": a[mi] & 0xFFFFFFFF,
                "rdev": a[mi + 1] & 0xFFFFFFFF,
                "uid": 0,
                "gid": 0,
                "umask": umask,
            }
            return self._ask(view, req)
        finally:
            os.close(fd)

    def _mount(self, caller: Caller, n: notif.Notification) -> int | None:
        a = n.args
        if not a[2] or caller.read_path(a[2]) != b"devpts" or not a[4]:
            raise _Continue
        data = notify_mount.devpts_data(caller.read_path(a[4]))
        if data is None:
            raise _Continue
        source = caller.read_path(a[0]) if a[0] else b"devpts"
        target = caller.read_path(a[1])
        if not notif.id_valid(self.listener, n.id):
            return None
        if not self._capable(caller, caller.status(), notify_mount.CAP_SYS_ADMIN):
            raise _Continue
        return notify_mount.mount_for(caller, source, target, a[3] & 0xFFFFFFFF, data)

    def _setgroups(self, caller: Caller, n: notif.Notification) -> int | None:
        """setgroups of gids the caller already has as its gid: success, nothing changed."""
        size = _s32(n.args[0])
        if not 0 <= size <= 64:
            raise _Continue
        data = caller.read_bytes(n.args[1], 4 * size) if size else b""
        wanted = set(struct.unpack(f"<{size}I", data))
        status = caller.status()
        own = {int(x) for x in status.get("Gid", "").split()}
        if not wanted <= own:
            raise _Continue
        if not notif.id_valid(self.listener, n.id):
            return None
        if not self._capable(caller, status, CAP_SETGID):
            raise _Continue
        return 0

    def _capable(self, caller: Caller, status: dict[str, str], cap: int) -> bool:
        """Whether the caller has ``cap`` in *our* user namespace (not one it made below it)."""
        if os.stat(f"{caller.pid}/ns/user", dir_fd=self.proc).st_ino != self.userns:
            return False
        return bool(int(status.get("CapEff", "0"), 16) & (1 << cap))

    def _chown(self, caller: Caller, n: notif.Notification, fd: int, uid: int | None, gid: int | None) -> int | None:
        view = self._view(fd)
        if not notif.id_valid(self.listener, n.id):
            return None
        if not self._capable(caller, caller.status(), CAP_CHOWN):
            raise _Continue
        if os.fstatvfs(fd).f_flag & os.ST_RDONLY:
            return errno.EROFS
        return self._ask(view, {"op": "chown", "ino": os.fstat(fd).st_ino, "uid": uid, "gid": gid})

    def _owner_copy(self, caller: Caller, name: str, n: notif.Notification) -> int | None:
        """A set of the owner xattr: a chown to the ids it names, or the kernel's (the view refuses it)."""
        a = n.args
        if not 0 < a[3] <= 64:
            raise _Continue
        try:
            u, g = caller.read_bytes(a[2], a[3]).split(b":")
            uid, gid = int(u), int(g)
        except ValueError:
            raise _Continue from None
        if not (0 <= uid < 0xFFFFFFFF and 0 <= gid < 0xFFFFFFFF):
            raise _Continue
        fd = self._xattr_target(caller, name, a)
        try:
            return self._chown(caller, n, fd, uid, gid)
        finally:
            os.close(fd)

    def _xattr_target(self, caller: Caller, name: str, a: tuple[int, ...]) -> int:
        if name == "fsetxattr":
            return caller.open_fd(_s32(a[0]))
        return caller.resolve(AT_FDCWD, caller.read_path(a[0]), follow=name == "setxattr")

    def _acl(self, caller: Caller, name: str, xname: bytes, n: notif.Notification) -> int | None:
        """A POSIX ACL naming ids the namespace cannot map: stored by the view's daemon; else the kernel's."""
        a = n.args
        size, flags = a[3] & 0xFFFFFFFF, a[4] & 0xFFFFFFFF
        if flags or not 4 <= size <= _ACL_MAX:
            raise _Continue
        value = caller.read_bytes(a[2], size)
        try:
            entries = acl.parse(value)
            acl.check_valid(entries)
        except acl.AclError:
            raise _Continue from None  # EINVAL from the kernel
        uids, gids = acl.named_ids(entries)
        if all(_mapped(self.uids, u) for u in uids) and all(_mapped(self.gids, g) for g in gids):
            raise _Continue  # the kernel can store it
        fd = self._xattr_target(caller, name, a)
        try:
            view = self._view(fd)
            if not notif.id_valid(self.listener, n.id):
                return None
            status = caller.status()
            if not self._capable(caller, status, CAP_FOWNER):
                raise _Continue
            if os.fstatvfs(fd).f_flag & os.ST_RDONLY:
                return errno.EROFS
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                return errno.EOPNOTSUPP
            if xname == _ACL_NAMES[1] and not stat.S_ISDIR(st.st_mode):
                return errno.EACCES
            req = {
                "op": "setxattr",
                "ino": st.st_ino,
                "name": xname.decode(),
                "value": value.hex(),
                "fsetid": self._capable(caller, status, CAP_FSETID),
            }
            return self._ask(view, req)
        finally:
            os.close(fd)

    def _chown_target(self, caller: Caller, name: str, a: tuple[int, ...]) -> int:
        if name == "fchown":
            return caller.open_fd(_s32(a[0]))
        if name == "fchownat":
            dirfd, flags = _s32(a[0]), a[4] & 0xFFFFFFFF
            if flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH):
                raise _Continue  # EINVAL from the kernel
            path = caller.read_path(a[1])
            if not path and not flags & AT_EMPTY_PATH:
                raise _Continue  # ENOENT from the kernel
            return caller.resolve(dirfd, path, follow=not flags & AT_SYMLINK_NOFOLLOW)
        path = caller.read_path(a[0])
        if not path:
            raise _Continue
        return caller.resolve(AT_FDCWD, path, follow=name == "chown")


def run_supervisor(sock: socket.socket, views: Sequence[View], stage: str) -> int:
    """The supervisor process (a child of pid 1 of A, before B exists): take the
    listener from B, then answer notifications until every process under the
    filter is gone."""
    mounts.set_parent_death_signal()
    os.setsid()
    # A procfs of our own pid namespace (A), where the notifications' pids are.
    mounts.unshare(mounts.CLONE_NEWNS)
    mounts.make_rprivate("/")
    if stage:
        mounts.umount2(stage, mounts.MNT_DETACH)  # hold no copy of the views
    mounts.mount("proc", "/proc", "proc", mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC)
    proc_fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    own_root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    _msg, fds, _flags, _addr = socket.recv_fds(sock, 16, 1)
    if not fds:
        return 0  # B failed before loading the filter
    sock.send(b"k")
    sock.close()
    sup = Supervisor(fds[0], views, proc_fd, own_root)
    try:
        sup.serve()
    except Exception as e:
        print(f"shiftfs: seccomp supervisor failed: {e}", file=sys.stderr)
        return 1
    return 0


def start_supervisor_for(prog: str, sup_end: socket.socket, devs: Sequence[int], controls: list[socket.socket]) -> None:
    """In pid 1 of A, once B0 has mounted the views (``devs``, in order) and
    before B1 runs: fork the supervisor (still in pid namespace A, so
    COMMAND can neither see nor signal it). The other end of ``sup_end`` is
    held only by B0 and B1: if they fail before handing the listener over,
    the supervisor reads the end of the socket and gives up."""
    served = [View(dev, c) for dev, c in zip(devs, controls)]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = run_supervisor(sup_end, served, "")
        except BaseException as e:
            print(f"{prog}: seccomp supervisor: {e}", file=sys.stderr)
        finally:
            os._exit(code)
    for c in controls:
        c.close()


def pid1_with_filter(inner: Callable[[str, list[str]], int], b_end: socket.socket) -> Callable[[str, list[str]], int]:
    """B's pid 1: load the filter and hand the listener over, then do ``inner``."""

    def pid1(stage: str, views: list[str]) -> int:
        install(b_end)
        return inner(stage, views)

    return pid1
