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
import fcntl
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable, Sequence

import pyfuse3
from pyfuse3 import FileHandleT, InodeT

from ..ownership.names import backing_name, temp_name
from ..ownership.node import CallerIds
from ..ownership.policy import CreatePlan, OwnershipPolicy
from ..sys.files import (
    O_PATH_NOFOLLOW,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    link_fd,
    proc_fd,
    renameat2,
    utimens_fd,
)
from .connection import ConnectionHandlers
from .dirs import DirectoryHandlers, DirHandle, unlink_any
from .filedata import FileDataHandlers
from .inodes import ROOT_ID, Inode, InodeTable
from .options import CacheConfig
from .requestlog import fuse_handler
from .xattrs import XattrHandlers

__all__ = ["Operations", "CacheConfig"]

log = logging.getLogger(__name__)

NAME_MAX = 255
# O_NOFOLLOW: the kernel resolved the path already, and we open a /proc/self/fd magic link.
_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | getattr(os, "O_DIRECT", 0)
Ctx = pyfuse3.RequestContext
Entry = pyfuse3.EntryAttributes


def _check_name(name: bytes) -> None:
    if name in (b".", b"..") or b"/" in name or not name or b"\0" in name:
        raise pyfuse3.FUSEError(errno.EINVAL)
    if len(name) > NAME_MAX:
        raise pyfuse3.FUSEError(errno.ENAMETOOLONG)


#: What statfs passes through from the backing filesystem.
_STATVFS_FIELDS = (
    "f_bsize",
    "f_frsize",
    "f_blocks",
    "f_bfree",
    "f_bavail",
    "f_files",
    "f_ffree",
    "f_favail",
    "f_namemax",
)


class Operations(DirectoryHandlers, XattrHandlers, FileDataHandlers, ConnectionHandlers, pyfuse3.Operations):
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
        acl: bool = False,
        early_writeback: bool = True,
    ):
        super().__init__()
        #: the kernel caches writes and owns size/mtime (fewer WRITE/GETATTR requests)
        self.enable_writeback_cache = writeback
        #: FUSE_POSIX_ACL: the kernel enforces POSIX ACLs through the mount (shiftfs.fs.mount)
        self.enable_acl = acl
        #: False: answer GETXATTR with ENOSYS once, so the kernel stops sending any
        self.xattr_probes = xattr_probes
        self.policy = policy
        # A policy whose records go with the inode needs no word when one goes
        # (table mode: no fstat per forgotten inode).
        self.table = InodeTable(
            root_fd, on_gone=policy.gone if policy.wants_gone else None, lazy=not policy.view_needs_fd
        )
        self.cache = cache or CacheConfig()
        self.trace = trace
        self.counts: Counter[str] = Counter()
        self._dirs: dict[int, DirHandle] = {}
        self._files: dict[int, Inode] = {}
        #: start the writeback of files released while a program syncs (shiftfs.fs.filedata)
        self.early_writeback = early_writeback
        self._written: set[int] = set()
        self._synced_at = float("-inf")
        self.writebacks_started = 0
        self._next_dh = 1
        self._fresh_learn = {}

    # -- for the request log -----------------------------------------------------
    def open_file_node(self, fh: FileHandleT) -> Inode | None:
        return self._files.get(fh)

    def open_dir_node(self, dh: FileHandleT) -> Inode | None:
        handle = self._dirs.get(dh)
        return handle.node if handle else None

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
        mode, uid, gid, rdev = self.policy.shown(node, st)[:4]
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
        self.table.count_lookup(node)
        return e

    def _plan(self, parent: Inode, mode: int, rdev: int, ctx: CallerIds) -> CreatePlan:
        pst = os.fstat(parent.path_fd())
        if pst.st_nlink == 0:
            raise pyfuse3.FUSEError(errno.ENOENT)  # removed behind our back (O_TMPFILE would say EPERM)
        # FUSE_DONT_MASK (shiftfs.fs.connection): the mode comes unmasked, with
        # the caller's umask in ctx; the umask or a default ACL on the parent
        # masks it: the policy's business.
        return self.policy.plan_create(parent, pst, ctx, mode, rdev)

    def _adopt_unpublished(self, fd: int) -> tuple[Inode, os.stat_result]:
        """Take an O_PATH descriptor of a new, not yet visible object into the table (nameless).

        The stat is the object as made, which is what the policy's stamp starts from.
        """
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return self.table.adopt(fd, st), st

    def make_node(self, parent: Inode, name: bytes, mode: int, rdev: int, caller: CallerIds) -> Entry:
        """A node made as a FUSE MKNOD by ``caller`` would make it (the control channel's
        ``mknod`` of a device a single-id namespace cannot make); counts one lookup."""
        return self._make(parent, name, mode, rdev, caller)

    def _make(
        self, parent: Inode, name: bytes, mode: int, rdev: int, ctx: CallerIds, target: bytes | None = None
    ) -> Entry:
        """Create a non-regular object with its ownership in place, then publish it."""
        name = self._bname(parent, name)
        plan = self._plan(parent, mode, rdev, ctx)
        bmode = plan.backing_mode

        def create(n: bytes) -> None:
            ft = stat.S_IFMT(bmode)
            if ft == stat.S_IFDIR:
                os.mkdir(n, bmode & 0o7777, dir_fd=parent.path_fd())
            elif ft == stat.S_IFLNK:
                assert target is not None  # only symlink() plans a symlink, and it gives the target
                os.symlink(target, n, dir_fd=parent.path_fd())
            elif ft == stat.S_IFREG:
                fd = os.open(
                    n, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, bmode & 0o7777, dir_fd=parent.path_fd()
                )
                os.close(fd)
            else:
                os.mknod(n, bmode, plan.backing_rdev, dir_fd=parent.path_fd())

        if plan.direct:
            create(name)
            node, st = self.table.child(parent, name)
            return self._entry(node, st)

        tmp = temp_name()
        create(tmp)
        try:
            node, st = self._adopt_unpublished(os.open(tmp, O_PATH_NOFOLLOW, dir_fd=parent.path_fd()))
            try:
                self.policy.stamp(node, plan, st)
                renameat2(parent.path_fd(), tmp, parent.path_fd(), name, RENAME_NOREPLACE)
            except BaseException:
                self.table.drop_if_unused(node)
                raise
        except BaseException:
            unlink_any(parent, tmp)
            raise
        self.table.renamed(node.key, parent, name)
        self._fresh_xnames(node, plan)
        return self._entry(node, os.fstat(node.path_fd()))

    def _last_link_check(self, parent: Inode, name: bytes) -> os.stat_result | None:
        """Stat a name about to be removed or replaced (for record cleanup)."""
        try:
            return os.stat(name, dir_fd=parent.path_fd(), follow_symlinks=False)
        except OSError:
            return None

    def _hold(self, victim: os.stat_result | None, parent: Inode, name: bytes) -> Inode | None:
        if victim is None:
            return None
        return self.table.open_before_unlink((victim.st_dev, victim.st_ino), parent, name)

    def _after_remove(self, victim: os.stat_result | None) -> None:
        if victim is None or stat.S_ISDIR(victim.st_mode) or not self.policy.wants_gone:
            return
        if victim.st_nlink <= 1:
            # The last name is gone: drop a side-table record now rather than
            # when the kernel forgets the inode, which may come only after
            # unmounting (too late). A node still in use keeps its cached record.
            self.policy.gone(self.table.by_key((victim.st_dev, victim.st_ino)), victim)

    # -- lifecycle -----------------------------------------------------------
    def init(self) -> None:
        log.debug("filesystem initialised")

    # -- lookups and attributes ------------------------------------------------
    @fuse_handler
    def lookup(self, parent_id: InodeT, name: bytes, ctx: Ctx) -> Entry:
        parent = self.table[parent_id]
        name = self._bname(parent, name)
        try:
            node, st = self.table.child(parent, name)
        except FileNotFoundError:
            return self._negative()
        return self._entry(node, st)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # FORGET has no reply to carry an error: one raised here would end pyfuse3's
        # loop, and the mount with it. Each inode is forgotten on its own.
        self.counts["forget"] += 1
        for ino, n in inode_list:
            try:
                self.table.forget(ino, n)
            except Exception as e:
                log.error("forget of inode %d: unexpected %s: %s", ino, type(e).__name__, e, exc_info=self.trace)

    @fuse_handler
    def getattr(self, inode_id: InodeT, ctx: Ctx) -> Entry:
        node = self.table[inode_id]
        return self._attrs(node, os.fstat(node.path_fd()))

    @fuse_handler
    def setattr(
        self, inode_id: InodeT, attr: Entry, fields: pyfuse3.SetattrFields, fh: FileHandleT | None, ctx: Ctx
    ) -> Entry:
        node = self.table[inode_id]
        if fields.update_size:
            if fh is not None:
                os.ftruncate(fh, attr.st_size)
            elif stat.S_ISREG(node.ftype):
                fd = os.open(proc_fd(node.path_fd()), os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.ftruncate(fd, attr.st_size)
                finally:
                    os.close(fd)
            else:
                raise pyfuse3.FUSEError(errno.EINVAL)
        if fields.update_uid or fields.update_gid or fields.update_mode:
            self.policy.change(
                node,
                None,
                attr.st_uid if fields.update_uid else None,
                attr.st_gid if fields.update_gid else None,
                attr.st_mode if fields.update_mode else None,
            )
        if fields.update_atime or fields.update_mtime:
            utimens_fd(
                node.path_fd(),
                attr.st_atime_ns if fields.update_atime else None,
                attr.st_mtime_ns if fields.update_mtime else None,
            )
        return self._attrs(node, os.fstat(node.path_fd()))

    @fuse_handler
    def readlink(self, inode_id: InodeT, ctx: Ctx) -> bytes:
        node = self.table[inode_id]
        return os.readlink(b"", dir_fd=node.path_fd())

    # -- creating and removing names -------------------------------------------
    @fuse_handler
    def mknod(self, parent_id: InodeT, name: bytes, mode: int, rdev: int, ctx: Ctx) -> Entry:
        return self._make(self.table[parent_id], name, mode, rdev, ctx)

    @fuse_handler
    def mkdir(self, parent_id: InodeT, name: bytes, mode: int, ctx: Ctx) -> Entry:
        return self._make(self.table[parent_id], name, stat.S_IFDIR | (mode & 0o7777), 0, ctx)

    @fuse_handler
    def symlink(self, parent_id: InodeT, name: bytes, target: bytes, ctx: Ctx) -> Entry:
        return self._make(self.table[parent_id], name, stat.S_IFLNK | 0o777, 0, ctx, target=target)

    @fuse_handler
    def link(self, inode_id: InodeT, new_parent_id: InodeT, new_name: bytes, ctx: Ctx) -> Entry:
        node = self.table[inode_id]
        parent = self.table[new_parent_id]
        new_name = self._bname(parent, new_name)
        link_fd(node.path_fd(), parent.path_fd(), new_name)
        return self._entry(node, os.fstat(node.path_fd()))

    def _remove(self, parent_id: InodeT, name: bytes, remove: Callable[..., None]) -> None:
        parent = self.table[parent_id]
        name = self._bname(parent, name)
        victim = self._last_link_check(parent, name)
        held = self._hold(victim, parent, name)
        remove(name, dir_fd=parent.path_fd())
        self.table.name_removed(held)
        self._after_remove(victim)

    @fuse_handler
    def unlink(self, parent_id: InodeT, name: bytes, ctx: Ctx) -> None:
        self._remove(parent_id, name, os.unlink)

    @fuse_handler
    def rmdir(self, parent_id: InodeT, name: bytes, ctx: Ctx) -> None:
        self._remove(parent_id, name, os.rmdir)

    @fuse_handler
    def rename(
        self, old_parent_id: InodeT, old_name: bytes, new_parent_id: InodeT, new_name: bytes, flags: int, ctx: Ctx
    ) -> None:
        op = self.table[old_parent_id]
        np = self.table[new_parent_id]
        old_name = self._bname(op, old_name)
        new_name = self._bname(np, new_name)
        moved = os.stat(old_name, dir_fd=op.path_fd(), follow_symlinks=False)
        other = self._last_link_check(np, new_name)
        held = None if flags & pyfuse3.RENAME_EXCHANGE else self._hold(other, np, new_name)
        # The whiteout is a new inode of the caller's, as on a kernel idmapped
        # mount: plan its owner first (EOVERFLOW changes nothing).
        whiteout = self._plan(op, stat.S_IFCHR, 0, ctx) if flags & RENAME_WHITEOUT else None
        renameat2(op.path_fd(), old_name, np.path_fd(), new_name, flags)
        if whiteout is not None and not whiteout.direct:
            self._own_whiteout(op, old_name, whiteout)
        self.table.name_removed(held)
        self.table.renamed((moved.st_dev, moved.st_ino), np, new_name)
        if other is not None:
            if flags & pyfuse3.RENAME_EXCHANGE:
                self.table.renamed((other.st_dev, other.st_ino), op, old_name)
            else:
                self._after_remove(other)

    def _own_whiteout(self, parent: Inode, name: bytes, plan: CreatePlan) -> None:
        """Give the whiteout a rename left at ``name`` its planned owner (the kernel made it the daemon's)."""
        node, st = self.table.child(parent, name)
        try:
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                self.policy.stamp(node, plan, st)
        finally:
            self.table.drop_if_unused(node)

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

    @fuse_handler
    def open(self, inode_id: InodeT, flags: int, ctx: Ctx) -> pyfuse3.FileInfo:
        node = self.table[inode_id]
        if not stat.S_ISREG(node.ftype):
            raise pyfuse3.FUSEError(errno.ELOOP if stat.S_ISLNK(node.ftype) else errno.EACCES)
        fd = os.open(proc_fd(node.path_fd()), self._open_flags(flags))
        return self._handle(fd, node)

    def _handle(self, fd: int, node: Inode) -> pyfuse3.FileInfo:
        self.table.pin(node)
        self._files[fd] = node
        return pyfuse3.FileInfo(fh=fd, keep_cache=self.cache.keep_cache)

    @fuse_handler
    def create(self, parent_id: InodeT, name: bytes, mode: int, flags: int, ctx: Ctx) -> tuple[pyfuse3.FileInfo, Entry]:
        parent = self.table[parent_id]
        name = self._bname(parent, name)
        plan = self._plan(parent, stat.S_IFREG | (mode & 0o7777), 0, ctx)
        perm = plan.backing_mode & 0o7777
        oflags = (self._open_flags(flags) & ~(os.O_ACCMODE | os.O_TRUNC)) | os.O_RDWR
        if plan.direct:
            # O_NOFOLLOW: a symlink put there behind the kernel's cached
            # negative entry must not be followed (it may lead out of SOURCE).
            fd = os.open(name, oflags | os.O_CREAT | (flags & os.O_EXCL) | os.O_NOFOLLOW, perm, dir_fd=parent.path_fd())
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
            fd = os.open(b".", cflags | os.O_TMPFILE, perm, dir_fd=parent.path_fd())
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            tmp = temp_name()
            fd = os.open(tmp, cflags | os.O_CREAT | os.O_EXCL, perm, dir_fd=parent.path_fd())
        try:
            node, st = self._adopt_unpublished(os.open(proc_fd(fd), os.O_PATH | os.O_CLOEXEC))
            try:
                self.policy.stamp(node, plan, st)
                if tmp is None:
                    link_fd(fd, parent.path_fd(), name)
                else:
                    renameat2(parent.path_fd(), tmp, parent.path_fd(), name, RENAME_NOREPLACE)
                    tmp = None
            except BaseException as e:
                self.table.drop_if_unused(node)
                if not isinstance(e, FileExistsError) or flags & os.O_EXCL:
                    raise
                os.close(fd)
                fd = -1
                return self.open_existing(parent, name, flags)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        finally:
            if tmp is not None:
                unlink_any(parent, tmp)
        if flags & os.O_APPEND and not self.enable_writeback_cache:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        self.table.renamed(node.key, parent, name)
        self._fresh_xnames(node, plan)
        return self._handle(fd, node), self._entry(node, os.fstat(node.path_fd()))

    def open_existing(self, parent: Inode, name: bytes, flags: int) -> tuple[pyfuse3.FileInfo, Entry]:
        node, st = self.table.child(parent, name)
        if not stat.S_ISREG(node.ftype):
            self.table.drop_if_unused(node)
            raise pyfuse3.FUSEError(errno.EEXIST)
        fd = os.open(proc_fd(node.path_fd()), self._open_flags(flags))
        return self._handle(fd, node), self._entry(node, os.fstat(node.path_fd()))

    @fuse_handler
    def statfs(self, ctx: Ctx) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.table.root.path_fd())
        s = pyfuse3.StatvfsData()
        for field in _STATVFS_FIELDS:
            setattr(s, field, getattr(sv, field))
        return s
