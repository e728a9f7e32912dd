"""The daemon's own mount namespace: immune to a pivot_root in the namespace it serves.

Why. ``pivot_root`` moves the root and cwd of every process of the mount
namespace whose root (or cwd) is the old root. A user who pivots into a
shiftfs view (``cd view && pivot_root . mnt/oldroot``) therefore moves the
daemon's root into the view too, and the daemon's next path-based call
(every ``getxattr("/proc/self/fd/N")``, SQLite opening ``records.db-wal``)
becomes a FUSE request to the daemon itself: it waits for itself for good,
and only host root can free it through fusectl's ``abort``.

Mechanism. Once the mount is live, and before the daemon reports ready, it
moves into a mount namespace of its own whose root is a tiny read-only
tmpfs holding exactly two mounts:

* ``/proc``: a clone of the served namespace's /proc, for the
  ``/proc/self/fd/N`` magic links that xattr calls and hard links use;
* ``/source``: a clone of the backing directory. The root descriptor is
  re-opened there (``dup2`` onto the same number), so every descriptor the
  daemon opens afterwards lies below its own root. That matters for SQLite:
  it resolves ``/proc/self/fd/N/records.db`` to a string path and opens
  ``records.db``, ``-wal``, ``-shm`` and ``-journal`` by that name (strace
  shows ``openat(AT_FDCWD, "/var/tmp/.../.shiftfs/records.db-wal")``); the
  name is now ``/source/.shiftfs/...`` inside the daemon's namespace.

The old root is detached right after ``pivot_root``, so the daemon holds no
copy of any other mount: not of its own FUSE mount (a copy would keep the
connection, and the daemon, alive after the user's ``umount``), nor of
other mounts (in a namespace with private propagation, as ``unshare
--mount`` makes, an unmount would never reach such copies: other daemons
would not exit, devices would stay busy). Nothing done in the served
namespace (``pivot_root``, ``umount -l``, new mounts) reaches the daemon's
root or cwd, and a stray path-based call fails with ENOENT instead of
deadlocking. The price: nothing outside is reachable by name any more, so
code that runs after the mount must not import lazily (modules load from
disk), open files by name (``-o stats`` goes through :func:`reachable`), or
reconnect to ``/dev/log``; tracebacks in the log lack source lines.

Not taken: (1) a private copy of the whole namespace with only our own FUSE
copy detached keeps every path working but holds copies of every other
mount, see above; (2) descriptors only, without a namespace: ``fgetxattr``
refuses O_PATH descriptors, so xattr calls go through ``/proc/self/fd``
(resolved from the root), and SQLite resolves and opens names itself.

Who can. It takes CAP_SYS_ADMIN in the daemon's user namespace (root, or
root of a user namespace as after ``unshare --user --map-root-user``). A
daemon without it stays where it is: pivoting its namespace takes
CAP_SYS_ADMIN over that namespace, which its plain-user peers lack.

Unmounting. The served mount is not in the daemon's namespace any more, so
on a signal the daemon closes the connection and then detaches the mount
from a short-lived thread that joins the served namespace
(:meth:`Isolation.unmount_served`), as libfuse itself would have. It
keeps no descriptor of the served namespace, so when the namespace's last
process exits the view goes with it and the daemon exits.
"""

from __future__ import annotations

import errno
import fcntl  # noqa: F401  loaded now: once isolated, no import can read a module from disk
import logging
import os
import platform
import threading
from dataclasses import dataclass

from ..sys import mounts
from ..sys.files import open_beneath
from ..sys.libc import AT_FDCWD
from ..sys.mounts import (
    CLONE_FS,
    CLONE_NEWNS,
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    UMOUNT_NOFOLLOW,
)

__all__ = ["Isolation", "isolate_daemon", "reachable"]

log = logging.getLogger(__name__)

#: Where the backing directory and /proc sit inside the daemon's namespace.
SOURCE = "/source"
_RO_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


def _clone_tree(path: str, dfd: int = AT_FDCWD) -> int:
    """A detached copy of the mount at ``path`` (recursive only if locked submounts demand it)."""
    try:
        return mounts.open_tree(path, recursive=False, dfd=dfd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    return mounts.open_tree(path, recursive=True, dfd=dfd)


def _mount_dev(mountpoint: str, mountinfo: str = "/proc/self/mountinfo", dir_fd: int | None = None) -> str | None:
    """``major:minor`` of the topmost fuse.shiftfs mount on ``mountpoint``."""
    found = None
    for m in mounts.mountinfo(mountinfo, dir_fd):
        if m.mountpoint == mountpoint and m.fstype == "fuse.shiftfs":
            found = m.dev
    return found


@dataclass
class Isolation:
    """The daemon lives in its own mount namespace; how to find the served one again."""

    served_ns: tuple[int, int]  # (st_dev, st_ino) of the served namespace: no descriptor, see unmount_served
    mountpoint: str
    dev: str | None
    proc_fd: int

    def _enter_served(self) -> bool:
        """Join the served namespace through a process still in it (this thread only)."""
        dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.proc_fd)
        try:
            names = os.listdir(dfd)
        finally:
            os.close(dfd)
        for name in names:
            if not name.isdigit() or int(name) == os.getpid():
                continue
            try:
                st = os.stat(f"{name}/ns/mnt", dir_fd=self.proc_fd)
                if (st.st_dev, st.st_ino) != self.served_ns:
                    continue
                fd = os.open(f"{name}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.proc_fd)
            except OSError:
                continue
            try:
                mounts.setns(fd, CLONE_NEWNS)
                return True
            finally:
                os.close(fd)
        return False

    def unmount_served(self, timeout: float = 10.0) -> None:
        """Detach our mount in the served namespace; call after the FUSE connection is closed.

        The daemon holds no descriptor of the served namespace: one would keep
        it, and the view mounted in it, alive after its last process exits,
        and the daemon with it. A thread unshares its fs state and joins the
        namespace through a process still in it (none: nothing to unmount).
        It unmounts only if that namespace still has our mount at its path (a
        pivot may have made the view the root there: then it is left alone).
        With the connection closed no lookup through the view can wait on us.
        """

        def work() -> None:
            try:
                mounts.unshare(CLONE_FS)
                if not self._enter_served():
                    return
                if self.dev is None or _mount_dev(self.mountpoint, "thread-self/mountinfo", self.proc_fd) != self.dev:
                    return
                mounts.umount2(self.mountpoint, MNT_DETACH | UMOUNT_NOFOLLOW)
            except OSError as e:
                log.warning("cannot unmount %s in the served namespace: %s; unmount it by hand", self.mountpoint, e)

        t = threading.Thread(target=work, name="shiftfs-unmount", daemon=True)
        t.start()
        t.join(timeout)


def reachable(path: str | None) -> str | None:
    """A name for ``path``, a file the daemon writes later (``-o stats``), that still works once it
    is isolated: ``/proc/self/fd/N/NAME`` of its directory, opened now without following a
    symlink (None, with a warning, when that fails). Call before isolating."""
    if not path:
        return path
    d, name = os.path.split(os.path.abspath(path))
    # No symlink is followed on the way (nor, when written, at NAME): the
    # directory may lie where a container's root can write (a bind, a shifted
    # directory) and plant a link to a host file the daemon's user may write.
    try:
        root = os.open("/", _RO_DIR)
        try:
            dfd = open_beneath(root, d, _RO_DIR)
        finally:
            os.close(root)
    except OSError as e:
        log.warning("-o stats: cannot open %s without following symlinks (%s); no stats are written", d, e)
        return None
    return f"/proc/self/fd/{dfd}/{name}"


def _own_proc() -> int | None:
    """A detached proc of the daemon's own pid namespace, or None (then the served
    namespace's /proc is used).

    FUSE gives each request's pid in the pid namespace of the process that
    mounted, the daemon's; the caller checks (groups and CAP_FSETID for the
    SGID rule) read ``/proc/PID`` and must see that namespace. The served
    namespace's /proc may show another one: ``shiftfs exec`` and ``run`` start
    their daemon in a new pid namespace under the host's /proc, where pid N is
    some other process (and the SGID of a ``cp -a``'d setgid file was lost).
    """
    try:
        mounts.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError as e:
        log.debug("no proc of the daemon's own pid namespace (%s); using the served one", e)
        return None
    try:
        return _clone_tree("/proc")
    finally:
        mounts.umount2("/proc", MNT_DETACH)


def _build_root(source: int, proc: int) -> None:
    """Private propagation, a tmpfs root with /proc and SOURCE, the old root detached."""
    # First: nothing mounted or unmounted below may propagate back to the served namespace.
    mounts.mount(None, "/", None, MS_REC | MS_PRIVATE)
    own_proc = _own_proc()
    # /proc exists wherever the daemon can run at all; in this namespace we may cover it.
    mounts.mount("shiftfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=16k,nr_inodes=16")
    os.mkdir("/proc/proc", 0o555)
    os.mkdir("/proc" + SOURCE, 0o555)
    if own_proc is None:
        mounts.move_mount(proc, "/proc/proc")
    else:
        try:
            mounts.move_mount(own_proc, "/proc/proc")
        finally:
            os.close(own_proc)
    mounts.move_mount(source, "/proc" + SOURCE)
    old = os.open("/", _RO_DIR)
    new = os.open("/proc", _RO_DIR)
    try:
        os.fchdir(new)
        mounts.pivot_root(".", ".")
        os.fchdir(old)
        mounts.umount2(".", MNT_DETACH)  # the old root
    finally:
        os.close(old)
        os.close(new)
        os.chdir("/")
    mounts.mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def isolate_daemon(root_fd: int, mountpoint: str) -> Isolation | None:
    """Move the calling thread (the one that serves) into a mount namespace of its own.

    ``root_fd`` (the backing root, O_PATH) is replaced in place by the same
    directory inside the new namespace. Returns None, logging why, when the
    daemon lacks the privilege or the kernel the calls (open_tree: 5.2); the
    daemon then serves as before.
    """
    mountpoint = os.path.abspath(mountpoint)
    if not mounts.can_pivot_root():
        log.warning("no pivot_root number for %s: the daemon shares the mount namespace it serves", platform.machine())
        return None
    dev = _mount_dev(mountpoint)
    trees: list[int] = []
    served = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)  # kept only while isolating
    ns = os.fstat(served)
    try:
        trees.append(_clone_tree("", root_fd))
        trees.append(_clone_tree("/proc"))
    except OSError as e:
        for fd in trees + [served]:
            os.close(fd)
        # EPERM: no CAP_SYS_ADMIN here, and so neither have this namespace's other plain users.
        how = log.debug if e.errno in (errno.EPERM, errno.ENOSYS) else log.warning
        how("the daemon shares the mount namespace it serves (%s); a pivot_root into the view there would hang it", e)
        return None
    try:
        mounts.unshare(CLONE_NEWNS)
    except OSError as e:
        for fd in trees + [served]:
            os.close(fd)
        log.warning("the daemon shares the mount namespace it serves (%s)", e)
        return None
    try:
        _build_root(trees[0], trees[1])
        fd = os.open(SOURCE, _RO_DIR)
        a, b = os.fstat(fd), os.fstat(root_fd)
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            os.close(fd)
            raise OSError(errno.EXDEV, f"{SOURCE} is not the backing directory")
        os.dup2(fd, root_fd, inheritable=False)
        os.close(fd)
        proc_fd = os.open("/proc", _RO_DIR)
    except OSError as e:
        # Back to the served namespace: a half-built private one could hold a
        # copy of the view, which would outlive the user's umount.
        try:
            mounts.setns(served, CLONE_NEWNS)
        except OSError as back:
            log.error(
                "cannot return to the served mount namespace (%s) after: %s; "
                "unmounting may not end this daemon, stop it with SIGTERM",
                back.strerror,
                e,
            )
        else:
            log.warning("the daemon shares the mount namespace it serves (%s)", e)
        os.chdir("/")
        return None
    finally:
        for fd in trees + [served]:
            os.close(fd)
    log.debug("daemon isolated in its own mount namespace (root: tmpfs with /proc and %s)", SOURCE)
    return Isolation((ns.st_dev, ns.st_ino), mountpoint, dev, proc_fd)
