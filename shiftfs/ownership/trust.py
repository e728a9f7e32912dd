"""Whom xattr mode believes: the three rules that keep other users out (issue 14).

In xattr mode a record (``user.containers.override_stat``) says who owns a
file in the view and whether it is setuid. Anyone who can write that xattr,
or the side table, can therefore make a setuid-root file appear inside
somebody else's container. Three rules, each kept here and nowhere else:

1. **Backing modes** (:func:`backing_perm`, the one rule for the mount and
   the offline writers, applied with every record by
   :meth:`shiftfs.ownership.store.RecordStore.apply_record`;
   :func:`fix_backing_modes` for trees written before it). The view's mode lives in the
   record, so the backing inode needs only what the daemon's user needs:
   owner rw (rwx for directories) plus the view's read and search bits, and
   never group or other write, setuid, setgid or sticky. A view ``/tmp``
   (1777) is 0755 on disk. User xattrs need write access to the inode, so
   this alone keeps other users from writing records on our inodes.

2. **Whose records count** (:func:`owned_by` is the one test of "owned by
   the trusted user", :func:`record_counts` the whole rule; what such an inode
   shows is :meth:`shiftfs.ownership.view.ViewRule.foreign`). A
   record counts only on an inode owned by the *trusted user* and not
   writable by group or others on disk. The trusted user is the daemon's own
   (effective) uid: the unprivileged user for a user's mount, namespace root
   (= the invoking user) inside ``shiftfs run``/``exec``, and root for a root
   daemon with ``--xattr``. The offline tools trust the same way
   (:func:`offline_trusted_uid`): a user's ``export``/``ls``/``stat``/``import``
   believe that user's records only, wherever the tree lies; run by root they
   believe the owner of the tree's root directory (root exporting a user's
   tree reads that user's records) and say so in one line
   (:func:`offline_trust_note`). ``import`` writes only into its own user's
   tree; ``absorb`` believes the ``--owner`` it hands the tree to;
   ``materialize`` changes nothing while a record in the tree fails this
   rule for the tree root's owner. Any other inode shows as the overflow id (65534) with
   setuid/setgid stripped, its record ignored, unless a table (``--map``)
   maps its owner: then it shows through the table, as a kernel idmapped
   mount would, still without its record. The side table counts only if
   it is the trusted user's alone (:func:`check_side_table`).

3. **SOURCE must be private** (:func:`source_problem`). If another user can
   write into SOURCE or replace it or a directory above it, they can plant
   inodes and side tables whose owner we would believe. Mounting (and
   ``run``/``exec``) refuses such a SOURCE unless told
   ``allow_shared_source``. A sticky world-writable directory owned by root
   or by us (``/tmp``, ``/var/tmp``) is fine above SOURCE: others can add
   siblings there but cannot rename or remove an entry they do not own, and
   the entry below it must then be ours (or root's) anyway. What
   ``allow_shared_source`` accepts is served as it is: the mount never changes
   the mode of that SOURCE directory (:func:`fix_backing_modes` leaves it
   alone), and while others can write it its own record is not believed.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Protocol

from ..sys.files import O_PATH_NOFOLLOW, proc_fd
from ..sys.mounts import in_init_userns
from ..sys.walk import walk
from .idmap import overflow_ids
from .names import SIDE_TABLE, STORE_DIR
from .record import Record, RecordError

__all__ = [
    "OTHERS_WRITE",
    "backing_perm",
    "owned_by",
    "needs_fix",
    "fix_backing_modes",
    "record_counts",
    "check_side_table",
    "StoreTrustError",
    "why_foreign",
    "without_setid_if_open",
    "offline_trusted_uid",
    "offline_trust_note",
    "source_problem",
]

#: group or other write
OTHERS_WRITE = 0o022
_SETID = stat.S_ISUID | stat.S_ISGID
_SPECIAL = _SETID | stat.S_ISVTX


# -- rule 1: backing modes ----------------------------------------------------------------


def backing_perm(view_mode: int) -> int:
    """Permission bits for the backing file of an inode with this view mode.

    The view's read and search bits, plus owner read and write (and search
    for directories) so the owning user can always manage the file. Never
    group or other write: user xattrs need write access, so others could
    write records; a view /tmp (1777) is 0755 on disk. Setuid, setgid and
    sticky live only in the record.
    """
    perm = view_mode & 0o777 & ~OTHERS_WRITE
    if stat.S_ISDIR(view_mode):
        return perm | 0o700
    if stat.S_ISREG(view_mode) or stat.S_ISCHR(view_mode) or stat.S_ISBLK(view_mode):
        return perm | 0o600
    return perm


def needs_fix(st: os.stat_result) -> bool:
    """Whether a backing inode's mode breaks rule 1 (symlinks have no mode of their own)."""
    return not stat.S_ISLNK(st.st_mode) and bool(st.st_mode & (OTHERS_WRITE | _SPECIAL))


# -- rule 2: whose records count --------------------------------------------------------


def owned_by(st: os.stat_result, trusted_uid: int) -> bool:
    """Whether the backing inode belongs to the trusted user (the first half of :func:`record_counts`)."""
    return st.st_uid == trusted_uid


def record_counts(st: os.stat_result, trusted_uid: int) -> bool:
    """Whether a record on (or for) this backing inode may be believed.

    Owned by the trusted user, and, for the types that carry their record as
    a user xattr (regular files, directories), not writable by anyone else.
    """
    if not owned_by(st, trusted_uid):
        return False
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        return not st.st_mode & OTHERS_WRITE
    return True


def why_foreign(st: os.stat_result, trusted_uid: int) -> str:
    """The log line's reason for :func:`record_counts` saying no."""
    if not owned_by(st, trusted_uid):
        return f"owned by uid {st.st_uid}, not by uid {trusted_uid}"
    return f"writable by others on disk (mode {stat.S_IMODE(st.st_mode):04o}; 'chmod go-w' it)"


def without_setid_if_open(rec: Record, st: os.stat_result) -> Record:
    """A record of a regular file others can write on disk, without setuid/setgid: anyone
    could have written it, and those bits are what a planted record is after."""
    if stat.S_ISREG(st.st_mode) and st.st_mode & OTHERS_WRITE and rec.mode & _SETID:
        return Record(rec.uid, rec.gid, rec.mode & ~_SETID, rec.rdev)
    return rec


def offline_trusted_uid(tree_root: os.stat_result, euid: int | None = None) -> int:
    """Whose records an offline tool believes (rule 2 without a mount).

    Like a daemon, a user's tool believes its own user: pointed at another
    user's directory it believes nothing there, so a record planted in a
    directory somebody names cannot become a setuid-root entry in their
    archive. Root believes the owner of the tree's root directory, so that
    root exporting a user's tree reads that user's records
    (:func:`offline_trust_note` says so).
    """
    euid = os.geteuid() if euid is None else euid
    return tree_root.st_uid if euid == 0 else euid


def offline_trust_note(tree: str, tree_root: os.stat_result, euid: int | None = None) -> str | None:
    """One line saying whose records count when that is not the running user, else None."""
    euid = os.geteuid() if euid is None else euid
    owner = tree_root.st_uid
    if owner == euid:
        return None
    ou = overflow_ids()[0]
    if euid == 0:
        return (
            f"believing the records of uid {owner} (the owner of {tree}, not root) on the inodes "
            f"uid {owner} owns; any other inode shows as {ou} without setuid/setgid"
        )
    return (
        f"{tree} is owned by uid {owner}, not by you (uid {euid}): only records on your own inodes "
        f"count, the rest shows as {ou} without setuid/setgid; run it as uid {owner} (or root) to see theirs"
    )


class StoreTrustError(OSError):
    """The side table is not the trusted user's alone; the message names the file and the fix."""

    def __init__(self, message: str):
        super().__init__(errno.EPERM, message)

    def __str__(self) -> str:
        assert self.strerror is not None  # set by __init__ (OSError leaves it None only without one)
        return self.strerror


def check_side_table(root_fd: int, owner_uid: int, fix: bool) -> list[str]:
    """Refuse a side table someone else could have written (rule 2 for the side table).

    ``.shiftfs`` and ``records.db`` with its ``-wal``, ``-shm`` and
    ``-journal`` (SQLite opens those by name and replays a WAL it finds)
    must be owned by ``owner_uid``, the user whose records count. Others
    must not be able to write them: with ``fix`` (the mount) that is
    repaired with a chmod and said in the returned notes, otherwise it is
    refused too. Raises :class:`StoreTrustError` with one line naming the
    file and the fix.
    """
    notes: list[str] = []
    try:
        dfd = os.open(STORE_DIR, O_PATH_NOFOLLOW, dir_fd=root_fd)
    except FileNotFoundError:
        return notes
    try:
        # (name shown, directory descriptor, name in it or None for the directory itself)
        entries: list[tuple[str, int, str | None]] = [(STORE_DIR, dfd, None)]
        for suffix in ("", "-wal", "-shm", "-journal"):
            entries.append((f"{STORE_DIR}/{SIDE_TABLE}{suffix}", dfd, SIDE_TABLE + suffix))
        for shown, dirfd, name in entries:
            try:
                st = os.fstat(dirfd) if name is None else os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            want = stat.S_ISDIR if name is None else stat.S_ISREG
            if not want(st.st_mode):
                raise StoreTrustError(
                    f"{shown} is not a {'directory' if name is None else 'regular file'}; "
                    f"someone else may have planted it: inspect it, then remove it"
                )
            if not owned_by(st, owner_uid):
                raise StoreTrustError(
                    f"{shown} is owned by uid {st.st_uid}, not by uid {owner_uid} whose records count: "
                    f"someone else could forge records there; inspect it, then remove it (or "
                    f"'chown {owner_uid}' it if it is yours)"
                )
            if st.st_mode & 0o022:
                if not fix:
                    raise StoreTrustError(
                        f"{shown} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                        f"run 'chmod go-w' on it (a mount does this itself)"
                    )
                perm = 0o700 if name is None else 0o600
                if name is None:
                    os.chmod(proc_fd(dfd), perm)
                else:
                    fd = os.open(name, O_PATH_NOFOLLOW, dir_fd=dfd)
                    try:
                        os.chmod(proc_fd(fd), perm)
                    finally:
                        os.close(fd)
                notes.append(f"{shown} was {stat.S_IMODE(st.st_mode):04o}, now {perm:04o}")
    finally:
        os.close(dfd)
    return notes


# -- rule 3: SOURCE must be private ---------------------------------------------------------


def _components(path: str) -> list[str]:
    out = []
    p = path
    while True:
        out.append(p)
        if p == "/":
            break
        p = os.path.dirname(p)
    return out[::-1]


def _private_group(gid: int, uid: int) -> bool:
    """Whether ``gid`` is ``uid``'s own group and nobody else's (Debian's user private groups,
    where the usual umask 002 makes new directories group-writable)."""
    import grp
    import pwd

    try:
        g = grp.getgrgid(gid)
        me = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    if any(m != me for m in g.gr_mem):
        return False
    return all(p.pw_uid == uid for p in pwd.getpwall() if p.pw_gid == gid)


def _others_write(st: os.stat_result, uid: int) -> bool:
    if st.st_mode & 0o002:
        return True
    return bool(st.st_mode & 0o020) and not (uid != 0 and _private_group(st.st_gid, uid))


def source_problem(source: str, uid: int, flag: str = "-o allow_shared_source") -> str | None:
    """Why another user could write into ``source`` (one line with the fix), or None.

    Checked along both the path as given and its real path, so that a
    symlink on the way counts as well as what it points to.
    """
    trusted = {0, uid}
    # In a user namespace the host's own directories (/, /home …) read as the overflow id:
    # their owner is outside the namespace, where root normally owns them, and nobody in
    # here could have made them. Above SOURCE such a directory is taken as root's (the
    # write bits are still checked); SOURCE itself must still be yours.
    above = trusted | ({overflow_ids()[0]} if not in_init_userns() else set())
    paths = dict.fromkeys((os.path.abspath(source), os.path.realpath(source)))
    for path in paths:
        comps = _components(path)
        for i, comp in enumerate(comps):
            try:
                st = os.lstat(comp)
            except OSError as e:
                return f"cannot check {comp} ({e.strerror}); fix the path of SOURCE"
            last = i == len(comps) - 1
            if stat.S_ISLNK(st.st_mode):
                # The link itself can only be replaced through its directory (checked
                # just before); where it points is checked as the real path.
                if st.st_uid not in above:
                    return (
                        f"{comp} is a symlink owned by uid {st.st_uid}, who can point it elsewhere; "
                        f"give SOURCE by a path without it, or pass {flag}"
                    )
                continue
            if st.st_uid not in (trusted if last else above):
                what = "SOURCE" if last else "a directory above SOURCE"
                return (
                    f"{comp} ({what}) is owned by uid {st.st_uid}, who could replace what is below it; "
                    f"move SOURCE somewhere only you (uid {uid}) or root control, or pass {flag}"
                )
            if last:
                if _others_write(st, uid):
                    return (
                        f"SOURCE {comp} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}), who "
                        f"could plant records in it; run 'chmod 700 {comp}', or pass {flag}"
                    )
            elif _others_write(st, uid) and not st.st_mode & stat.S_ISVTX:
                return (
                    f"{comp} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}), who could "
                    f"replace SOURCE below it; run 'chmod go-w {comp}', or pass {flag}"
                )
    return None


# -- trees written before rule 1 -------------------------------------------------------------


class _Records(Protocol):
    """What :func:`fix_backing_modes` needs of the record store (which imports this module)."""

    root_fd: int

    def read_record(self, fd: int, st: os.stat_result) -> Record | None: ...

    def apply_record(self, fd: int, st: os.stat_result, rec: Record, legacy: bool | None = None) -> None: ...


def fix_backing_modes(
    store: _Records, trusted_uid: int, unrecorded: Callable[[os.stat_result], Record], keep_root: bool = False
) -> tuple[int, list[str]]:
    """Apply rule 1 to every backing inode of the trusted user below the store's root.

    Older versions stored a view ``/tmp`` (1777) as 0777 and a 0666 view file
    as 0666 on disk. Each such inode keeps its view: its record if it has
    one, else ``unrecorded(st)`` (the record of what it shows now) is written
    first; then it gets :func:`backing_perm`. A record that makes a file that
    others could write setuid or setgid may have been planted: those bits are
    dropped from it (and said). Runs once per mount, before serving, through
    descriptors only (no symlink is followed, other filesystems are skipped).
    ``keep_root`` (``allow_shared_source``) leaves the root itself as it is:
    a SOURCE we were told to share stays shared (its record is then not
    believed while others can write it). Returns the number of inodes fixed
    and notes for the log.
    """
    fixed = 0
    notes: list[str] = []

    def fix(fd: int, st: os.stat_result, rel: str) -> None:
        nonlocal fixed
        try:
            rec = store.read_record(fd, st)
        except RecordError:
            rec = None  # shown as the default owner; its mode below is the disk's
        if rec is None:
            rec = unrecorded(st)
        elif without_setid_if_open(rec, st) != rec:
            rec = without_setid_if_open(rec, st)
            notes.append(f"dropped setuid/setgid from the record of {rel}: others could write it on disk")
        store.apply_record(fd, st, rec)
        fixed += 1
        if fixed == 1:
            notes.insert(0, f"first: {rel or '.'} was {stat.S_IMODE(st.st_mode):04o}")

    def skip_store(dirfd: int, rel: str, name: str) -> str | None:
        return None if not rel and name == STORE_DIR else name  # checked on its own (check_side_table)

    def on_error(rel: str, exc: OSError) -> None:
        # Gone meanwhile, replaced meanwhile, another user's directory we cannot
        # enter, another filesystem mounted here: none of it is ours to fix.
        if not isinstance(exc, (FileNotFoundError, PermissionError)) and exc.errno not in (errno.ESTALE, errno.EXDEV):
            raise exc

    # The one walk (shiftfs.sys.walk): no recursion, bounded descriptors, no symlink followed.
    for e in walk(store.root_fd, select=skip_store, on_error=on_error):
        if not owned_by(e.st, trusted_uid) or not needs_fix(e.st) or (keep_root and not e.rel):
            continue
        try:
            fix(e.fd, e.st, e.rel)
        except (FileNotFoundError, PermissionError):
            continue
    return fixed, notes
