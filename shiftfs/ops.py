"""FUSE plumbing: a passthrough of SOURCE that asks a policy about ownership.

Every backing call is relative to a descriptor from the inode table and never
follows a symlink: ``*at()`` calls with ``AT_SYMLINK_NOFOLLOW``/``O_NOFOLLOW``,
``AT_EMPTY_PATH`` on held descriptors, or the ``/proc/self/fd`` magic link of a
held descriptor (which names the object itself, not a path in SOURCE). Names
``.``, ``..`` and names containing ``/`` are refused.

New objects get their ownership before anyone can see them: a regular file is
made with ``O_TMPFILE``, stamped by the policy and linked into place; other
objects are made under a hidden temporary name, stamped, and renamed into
place with ``RENAME_NOREPLACE``. Temporary names are never shown, and stale
ones (from a killed daemon) are removed when their directory is listed.
"""

from __future__ import annotations

import errno
import sqlite3
import functools
import logging
import os
import secrets
import stat
import time
from collections import Counter

import pyfuse3

from .inodes import ROOT_ID, Inode, InodeTable
from .policy import OwnershipPolicy
from .store import TMP_NEW, TMP_PREFIX, backing_name, view_name
from .syscalls import (
    RENAME_NOREPLACE,
    link_fd,
    proc_fd,
    renameat2,
    utimens_fd,
)

__all__ = ["Operations", "CacheConfig", "TMP_PREFIX"]

log = logging.getLogger(__name__)

#: Prefix of the hidden names new objects are made under before they are renamed into place.
NAME_MAX = 255
_O_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NOFOLLOW: the kernel resolved the path already, and we open a /proc/self/fd magic link.
_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | getattr(os, "O_DIRECT", 0)


class CacheConfig:
    """How long the kernel may trust what we tell it.

    ``always`` (default): the mount owns SOURCE; entries and attributes are
    cached for a long time, misses are cached too, and file pages survive
    reopening. ``auto``: one second. ``never``: nothing is cached, for a
    SOURCE that other programs change at the same time.
    """

    MODES = ("always", "auto", "never")

    def __init__(self, mode: str = "always"):
        if mode not in self.MODES:
            raise ValueError(f"unknown cache mode {mode!r}; use one of {', '.join(self.MODES)}")
        self.mode = mode
        if mode == "always":
            self.timeout, self.negative_timeout, self.keep_cache, self.xattr_cache = 86400.0 * 365, 86400.0 * 365, True, True
        elif mode == "auto":
            self.timeout, self.negative_timeout, self.keep_cache, self.xattr_cache = 1.0, 1.0, False, False
        else:
            self.timeout, self.negative_timeout, self.keep_cache, self.xattr_cache = 0.0, 0.0, False, False


#: backing errnos that mean something is wrong with the daemon or the disk: logged
_LOGGED_ERRNOS = {
    errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EBADF, errno.EFAULT, errno.EUCLEAN,
    errno.EBADMSG, errno.EDEADLK, errno.ENOTCONN,
}
# handlers whose first argument is a file handle / a directory handle, not an inode
_FH_OPS = {"read", "write", "flush", "release", "fsync"}
_DH_OPS = {"readdir", "releasedir", "fsyncdir"}
# handlers whose first two arguments are a directory inode and a name in it
_NAMED_OPS = {"lookup", "mknod", "mkdir", "symlink", "unlink", "rmdir", "create"}
# sqlite result codes (the side table) and the errnos they stand for
_SQLITE_ERRNOS = {13: errno.ENOSPC, 8: errno.EROFS, 5: errno.EAGAIN, 6: errno.EAGAIN, 3: errno.EACCES, 23: errno.EACCES}


def _printable(s: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def _view_path(ops: "Operations", node: Inode | None, inode_id=None) -> str:
    """The last known view path of an inode, for the log."""
    if node is None:
        return f"<inode {inode_id}>"
    names = []
    cur = node
    while cur is not None and cur.id != ROOT_ID and len(names) < 64:
        if not cur.name:
            names.append(f"<inode {cur.id}>")
            break
        names.append(os.fsdecode(cur.name))
        cur = ops.table.get(cur.parent)
    return _printable("/" + "/".join(reversed(names)))


def _describe(ops: "Operations", name: str, args: tuple) -> str:
    """A request in one log line: inodes and handles as view paths, buffers as lengths."""
    try:
        args = tuple(a for a in args if not isinstance(a, pyfuse3.RequestContext))
        if not args:
            return ""
        first, rest = args[0], list(args[1:])
        if name in _FH_OPS:
            head = _view_path(ops, ops._files.get(first), f"fh {first}")
        elif name in _DH_OPS:
            dh = ops._dirs.get(first)
            head = _view_path(ops, dh.node if dh else None, f"dh {first}")
        elif isinstance(first, int):
            head = _view_path(ops, ops.table.get(first), first)
        else:
            head = repr(first)
        if name in _NAMED_OPS and rest and isinstance(rest[0], bytes):
            head = head.rstrip("/") + "/" + _printable(os.fsdecode(rest.pop(0)))
        elif name == "link" and len(rest) >= 2:
            head += " -> " + _view_path(ops, ops.table.get(rest[0]), rest[0]).rstrip("/") + "/" + _printable(
                os.fsdecode(rest[1]))
            rest = rest[2:]
        elif name == "rename" and len(rest) >= 3:
            head = head.rstrip("/") + "/" + _printable(os.fsdecode(rest[0])) + " -> " + _view_path(
                ops, ops.table.get(rest[1]), rest[1]).rstrip("/") + "/" + _printable(os.fsdecode(rest[2]))
            rest = rest[3:]
        shown = []
        for a in rest:
            if isinstance(a, (bytes, bytearray, memoryview)) and len(a) > 64:
                shown.append(f"<{len(a)} bytes>")
            elif isinstance(a, (int, bytes, str, type(None))):
                shown.append(repr(a))
        return " ".join([head] + shown)
    except Exception:  # never let the log line break the request
        return _printable(repr(args)[:200])


def _op(fn):
    """Run a synchronous handler as a pyfuse3 coroutine; map errors to errnos.

    Unexpected errors are logged as one line naming the request and the view
    path (the traceback only with ``-o debug``); ``-o debug`` traces requests.
    """
    name = fn.__name__

    @functools.wraps(fn)
    async def handler(self, *args):
        self.counts[name] += 1
        if self.trace:
            log.debug("-> %s %s", name, _describe(self, name, args))
        try:
            return fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            if e.errno in _LOGGED_ERRNOS or not e.errno:
                log.warning("%s %s: %s", name, _describe(self, name, args), _printable(str(e)))
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except sqlite3.Error as e:
            code = getattr(e, "sqlite_errorcode", 0) & 0xFF
            err = _SQLITE_ERRNOS.get(code, errno.EIO)
            if err != errno.ENOSPC:
                log.error("%s %s: record side table: %s", name, _describe(self, name, args), _printable(str(e)))
            raise pyfuse3.FUSEError(err) from None
        except Exception as e:
            log.error("%s %s: unexpected %s: %s", name, _describe(self, name, args), type(e).__name__,
                      _printable(str(e)), exc_info=self.trace)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return handler


def _check_name(name: bytes) -> None:
    if name in (b".", b"..") or b"/" in name or not name or b"\0" in name:
        raise pyfuse3.FUSEError(errno.EINVAL)
    if len(name) > NAME_MAX:
        raise pyfuse3.FUSEError(errno.ENAMETOOLONG)


class _DirHandle:
    __slots__ = ("node", "names")

    def __init__(self, node: Inode):
        self.node = node
        self.names: list[tuple[bytes, bytes]] | None = None  # (view, backing) names


class Operations(pyfuse3.Operations):
    """The pyfuse3 operations of a shiftfs mount."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        root_fd: int,
        policy: OwnershipPolicy,
        cache: CacheConfig | None = None,
        trace: bool = False,
        writeback: bool = False,
        xattr_probes: bool = True,
    ):
        super().__init__()
        #: the kernel caches writes and owns size/mtime (fewer WRITE/GETATTR requests)
        self.enable_writeback_cache = writeback
        #: False: answer GETXATTR with ENOSYS once, so the kernel stops sending any
        self.xattr_probes = xattr_probes
        self.table = InodeTable(root_fd)
        self.table.on_gone = lambda node, st: self.policy.gone(node, st)
        self.policy = policy
        policy.describe = lambda node: _view_path(self, node)  # the policy's log lines name view paths
        self.cache = cache or CacheConfig()
        self.trace = trace
        self.counts: Counter[str] = Counter()
        self._dirs: dict[int, _DirHandle] = {}
        self._files: dict[int, Inode] = {}
        self._next_dh = 1
        self._umask_default = 0o022

    # -- helpers -------------------------------------------------------------
    def _bname(self, parent: Inode, name: bytes) -> bytes:
        """The backing name of a view name (checked; our own names escaped)."""
        _check_name(name)
        name = backing_name(name, parent.id == ROOT_ID)
        if len(name) > NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        return name

    def _attrs(self, node: Inode, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        mode, uid, gid, rdev = self.policy.view(node, st)
        e.st_ino = node.id
        e.generation = 0
        e.entry_timeout = self.cache.timeout
        e.attr_timeout = self.cache.timeout
        e.st_mode = mode
        e.st_nlink = st.st_nlink
        e.st_uid = uid
        e.st_gid = gid
        e.st_rdev = rdev
        e.st_size = st.st_size if stat.S_IFMT(mode) == stat.S_IFMT(st.st_mode) else 0
        e.st_blocks = st.st_blocks
        e.st_blksize = st.st_blksize
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _negative(self) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0
        e.entry_timeout = self.cache.negative_timeout
        return e

    def _entry(self, node: Inode, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """Reply an entry to the kernel: counts one lookup reference."""
        e = self._attrs(node, st)
        self.table.remember(node)
        return e

    def _parent_view(self, parent: Inode):
        st = os.fstat(parent.fd)
        return st, self.policy.view(parent, st)

    def _apply_umask(self, parent: Inode, mode: int, ctx) -> int:
        # Without FUSE_DONT_MASK (pyfuse3 does not ask for it) the kernel has
        # applied the umask already; applying it again changes nothing. A
        # default ACL on the parent masks the mode further; where that ACL
        # lives (backing or escaped) is the policy's business.
        return self.policy.create_mode(parent, mode, ctx.umask)

    def _prepare_new(self, parent: Inode, name: bytes, mode: int, ctx):
        pst, pview = self._parent_view(parent)
        if pst.st_nlink == 0:
            raise pyfuse3.FUSEError(errno.ENOENT)  # removed behind our back (O_TMPFILE would say EPERM)
        mode = self._apply_umask(parent, mode, ctx)
        uid, gid, mode = self.policy.new_owner(ctx, pview, mode)
        du, dg = self.policy.disk_ids(uid, gid)
        return pst, du, dg, mode

    def _make(self, parent: Inode, name: bytes, mode: int, rdev: int, ctx, target: bytes | None = None):
        """Create a non-regular object with its ownership in place, then publish it."""
        name = self._bname(parent, name)
        pst, du, dg, mode = self._prepare_new(parent, name, mode, ctx)
        bmode, brdev = self.policy.backing_mode(mode, rdev)

        def create(n: bytes) -> None:
            ft = stat.S_IFMT(bmode)
            if ft == stat.S_IFDIR:
                os.mkdir(n, bmode & 0o7777, dir_fd=parent.fd)
            elif ft == stat.S_IFLNK:
                os.symlink(target, n, dir_fd=parent.fd)
            elif ft == stat.S_IFREG:
                fd = os.open(n, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, bmode & 0o7777, dir_fd=parent.fd)
                os.close(fd)
            else:
                os.mknod(n, bmode, brdev, dir_fd=parent.fd)

        if self.policy.may_create_directly and self.policy.direct_ok(du, dg, mode, pst) and not (
            stat.S_ISDIR(mode) and mode & stat.S_ISGID and not pst.st_mode & stat.S_ISGID
        ):
            create(name)
            node, st = self.table.child(parent, name)
            return self._entry(node, st)

        tmp = TMP_NEW + secrets.token_hex(8).encode()
        create(tmp)
        try:
            fd = os.open(tmp, _O_PATH_FLAGS, dir_fd=parent.fd)
            try:
                st = os.fstat(fd)
                cached = self.policy.stamp(fd, st, du, dg, mode, rdev, parent=parent)
                renameat2(parent.fd, tmp, parent.fd, name, RENAME_NOREPLACE)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            self._unlink_any(parent, tmp)
            raise
        st = os.fstat(fd)
        node = self.table.adopt(fd, st)
        node.parent, node.name = parent.id, name
        self.policy.adopted(node, cached)
        return self._entry(node, st)

    @staticmethod
    def _unlink_any(parent: Inode, name: bytes) -> None:
        try:
            os.unlink(name, dir_fd=parent.fd)
        except IsADirectoryError:
            try:
                os.rmdir(name, dir_fd=parent.fd)
            except OSError:
                pass
        except OSError:
            pass

    def _last_link_check(self, parent: Inode, name: bytes) -> os.stat_result | None:
        """Stat a name about to be removed or replaced (for record cleanup)."""
        try:
            return os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except OSError:
            return None

    def _hold(self, victim: os.stat_result | None, parent: Inode, name: bytes) -> Inode | None:
        if victim is None:
            return None
        return self.table.holding((victim.st_dev, victim.st_ino), parent, name)

    def _after_remove(self, victim: os.stat_result | None) -> None:
        if victim is None or stat.S_ISDIR(victim.st_mode):
            return
        if victim.st_nlink <= 1:
            # The last name is gone: drop a side-table record now rather than
            # when the kernel forgets the inode, which may come only after
            # unmounting (too late). A node still in use keeps its cached record.
            self.policy.gone(self.table.by_key((victim.st_dev, victim.st_ino)), victim)

    # -- lifecycle -----------------------------------------------------------
    def init(self):
        log.debug("filesystem initialised")

    # -- lookups and attributes ------------------------------------------------
    @_op
    def lookup(self, parent_id, name, ctx):
        parent = self.table[parent_id]
        name = self._bname(parent, name)
        try:
            node, st = self.table.child(parent, name)
        except FileNotFoundError:
            return self._negative()
        return self._entry(node, st)

    async def forget(self, inode_list):
        self.counts["forget"] += 1
        for ino, n in inode_list:
            self.table.forget(ino, n)

    @_op
    def getattr(self, inode_id, ctx):
        node = self.table[inode_id]
        return self._attrs(node, os.fstat(node.fd))

    @_op
    def setattr(self, inode_id, attr, fields, fh, ctx):
        node = self.table[inode_id]
        if fields.update_size:
            if fh is not None:
                os.ftruncate(fh, attr.st_size)
            elif stat.S_ISREG(node.ftype):
                fd = os.open(proc_fd(node.fd), os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.ftruncate(fd, attr.st_size)
                finally:
                    os.close(fd)
            else:
                raise pyfuse3.FUSEError(errno.EINVAL)
        if fields.update_uid or fields.update_gid or fields.update_mode:
            st = os.fstat(node.fd)
            self.policy.change(
                node,
                st,
                attr.st_uid if fields.update_uid else None,
                attr.st_gid if fields.update_gid else None,
                attr.st_mode if fields.update_mode else None,
            )
        if fields.update_atime or fields.update_mtime:
            utimens_fd(
                node.fd,
                attr.st_atime_ns if fields.update_atime else None,
                attr.st_mtime_ns if fields.update_mtime else None,
            )
        return self._attrs(node, os.fstat(node.fd))

    @_op
    def readlink(self, inode_id, ctx):
        node = self.table[inode_id]
        return os.readlink(b"", dir_fd=node.fd)

    # -- creating and removing names -------------------------------------------
    @_op
    def mknod(self, parent_id, name, mode, rdev, ctx):
        return self._make(self.table[parent_id], name, mode, rdev, ctx)

    @_op
    def mkdir(self, parent_id, name, mode, ctx):
        return self._make(self.table[parent_id], name, stat.S_IFDIR | (mode & 0o7777), 0, ctx)

    @_op
    def symlink(self, parent_id, name, target, ctx):
        return self._make(self.table[parent_id], name, stat.S_IFLNK | 0o777, 0, ctx, target=target)

    @_op
    def link(self, inode_id, new_parent_id, new_name, ctx):
        node = self.table[inode_id]
        parent = self.table[new_parent_id]
        new_name = self._bname(parent, new_name)
        link_fd(node.fd, parent.fd, new_name)
        return self._entry(node, os.fstat(node.fd))

    def _remove(self, parent_id: int, name: bytes, remove) -> None:
        parent = self.table[parent_id]
        name = self._bname(parent, name)
        victim = self._last_link_check(parent, name)
        held = self._hold(victim, parent, name)
        remove(name, dir_fd=parent.fd)
        self.table.unnamed(held)
        self._after_remove(victim)

    @_op
    def unlink(self, parent_id, name, ctx):
        self._remove(parent_id, name, os.unlink)

    @_op
    def rmdir(self, parent_id, name, ctx):
        self._remove(parent_id, name, os.rmdir)

    @_op
    def rename(self, old_parent_id, old_name, new_parent_id, new_name, flags, ctx):
        op = self.table[old_parent_id]
        np = self.table[new_parent_id]
        old_name = self._bname(op, old_name)
        new_name = self._bname(np, new_name)
        moved = os.stat(old_name, dir_fd=op.fd, follow_symlinks=False)
        other = self._last_link_check(np, new_name)
        held = None if flags & pyfuse3.RENAME_EXCHANGE else self._hold(other, np, new_name)
        renameat2(op.fd, old_name, np.fd, new_name, flags)
        self.table.unnamed(held)
        self.table.renamed((moved.st_dev, moved.st_ino), np, new_name)
        if other is not None:
            if flags & pyfuse3.RENAME_EXCHANGE:
                self.table.renamed((other.st_dev, other.st_ino), op, old_name)
            else:
                self._after_remove(other)

    # -- files -----------------------------------------------------------------
    def _open_flags(self, flags: int) -> int:
        flags = (flags & ~_OPEN_STRIP) | os.O_CLOEXEC
        if self.enable_writeback_cache:
            # The kernel may read pages of a write-only file, and it computes
            # append offsets itself.
            flags &= ~os.O_APPEND
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags

    @_op
    def open(self, inode_id, flags, ctx):
        node = self.table[inode_id]
        if not stat.S_ISREG(node.ftype):
            raise pyfuse3.FUSEError(errno.ELOOP if stat.S_ISLNK(node.ftype) else errno.EACCES)
        fd = os.open(proc_fd(node.fd), self._open_flags(flags))
        return self._handle(fd, node)

    def _handle(self, fd: int, node: Inode) -> pyfuse3.FileInfo:
        self.table.pin(node)
        self._files[fd] = node
        return pyfuse3.FileInfo(fh=fd, keep_cache=self.cache.keep_cache)

    @_op
    def create(self, parent_id, name, mode, flags, ctx):
        parent = self.table[parent_id]
        name = self._bname(parent, name)
        pst, du, dg, mode = self._prepare_new(parent, name, stat.S_IFREG | (mode & 0o7777), ctx)
        bmode, _ = self.policy.backing_mode(mode, 0)
        oflags = (self._open_flags(flags) & ~(os.O_ACCMODE | os.O_TRUNC)) | os.O_RDWR
        if self.policy.may_create_directly and self.policy.direct_ok(du, dg, mode, pst):
            # O_NOFOLLOW: a symlink put there behind the kernel's cached
            # negative entry must not be followed (it may lead out of SOURCE).
            fd = os.open(
                name, oflags | os.O_CREAT | (flags & os.O_EXCL) | os.O_NOFOLLOW, bmode & 0o7777, dir_fd=parent.fd
            )
            try:
                node, st = self.table.child(parent, name)
            except BaseException:
                os.close(fd)
                raise
            return self._handle(fd, node), self._entry(node, st)
        # Made invisible (O_TMPFILE, or a temporary name where the backing fs
        # has no O_TMPFILE), stamped, then linked or renamed into place.
        tmp = None
        cflags = oflags & ~os.O_APPEND
        try:
            fd = os.open(b".", cflags | os.O_TMPFILE, bmode & 0o7777, dir_fd=parent.fd)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            tmp = TMP_NEW + secrets.token_hex(8).encode()
            fd = os.open(tmp, cflags | os.O_CREAT | os.O_EXCL, bmode & 0o7777, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
            cached = self.policy.stamp(fd, st, du, dg, mode, 0, parent=parent)
            try:
                if tmp is None:
                    link_fd(fd, parent.fd, name)
                else:
                    renameat2(parent.fd, tmp, parent.fd, name, RENAME_NOREPLACE)
                    tmp = None
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
                os.close(fd)
                fd = -1
                return self.open_existing(parent, name, flags)
            pfd = os.open(proc_fd(fd), os.O_PATH | os.O_CLOEXEC)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        finally:
            if tmp is not None:
                self._unlink_any(parent, tmp)
        if flags & os.O_APPEND and not self.enable_writeback_cache:
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        st = os.fstat(pfd)
        node = self.table.adopt(pfd, st)
        node.parent, node.name = parent.id, name
        self.policy.adopted(node, cached)
        return self._handle(fd, node), self._entry(node, st)

    def open_existing(self, parent: Inode, name: bytes, flags: int):
        node, st = self.table.child(parent, name)
        if not stat.S_ISREG(node.ftype):
            self.table.drop_if_unused(node)
            raise pyfuse3.FUSEError(errno.EEXIST)
        fd = os.open(proc_fd(node.fd), self._open_flags(flags))
        return self._handle(fd, node), self._entry(node, os.fstat(node.fd))

    @_op
    def read(self, fh, off, size):
        return os.pread(fh, size, off)

    @_op
    def write(self, fh, off, buf):
        return os.pwrite(fh, buf, off)

    @_op
    def flush(self, fh):
        pass

    @_op
    def release(self, fh):
        node = self._files.pop(fh, None)
        os.close(fh)
        if node is not None:
            self.table.unpin(node)

    @_op
    def fsync(self, fh, datasync):
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)

    # -- directories -------------------------------------------------------------
    @_op
    def opendir(self, inode_id, ctx):
        node = self.table[inode_id]
        if not stat.S_ISDIR(node.ftype):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        dh = self._next_dh
        self._next_dh += 1
        self._dirs[dh] = _DirHandle(node)
        return dh

    def _snapshot(self, node: Inode) -> list[tuple[bytes, bytes]]:
        """(view name, backing name) of every entry, ``.`` and ``..`` first."""
        fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=node.fd)
        try:
            names = [os.fsencode(n) for n in os.listdir(fd)]
        finally:
            os.close(fd)
        out = [(b".", b"."), (b"..", b"..")]
        for n in names:
            v = view_name(n, node.id == ROOT_ID)
            if v is None:
                if n.startswith(TMP_PREFIX):
                    # No create is in flight while we run (handlers never
                    # yield), so this is left over from a killed daemon.
                    self._unlink_any(node, n)
                continue
            out.append((v, n))
        return out

    @_op
    def readdir(self, fh, start_id, token):
        dh = self._dirs[fh]
        node = dh.node
        if dh.names is None or start_id == 0:
            dh.names = self._snapshot(node)
        names = dh.names
        for i in range(start_id, len(names)):
            name, bname = names[i]
            if i < 2:
                e = pyfuse3.EntryAttributes()
                if i == 0:
                    e.st_ino = node.id
                else:
                    e.st_ino = ROOT_ID if node.id == ROOT_ID else self._dotdot_id(node)
                e.st_mode = stat.S_IFDIR | 0o755
                if not pyfuse3.readdir_reply(token, name, e, i + 1):
                    return
                continue
            try:
                child, st = self.table.child(node, bname)
            except FileNotFoundError:
                continue  # removed since the snapshot
            attrs = self._attrs(child, st)
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                self.table.drop_if_unused(child)
                return
            self.table.remember(child)

    def _dotdot_id(self, node: Inode) -> int:
        try:
            return self.table.id_for(os.stat(b"..", dir_fd=node.fd, follow_symlinks=False))
        except OSError:
            return ROOT_ID

    @_op
    def releasedir(self, fh):
        self._dirs.pop(fh, None)

    @_op
    def fsyncdir(self, fh, datasync):
        dh = self._dirs[fh]
        fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dh.node.fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @_op
    def statfs(self, ctx):
        sv = os.statvfs(self.table.root.fd)
        s = pyfuse3.StatvfsData()
        s.f_bsize = sv.f_bsize
        s.f_frsize = sv.f_frsize
        s.f_blocks = sv.f_blocks
        s.f_bfree = sv.f_bfree
        s.f_bavail = sv.f_bavail
        s.f_files = sv.f_files
        s.f_ffree = sv.f_ffree
        s.f_favail = sv.f_favail
        s.f_namemax = sv.f_namemax
        return s

    # -- xattrs ------------------------------------------------------------------
    def _xnames(self, node: Inode) -> set[str]:
        if node.xnames is not None and self.cache.xattr_cache:
            return node.xnames
        if stat.S_ISLNK(node.ftype):
            names: set[str] = set()
        else:
            try:
                names = set(os.listxattr(proc_fd(node.fd)))
            except OSError as e:
                if e.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
                names = set()
        node.xnames = names
        return names

    @_op
    def getxattr(self, inode_id, name, ctx):
        if not self.xattr_probes:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        node = self.table[inode_id]
        vname = os.fsdecode(name)
        bname = self.policy.xattr_to_backing(vname)
        if bname is None or bname not in self._xnames(node):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        try:
            value = os.getxattr(proc_fd(node.fd), bname)
        except OSError as e:
            if e.errno == errno.ENODATA:
                node.xnames = None
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise
        return self.policy.xattr_value_out(vname, value)

    @_op
    def listxattr(self, inode_id, ctx):
        node = self.table[inode_id]
        out = []
        for b in self._xnames(node):
            v = self.policy.xattr_to_view(b)
            if v is not None:
                out.append(os.fsencode(v))
        return out

    @_op
    def setxattr(self, inode_id, name, value, ctx):
        node = self.table[inode_id]
        vname = os.fsdecode(name)
        bname = self.policy.xattr_to_backing(vname)
        if bname is None:
            raise pyfuse3.FUSEError(errno.EPERM)
        if stat.S_ISLNK(node.ftype):
            raise pyfuse3.FUSEError(errno.EPERM)
        os.setxattr(proc_fd(node.fd), bname, self.policy.xattr_value_in(vname, value))
        if node.xnames is not None:
            node.xnames.add(bname)
        if vname == "system.posix_acl_default":
            node.default_acl = True
        if self.policy.xattr_stored(node, vname, value):
            # e.g. an access ACL set the mode's group class: the kernel's
            # cached attributes are stale (attributes only: takes no locks)
            pyfuse3.invalidate_inode(node.id, attr_only=True)

    @_op
    def removexattr(self, inode_id, name, ctx):
        node = self.table[inode_id]
        vname = os.fsdecode(name)
        bname = self.policy.xattr_to_backing(vname)
        if bname is None:
            raise pyfuse3.FUSEError(errno.EPERM)
        if stat.S_ISLNK(node.ftype):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        try:
            os.removexattr(proc_fd(node.fd), bname)
        except OSError as e:
            if e.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise
        finally:
            node.xnames = None
        if vname == "system.posix_acl_default":
            node.default_acl = False
