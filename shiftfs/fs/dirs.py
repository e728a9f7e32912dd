"""Directory handlers: listing a backing directory as the view shows it.

A listing is a snapshot of (view name, backing name) pairs taken at
``opendir``/offset 0; shiftfs' own names are left out (see
:mod:`shiftfs.ownership.names`) and stale temporaries are removed.

The offset (cookie) of an entry is a hash of its name, and a listing is in
cookie order, so an offset means the same in every snapshot of the directory:
resuming at an offset lists exactly the entries after it that still exist,
whoever took the snapshot. The kernel's cached listings (FOPEN_CACHE_DIR)
need that: when the directory changes while a listing is served from its
cache, the kernel continues on the daemon, on another handle, at the offset
the cache held (with positions in one snapshot, entries would be skipped or
repeated). ``.`` and ``..`` are offsets 1 and 2.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import os
import stat
import time
from collections import Counter
from typing import Any

import pyfuse3
from pyfuse3 import FileHandleT, InodeT

from ..ownership.names import is_temp_name, view_name
from ..sys.files import proc_fd
from .inodes import ROOT_ID, Inode, InodeTable
from .options import CacheConfig
from .requestlog import fuse_handler

__all__ = ["DirectoryHandlers", "DirHandle", "unlink_any"]

Ctx = pyfuse3.RequestContext


def unlink_any(parent: Inode, name: bytes) -> None:
    try:
        os.unlink(name, dir_fd=parent.path_fd())
    except IsADirectoryError:
        try:
            os.rmdir(name, dir_fd=parent.path_fd())
        except OSError:
            pass
    except OSError:
        pass


def cookie(name: bytes) -> int:
    """The offset of the entry after ``name``: a 62-bit hash, above 2 (``.``, ``..``)."""
    return (int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little") >> 2) + 3


class DirHandle:
    __slots__ = ("node", "names", "cookies")

    def __init__(self, node: Inode):
        self.node = node
        self.names: list[tuple[bytes, bytes]] | None = None  # (view, backing) names in cookie order
        self.cookies: list[int] = []  # the offset after each of them


class DirectoryHandlers:
    """The directory handlers of :class:`shiftfs.fs.ops.Operations`."""

    table: InodeTable
    cache: CacheConfig
    counts: Counter[str]  # the error door's request counts (requestlog.Served)
    trace: bool
    _dirs: dict[int, DirHandle]
    _next_dh: int
    _synced_at: float  # the last FSYNC/FSYNCDIR (shiftfs.fs.filedata: early writeback)

    def _attrs(self, node: Inode, st: os.stat_result) -> pyfuse3.EntryAttributes:
        raise NotImplementedError

    # -- directories -------------------------------------------------------------
    @fuse_handler
    def opendir(self, inode_id: InodeT, ctx: Ctx) -> pyfuse3.FileInfo:
        node = self.table[inode_id]
        if not stat.S_ISDIR(node.ftype):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        dh = self._next_dh
        self._next_dh += 1
        self._dirs[dh] = DirHandle(node)
        # cache=always: the kernel keeps the listing (FOPEN_CACHE_DIR) across
        # opens (keep_cache) and drops it itself when the directory changes
        # through the mount (create, unlink, rename, link: the directory's
        # version moves). cache=auto|never: every listing is read afresh.
        cached = self.cache.mode == "always"
        return pyfuse3.FileInfo(fh=dh, cache_readdir=cached, keep_cache=cached)

    def _snapshot(self, dh: DirHandle) -> None:
        """(view name, backing name) of every entry, ``.`` and ``..`` first, then in cookie order."""
        node = dh.node
        # Listed through the magic link of the held descriptor (it names the
        # directory itself, not a path in SOURCE): glibc's opendir opens it
        # once, where listing a descriptor costs an extra open, a dup, three
        # fcntl and an lseek per directory. A bytes path gives bytes names.
        names = os.listdir(os.fsencode(proc_fd(node.path_fd())))
        out = [(0, b".", b"."), (1, b"..", b"..")]
        for n in names:
            v = view_name(n, node.id == ROOT_ID)
            if v is None:
                if is_temp_name(n):
                    # No create is in flight while we run (handlers never
                    # yield), so this is left over from a killed daemon.
                    unlink_any(node, n)
                continue
            out.append((cookie(v), v, n))
        out.sort()
        cookies = [1, 2]
        for i in range(2, len(out)):
            c = max(out[i][0], cookies[-1] + 1)  # a hash collision: the next free value
            cookies.append(c)
        dh.names = [(v, n) for _, v, n in out]
        dh.cookies = cookies

    @fuse_handler
    def readdir(self, fh: FileHandleT, start_id: int, token: Any) -> None:
        dh = self._dirs[fh]
        node = dh.node
        if dh.names is None or start_id == 0:
            self._snapshot(dh)
        assert dh.names is not None
        names, cookies = dh.names, dh.cookies
        for i in range(bisect.bisect_right(cookies, start_id), len(names)):
            name, bname = names[i]
            if i < 2:
                e = pyfuse3.EntryAttributes()
                if i == 0:
                    e.st_ino = node.id
                else:
                    e.st_ino = ROOT_ID if node.id == ROOT_ID else self._dotdot_id(node)
                e.st_mode = stat.S_IFDIR | 0o755
                if not pyfuse3.readdir_reply(token, name, e, cookies[i]):
                    return
                continue
            try:
                child, st = self.table.child(node, bname)
            except FileNotFoundError:
                continue  # removed since the snapshot
            attrs = self._attrs(child, st)
            if not pyfuse3.readdir_reply(token, name, attrs, cookies[i]):
                self.table.drop_if_unused(child)
                return
            self.table.count_lookup(child)

    def _dotdot_id(self, node: Inode) -> int:
        # A directory has one parent, and the table follows every move made
        # through the mount: its last known parent is the answer.
        if node.name and self.table.get(node.parent) is not None:
            return node.parent
        try:
            return self.table.id_for(os.stat(b"..", dir_fd=node.path_fd(), follow_symlinks=False))
        except OSError:
            return ROOT_ID

    @fuse_handler
    def releasedir(self, fh: FileHandleT) -> None:
        self._dirs.pop(fh, None)

    @fuse_handler
    def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        dh = self._dirs[fh]
        self._synced_at = time.monotonic()
        fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dh.node.path_fd())
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
