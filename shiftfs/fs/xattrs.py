"""Xattr handlers: view xattr names and values, through the ownership policy.

The backing names an inode carries are cached on it (``xnames``), so the
kernel's per-write ``security.capability`` probe and ``ls -l``'s ACL probe
are answered from memory.
"""

from __future__ import annotations

import errno
import os
import stat

import pyfuse3

from .inodes import Inode, InodeTable
from .options import CacheConfig
from .requestlog import fuse_handler
from ..ownership.policy import OwnershipPolicy
from ..sys.files import proc_fd

__all__ = ["XattrHandlers"]

Ctx = pyfuse3.RequestContext


class XattrHandlers:
    """The xattr handlers of :class:`shiftfs.fs.ops.Operations`."""

    table: InodeTable
    policy: OwnershipPolicy
    cache: CacheConfig
    xattr_probes: bool

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

    @fuse_handler
    def getxattr(self, inode_id: int, name: bytes, ctx: Ctx) -> bytes:
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

    @fuse_handler
    def listxattr(self, inode_id: int, ctx: Ctx) -> list[bytes]:
        node = self.table[inode_id]
        out = []
        for b in self._xnames(node):
            v = self.policy.xattr_to_view(b)
            if v is not None:
                out.append(os.fsencode(v))
        return out

    def _writable_xattr(self, inode_id: int, name: bytes) -> tuple[Inode, str, str]:
        """The inode, view name and backing name of an xattr the caller may
        set or remove; EPERM for names the view reserves (records)."""
        node = self.table[inode_id]
        vname = os.fsdecode(name)
        bname = self.policy.xattr_to_backing(vname)
        if bname is None:
            raise pyfuse3.FUSEError(errno.EPERM)
        return node, vname, bname

    @fuse_handler
    def setxattr(self, inode_id: int, name: bytes, value: bytes, ctx: Ctx) -> None:
        node, vname, bname = self._writable_xattr(inode_id, name)
        if stat.S_ISLNK(node.ftype):
            raise pyfuse3.FUSEError(errno.EPERM)
        os.setxattr(proc_fd(node.fd), bname, self.policy.xattr_value_in(vname, value))
        if node.xnames is not None:
            node.xnames.add(bname)
        effect = self.policy.xattr_stored(node, vname, value)
        if effect.names_changed:
            node.xnames = None
        if effect.attrs_changed:
            # e.g. an access ACL set the mode's group class: the kernel's
            # cached attributes are stale (attributes only: takes no locks)
            pyfuse3.invalidate_inode(node.id, attr_only=True)

    @fuse_handler
    def removexattr(self, inode_id: int, name: bytes, ctx: Ctx) -> None:
        node, vname, bname = self._writable_xattr(inode_id, name)
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
        self.policy.xattr_removed(node, vname)
