"""The inode table: one ``O_PATH`` descriptor per inode the kernel knows.

Modelled on libfuse's ``passthrough_hp``: an inode is identified by its backing
``(st_dev, st_ino)``; while the kernel holds a lookup reference we hold an
``O_PATH | O_NOFOLLOW`` descriptor of it, which pins the backing inode (so its
number cannot be reused under us) and lets every later call work relative to
it without resolving a path.

Lookup counting lives here and only here: every reply that hands the kernel an
entry (lookup, create, mkdir, mknod, symlink, link and each READDIRPLUS entry
pyfuse3 reports as sent) calls :meth:`InodeTable.remember`, and ``forget``
calls :meth:`InodeTable.forget`.

FUSE node ids are the backing inode numbers where that is unambiguous (the
filesystem of SOURCE), so ``st_ino`` seen through the mount matches the disk;
inodes of other filesystems mounted below SOURCE get ids from a private range.
"""

from __future__ import annotations

import errno
import os
import stat

import pyfuse3

__all__ = ["Inode", "InodeTable", "ROOT_ID"]

ROOT_ID = pyfuse3.ROOT_INODE
_SYNTHETIC_BASE = 1 << 62

_UNLOADED = object()


class Inode:
    """What we keep per live inode.

    ``record`` caches the decoded ownership record (xattr mode);
    ``xnames`` caches the set of backing xattr names, so the kernel's
    per-write ``security.capability`` probe and ``ls -l``'s ACL probe are
    answered from memory.
    """

    __slots__ = ("id", "fd", "key", "ftype", "nlookup", "record", "xnames", "default_acl")

    def __init__(self, id: int, fd: int, key: tuple[int, int], ftype: int):
        self.id = id
        self.fd = fd
        self.key = key
        self.ftype = ftype
        self.nlookup = 0
        self.record = _UNLOADED
        self.xnames: set[str] | None = None
        self.default_acl: bool | None = None

    @property
    def record_loaded(self) -> bool:
        return self.record is not _UNLOADED

    def drop_caches(self) -> None:
        self.record = _UNLOADED
        self.xnames = None
        self.default_acl = None

    def __repr__(self) -> str:
        return f"<Inode {self.id} fd={self.fd} n={self.nlookup}>"


class InodeTable:
    def __init__(self, root_fd: int):
        st = os.fstat(root_fd)
        self.root_dev = st.st_dev
        root = Inode(ROOT_ID, root_fd, (st.st_dev, st.st_ino), stat.S_IFDIR)
        root.nlookup = 1 << 62  # never forgotten
        self.root = root
        self._by_id: dict[int, Inode] = {ROOT_ID: root}
        self._by_key: dict[tuple[int, int], Inode] = {root.key: root}
        self._next_synthetic = _SYNTHETIC_BASE
        #: called with the stat of an inode whose last link is gone when we drop it
        self.on_gone = None

    def __len__(self) -> int:
        return len(self._by_id)

    def __getitem__(self, id: int) -> Inode:
        try:
            return self._by_id[id]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def get(self, id: int) -> Inode | None:
        return self._by_id.get(id)

    def by_key(self, key: tuple[int, int]) -> Inode | None:
        return self._by_key.get(key)

    def _new_id(self, st: os.stat_result) -> int:
        if st.st_dev == self.root_dev and 1 < st.st_ino < _SYNTHETIC_BASE and st.st_ino not in self._by_id:
            return st.st_ino
        self._next_synthetic += 1
        return self._next_synthetic

    def id_for(self, st: os.stat_result) -> int:
        """The node id an inode has or would get (for ``.``/``..`` entries)."""
        node = self._by_key.get((st.st_dev, st.st_ino))
        if node is not None:
            return node.id
        if st.st_dev == self.root_dev and 1 < st.st_ino < _SYNTHETIC_BASE:
            return st.st_ino
        return ROOT_ID

    def child(self, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        """Find or add the inode named ``name`` in ``parent`` (no reference taken)."""
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return self.adopt(fd, st), st

    def adopt(self, fd: int, st: os.stat_result) -> Inode:
        """Take ownership of an ``O_PATH`` descriptor; reuse the entry if known."""
        key = (st.st_dev, st.st_ino)
        node = self._by_key.get(key)
        if node is not None:
            os.close(fd)
            return node
        node = Inode(self._new_id(st), fd, key, stat.S_IFMT(st.st_mode))
        self._by_id[node.id] = node
        self._by_key[key] = node
        return node

    def remember(self, node: Inode) -> None:
        """The kernel got an entry for ``node``: count one lookup reference."""
        node.nlookup += 1

    def drop_if_unused(self, node: Inode) -> None:
        if node.nlookup <= 0:
            self._drop(node)

    def forget(self, id: int, n: int) -> None:
        node = self._by_id.get(id)
        if node is None or node is self.root:
            return
        node.nlookup -= n
        if node.nlookup <= 0:
            self._drop(node)

    def _drop(self, node: Inode) -> None:
        if node is self.root:
            return
        del self._by_id[node.id]
        del self._by_key[node.key]
        if self.on_gone is not None:
            try:
                st = os.fstat(node.fd)
                if st.st_nlink == 0:
                    self.on_gone(node, st)
            except OSError:
                pass
        os.close(node.fd)
        node.fd = -1

    def close(self) -> None:
        for node in list(self._by_id.values()):
            if node is not self.root:
                os.close(node.fd)
        self._by_id = {ROOT_ID: self.root}
        self._by_key = {self.root.key: self.root}
