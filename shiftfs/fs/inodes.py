"""The inode table: the inodes the kernel knows, each reachable by a descriptor.

Modelled on libfuse's ``passthrough_hp``: an inode is identified by its backing
``(st_dev, st_ino)`` and reached through an ``O_PATH | O_NOFOLLOW`` descriptor,
so every call works relative to it without resolving a path.

Lookup counting lives here and only here: every reply that hands the kernel an
entry (lookup, create, mkdir, mknod, symlink, link and each READDIRPLUS entry
pyfuse3 reports as sent) calls :meth:`InodeTable.count_lookup`, and ``forget``
calls :meth:`InodeTable.forget`.

Descriptors are bounded (RLIMIT_NOFILE is 20000 here and cannot be raised
without CAP_SYS_RESOURCE), while the kernel may know hundreds of thousands of
inodes. So the table keeps at most :attr:`InodeTable.max_fds` descriptors open,
least recently used first out. An inode whose descriptor was closed is
reopened on demand from its parent's descriptor and the last name we saw for
it (one ``openat(O_PATH|O_NOFOLLOW)``), and the reopened inode must have the
same ``(st_dev, st_ino)`` or the call fails with ``ESTALE``: no path string
is ever resolved. Inodes that cannot be reopened by name keep their
descriptor: the root, inodes with open files, and inodes whose name we
removed (an unlinked, still open file; the other names of a hard link).

One writer: only the request loop's thread reads or changes the table and
its inodes. The one other thread, :class:`~shiftfs.fs.closer.Closer`'s
worker, gets descriptors the table has already let go of: when ``forget``
drops an inode whose name we removed (its last name, as far as we know), the
inode leaves the table, its ``_fd`` becomes ``-1``, and only then is the
descriptor handed over; the worker closes exactly that descriptor, once,
and never sees the table. That ``close`` is where the backing filesystem
frees a removed inode (73 % of the daemon's busy time in ``rm -rf`` when it
was made inside FORGET); a still-linked inode's ``close`` is cheap and stays
on the loop, as do all closes unless ``-o closer=on`` (off by default: see
docs/speed-round4.md).

FUSE node ids are the backing inode numbers where that is unambiguous (the
filesystem of SOURCE), so ``st_ino`` seen through the mount matches the disk;
inodes of other filesystems mounted below SOURCE get ids from a private range.
"""

from __future__ import annotations

import errno
import os
import resource
import stat
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import pyfuse3

from ..ownership.node import UNLOADED, Unloaded
from ..sys.files import O_PATH_NOFOLLOW
from .closer import MAX_PENDING, Closer

if TYPE_CHECKING:
    from ..ownership.record import Record

__all__ = ["Inode", "InodeTable", "ROOT_ID"]

ROOT_ID = pyfuse3.ROOT_INODE
_SYNTHETIC_BASE = 1 << 62


class Inode:
    """What we keep per live inode.

    ``record`` caches the decoded ownership record (xattr mode); ``xnames``
    caches the set of backing xattr names, so the kernel's per-write
    ``security.capability`` probe and ``ls -l``'s ACL probe are answered from
    memory. ``parent``/``name`` are the last place we saw the inode, used to
    reopen it; ``pins`` counts reasons its descriptor must stay open.

    Who writes what: the table owns ``parent``, ``name``, ``pins``,
    ``nlookup`` and the descriptor; the ownership policy owns ``record`` and
    ``default_acl``; the operations own ``xnames``.
    """

    __slots__ = (
        "id",
        "_fd",
        "key",
        "ftype",
        "nlookup",
        "record",
        "xnames",
        "default_acl",
        "parent",
        "name",
        "pins",
        "_table",
    )

    def __init__(self, table: InodeTable, id: int, fd: int, key: tuple[int, int], ftype: int):
        self._table = table
        self.id = id
        self._fd = fd
        self.key = key
        self.ftype = ftype
        self.nlookup = 0
        self.parent = 0
        self.name = b""
        self.pins = 0
        self.record: Record | None | Literal[Unloaded.UNLOADED] = UNLOADED
        self.xnames: set[str] | None = None
        self.default_acl: bool | None = None

    def path_fd(self) -> int:
        """An ``O_PATH`` descriptor of the inode, reopened when the table closed it.

        Not a plain field: the table keeps a bounded number of descriptors
        open (least recently used closed first), so this may reopen the inode
        by name from its parent (``O_NOFOLLOW``, same device and inode checked)
        and raise ``ESTALE`` when that name no longer leads to it. It also
        marks the inode recently used.
        """
        if self._fd >= 0:
            lru = self._table._lru
            if self.id in lru:
                lru.move_to_end(self.id)
            return self._fd
        return self._table._reopen(self)

    @property
    def record_loaded(self) -> bool:
        return self.record is not UNLOADED

    def view_path(self) -> str:
        """The last known path of the inode below the root, for log lines."""
        return self._table.path_of(self)

    def __repr__(self) -> str:
        return f"<Inode {self.id} fd={self._fd} n={self.nlookup} {self.name!r}>"


def _fd_budget() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    # Leave room for open files, directories being listed, the side table…
    return max(64, min(soft - 1024, soft * 3 // 4))


def _printable(s: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


GoneHook = Callable[[Inode, os.stat_result], None]


class InodeTable:
    def __init__(self, root_fd: int, max_fds: int | None = None, on_gone: GoneHook | None = None, lazy: bool = False):
        #: lookups open no descriptor (see :meth:`child`)
        self.lazy = lazy
        #: most inode descriptors kept open at once
        self.max_fds = max_fds or _fd_budget()
        st = os.fstat(root_fd)
        self.root_dev = st.st_dev
        root = Inode(self, ROOT_ID, root_fd, (st.st_dev, st.st_ino), stat.S_IFDIR)
        root.nlookup = 1 << 62  # never forgotten
        self.root = root
        self._by_id: dict[int, Inode] = {ROOT_ID: root}
        self._by_key: dict[tuple[int, int], Inode] = {root.key: root}
        self._lru: OrderedDict[int, Inode] = OrderedDict()  # open, closable descriptors
        self._next_synthetic = _SYNTHETIC_BASE
        #: open file handles; each holds a descriptor (and pins one) outside the LRU
        self._pin_count = 0
        #: called with an inode and its stat when the inode is dropped with no links left
        self.on_gone = on_gone
        #: closes the descriptors of removed inodes off the loop (see the note above)
        self.closer = Closer()
        #: ``-o closer=on``: hand removed inodes' descriptors to :attr:`closer`
        self.defer_closes = False

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

    def path_of(self, node: Inode) -> str:
        """The last known path of an inode (backing names), for log lines."""
        names: list[str] = []
        cur: Inode | None = node
        while cur is not None and cur.id != ROOT_ID and len(names) < 64:
            if not cur.name:
                names.append(f"<inode {cur.id}>")
                break
            names.append(os.fsdecode(cur.name))
            cur = self._by_id.get(cur.parent)
        return _printable("/" + "/".join(reversed(names)))

    # -- ids -------------------------------------------------------------------
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

    # -- finding and adding inodes ------------------------------------------------
    def child(self, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        """Find or add the inode named ``name`` in ``parent`` (no reference taken).

        With :attr:`lazy` (the policy shows an inode from its stat alone), one
        ``fstatat`` is all: a known inode is reused as it is, a new one gets
        no descriptor until a call needs it (:meth:`_reopen` then opens it by
        this name and checks it is still the same inode, else ESTALE). A stat
        storm or a ``find`` sends lookups and READDIRPLUS entries for many
        inodes that are never opened; each of them used to cost an open, a
        stat and, when known, a close.
        """
        if self.lazy:
            st = os.stat(name, dir_fd=parent.path_fd(), follow_symlinks=False)
            node = self._by_key.get((st.st_dev, st.st_ino)) or self._add(-1, st)
        else:
            fd = os.open(name, O_PATH_NOFOLLOW, dir_fd=parent.path_fd())
            try:
                st = os.fstat(fd)
            except BaseException:
                os.close(fd)
                raise
            node = self.adopt(fd, st)
        if not node.name and node._fd >= 0 and not node.pins and node is not self.root:
            node.name = name
            self._track(node)
        node.parent = parent.id
        node.name = name
        return node, st

    def adopt(self, fd: int, st: os.stat_result) -> Inode:
        """Take ownership of an ``O_PATH`` descriptor; reuse the entry if known."""
        key = (st.st_dev, st.st_ino)
        node = self._by_key.get(key)
        if node is not None:
            if node._fd < 0:
                node._fd = fd
                self._track(node)
            else:
                os.close(fd)
            return node
        node = self._add(fd, st)
        self._track(node)
        return node

    def _add(self, fd: int, st: os.stat_result) -> Inode:
        """A new entry for the inode of ``st`` (``fd`` -1: no descriptor yet, see :meth:`child`)."""
        key = (st.st_dev, st.st_ino)
        node = Inode(self, self._new_id(st), fd, key, stat.S_IFMT(st.st_mode))
        self._by_id[node.id] = node
        self._by_key[key] = node
        return node

    def _track(self, node: Inode) -> None:
        if node.pins == 0 and node is not self.root:
            self._lru[node.id] = node
            if len(self._lru) > self._lru_limit():
                self._shrink()

    def _lru_limit(self) -> int:
        # Open files hold descriptors too (their handle and their pinned
        # O_PATH descriptor): the LRU gives way to them.
        return max(16, self.max_fds - 2 * self._pin_count)

    def _shrink(self) -> None:
        target = self._lru_limit() * 7 // 8
        lru = self._lru
        while len(lru) > target:
            _, node = lru.popitem(last=False)
            if node.pins or not node.name:
                continue  # cannot be reopened by name: keep it (it left the LRU)
            os.close(node._fd)
            node._fd = -1

    def _reopen(self, node: Inode) -> int:
        # The ancestors of a deep inode may have lost their descriptors too:
        # find the nearest one that is open, then reopen downwards (a loop, not
        # recursion through ``parent.path_fd()``, so any depth works).
        chain: list[Inode] = []
        cur = node
        while cur._fd < 0:
            parent = self._by_id.get(cur.parent)
            if parent is None or not cur.name or len(chain) > len(self._by_id):
                raise pyfuse3.FUSEError(errno.ESTALE)
            chain.append(cur)
            cur = parent
        for n in reversed(chain):
            try:
                fd = os.open(n.name, O_PATH_NOFOLLOW, dir_fd=self._by_id[n.parent].path_fd())
            except FileNotFoundError:
                raise pyfuse3.FUSEError(errno.ESTALE) from None
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != n.key:
                os.close(fd)
                raise pyfuse3.FUSEError(errno.ESTALE)
            n._fd = fd
            self._track(n)
        return node.path_fd()

    # -- pins: descriptors that must stay open ----------------------------------------
    def pin(self, node: Inode) -> None:
        """Keep ``node``'s descriptor open (an open file refers to it)."""
        _ = node.path_fd()  # open it now, while it can still be reopened by name
        node.pins += 1
        self._pin_count += 1
        self._lru.pop(node.id, None)
        if len(self._lru) > self._lru_limit():
            self._shrink()

    def unpin(self, node: Inode) -> None:
        if node.pins > 0:
            self._pin_count -= 1
        node.pins -= 1
        if node.pins <= 0:
            node.pins = 0
            if node._fd >= 0 and node.id in self._by_id and node is not self.root:
                if node.name:
                    self._track(node)
                # a nameless inode keeps its descriptor until it is forgotten

    def open_before_unlink(self, key: tuple[int, int], parent: Inode, name: bytes) -> Inode | None:
        """Before ``name`` in ``parent`` goes away: the inode we reach by it, opened.

        Its descriptor must be open now: once the name is gone it cannot be
        reopened by name. Pass the result to :meth:`name_removed` afterwards.
        """
        node = self._by_key.get(key)
        if node is not None and node.parent == parent.id and node.name == name and node is not self.root:
            _ = node.path_fd()  # reopen now if it was closed: the caller is about to use it
            return node
        return None

    def name_removed(self, node: Inode | None) -> None:
        """The name we reached ``node`` by is gone: keep its descriptor until forget."""
        if node is not None:
            node.name = b""
            self._lru.pop(node.id, None)

    def renamed(self, key: tuple[int, int], parent: Inode, name: bytes) -> None:
        """Keep the last known name of an inode right after a rename (or after publishing a new one)."""
        node = self._by_key.get(key)
        if node is not None:
            node.parent = parent.id
            node.name = name
            if node._fd >= 0 and not node.pins and node is not self.root and node.id not in self._lru:
                self._track(node)

    # -- lookup counts -------------------------------------------------------------
    def count_lookup(self, node: Inode) -> None:
        """The kernel got an entry for ``node``: count one lookup reference."""
        node.nlookup += 1

    def drop_if_unused(self, node: Inode) -> None:
        if node.nlookup <= 0 and node.pins <= 0:
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
        self._lru.pop(node.id, None)
        if node._fd >= 0:
            if self.on_gone is not None:
                try:
                    st = os.fstat(node._fd)
                    if st.st_nlink == 0:
                        self.on_gone(node, st)
                except OSError:
                    pass
            fd, node._fd = node._fd, -1
            if node.name or not self.defer_closes or self.closer.pending >= MAX_PENDING:
                os.close(fd)  # still linked: a cheap close (or the worker is behind)
            else:
                self.closer.close(fd)  # removed: the backing fs frees the inode in this close

    def close(self) -> None:
        for node in list(self._by_id.values()):
            if node is not self.root and node._fd >= 0:
                os.close(node._fd)
                node._fd = -1
        self._by_id = {ROOT_ID: self.root}
        self._by_key = {self.root.key: self.root}
        self._lru.clear()
        self.closer.drain()
