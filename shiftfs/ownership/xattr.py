"""Xattr mode: view ownership and mode live in records; backing files stay the daemon's.

Records are kept by a :class:`~shiftfs.ownership.store.RecordStore`. ACLs set
through the mount are kept escaped (``user.containers.override_system.posix_acl_*``),
so the backing filesystem neither enforces nor inherits them: we do what it
would. A default ACL is inherited by new objects; an access ACL sets the
mode's group class from its mask, and a chmod sets the mask. A default ACL
replaces the umask (the mount asks for FUSE_DONT_MASK, so the mode comes
unmasked). Enforcing ACLs is the kernel's job: FUSE_POSIX_ACL.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

import pyfuse3

from ..sys.files import proc_fd, touch_ctime
from . import acl, trust
from .idmap import IdMap
from .names import escape_xattr_name
from .node import UNLOADED, PolicyNode
from .policy import CreatePlan, OwnershipPolicy, SideXattrStore, XattrEffect, eoverflow
from .record import LEGACY_RECORD_NAME, Record, RecordError
from .single_id import SingleIdPresentation
from .store import RecordStore, SideTableError, can_hold_xattr
from .trust import backing_perm
from .view import View, ViewRule, backing_type

__all__ = ["XattrPolicy"]

log = logging.getLogger(__name__)

_SPECIAL = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX
_ESC_ACL_ACCESS = escape_xattr_name(acl.ACL_ACCESS)
_ESC_ACL_DEFAULT = escape_xattr_name(acl.ACL_DEFAULT)


class XattrPolicy(OwnershipPolicy):
    """View ownership and mode live in records; backing files stay the daemon's."""

    def __init__(
        self,
        uids: IdMap,
        gids: IdMap,
        store: RecordStore,
        default_owner: tuple[int, int] | None = None,
        stamp_root: bool = True,
        *,
        xnames_trusted: bool = False,
        reread: bool = False,
        single_id: SingleIdPresentation | None = None,
    ):
        # Whose records count (shiftfs.ownership.trust) is the store's: the daemon's own user,
        # which is root for a root daemon and namespace root (the invoking user) in run/exec.
        rule = ViewRule(uids, gids, store.trusted_uid, default_owner=default_owner)
        super().__init__(rule, xnames_trusted=xnames_trusted, reread=reread, single_id=single_id)
        self.store = store
        self.default_owner = default_owner
        self.trusted_uid = store.trusted_uid
        self._warned: set[tuple[int, int]] = set()
        self._store_errors: set[str] = set()
        self._distrusted: set[tuple[int, int]] = set()
        if stamp_root:
            self._record_root()
            store.stamp_own_files()

    def _record_root(self) -> None:
        """Give the tree root a record of the view it already shows.

        fuse-overlayfs (1.10 at least) picks the record name of a layer by
        probing the layer's root, and then fails every directory listing
        that meets a directory or regular file without a record ("No data
        available"): a tree whose root has no record cannot be listed. A root
        that has a record under either name keeps it (its name tells
        fuse-overlayfs which one the tree uses); with ``-o legacy_xattr`` the
        root needs the legacy name too.
        """
        fd = self.store.root_fd
        if self.store.has_record(fd):
            return
        try:
            st = os.fstat(fd)
            try:
                rec = self.store.read_record(fd, st)
            except RecordError:
                rec = None
            if rec is None:
                rec = self.rule.unrecorded_record(st)
            self.store.write_record(fd, st, rec)
        except (OSError, ValueError) as e:
            log.warning("cannot give the root a record (fuse-overlayfs will not list this tree): %s", e)

    # records ----------------------------------------------------------------
    def _load_record(self, node: PolicyNode, st: os.stat_result) -> Record | None:
        """The inode's believed record (cached on the inode), or None if it has no usable one."""
        cached = node.record
        if cached is not UNLOADED and not self.reread:
            return cached
        rec = None
        try:
            rec, why = self.rule.believed(self.store, node.path_fd(), st)
            if why:
                self._say_distrust(node, st)
        except SideTableError as e:
            # The side table as a whole: say so once, not once per inode.
            if str(e) not in self._store_errors:
                self._store_errors.add(str(e))
                log.warning(
                    "cannot read the record side table (%s; first seen for %s); inodes whose "
                    "records live there show their backing owner",
                    e,
                    node.view_path(),
                )
        except OSError as e:
            if node.key not in self._warned:
                self._warned.add(node.key)
                log.warning("cannot read the record of %s: %s", node.view_path(), e)
        except RecordError as e:
            if node.key not in self._warned:
                self._warned.add(node.key)
                log.warning("malformed record on %s (%s); showing the default owner", node.view_path(), e)
        node.record = rec
        return rec

    def _say_distrust(self, node: PolicyNode, st: os.stat_result) -> None:
        """Say once per inode that its record is not believed, and what it shows instead."""
        if node.key in self._distrusted:
            return
        self._distrusted.add(node.key)
        owned = trust.owned_by(st, self.trusted_uid)
        shown = "if it had none" if owned else "the overflow id, without setuid/setgid"
        log.warning(
            "not believing the record of %s: %s; it shows as %s",
            node.view_path(),
            trust.why_foreign(st, self.trusted_uid),
            shown,
        )

    def view(self, node: PolicyNode, st: os.stat_result) -> View:
        if not self.rule.trusts(st):
            self._say_distrust(node, st)
            return self.rule.foreign(st)
        return self.rule.shows(st, self._load_record(node, st))

    def backing_mode(self, mode: int, rdev: int) -> tuple[int, int]:
        return backing_type(mode) | backing_perm(mode), 0

    # ACLs -----------------------------------------------------------------
    def _default_acl(self, parent: PolicyNode) -> list[acl.Entry] | None:
        if parent.default_acl is False and not self.reread:
            return None
        try:
            raw = os.getxattr(proc_fd(parent.path_fd()), _ESC_ACL_DEFAULT)
        except OSError:
            parent.default_acl = False
            return None
        parent.default_acl = True
        try:
            return acl.parse(raw)
        except ValueError as e:
            log.warning("ignoring the malformed default ACL of %s: %s", parent.view_path(), e)
            return None

    def create_mode(self, parent: PolicyNode, mode: int, umask: int) -> int:
        dacl = self._default_acl(parent)
        if dacl is None:
            return mode & ~(umask & 0o777)
        return acl.create_masq(dacl, mode)[1]

    def _inherit(self, fd: int, st: os.stat_result, mode: int, parent: PolicyNode) -> None:
        if not can_hold_xattr(st.st_mode) or stat.S_ISLNK(mode):
            return  # FIFOs and sockets carry no ACLs in xattr mode; symlinks none anywhere
        dacl = self._default_acl(parent)
        if dacl is None:
            return
        access, _, not_equiv = acl.create_masq(dacl, mode)
        path = proc_fd(fd)
        if stat.S_ISDIR(mode):
            os.setxattr(path, _ESC_ACL_DEFAULT, acl.pack(dacl))
        if not_equiv:
            os.setxattr(path, _ESC_ACL_ACCESS, acl.pack(access))

    def stamped_xattrs(self, plan: CreatePlan) -> set[str] | None:
        if plan.parent.default_acl is not False:
            return None  # an inherited ACL may be added: let the first probe list them
        return self.store.xattr_names_written(plan.backing_mode)

    def stamp(self, node: PolicyNode, plan: CreatePlan, st: os.stat_result) -> None:
        fd = node.path_fd()
        if st.st_mode & _SPECIAL and not stat.S_ISLNK(st.st_mode):
            # A directory made in a backing directory that is setgid (a tree
            # not made through the mount) inherits the bit: not on our side.
            os.chmod(proc_fd(fd), st.st_mode & 0o777)
        self._inherit(fd, st, plan.mode, plan.parent)
        dev = stat.S_ISCHR(plan.mode) or stat.S_ISBLK(plan.mode)
        rec = Record(plan.uid, plan.gid, plan.mode, plan.rdev if dev else 0)
        self.store.write_record(fd, st, rec, legacy=False)  # a new inode has no legacy record
        node.record = rec

    def xattr_stored(self, node: PolicyNode, name: str, value: bytes) -> XattrEffect:
        super().xattr_stored(node, name, value)
        if name != acl.ACL_ACCESS:
            return XattrEffect()
        try:
            entries = acl.parse(value)
        except ValueError:
            return XattrEffect()
        bits, equiv = acl.equiv_mode(entries)
        st = os.fstat(node.path_fd())
        if not self.rule.trusts(st):
            return XattrEffect()  # another user's inode: no record of ours goes on it
        cur = self._current(node, st)
        changed = cur.mode & 0o777 != bits
        if changed:
            self._set_mode(node, st, cur, (cur.mode & ~0o777) | bits)
        if equiv:  # the mode says it all: keep no ACL, as the kernel does
            try:
                os.removexattr(proc_fd(node.path_fd()), _ESC_ACL_ACCESS)
            except OSError:
                pass
        return XattrEffect(changed, equiv)

    def _sync_acl_to_mode(self, node: PolicyNode, st: os.stat_result, mode: int) -> None:
        if not can_hold_xattr(st.st_mode) or self._lacks_xattr(node, _ESC_ACL_ACCESS):
            return
        path = proc_fd(node.path_fd())
        try:
            raw = os.getxattr(path, _ESC_ACL_ACCESS)
        except OSError:
            return
        try:
            os.setxattr(path, _ESC_ACL_ACCESS, acl.pack(acl.chmod_masq(acl.parse(raw), mode)))
        except ValueError as e:
            log.warning("leaving the malformed access ACL of %s alone: %s", node.view_path(), e)

    def _current(self, node: PolicyNode, st: os.stat_result) -> Record:
        """What the view shows now, with disk ids (what a new record starts from).

        Another user's inode gets no record from us (EPERM): it would not be
        believed, and its owner, not the daemon's user, controls it.
        """
        if not self.rule.trusts(st):
            raise pyfuse3.FUSEError(errno.EPERM)
        rec = self._load_record(node, st)
        if rec is not None:
            return rec
        try:
            return self.rule.unrecorded_record(st)
        except RecordError:
            raise eoverflow() from None

    def change(
        self, node: PolicyNode, st: os.stat_result | None, uid: int | None, gid: int | None, mode: int | None
    ) -> None:
        if st is None:
            st = os.fstat(node.path_fd())
        cur = self._current(node, st)
        # Unchanged ids stay as stored: an id the table cannot map back (shown
        # as the overflow id) survives a chmod.
        du, dg = self.disk_ids(uid, gid)
        du = cur.uid if uid is None else du
        dg = cur.gid if gid is None else dg
        new_mode = cur.mode if mode is None else (stat.S_IFMT(cur.mode) | (mode & 0o7777))
        self._set_mode(node, st, Record(du, dg, cur.mode, cur.rdev), new_mode)
        if mode is not None:
            self._sync_acl_to_mode(node, st, new_mode)

    def _set_mode(self, node: PolicyNode, st: os.stat_result, cur: Record, new_mode: int) -> None:
        """Write the record ``cur`` with ``new_mode``, and the backing permissions that go with it."""
        rec = Record(cur.uid, cur.gid, new_mode, cur.rdev)
        legacy = False if self._lacks_xattr(node, LEGACY_RECORD_NAME) else None
        self.store.apply_record(node.path_fd(), st, rec, legacy=legacy)
        node.record = rec
        if self.store.in_side_table(st):
            # A row in the side table is not the inode: give it the new ctime
            # that a chown or chmod must leave (POSIX), as an xattr write would.
            try:
                touch_ctime(node.path_fd())
            except OSError as e:
                log.debug("cannot update the ctime of inode %d: %s", node.id, e)

    wants_gone = True

    def gone(self, node: PolicyNode | None, st: os.stat_result) -> None:
        # Records in xattrs go with the inode; rows of the side table do not. A row left
        # behind (the side table failed: on a full disk, ENOSPC, said nothing about here as
        # everywhere) is a stale one, as of an inode removed outside the mount: keyed by
        # inode number and birth time, it attaches to no later inode where the backing
        # filesystem has birth times, and a create through the mount replaces it.
        try:
            self.store.forget_inode(st)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                log.warning("cannot drop the side record of inode %d: %s", st.st_ino, e)

    def side_xattr_store(self, node: PolicyNode) -> SideXattrStore | None:
        # The escaped names are user.* xattrs, which symlinks, FIFOs and sockets cannot carry.
        return None if can_hold_xattr(node.ftype) else self.store

    def xattr_to_backing(self, name: str) -> str | None:
        if self.is_synthetic_xattr(name):
            return None
        return escape_xattr_name(name)
