"""Xattr handlers: view xattr names and values, through the ownership policy.

The backing names an inode carries are cached on it (``xnames``), so the
kernel's per-write ``security.capability`` probe and ``ls -l``'s ACL probe
are answered from memory. A file or directory the mount creates gets its
names without a listxattr: what the backing filesystem gives every new
object (learnt from the first one listed: security labels, none here) plus
what the policy's stamp wrote; only a parent with a default ACL, whose
copies the backing filesystem may add, sends the first probe to the disk.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from collections.abc import Callable

import pyfuse3
from pyfuse3 import InodeT

from ..ownership.policy import CreatePlan, OwnershipPolicy
from ..ownership.view import View
from .caller import in_group_or_capable, sees_trusted
from .inodes import Inode, InodeTable
from .options import CacheConfig
from .requestlog import fuse_handler
from .xattr_io import InodeXattrs, LinkXattrs, SideXattrs

__all__ = ["XattrHandlers"]

Ctx = pyfuse3.RequestContext


class XattrHandlers:
    """The xattr handlers of :class:`shiftfs.fs.ops.Operations`."""

    table: InodeTable
    policy: OwnershipPolicy
    counts: Counter[str]  # the error door's request counts (requestlog.Served)
    trace: bool
    cache: CacheConfig
    xattr_probes: bool
    #: backing xattr names every new object gets from the filesystem (None: not learnt yet)
    _fresh_base: frozenset[str] | None = None
    #: a few new inodes whose first listing teaches ``_fresh_base``: id -> (inode, names the stamp wrote)
    _fresh_learn: dict[int, tuple[Inode, set[str]]]

    # -- xattrs ------------------------------------------------------------------
    def _fresh_xnames(self, node: Inode, plan: CreatePlan) -> None:
        """Give a just-published regular file or directory its ``xnames`` (see the module doc)."""
        if not self.cache.xattr_cache or not (stat.S_ISREG(node.ftype) or stat.S_ISDIR(node.ftype)):
            return
        written = self.policy.stamped_xattrs(plan)
        if written is None or plan.parent.default_acl is not False:
            return
        if self._fresh_base is None:
            # the newest few: an object nobody probes (a directory its owner
            # walks through) must not hold the place of one that is
            if len(self._fresh_learn) >= 16:
                del self._fresh_learn[next(iter(self._fresh_learn))]
            self._fresh_learn[node.id] = (node, written)
            return
        node.xnames = set(self._fresh_base) | written

    def _xio(self, node: Inode) -> InodeXattrs | SideXattrs:
        """Where this inode's backing xattrs are (see :mod:`shiftfs.fs.xattr_io`)."""
        store = self.policy.side_xattr_store(node)
        if store is not None:
            return SideXattrs(store, node)
        if stat.S_ISLNK(node.ftype):
            return LinkXattrs(self.table, node)
        return InodeXattrs(node)

    def _xnames(self, node: Inode) -> set[str]:
        if node.xnames is not None and self.cache.xattr_cache:
            return node.xnames
        names = self._xio(node).names()
        node.xnames = names
        learn = self._fresh_learn.pop(node.id, None) if self._fresh_learn else None
        if learn is not None and learn[0] is node:
            self._fresh_base = frozenset(names - learn[1])
            self._fresh_learn.clear()
        return names

    @fuse_handler
    def getxattr(self, inode_id: InodeT, name: bytes, ctx: Ctx) -> bytes:
        if not self.xattr_probes:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        node = self.table[inode_id]
        vname = os.fsdecode(name)
        if self.policy.is_synthetic_xattr(vname):
            value = self.policy.synthetic_xattr(node, vname)
            if value is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            return value
        bname = self.policy.xattr_to_backing(vname)
        if bname is None or bname not in self._xnames(node):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        try:
            value = self._xio(node).get(bname)
        except OSError as e:
            if e.errno == errno.ENODATA:
                node.xnames = None
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise
        return self.policy.xattr_value_out(vname, value)

    @fuse_handler
    def listxattr(self, inode_id: InodeT, ctx: Ctx) -> list[bytes]:
        node = self.table[inode_id]
        out = []
        for b in self._xnames(node):
            v = self.policy.xattr_to_view(b)
            if v is not None:
                out.append(os.fsencode(v))
        if any(v.startswith(b"trusted.") for v in out) and not sees_trusted(ctx.pid):
            out = [v for v in out if not v.startswith(b"trusted.")]
        out.extend(os.fsencode(v) for v in self.policy.synthetic_xattr_names(node))
        return out

    def writable_xattr(self, inode_id: InodeT, name: bytes) -> tuple[Inode, str, str]:
        """The inode, view name and backing name of an xattr the caller may
        set or remove; EPERM for names the view reserves (records)."""
        node = self.table[inode_id]
        self._fresh_learn.pop(node.id, None)  # no longer as made: it cannot teach what new objects get
        vname = os.fsdecode(name)
        bname = self.policy.xattr_to_backing(vname)
        if bname is None:  # a record name, or one the policy shows itself (read-only)
            raise pyfuse3.FUSEError(errno.EPERM)
        return node, vname, bname

    @fuse_handler
    def setxattr(self, inode_id: InodeT, name: bytes, value: bytes, ctx: Ctx) -> None:
        node, vname, bname = self.writable_xattr(inode_id, name)
        keep = lambda view: in_group_or_capable(ctx.pid, ctx.gid, view.uid, view.gid)  # noqa: E731
        if self.store_xattr(node, vname, bname, value, keep):
            # e.g. an access ACL set the mode's group class: the kernel's
            # cached attributes are stale (attributes only: takes no locks)
            pyfuse3.invalidate_inode(node.id, attr_only=True)

    def store_xattr(self, node: Inode, vname: str, bname: str, value: bytes, keep_sgid: Callable[[View], bool]) -> bool:
        """Store a view xattr (FUSE SETXATTR, or the control channel's ACL of a
        single-id namespace); whether the inode's attributes changed."""
        self._xio(node).set(bname, self.policy.xattr_value_in(vname, value))
        if node.xnames is not None:
            node.xnames.add(bname)
        effect = self.policy.xattr_stored(node, vname, value)
        if effect.names_changed:
            node.xnames = None
        changed = effect.attrs_changed
        if vname == "system.posix_acl_access":
            changed = self.policy.acl_written(node, keep_sgid) or changed
        return changed

    @fuse_handler
    def removexattr(self, inode_id: InodeT, name: bytes, ctx: Ctx) -> None:
        node, vname, bname = self.writable_xattr(inode_id, name)
        try:
            self._xio(node).remove(bname)
        except OSError as e:
            if e.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise
        finally:
            node.xnames = None
        self.policy.xattr_removed(node, vname)
