"""Ownership policies: what the view shows and how changes are stored.

:class:`shiftfs.fs.ops.Operations` does the FUSE plumbing and knows nothing
about ownership; it asks one :class:`OwnershipPolicy` instead:

* :class:`~shiftfs.ownership.table.TablePolicy` stores view ownership as real
  backing ownership, translated through the id tables (what a kernel
  idmapped mount does; the daemon needs the privilege to chown).
* :class:`~shiftfs.ownership.xattr.XattrPolicy` leaves backing files owned by
  the daemon's user and keeps the view owner, group, mode and device number
  in a *record* (see :mod:`shiftfs.ownership.record`). It composes with a
  table: view id → table → record.

A create crosses into the policy twice: ``plan = policy.plan_create(…)``
decides everything about the new object before it exists, and
``policy.stamp(node, plan, st)`` gives the made, not yet visible object its
ownership. Both keep POSIX creation semantics for the view: the new owner is
the caller, the group the caller's or, under a setgid directory, the
directory's.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import NamedTuple

import pyfuse3

from ..fs.inodes import Inode
from ..sys.files import proc_fd
from . import acl
from .idmap import IdMap
from .names import OUR_XATTR_PREFIXES
from .view import View

__all__ = ["OwnershipPolicy", "CreatePlan", "XattrEffect", "eoverflow"]


def eoverflow() -> pyfuse3.FUSEError:
    """A view id the table cannot store (what an idmapped mount answers)."""
    return pyfuse3.FUSEError(errno.EOVERFLOW)


@dataclass(frozen=True)
class CreatePlan:
    """Everything about a new object, decided before it exists."""

    parent: Inode
    mode: int  # view st_mode, type included
    rdev: int  # view device number (0 unless a device)
    uid: int  # disk ids
    gid: int
    backing_mode: int  # st_mode to create on the backing filesystem
    backing_rdev: int
    #: creating it as the daemon already gives exactly this owner and mode (no stamp, no temporary)
    direct: bool


class XattrEffect(NamedTuple):
    """What setting an xattr through the mount changed besides the xattr itself."""

    attrs_changed: bool = False  # the kernel's cached attributes are stale
    names_changed: bool = False  # the inode's backing xattr names changed


class OwnershipPolicy:
    """The interface between the FUSE plumbing and the ownership rules.

    Inode fields: the policy alone writes ``record`` and ``default_acl``.
    """

    #: ``Inode.xnames`` may be believed (``cache=always``: the mount is the only writer of SOURCE)
    xnames_trusted = False
    #: ``-o shared``: another daemon may change records and ACLs, so what is
    #: cached on an inode (its record, "no default ACL") is read again each time.
    reread = False
    #: :meth:`view` reads through the inode's descriptor (records); False: the stat alone decides
    view_needs_fd = True

    def __init__(self, uids: IdMap, gids: IdMap):
        self.uids = uids
        self.gids = gids

    def _lacks_xattr(self, node: Inode, name: str) -> bool:
        """Whether the inode is known not to carry the backing xattr ``name`` (saves probing for it)."""
        return self.xnames_trusted and not self.reread and node.xnames is not None and name not in node.xnames

    # -- attributes --------------------------------------------------------
    def view(self, node: Inode, st: os.stat_result) -> View:
        """The inode as seen through the mount."""
        raise NotImplementedError

    def disk_ids(self, uid: int | None, gid: int | None) -> tuple[int, int]:
        """View ids to disk ids (-1 for None); EOVERFLOW when one has no mapping."""
        du = dg = -1
        if uid is not None:
            mapped = self.uids.to_disk(uid)
            if mapped is None:
                raise eoverflow()
            du = mapped
        if gid is not None:
            mapped = self.gids.to_disk(gid)
            if mapped is None:
                raise eoverflow()
            dg = mapped
        return du, dg

    # -- creation ----------------------------------------------------------
    def plan_create(self, parent: Inode, parent_st: os.stat_result, ctx, mode: int, rdev: int = 0) -> CreatePlan:
        """Owner, group, mode and backing form of a new object in ``parent``, for caller ``ctx``."""
        pview = self.view(parent, parent_st)
        mode = self.create_mode(parent, mode, ctx.umask)
        uid = ctx.uid
        if pview.mode & stat.S_ISGID:
            gid = pview.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        else:
            gid = ctx.gid
        du, dg = self.disk_ids(uid, gid)
        bmode, brdev = self.backing_mode(mode, rdev)
        direct = self.direct_ok(du, dg, mode, parent_st) and not (
            stat.S_ISDIR(mode) and mode & stat.S_ISGID and not parent_st.st_mode & stat.S_ISGID
        )
        return CreatePlan(parent, mode, rdev, du, dg, bmode, brdev, direct)

    def create_mode(self, parent: Inode, mode: int, umask: int) -> int:
        """The mode of a new object, from the mode asked for and the caller's umask.

        A default ACL on the parent replaces the umask and masks the mode
        (posix_acl_create). Here that ACL is the backing directory's own. The
        backing filesystem applies it too when we create the object, but an
        object made under a temporary name is then chmod-ed to the mode
        planned here, so it must be the masked one. (The mount asks for
        FUSE_DONT_MASK, so the kernel has not applied the umask.)
        """
        raw = None
        if parent.default_acl is not False or self.reread:
            try:
                raw = os.getxattr(proc_fd(parent.fd), acl.ACL_DEFAULT)
                parent.default_acl = True
            except OSError:
                parent.default_acl = False
        if raw is None:
            return mode & ~(umask & 0o777)
        try:
            return acl.create_masq(acl.parse(raw), mode)[1]
        except ValueError:
            return mode  # a malformed ACL: the backing filesystem's own rules apply

    def backing_mode(self, mode: int, rdev: int) -> tuple[int, int]:
        """The ``(mode, rdev)`` to create on the backing fs for a view object."""
        return mode, rdev

    def direct_ok(self, du: int, dg: int, mode: int, parent_st: os.stat_result) -> bool:
        """Whether creating as the daemon gives exactly this owner and mode."""
        return False

    def stamped_xattrs(self, plan: CreatePlan) -> set[str] | None:
        """The backing xattr names :meth:`stamp` gives a new object of this plan; None: not known."""
        return None

    def stamp(self, node: Inode, plan: CreatePlan, st: os.stat_result) -> None:
        """Give a new, not yet visible object its ownership (and inherited ACLs); ``st`` is it as made."""
        raise NotImplementedError

    # -- changes -----------------------------------------------------------
    def change(
        self, node: Inode, st: os.stat_result | None, uid: int | None, gid: int | None, mode: int | None
    ) -> None:
        """A chown/chmod through the mount; ``st`` is the inode's stat if the caller has one
        (a policy that needs it stats otherwise: one fstat less where it does not)."""
        raise NotImplementedError

    #: :meth:`gone` does something (records kept apart from the inode)
    wants_gone = False

    def gone(self, node: Inode | None, st: os.stat_result) -> None:
        """The last link of an inode was removed."""

    # -- xattrs ------------------------------------------------------------
    def side_xattrs(self, node: Inode):
        """The store that keeps this inode's xattrs when the inode cannot carry them; None: the inode does."""
        return None

    def xattr_stored(self, node: Inode, name: str, value: bytes) -> XattrEffect:
        """An xattr was set through the mount."""
        if name == acl.ACL_DEFAULT:
            node.default_acl = True
        return XattrEffect()

    def xattr_removed(self, node: Inode, name: str) -> None:
        """An xattr was removed through the mount."""
        if name == acl.ACL_DEFAULT:
            node.default_acl = False

    def xattr_to_backing(self, name: str) -> str | None:
        """Backing name of a view xattr name, or None if it may not be touched."""
        if name.startswith(OUR_XATTR_PREFIXES):
            return None
        return name

    def xattr_to_view(self, backing: str) -> str | None:
        if backing.startswith(OUR_XATTR_PREFIXES):
            return None
        return backing

    def xattr_value_in(self, name: str, value: bytes) -> bytes:
        if name in acl.ACL_NAMES:
            return self._acl_translate(value, to_disk=True)
        return value

    def xattr_value_out(self, name: str, value: bytes) -> bytes:
        if name in acl.ACL_NAMES:
            return self._acl_translate(value, to_disk=False)
        return value

    def _acl_translate(self, value: bytes, to_disk: bool) -> bytes:
        if self.uids.identity and self.gids.identity:
            return value
        try:
            if to_disk:
                return acl.map_ids(value, self.uids.to_disk, self.gids.to_disk)
            return acl.map_ids(value, self.uids.to_view, self.gids.to_view)
        except acl.UnmappedAclId:
            raise eoverflow() from None
        except acl.AclError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None
