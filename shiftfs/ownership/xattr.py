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

from ..fs.inodes import UNLOADED, Inode
from ..sys.files import proc_fd, touch_ctime
from . import acl, trust
from .idmap import IdMap
from .names import escape_xattr_name, unescape_xattr_name
from .policy import CreatePlan, OwnershipPolicy, XattrEffect
from .record import LEGACY_RECORD_NAME, Record, decode, encode
from .store import RecordStore, SideTableError, can_hold_xattr
from .view import backing_perm, backing_type, backing_view, check_fits, foreign_view, record_view

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
    ):
        super().__init__(uids, gids)
        self.store = store
        self.default_owner = default_owner
        self._warned: set[tuple[int, int]] = set()
        self._store_errors: set[str] = set()
        #: whose records count (shiftfs.ownership.trust): the daemon's own user, which is
        #: root for a root daemon and namespace root (the invoking user) in run/exec
        self.trusted_uid = os.geteuid()
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
            raw = self.store.read(fd, st)
            rec = None
            if raw is not None:
                try:
                    rec = decode(raw, stat.S_IFDIR)
                except ValueError:
                    rec = None
            if rec is None or rec.type != stat.S_IFDIR:
                if self.default_owner is not None:
                    du, dg = self.disk_ids(*self.default_owner)
                else:
                    du, dg = st.st_uid, st.st_gid
                rec = Record(du, dg, st.st_mode)
            self.store.write(fd, st, encode(rec))
        except (OSError, ValueError, pyfuse3.FUSEError) as e:
            log.warning("cannot give the root a record (fuse-overlayfs will not list this tree): %s", e)

    # records ----------------------------------------------------------------
    def _load_record(self, node: Inode, st: os.stat_result) -> Record | None:
        """The inode's record (cached on the inode), or None if it has no usable one."""
        cached = node.record
        if cached is not UNLOADED and not self.reread:
            return cached
        rec = None
        try:
            raw = self.store.read(node.fd, st)
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
            raw = None
        except OSError as e:
            if node.key not in self._warned:
                self._warned.add(node.key)
                log.warning("cannot read the record of %s: %s", node.view_path(), e)
            raw = None
        if raw is not None and not self._counts(node, st):
            raw = None  # ours, but others can write it on disk: shown as if it had no record
        if raw is not None:
            try:
                rec = decode(raw, stat.S_IFMT(st.st_mode))
                check_fits(rec, st)
            except ValueError as e:
                if node.key not in self._warned:
                    self._warned.add(node.key)
                    log.warning("malformed record %r on %s (%s); showing the default owner", raw, node.view_path(), e)
                rec = None
        node.record = rec
        return rec

    def _counts(self, node: Inode, st: os.stat_result) -> bool:
        """Whether a record of this inode may be believed; says so once per inode when not."""
        if trust.record_counts(st, self.trusted_uid):
            return True
        if node.key not in self._distrusted:
            self._distrusted.add(node.key)
            shown = "the overflow id, without setuid/setgid" if st.st_uid != self.trusted_uid else "if it had none"
            log.warning(
                "not believing the record of %s: %s; it shows as %s",
                node.view_path(),
                trust.why_foreign(st, self.trusted_uid),
                shown,
            )
        return False

    def view(self, node, st):
        if st.st_uid != self.trusted_uid:
            self._counts(node, st)
            return foreign_view(st, self.uids, self.gids, self.trusted_uid)
        rec = self._load_record(node, st)
        if rec is None:
            return backing_view(st, self.uids, self.gids, self.default_owner)
        return record_view(rec, st, self.uids, self.gids)

    def backing_mode(self, mode, rdev):
        return backing_type(mode) | backing_perm(mode), 0

    # ACLs -----------------------------------------------------------------
    def _default_acl(self, parent: Inode) -> list[acl.Entry] | None:
        if parent.default_acl is False and not self.reread:
            return None
        try:
            raw = os.getxattr(proc_fd(parent.fd), _ESC_ACL_DEFAULT)
        except OSError:
            parent.default_acl = False
            return None
        parent.default_acl = True
        try:
            return acl.parse(raw)
        except ValueError as e:
            log.warning("ignoring the malformed default ACL of %s: %s", parent.view_path(), e)
            return None

    def create_mode(self, parent, mode, umask):
        dacl = self._default_acl(parent)
        if dacl is None:
            return mode & ~(umask & 0o777)
        return acl.create_masq(dacl, mode)[1]

    def _inherit(self, fd: int, st: os.stat_result, mode: int, parent: Inode) -> None:
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

    def stamped_xattrs(self, plan):
        if plan.parent.default_acl is not False:
            return None  # an inherited ACL may be added: let the first probe list them
        return self.store.xattr_names_written(plan.backing_mode)

    def stamp(self, node: Inode, plan: CreatePlan, st: os.stat_result) -> None:
        fd = node.fd
        if st.st_mode & _SPECIAL and not stat.S_ISLNK(st.st_mode):
            # A directory made in a backing directory that is setgid (a tree
            # not made through the mount) inherits the bit: not on our side.
            os.chmod(proc_fd(fd), st.st_mode & 0o777)
        self._inherit(fd, st, plan.mode, plan.parent)
        dev = stat.S_ISCHR(plan.mode) or stat.S_ISBLK(plan.mode)
        rec = Record(plan.uid, plan.gid, plan.mode, plan.rdev if dev else 0)
        self.store.write(fd, st, encode(rec), legacy=False)  # a new inode has no legacy record
        node.record = rec

    def xattr_stored(self, node, name, value):
        super().xattr_stored(node, name, value)
        if name != acl.ACL_ACCESS:
            return XattrEffect()
        try:
            entries = acl.parse(value)
        except ValueError:
            return XattrEffect()
        bits, equiv = acl.equiv_mode(entries)
        st = os.fstat(node.fd)
        if st.st_uid != self.trusted_uid:
            return XattrEffect()  # another user's inode: no record of ours goes on it
        cur = self._current(node, st)
        changed = cur.mode & 0o777 != bits
        if changed:
            self._set_mode(node, st, cur, (cur.mode & ~0o777) | bits)
        if equiv:  # the mode says it all: keep no ACL, as the kernel does
            try:
                os.removexattr(proc_fd(node.fd), _ESC_ACL_ACCESS)
            except OSError:
                pass
        return XattrEffect(changed, equiv)

    def _sync_acl_to_mode(self, node: Inode, st: os.stat_result, mode: int) -> None:
        if not can_hold_xattr(st.st_mode) or self._lacks_xattr(node, _ESC_ACL_ACCESS):
            return
        path = proc_fd(node.fd)
        try:
            raw = os.getxattr(path, _ESC_ACL_ACCESS)
        except OSError:
            return
        try:
            os.setxattr(path, _ESC_ACL_ACCESS, acl.pack(acl.chmod_masq(acl.parse(raw), mode)))
        except ValueError as e:
            log.warning("leaving the malformed access ACL of %s alone: %s", node.view_path(), e)

    def _current(self, node: Inode, st: os.stat_result) -> Record:
        """What the view shows now, with disk ids (what a new record starts from).

        Another user's inode gets no record from us (EPERM): it would not be
        believed, and its owner, not the daemon's user, controls it.
        """
        if st.st_uid != self.trusted_uid:
            raise pyfuse3.FUSEError(errno.EPERM)
        rec = self._load_record(node, st)
        if rec is not None:
            return rec
        if self.default_owner is not None:
            du, dg = self.disk_ids(*self.default_owner)
        else:
            du, dg = st.st_uid, st.st_gid
        dev = stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
        return Record(du, dg, st.st_mode, st.st_rdev if dev else 0)

    def change(self, node, st, uid, gid, mode):
        if st is None:
            st = os.fstat(node.fd)
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

    def _set_mode(self, node: Inode, st: os.stat_result, cur: Record, new_mode: int) -> None:
        """Write the record ``cur`` with ``new_mode``, and the backing permissions that go with it."""
        rec = Record(cur.uid, cur.gid, new_mode, cur.rdev)
        legacy = False if self._lacks_xattr(node, LEGACY_RECORD_NAME) else None
        self.store.write(node.fd, st, encode(rec), legacy=legacy)
        node.record = rec
        if self.store.in_side_table(st):
            # A row in the side table is not the inode: give it the new ctime
            # that a chown or chmod must leave (POSIX), as an xattr write would.
            try:
                touch_ctime(node.fd)
            except OSError as e:
                log.debug("cannot update the ctime of inode %d: %s", node.id, e)
        if not stat.S_ISLNK(st.st_mode):
            want = backing_perm(new_mode if not stat.S_ISREG(st.st_mode) else (stat.S_IFREG | new_mode & 0o777))
            if st.st_mode & 0o7777 != want:
                try:
                    os.chmod(proc_fd(node.fd), want)
                except PermissionError:
                    pass  # not ours on the backing fs; the record is what counts

    wants_gone = True

    def gone(self, node, st):
        # Records in xattrs go with the inode; rows of the side table do not.
        try:
            self.store.forget_inode(st)
        except OSError as e:
            log.warning("cannot drop the side record of inode %d: %s", st.st_ino, e)

    def side_xattrs(self, node):
        # The escaped names are user.* xattrs, which symlinks, FIFOs and sockets cannot carry.
        return None if can_hold_xattr(node.ftype) else self.store

    def xattr_to_backing(self, name):
        return escape_xattr_name(name)

    def xattr_to_view(self, backing):
        return unescape_xattr_name(backing)
