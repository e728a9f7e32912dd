"""``shiftfs import``: unpack a tar as an unprivileged user, ownership into records.

Files belong to the importing user with owner-accessible modes; ownership,
mode, type and device numbers go into records; devices become empty
placeholder files; privileged xattrs are stored under escaped names.
``--oci-layer`` applies ``.wh.`` whiteouts.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
import time

from ..errors import ArchiveError, UsageError
from ..ownership import trust
from ..ownership.idmap import MAX_ID
from ..ownership.names import STORE_DIR, escape_xattr_name
from ..ownership.record import Record
from ..sys.files import O_PATH_NOFOLLOW, proc_fd, utimens_fd
from ..sys.walk import Entry, remove_tree, walk
from .members import mtime_ns, xattrs_of
from .streams import open_archive_stream
from .walk import COPY_CHUNK, DIR_PATH_FLAGS, Progress, open_beneath, open_root, open_store

__all__ = ["import_archive"]


def _normalize(name: str, what: str = "entry") -> list[str]:
    # The usual names ("./usr/bin/ls") take no Python loop over their components: an
    # archive of a deep tree repeats thousands of them in each name.
    body = name
    while body.startswith("./"):
        body = body[2:]
    parts = body.split("/")
    if "" in parts or "." in parts:
        parts = [p for p in parts if p and p != "."]
    if ".." in parts:
        raise ArchiveError(f"{what} {name!r} contains '..'; refusing to write outside ROOT")
    return parts


_IMPLIED_DIR = Record(0, 0, stat.S_IFDIR | 0o755)


class _Importer:
    def __init__(self, root_fd: int, store, oci: bool, progress: Progress):
        self.root_fd = root_fd
        self.store = store
        self.oci = oci
        self.progress = progress
        self.errors: list[str] = []
        self.created: set[str] = set()
        self.dir_times: list[tuple[str, int | None, int]] = []
        self._dir_cache: dict[str, int] = {}
        self.dropped_xattrs: list[str] = []
        self.root_recorded = False

    # -- directory descriptors ------------------------------------------------
    def close(self) -> None:
        self._flush_cache()

    def _flush_cache(self) -> None:
        for fd in self._dir_cache.values():
            os.close(fd)
        self._dir_cache.clear()

    def _dir(self, parts: list[str]) -> int:
        """A descriptor of the directory ``parts``, creating missing ones.

        Down from the deepest cached ancestor, one level at a time (no
        recursion, however deep the archive goes); only the directory asked
        for is cached, the ones on the way are closed again.
        """
        rel = "/".join(parts)
        fd = self._dir_cache.get(rel)
        if fd is not None:
            return fd
        have, sub = len(parts), rel  # sub: the path of parts[:have]
        while have and sub not in self._dir_cache:
            have -= 1
            sub = sub[: sub.rfind("/")] if have else ""
        cur = self._dir_cache.get(sub)
        if cur is None:
            cur = os.open(".", DIR_PATH_FLAGS, dir_fd=self.root_fd)
            self._dir_cache[""] = cur
        for i in range(have, len(parts)):
            parent, name, sub = cur, parts[i], f"{sub}/{parts[i]}" if sub else parts[i]
            cached = i == have
            try:
                try:
                    fd = os.open(name, DIR_PATH_FLAGS, dir_fd=parent)
                except FileNotFoundError:
                    self._mkdir(parent, name, sub, _IMPLIED_DIR)
                    fd = os.open(name, DIR_PATH_FLAGS, dir_fd=parent)
                except (NotADirectoryError, OSError) as exc:
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                        raise ArchiveError(
                            f"{sub}: is not a directory in ROOT (a symlink or file); refusing to follow it"
                        ) from None
                    raise
                try:
                    self._check_ours(os.fstat(fd), sub)
                except BaseException:
                    os.close(fd)
                    raise
            finally:
                if not cached:
                    os.close(parent)
            cur = fd
        self._dir_cache[rel] = cur
        return cur

    def _check_ours(self, st: os.stat_result, rel: str) -> None:
        """Refuse to keep (and fill) a directory whose record would not be believed: another
        user's directory left in ROOT is theirs to change, records on it count for nobody."""
        if not trust.owned_by(st, self.store.trusted_uid):
            raise ArchiveError(
                f"{rel}: a directory of uid {st.st_uid} is in the way, not of uid {self.store.trusted_uid} "
                f"whose records count; remove it (as its owner or root) and import again"
            )

    def _mkdir(self, parent: int, name: str, rel: str, rec: Record) -> None:
        os.mkdir(name, 0o700, dir_fd=parent)
        fd = os.open(name, DIR_PATH_FLAGS, dir_fd=parent)
        try:
            self._stamp(fd, rec, rel)
        finally:
            os.close(fd)
        self.created.add(rel)

    def _stamp(self, fd: int, rec: Record, rel: str) -> None:
        """Write the record, then the backing mode."""
        self.store.apply_record(fd, os.stat(fd), rec)

    # -- removal ----------------------------------------------------------------
    def _remove(self, parent: int, name: str) -> None:
        """Remove ``name`` (the whole tree below it) and its side-table records.

        Cached descriptors of removed directories go stale: callers flush the
        cache afterwards (never in here, where ``parent`` may be cached).
        """

        def forget(e: Entry) -> None:
            if not stat.S_ISDIR(e.st.st_mode) and e.st.st_nlink == 1 and not stat.S_ISREG(e.st.st_mode):
                self.store.remove(e.fd, e.st)

        remove_tree(parent, name, forget)

    # -- entries ----------------------------------------------------------------
    def entry(self, tf: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
        if len(self._dir_cache) > 256:
            self._flush_cache()
        parts = _normalize(ti.name)
        rel = "/".join(parts)
        if parts and parts[0] == STORE_DIR:
            self.progress.log(f"shiftfs import: {ti.name}: skipped; {STORE_DIR} at the top is reserved for records")
            return
        base = parts[-1] if parts else ""
        if self.oci and base.startswith(".wh."):
            self._whiteout(parts)
            return
        if not parts:
            if not ti.isdir():
                raise ArchiveError(f"{ti.name!r}: the root entry is not a directory; the archive is malformed")
            self._apply_root(ti)
            return
        try:
            parent = self._dir(parts[:-1])
        except ArchiveError as exc:
            raise ArchiveError(f"{ti.name}: {exc}") from None
        name = parts[-1]
        # Replace what is there, except a directory by a directory.
        try:
            old = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            old = None
        if old is not None and not (ti.isdir() and stat.S_ISDIR(old.st_mode)):
            self._remove(parent, name)
            self._flush_cache()
            parent = self._dir(parts[:-1])
            old = None  # gone: a directory entry makes it anew
        elif old is not None:
            self._check_ours(old, rel)

        rec = self._record_of(ti)
        if ti.islnk():
            self._hardlink(ti, parent, name, rel)
        elif ti.isdir():
            if old is None:
                os.mkdir(name, 0o700, dir_fd=parent)
            fd = os.open(name, DIR_PATH_FLAGS, dir_fd=parent)
            try:
                self._stamp(fd, rec, rel)
                self._xattrs(fd, ti, rel, True)
            finally:
                os.close(fd)
            self.dir_times.append((rel, None, mtime_ns(ti)))
        elif ti.isreg():
            fd = os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent
            )
            try:
                src = tf.extractfile(ti)
                assert src is not None  # a regular member always has its data
                left = ti.size
                while left > 0:
                    chunk = src.read(min(COPY_CHUNK, left))
                    if not chunk:
                        raise ArchiveError(f"{ti.name}: archive ends inside the file; it is truncated")
                    os.write(fd, chunk)
                    left -= len(chunk)
                    self.progress.advance(0, len(chunk))
                self._xattrs(fd, ti, rel, True)
                self._stamp(fd, rec, rel)
                os.utime(fd, ns=(time.time_ns(), mtime_ns(ti)))
            except BaseException:
                # a damaged or truncated member leaves no half-written file behind
                try:
                    os.unlink(name, dir_fd=parent)
                except OSError:
                    pass
                raise
            finally:
                os.close(fd)
        elif ti.issym():
            os.symlink(ti.linkname, name, dir_fd=parent)
            self._finish_special(parent, name, rec, ti, rel)
        elif ti.isfifo():
            os.mkfifo(name, 0o600, dir_fd=parent)
            self._finish_special(parent, name, rec, ti, rel)
        elif ti.ischr() or ti.isblk():
            fd = os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent
            )
            try:
                self._xattrs(fd, ti, rel, True)
                self._stamp(fd, rec, rel)
                os.utime(fd, ns=(time.time_ns(), mtime_ns(ti)))
            finally:
                os.close(fd)
        else:
            self.errors.append(f"{ti.name}: unsupported tar entry type {ti.type!r}; skipped")
            return
        self.created.add(rel)

    def _record_of(self, ti: tarfile.TarInfo) -> Record:
        ftype = {
            tarfile.DIRTYPE: stat.S_IFDIR,
            tarfile.SYMTYPE: stat.S_IFLNK,
            tarfile.FIFOTYPE: stat.S_IFIFO,
            tarfile.CHRTYPE: stat.S_IFCHR,
            tarfile.BLKTYPE: stat.S_IFBLK,
        }.get(ti.type, stat.S_IFREG)
        rdev = os.makedev(ti.devmajor, ti.devminor) if ftype in (stat.S_IFCHR, stat.S_IFBLK) else 0
        for what, value in (("uid", ti.uid), ("gid", ti.gid)):
            if not 0 <= value <= MAX_ID:
                raise ArchiveError(f"{ti.name}: {what} {value} is not a valid id; the archive is malformed")
        return Record(ti.uid, ti.gid, ftype | (ti.mode & 0o7777), rdev)

    def _apply_root(self, ti: tarfile.TarInfo) -> None:
        fd = os.open(".", DIR_PATH_FLAGS, dir_fd=self.root_fd)
        try:
            st = os.stat(fd)
            self.store.write_record(fd, st, self._record_of(ti))
            self._xattrs(fd, ti, ".", True)
        finally:
            os.close(fd)
        self.root_recorded = True
        self.dir_times.append(("", None, mtime_ns(ti)))

    def _finish_special(self, parent: int, name: str, rec: Record, ti, rel: str) -> None:
        fd = os.open(name, O_PATH_NOFOLLOW, dir_fd=parent)
        try:
            self._stamp(fd, rec, rel)
            if xattrs_of(ti):
                self.dropped_xattrs.append(rel)
            utimens_fd(fd, None, mtime_ns(ti))
        finally:
            os.close(fd)

    def _hardlink(self, ti, parent: int, name: str, rel: str) -> None:
        tparts = _normalize(ti.linkname, "hard link target")
        if not tparts:
            raise ArchiveError(f"{ti.name}: hard link to the root; the archive is malformed")
        tparent = self._dir(tparts[:-1])
        try:
            os.link(tparts[-1], name, src_dir_fd=tparent, dst_dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            raise ArchiveError(
                f"{ti.name}: hard link target {ti.linkname!r} is not in ROOT; the archive must list it first"
            ) from None

    def _xattrs(self, fd: int, ti, rel: str, can_hold: bool) -> None:
        xattrs = xattrs_of(ti, self._lookup_user, self._lookup_group, self.errors, rel)
        if not xattrs:
            return
        path = proc_fd(fd)
        for name, value in xattrs.items():
            backing = escape_xattr_name(name)
            try:
                os.setxattr(path, backing, value)
            except OSError as exc:
                self.errors.append(f"{rel}: xattr {name} not stored: {exc.strerror}")

    # The view's user database, for ACL text that names users without ids.
    def _lookup(self, dbname: str, name: str) -> int | None:
        try:
            fd = open_beneath(self.root_fd, f"etc/{dbname}", os.O_RDONLY)
        except OSError:
            return None
        with os.fdopen(fd, "r", errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 3 and fields[0] == name and fields[2].isdigit():
                    return int(fields[2])
        return None

    def _lookup_user(self, name: str) -> int | None:
        return self._lookup("passwd", name)

    def _lookup_group(self, name: str) -> int | None:
        return self._lookup("group", name)

    def _whiteout(self, parts: list[str]) -> None:
        base = parts[-1]
        dparts = parts[:-1]
        drel = "/".join(dparts)
        try:  # a whiteout in a directory that is not there has nothing to hide
            os.close(open_beneath(self.root_fd, drel, DIR_PATH_FLAGS))
        except OSError:
            return
        parent = self._dir(dparts)
        if base == ".wh..wh..opq":
            sub = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent)
            try:
                names = os.listdir(sub)
            finally:
                os.close(sub)
            for n in names:
                crel = f"{drel}/{n}" if drel else n
                if crel in self.created or (not drel and n == STORE_DIR):
                    continue
                self._remove(parent, n)
                self._flush_cache()
                parent = self._dir(dparts)
            return
        target = base[len(".wh.") :]
        trel = f"{drel}/{target}" if drel else target
        if not target or trel in self.created or (not drel and target == STORE_DIR):
            return
        try:
            self._remove(parent, target)
        except FileNotFoundError:
            pass
        self._flush_cache()

    def finish(self) -> None:
        self._flush_cache()
        if not self.root_recorded:
            fd = os.open(".", DIR_PATH_FLAGS, dir_fd=self.root_fd)
            try:
                st = os.stat(fd)
                if self.store.read(fd, st) is None:
                    self.store.write_record(fd, st, _IMPLIED_DIR)
            finally:
                os.close(fd)
        # Directory times last, once nothing changes inside: each directory as the
        # walk leaves it (everything below it first). The walk visits only the
        # directories on the way to those, whatever else ROOT holds.
        times = {rel: (atime, mtime) for rel, atime, mtime in self.dir_times}
        on_way = {""}
        for rel in times:
            while rel not in on_way:
                on_way.add(rel)
                rel = rel.rpartition("/")[0]

        def wanted(dirfd: int, rel: str, name: str) -> str | None:
            return name if (f"{rel}/{name}" if rel else name) in on_way else None

        for e in walk(self.root_fd, select=wanted, on_error=lambda rel, exc: None, leave=True):
            if e.leaving and e.rel in times:
                utimens_fd(e.fd, *times[e.rel])


def import_archive(
    archive: str, root: str, oci_layer: bool = False, progress=None, legacy_xattr: bool = False
) -> list[str]:
    """Unpack ``archive`` into ``root`` as records; returns per-path errors."""
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise UsageError(f"{root}: its parent directory does not exist; create it first") from None
    root_fd = open_root(root)
    progress = progress or Progress("import", False)
    try:
        # The records we write go on inodes we create: ours, so we are whose records count
        # (root too). Into another user's directory they would count for nobody, and the
        # record that directory may carry is not ours to keep.
        me = os.geteuid()
        root_st = os.fstat(root_fd)
        owner = root_st.st_uid
        if not trust.owned_by(root_st, me):
            raise ArchiveError(
                f"{root} is owned by uid {owner}, not by you (uid {me}): records there would not be "
                f"believed; import into a directory you own (or run the import as uid {owner})"
            )
        store = open_store(root_fd, True, legacy_xattr, trusted_uid=me)
    except BaseException:
        os.close(root_fd)
        raise
    stream, proc = open_archive_stream(archive)
    imp = _Importer(root_fd, store, oci_layer, progress)
    try:
        try:
            tf = tarfile.open(fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape")
        except tarfile.ReadError as exc:
            raise ArchiveError(
                f"{archive}: not a tar archive ({exc}); give a tar, tar.gz, tar.xz or tar.zst file"
            ) from None
        try:
            for ti in tf:
                try:
                    imp.entry(tf, ti)
                except ArchiveError as exc:
                    imp.errors.append(str(exc))
                except OSError as exc:
                    imp.errors.append(f"{ti.name}: {exc.strerror or exc}")
                progress.advance(1)
        except tarfile.ReadError as exc:
            raise ArchiveError(f"{archive}: the archive is damaged ({exc}); nothing after it was imported") from None
        except EOFError:
            raise ArchiveError(f"{archive}: the archive ends early; it is truncated") from None
        imp.finish()
    finally:
        imp.close()
        store.close()
        os.close(root_fd)
        if proc is not None:
            if proc.stdout is not None:  # always: it is the stream we read
                proc.stdout.close()
            proc.wait()
    if imp.dropped_xattrs:
        imp.errors.append(
            f"{imp.dropped_xattrs[0]}: xattrs dropped on {len(imp.dropped_xattrs)} symlinks/FIFOs "
            "(they cannot carry user xattrs)"
        )
    return imp.errors


# ---------------------------------------------------------------------------
# stat and ls
# ---------------------------------------------------------------------------
