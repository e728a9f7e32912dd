"""``shiftfs absorb`` and ``shiftfs materialize``: real ownership ↔ records, as root.

Both are ordered so that an interrupted run never leaves a file with neither
its real ownership nor its record, and a rerun finishes the job (see
:func:`absorb` and :func:`materialize`). Replacements are built under the
mount's temporary names (hidden by a mount and skipped by the walk), and
a rerun removes those an interrupted run left.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
from collections.abc import Callable

from ..errors import TreeError
from ..ownership import acl, trust
from ..ownership.idmap import IdMap, parse_map_args
from ..ownership.names import STORE_DIR, escape_xattr_name, is_privileged_xattr, temp_name, unescape_xattr_name
from ..ownership.record import RECORD_NAME, Record, RecordError, type_fits
from ..ownership.view import capability_for_disk, get_xattr, list_xattrs, map_capability
from ..sys.files import O_PATH_NOFOLLOW, fchown_fd, proc_fd, utimens_fd
from ..sys.walk import remove_tree
from .walk import Progress, open_beneath, open_root, open_store, walk

__all__ = ["absorb", "materialize"]


def _crash_point(what: str) -> None:
    """Test hook: ``SHIFTFS_TEST_KILL=absorb:N`` kills us at the N-th step."""
    spec = os.environ.get("SHIFTFS_TEST_KILL")
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != what:
        return
    _crash_counts[what] = _crash_counts.get(what, 0) + 1
    if _crash_counts[what] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_crash_counts: dict[str, int] = {}


#: Where a directory's original times wait while we edit it (hidden by the
#: name escaping, like every ``user.containers.*`` name but the escapes).
_DIRTIMES_XATTR = "user.containers.shiftfs_dirtimes"


class _DirTimes:
    """Directory times as they were before we edited the directory.

    Replacing a device by a placeholder (or back) and creating the side table
    change directory mtimes; the tree should not show our work. Before an
    edit the original times go into an xattr on the directory, and after it
    they are put back and the xattr removed, so a run killed in between
    leaves the times for the rerun to restore.
    """

    def __init__(self):
        self._saved: dict[tuple[int, int], tuple[int, int]] = {}

    def note(self, fd: int, st: os.stat_result) -> None:
        """Remember a directory's times (or those an interrupted run saved)."""
        if not stat.S_ISDIR(st.st_mode):
            return
        pending = get_xattr(fd, _DIRTIMES_XATTR)
        times = (st.st_atime_ns, st.st_mtime_ns)
        if pending is not None:
            try:
                a, m = (int(x) for x in pending.split())
                times = (a, m)
            except ValueError:
                pass
        self._saved.setdefault((st.st_dev, st.st_ino), times)
        if pending is not None:
            self.end(fd)

    def _times(self, dirfd: int) -> tuple[tuple[int, int], tuple[int, int]]:
        st = os.fstat(dirfd)
        key = (st.st_dev, st.st_ino)
        return key, self._saved.setdefault(key, (st.st_atime_ns, st.st_mtime_ns))

    def begin(self, dirfd: int) -> None:
        _, (a, m) = self._times(dirfd)
        os.setxattr(proc_fd(dirfd), _DIRTIMES_XATTR, f"{a} {m}".encode())

    def end(self, dirfd: int) -> None:
        _, times = self._times(dirfd)
        utimens_fd(dirfd, *times)
        try:
            os.removexattr(proc_fd(dirfd), _DIRTIMES_XATTR)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise


def _remove_leftover(dirfd: int, name: str, times: _DirTimes) -> None:
    """Drop a temporary file an interrupted run (or a killed daemon) left."""
    times.begin(dirfd)
    try:
        os.unlink(name, dir_fd=dirfd)
    except FileNotFoundError:
        pass
    times.end(dirfd)


def _tmp(st) -> str:
    """The temporary name a replacement of inode ``st`` is built under (the mount hides it)."""
    return os.fsdecode(temp_name(str(st.st_ino)))


def absorb(
    root: str, maps: list[str] | None, owner: tuple[int, int], progress=None, legacy_xattr: bool = False
) -> list[str]:
    """Turn real ownership into records; backing files go to ``owner``.

    Per inode, in this order, so that an interruption at any point leaves
    either the real ownership or a record (and a rerun completes the job):

    1. copy privileged xattrs (capabilities, ACLs) to their escaped names,
       unless an earlier run already did (its copy predates any chmod);
    2. write the record, unless the inode already has one;
    3. remove the privileged originals;
    4. chown to ``owner``, chmod to the backing mode (no setuid/setgid).

    A device node is replaced by a placeholder file that already carries its
    record and owner, by an atomic rename over the node.
    """
    umap, gmap = parse_map_args(maps or [])
    root_fd = open_root(root)
    store = open_store(root_fd, True, legacy_xattr, check=False, trusted_uid=owner[0])
    progress = progress or Progress("absorb", False)
    placeholders: dict[tuple[int, int], str] = {}
    times = _DirTimes()

    def to_view(e, st) -> tuple[int, int]:
        vu, vg = umap.to_view(st.st_uid), gmap.to_view(st.st_gid)
        if not umap.identity and umap.to_disk(vu) != st.st_uid:
            raise TreeError(f"{e.display}: uid {st.st_uid} is outside --map; extend the map")
        if not gmap.identity and gmap.to_disk(vg) != st.st_gid:
            raise TreeError(f"{e.display}: gid {st.st_gid} is outside --map; extend the map")
        return vu, vg

    def absorb_one(e, key, seen: bool) -> None:
        st = e.st
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            _absorb_device(e, store, to_view(e, st), owner, placeholders, root_fd, times)
        elif not seen:
            _absorb_inode(e, store, umap, gmap, to_view, owner)

    try:
        errors = _each_inode(root_fd, times, progress, absorb_one)
    finally:
        store.close()
        try:
            _chown_tree_at(root_fd, STORE_DIR, owner)
            times.end(root_fd)
        finally:
            os.close(root_fd)
    return errors


def _each_inode(root_fd: int, times: _DirTimes, progress, handle) -> list[str]:
    """The one walk of absorb and materialize: keeps directory times, removes
    what an interrupted run left, calls ``handle(entry, key, seen)`` for each
    entry (``seen``: an earlier hard link of the same inode was handled) and
    turns each entry's failure into one error line, so one bad file never
    stops the rest."""
    errors: list[str] = []
    done: set[tuple[int, int]] = set()

    def on_error(rel, exc):
        errors.append(f"{rel}: {exc.strerror or exc}")

    for e in walk(root_fd, on_error, lambda dirfd, name: _remove_leftover(dirfd, name, times)):
        times.note(e.fd, e.st)
        if not e.rel:
            times.begin(root_fd)  # the side table may appear in (or leave) the root
        key = (e.st.st_dev, e.st.st_ino)
        try:
            handle(e, key, key in done)
        except TreeError as exc:
            errors.append(str(exc))
        except (OSError, ValueError) as exc:
            errors.append(f"{e.display}: {getattr(exc, 'strerror', None) or exc}")
        done.add(key)
        progress.advance(1)
    return errors


def _chown_tree_at(dirfd: int, name: str, owner: tuple[int, int]) -> None:
    """Give the side table (created by root) to the tree's owner."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    except FileNotFoundError:
        return
    try:
        os.fchown(fd, *owner)
        for child in os.listdir(fd):
            os.chown(child, *owner, dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)


def _strict_view(idmap: IdMap) -> Callable[[int], int | None]:
    """``to_view`` that gives None (not the overflow id) for unmapped ids."""

    def to_view(disk: int) -> int | None:
        view = idmap.to_view(disk)
        return view if idmap.identity or idmap.to_disk(view) == disk else None

    return to_view


def _absorb_inode(e, store, umap, gmap, to_view, owner) -> None:
    fd, st = e.fd, e.st
    path = proc_fd(fd)
    privileged: list[str] = []
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        present = set(list_xattrs(fd))
        for name in sorted(present):
            if not is_privileged_xattr(name) or name == "security.selinux":
                continue
            privileged.append(name)
            escaped = escape_xattr_name(name)
            if escaped in present:
                continue  # copied by an earlier, interrupted run: keep that copy
            value = get_xattr(fd, name)
            if value is None:
                continue
            if name.startswith("system.posix_acl_"):
                value = acl.map_ids(value, _strict_view(umap), _strict_view(gmap))
            elif name == "security.capability":
                value = map_capability(value, umap.to_view)
            os.setxattr(path, escaped, value)
            _crash_point("absorb")
    # A record already there counts only on an inode of ``owner`` (an earlier, interrupted
    # run chowns last, so its records are on inodes it gave to ``owner`` or they say what
    # the real ownership says anyway); on any other inode the real owner is the truth, and
    # a record another user planted there is replaced (shiftfs.ownership.trust, rule 2).
    # On one of ``owner``'s that others can write on disk (a world-writable directory an
    # interrupted run chowned before its chmod) it keeps no setuid/setgid, as in a mount.
    rec = store.read_record(fd, st) if trust.owned_by(st, owner[0]) else None
    if rec is not None and not trust.record_counts(st, owner[0]):
        if trust.without_setid_if_open(rec, st) != rec:
            rec = trust.without_setid_if_open(rec, st)
            store.write_record(fd, st, rec)
    if rec is None:
        vu, vg = to_view(e, st)
        rec = Record(vu, vg, st.st_mode, 0)
        try:
            there = store.read_record(fd, st)
        except RecordError:
            there = None  # another user's malformed record: replaced
        if there != rec:
            store.write_record(fd, st, rec)
            _crash_point("absorb")
    for name in privileged:
        try:
            os.removexattr(path, name)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
    if (st.st_uid, st.st_gid) != owner:
        fchown_fd(fd, *owner)
        _crash_point("absorb")
    # the backing mode last: after the chown, which would clear setuid/setgid anyway
    store.set_backing_mode(fd, st, rec)


def _absorb_device(e, store, view_ids, owner, placeholders, root_fd, times: _DirTimes) -> None:
    st = e.st
    key = (st.st_dev, st.st_ino)
    tmp = _tmp(st)
    first = placeholders.get(key)
    if first is not None:  # another name of a device already turned into a placeholder
        _link_over(e, first, root_fd, times)
        return
    rec = Record(view_ids[0], view_ids[1], st.st_mode, st.st_rdev)
    times.begin(e.dirfd)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=e.dirfd)
    try:
        store.apply_record(fd, os.fstat(fd), rec)
        os.fchown(fd, *owner)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=e.dirfd)
        raise
    os.close(fd)
    _crash_point("absorb")
    os.rename(tmp, e.name, src_dir_fd=e.dirfd, dst_dir_fd=e.dirfd)
    times.end(e.dirfd)
    placeholders[key] = e.rel
    _crash_point("absorb")


def materialize(root: str, maps: list[str] | None, progress=None) -> list[str]:
    """Turn records back into real ownership (the reverse of :func:`absorb`).

    Per inode: chown to the record's disk ids, restore escaped privileged
    xattrs under their real names (after the chown, which would drop a
    capability), chmod to the record's mode (setuid included), drop the
    escaped copies and only then remove the record. A rerun redoes every
    step of an inode whose record is still there. A placeholder becomes a
    real device node by an atomic rename over it. After a run without
    errors no record is left and the side table directory is removed.
    """
    umap, gmap = parse_map_args(maps or [])
    root_fd = open_root(root)
    store = open_store(root_fd, False, check=False)
    try:
        _check_records_believed(root_fd, store, umap, gmap)
    except BaseException:
        store.close()
        os.close(root_fd)
        raise
    progress = progress or Progress("materialize", False)
    devices: dict[tuple[int, int], str] = {}
    times = _DirTimes()

    def materialize_one(e, key, seen: bool) -> None:
        if key in devices:
            _link_over(e, devices[key], root_fd, times)
        elif not seen:
            if _materialize_inode(e, store, umap, gmap, times) is not None:
                devices[key] = e.rel

    errors: list[str] = []
    try:
        errors = _each_inode(root_fd, times, progress, materialize_one)
    finally:
        store.close()
    try:
        if not errors:
            try:
                os.stat(STORE_DIR, dir_fd=root_fd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                remove_tree(root_fd, STORE_DIR)
            try:
                os.removexattr(proc_fd(root_fd), _TRUSTED_XATTR)
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                    raise
        times.end(root_fd)
    finally:
        os.close(root_fd)
    return errors


#: On the tree root while a materialize is under way: the uid whose records it applies
#: (hidden through a mount like every ``user.containers.*`` name but the escapes).
_TRUSTED_XATTR = "user.containers.shiftfs_materialize"


def _check_records_believed(root_fd: int, store, umap: IdMap, gmap: IdMap) -> None:
    """Before materialize changes anything: every record in the tree must be one a mount
    believes (shiftfs.ownership.trust, rule 2), or another user's planted record would
    become a real setuid-root file. Raises TreeError (one line); nothing is changed then.

    The trusted user is the owner of the tree's root. The first run leaves it on the root
    (``_TRUSTED_XATTR``) before its first change, since the root is the first inode it
    chowns; a rerun takes it from there and lets pass the one inode an interruption can
    leave half done: chowned to its record's ids, its record not yet removed.
    """
    top = os.open(".", O_PATH_NOFOLLOW | os.O_DIRECTORY, dir_fd=root_fd)
    try:
        rst = os.fstat(top)
        marker = get_xattr(top, _TRUSTED_XATTR)
        # Only root (us) or the root's owner could have written it, unless others can write the root.
        if marker is not None and marker.isdigit() and not rst.st_mode & trust.OTHERS_WRITE:
            owner, rerun = int(marker), True
        else:
            owner, rerun = rst.st_uid, False
    finally:
        os.close(top)
    bad: list[str] = []
    half_done: set[tuple[int, int]] = set()  # (one inode, under each of its names)
    for e in walk(root_fd, lambda rel, exc: None):
        if trust.record_counts(e.st, owner):
            continue
        if store.read(e.fd, e.st) is None:
            continue
        key = (e.st.st_dev, e.st.st_ino)
        if rerun and (not half_done or key in half_done):
            try:
                rec = store.read_record(e.fd, e.st)
            except RecordError:
                rec = None
            if rec is not None and (umap.to_disk(rec.uid), gmap.to_disk(rec.gid)) == (e.st.st_uid, e.st.st_gid):
                half_done.add(key)
                continue
        bad.append(f"{e.display} ({trust.why_foreign(e.st, owner)})")
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise TreeError(
            f"{bad[0]}{more} carries a record a mount would not believe (someone else may have planted it); "
            f"nothing was changed: remove that record ('setfattr -x {RECORD_NAME}') or fix the file's owner "
            f"and mode, then run materialize again"
        )
    if not rerun:
        try:
            os.setxattr(proc_fd(root_fd), _TRUSTED_XATTR, str(owner).encode())
        except OSError as exc:
            if exc.errno != errno.ENOTSUP:  # no user xattrs: a rerun judges by the root's owner again
                raise


def _link_over(e, first_rel: str, root_fd: int, times: _DirTimes) -> None:
    """Replace this name of a converted inode by a link to its new inode."""
    src = open_beneath(root_fd, first_rel, O_PATH_NOFOLLOW)
    tmp = _tmp(e.st)
    try:
        times.begin(e.dirfd)
        os.link(proc_fd(src), tmp, dst_dir_fd=e.dirfd, follow_symlinks=True)
        os.rename(tmp, e.name, src_dir_fd=e.dirfd, dst_dir_fd=e.dirfd)
    finally:
        os.close(src)
    times.end(e.dirfd)


def _materialize_inode(e, store, umap: IdMap, gmap: IdMap, times: _DirTimes):
    fd, st = e.fd, e.st
    try:
        rec = store.read_record(fd, st)
    except RecordError as exc:
        raise TreeError(f"{e.display}: {exc}") from None
    if rec is None:
        return None
    du, dg = umap.to_disk(rec.uid), gmap.to_disk(rec.gid)
    if du is None or dg is None:
        raise TreeError(f"{e.display}: record ids {rec.uid}:{rec.gid} have no disk ids in --map; extend the map")
    if stat.S_ISREG(st.st_mode) and rec.type != stat.S_IFREG and type_fits(rec.type, stat.S_IFREG):
        # a placeholder (device, FIFO or socket record on a regular file): make the real node
        tmp = _tmp(st)
        times.begin(e.dirfd)
        os.mknod(tmp, rec.mode & ~0o7777 | 0o600, rec.rdev, dir_fd=e.dirfd)
        try:
            os.chown(tmp, du, dg, dir_fd=e.dirfd, follow_symlinks=False)
            os.chmod(tmp, stat.S_IMODE(rec.mode), dir_fd=e.dirfd)
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=e.dirfd, follow_symlinks=False)
        except BaseException:
            os.unlink(tmp, dir_fd=e.dirfd)
            raise
        _crash_point("materialize")
        os.rename(tmp, e.name, src_dir_fd=e.dirfd, dst_dir_fd=e.dirfd)
        times.end(e.dirfd)
        return e.rel
    if stat.S_IFMT(rec.mode) != stat.S_IFMT(st.st_mode):
        raise TreeError(f"{e.display}: record type disagrees with the backing inode; fix or remove the record")
    fchown_fd(fd, du, dg)  # also drops security.capability and setuid: restored below
    _crash_point("materialize")
    escaped: list[str] = []
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        path = proc_fd(fd)
        for name in list_xattrs(fd):
            vname = unescape_xattr_name(name)
            if vname is None or not is_privileged_xattr(vname):
                continue
            value = get_xattr(fd, name)
            if value is None:
                continue
            if vname.startswith("system.posix_acl_"):
                value = acl.map_ids(value, umap.to_disk, gmap.to_disk)
            elif vname == "security.capability":
                value = capability_for_disk(value, umap.to_disk(0) if not umap.identity else None)
            os.setxattr(path, vname, value)
            escaped.append(name)
            _crash_point("materialize")
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(proc_fd(fd), stat.S_IMODE(rec.mode))
    for name in escaped:
        os.removexattr(proc_fd(fd), name)
    _crash_point("materialize")
    store.remove(fd, st)
    return None


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------
