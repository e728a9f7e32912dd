"""Where the xattrs of one inode live on the backing side.

* :class:`InodeXattrs` — on the inode, through the ``/proc/self/fd`` magic
  link of its held descriptor (regular files, directories, FIFOs, sockets).
* :class:`LinkXattrs` — on a symlink. The magic link of a symlink's
  ``O_PATH`` descriptor is followed *through* the symlink, so we name it as
  its held parent's magic link plus the last name we saw, without following
  (``l*xattr``), after checking that name still is this inode.
* :class:`SideXattrs` — in the record side table, for inodes that cannot
  carry the escaped names xattr mode stores (``user.*`` is refused on
  symlinks, FIFOs and sockets).

All take and return *backing* names; the policy translates view names.
"""

from __future__ import annotations

import errno
import os

import pyfuse3

from ..ownership.policy import SideXattrStore
from ..sys.files import proc_fd, touch_ctime
from .inodes import Inode, InodeTable

__all__ = ["InodeXattrs", "LinkXattrs", "SideXattrs"]

_NO_XATTRS = (errno.ENOTSUP, errno.EPERM)


class InodeXattrs:
    def __init__(self, node: Inode):
        self.path: str | bytes = proc_fd(node.path_fd())
        self.follow = True

    def names(self) -> set[str]:
        try:
            return set(os.listxattr(self.path, follow_symlinks=self.follow))
        except OSError as e:
            if e.errno not in _NO_XATTRS:
                raise
            return set()

    def get(self, name: str) -> bytes:
        return os.getxattr(self.path, name, follow_symlinks=self.follow)

    def set(self, name: str, value: bytes) -> None:
        os.setxattr(self.path, name, value, follow_symlinks=self.follow)

    def remove(self, name: str) -> None:
        os.removexattr(self.path, name, follow_symlinks=self.follow)


class LinkXattrs(InodeXattrs):
    def __init__(self, table: InodeTable, node: Inode):
        self.follow = False
        self.path = b""
        parent = table.get(node.parent)
        if parent is None or not node.name:
            return  # an unlinked symlink: no name to reach it by
        path = os.fsencode(proc_fd(parent.path_fd())) + b"/" + node.name
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == node.key:  # else renamed behind the mount's back
            self.path = path

    def _reachable(self) -> None:
        if not self.path:
            raise pyfuse3.FUSEError(errno.ESTALE)

    def names(self) -> set[str]:
        return super().names() if self.path else set()

    def get(self, name: str) -> bytes:
        if not self.path:
            raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
        return super().get(name)

    def set(self, name: str, value: bytes) -> None:
        self._reachable()
        super().set(name, value)

    def remove(self, name: str) -> None:
        self._reachable()
        super().remove(name)


class SideXattrs:
    def __init__(self, store: SideXattrStore, node: Inode):
        self.store = store
        self.fd = node.path_fd()
        self.st = os.fstat(self.fd)

    def names(self) -> set[str]:
        return set(self.store.side_xattrs(self.fd, self.st))

    def get(self, name: str) -> bytes:
        value = self.store.side_xattrs(self.fd, self.st).get(name)
        if value is None:
            raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
        return value

    def set(self, name: str, value: bytes) -> None:
        self.store.side_xattr_set(self.fd, self.st, name, value)
        touch_ctime(self.fd)  # a row is not the inode; an xattr write changes ctime

    def remove(self, name: str) -> None:
        if not self.store.side_xattr_remove(self.fd, self.st, name):
            raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
        touch_ctime(self.fd)
