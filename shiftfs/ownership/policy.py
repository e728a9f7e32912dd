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

What an inode shows is the policy's :class:`~shiftfs.ownership.view.ViewRule`,
the one the offline tools use too. A create crosses into the policy twice:
``plan = policy.plan_create(…)`` decides everything about the new object
before it exists, and ``policy.stamp(node, plan, st)`` gives the made, not yet
visible object its ownership. Both keep POSIX creation semantics for the
view: the new owner is the caller, the group the caller's or, under a setgid
directory, the directory's.

Every ownership decision of the mount is made here, also those the FUSE
plumbing only triggers: the setgid bit an ACL write clears
(:meth:`OwnershipPolicy.acl_written`), a privileged chown asked for over the
control channel (:meth:`OwnershipPolicy.privileged_chown`), and ``-o
single_id``'s presentation of ids (:meth:`OwnershipPolicy.shown`, see
:mod:`shiftfs.ownership.single_id`). A policy is configured by its
constructor and not changed afterwards. It sees the mount's inodes as
:class:`~shiftfs.ownership.node.PolicyNode` (``ownership/`` imports nothing
from ``fs/``).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import pyfuse3

from ..sys.files import proc_fd
from . import acl
from .names import OUR_XATTR_PREFIXES
from .node import CallerIds, PolicyNode
from .single_id import OWNER_XATTR, SingleIdPresentation
from .view import View, ViewRule

__all__ = ["OwnershipPolicy", "CreatePlan", "XattrEffect", "SideXattrStore", "eoverflow"]


def eoverflow() -> pyfuse3.FUSEError:
    """A view id the table cannot store (what an idmapped mount answers)."""
    return pyfuse3.FUSEError(errno.EOVERFLOW)


@dataclass(frozen=True)
class CreatePlan:
    """Everything about a new object, decided before it exists."""

    parent: PolicyNode
    mode: int  # view st_mode, type included
    rdev: int  # view device number (0 unless a device)
    uid: int  # disk ids
    gid: int
    backing_mode: int  # st_mode to create on the backing filesystem
    backing_rdev: int
    #: creating it as the daemon already gives exactly this owner and mode (no stamp, no temporary)
    direct: bool


class SideXattrStore(Protocol):
    """Where the xattrs of inodes that cannot carry user xattrs live (the record store's side table)."""

    def side_xattrs(self, fd: int, st: os.stat_result) -> dict[str, bytes]: ...

    def side_xattr_set(self, fd: int, st: os.stat_result, name: str, value: bytes) -> None: ...

    def side_xattr_remove(self, fd: int, st: os.stat_result, name: str) -> bool: ...


class XattrEffect(NamedTuple):
    """What setting an xattr through the mount changed besides the xattr itself."""

    attrs_changed: bool = False  # the kernel's cached attributes are stale
    names_changed: bool = False  # the inode's backing xattr names changed


class OwnershipPolicy:
    """The interface between the FUSE plumbing and the ownership rules.

    Inode fields: the policy alone writes ``record`` and ``default_acl``.
    """

    #: :meth:`view` reads through the inode's descriptor (records); False: the stat alone decides
    view_needs_fd = True

    def __init__(
        self,
        rule: ViewRule,
        *,
        xnames_trusted: bool = False,
        reread: bool = False,
        single_id: SingleIdPresentation | None = None,
    ):
        #: what inodes show (shared with the offline tools)
        self.rule = rule
        self.uids = rule.uids
        self.gids = rule.gids
        #: ``Inode.xnames`` may be believed (``cache=always``: the mount is the only writer of SOURCE)
        self.xnames_trusted = xnames_trusted
        #: ``-o shared``: another daemon may change records and ACLs, so what is
        #: cached on an inode (its record, "no default ACL") is read again each time.
        self.reread = reread
        #: ``-o single_id``: what the kernel is shown (shiftfs.ownership.single_id)
        self.single_id = single_id

    def _lacks_xattr(self, node: PolicyNode, name: str) -> bool:
        """Whether the inode is known not to carry the backing xattr ``name`` (saves probing for it)."""
        return self.xnames_trusted and not self.reread and node.xnames is not None and name not in node.xnames

    # -- attributes --------------------------------------------------------
    def view(self, node: PolicyNode, st: os.stat_result) -> View:
        """The inode as seen through the mount (the true view every decision works from)."""
        raise NotImplementedError

    def shown(self, node: PolicyNode, st: os.stat_result) -> View:
        """What the kernel is told about the inode: the view, presented (``-o single_id``)."""
        view = self.view(node, st)
        return view if self.single_id is None else self.single_id.present(view)

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
    def plan_create(
        self, parent: PolicyNode, parent_st: os.stat_result, ctx: CallerIds, mode: int, rdev: int = 0
    ) -> CreatePlan:
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

    def create_mode(self, parent: PolicyNode, mode: int, umask: int) -> int:
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
                raw = os.getxattr(proc_fd(parent.path_fd()), acl.ACL_DEFAULT)
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

    def stamp(self, node: PolicyNode, plan: CreatePlan, st: os.stat_result) -> None:
        """Give a new, not yet visible object its ownership (and inherited ACLs); ``st`` is it as made."""
        raise NotImplementedError

    # -- changes -----------------------------------------------------------
    def change(
        self, node: PolicyNode, st: os.stat_result | None, uid: int | None, gid: int | None, mode: int | None
    ) -> None:
        """A chown/chmod through the mount; ``st`` is the inode's stat if the caller has one
        (a policy that needs it stats otherwise: one fstat less where it does not)."""
        raise NotImplementedError

    def privileged_chown(self, node: PolicyNode, uid: int | None, gid: int | None) -> None:
        """A chown by a privileged caller the kernel could not pass on (the control channel of a
        single-id namespace): recorded as such a chown is, so a non-directory loses setuid, and
        setgid if group-executable, as the kernel clears them."""
        st = os.fstat(node.path_fd())
        mode = None
        if not stat.S_ISDIR(st.st_mode) and (uid is not None or gid is not None):
            cur = self.view(node, st).mode
            kill = stat.S_ISUID | (stat.S_ISGID if cur & stat.S_IXGRP else 0)
            if cur & kill:
                mode = cur & ~kill
        self.change(node, st, uid, gid, mode)

    def acl_written(self, node: PolicyNode, keep_sgid: Callable[[View], bool]) -> bool:
        """After an access ACL write: clear setgid unless the caller is in the file's group or has
        CAP_FSETID (``keep_sgid(view)``); whether the mode changed.

        The kernel's posix_acl_update_mode does this on a local filesystem,
        and its chmod path does it before a SETATTR reaches us; for ACLs it
        leaves the mode to a FUSE_POSIX_ACL daemon. The backing filesystem
        judges the daemon instead, which may keep the bit.
        """
        st = os.fstat(node.path_fd())
        view = self.view(node, st)
        if not view.mode & stat.S_ISGID or keep_sgid(view):
            return False
        self.change(node, st, None, None, view.mode & 0o7777 & ~stat.S_ISGID)
        return True

    #: :meth:`gone` does something (records kept apart from the inode)
    wants_gone = False

    def gone(self, node: PolicyNode | None, st: os.stat_result) -> None:
        """The last link of an inode was removed."""

    # -- xattrs ------------------------------------------------------------
    def side_xattr_store(self, node: PolicyNode) -> SideXattrStore | None:
        """The store that keeps this inode's xattrs when the inode cannot carry them; None: the inode does."""
        return None

    def xattr_stored(self, node: PolicyNode, name: str, value: bytes) -> XattrEffect:
        """An xattr was set through the mount."""
        if name == acl.ACL_DEFAULT:
            node.default_acl = True
        return XattrEffect()

    def xattr_removed(self, node: PolicyNode, name: str) -> None:
        """An xattr was removed through the mount."""
        if name == acl.ACL_DEFAULT:
            node.default_acl = False

    def xattr_to_backing(self, name: str) -> str | None:
        """Backing name of a view xattr name, or None if it may not be touched."""
        if name.startswith(OUR_XATTR_PREFIXES) or self.is_synthetic_xattr(name):
            return None
        return name

    def xattr_to_view(self, backing: str) -> str | None:
        """View name of a backing xattr name, or None if it is hidden (the view rule's)."""
        return self.rule.xattr_name(backing)

    # -- xattrs no backing inode carries (-o single_id) ----------------------
    def is_synthetic_xattr(self, name: str) -> bool:
        """Whether ``name`` is shown by the policy itself (read-only through the mount)."""
        return self.single_id is not None and name == OWNER_XATTR

    def synthetic_xattr(self, node: PolicyNode, name: str) -> bytes | None:
        """The value of a synthetic xattr of this inode, or None if the inode has none:
        ``UID:GID`` of an inode whose owner the kernel is shown as another."""
        if not self.is_synthetic_xattr(name):
            return None
        view = self.view(node, os.fstat(node.path_fd()))
        assert self.single_id is not None  # is_synthetic_xattr says so
        if self.single_id.present(view) == view:
            return None
        return f"{view.uid}:{view.gid}".encode()

    def synthetic_xattr_names(self, node: PolicyNode) -> list[str]:
        """The synthetic xattrs a listing of this inode shows."""
        if self.single_id is None or stat.S_ISLNK(node.ftype) or self.synthetic_xattr(node, OWNER_XATTR) is None:
            return []
        return [OWNER_XATTR]

    def xattr_value_in(self, name: str, value: bytes) -> bytes:
        """The value stored for a view xattr set through the mount (ACL ids to disk ids)."""
        if name in acl.ACL_NAMES:
            return self._acl_translate(value, to_disk=True)
        return value

    def xattr_value_out(self, name: str, value: bytes) -> bytes:
        """The value shown for a view xattr (the view rule's: ACL ids, capabilities)."""
        try:
            return self.rule.xattr_value(name, value)
        except acl.AclError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None

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
