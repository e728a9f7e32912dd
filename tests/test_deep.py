"""Trees 5,000 directories deep through every walk (issue 26 item 4).

Every tool that walks a tree goes through the one walk, :mod:`shiftfs.sys.walk`,
which has no recursion and keeps a bounded number of directory descriptors.
Before it, ``shiftfs export`` of a 3,000-deep tree died with a RecursionError
(a nested ``yield from`` per level), and so did absorb, materialize and the
import of such an archive; the mount's fix-up walk held one descriptor per
level. The tools here run with a soft RLIMIT_NOFILE of 1024 (what most users
have; the mount's daemon with 1024 as its hard limit too, which it cannot
raise as a user), and each result is checked at the bottom of the tree, through
descriptors: a path 5,000 levels deep is longer than PATH_MAX.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from archive_util import USER, shiftfs, workdir
from fsutil import Mount
from ns_util import throwaway_users

from shiftfs.ownership.record import RECORD_NAME
from shiftfs.sys import walk as walk_mod
from shiftfs.sys.walk import remove_tree, walk

DEPTH = 5000
CHAIN = "/".join(["d"] * DEPTH)  # the deepest directory, below the tree root
_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="builds devices, chowns and runs setpriv: needs root")


@pytest.fixture
def low_fd_limit():
    """A soft RLIMIT_NOFILE of 1024 here and in every command the test starts (the hard
    limit stays: without CAP_SYS_RESOURCE, as here, it could not be raised again)."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, old[0]), old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


@pytest.fixture
def wd():
    d = workdir()
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=False)  # fts: any depth


def _chain(root: Path, depth: int = DEPTH, mode: int = 0o755) -> int:
    """Make ``root`` and ``depth`` nested directories ``d`` below it; an O_RDONLY descriptor of the last."""
    root.mkdir(mode)
    fd = os.open(root, _DIR)
    for _ in range(depth):
        os.mkdir("d", mode, dir_fd=fd)
        sub = os.open("d", _DIR, dir_fd=fd)
        os.close(fd)
        fd = sub
    return fd


@contextlib.contextmanager
def _bottom(root: Path, depth: int = DEPTH) -> Iterator[int]:
    """An O_PATH descriptor of the deepest directory, reached one ``openat`` at a time."""
    fd = os.open(root, _PATH | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            sub = os.open("d", _PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        yield fd
    finally:
        os.close(fd)


def _record(dirfd: int, name: str | None = None) -> bytes | None:
    fd = dirfd if name is None else os.open(name, _PATH, dir_fd=dirfd)
    try:
        return os.getxattr(f"/proc/self/fd/{fd}", RECORD_NAME)
    except OSError as e:
        if e.errno != errno.ENODATA:
            raise
        return None
    finally:
        if name is not None:
            os.close(fd)


def _build_real_tree(root: Path) -> None:
    """What real root would have: the deepest directory 7:7 0750 holding a setuid file of
    uid 1000, /dev/null's device and a symlink of uid 5."""
    fd = _chain(root)
    try:
        os.fchown(fd, 7, 7)
        os.fchmod(fd, 0o750)
        f = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=fd)
        os.write(f, b"deep\n")
        os.fchown(f, 1000, 1000)
        os.fchmod(f, 0o4755)
        os.close(f)
        os.mknod("null", stat.S_IFCHR | 0o666, os.makedev(1, 3), dir_fd=fd)
        os.chmod("null", 0o666, dir_fd=fd)
        os.symlink("f", "l", dir_fd=fd)
        os.chown("l", 5, 5, dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)


def _check_records_at_bottom(root: Path, what: str) -> None:
    with _bottom(root) as fd:
        st = os.fstat(fd)
        assert (st.st_uid, st.st_gid) == (USER, USER), f"{what}: deepest directory owned {st.st_uid}:{st.st_gid}"
        assert not st.st_mode & 0o7022, f"{what}: deepest directory's backing mode {st.st_mode:o}"
        assert _record(fd) == b"7:7:40750", what
        assert _record(fd, "f") == b"1000:1000:104755", what
        assert _record(fd, "null") == b"0:0:0666:char-1-3", what
        null = os.stat("null", dir_fd=fd, follow_symlinks=False)
        assert stat.S_ISREG(null.st_mode) and null.st_uid == USER, f"{what}: the device is not a placeholder"
        assert os.readlink("l", dir_fd=fd) == "f", what
        with pytest.raises(FileNotFoundError):
            os.stat("d", dir_fd=fd, follow_symlinks=False)
        data = os.open("f", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        try:
            assert os.read(data, 100) == b"deep\n", what
        finally:
            os.close(data)


@root_only
@pytest.mark.timeout(600)
def test_offline_tools_on_a_tree_5000_deep(wd, low_fd_limit):
    """absorb, export, import (and a whiteout of it all) and materialize a tree 5,000 directories deep."""
    tree = wd / "tree"
    _build_real_tree(tree)

    shiftfs("absorb", tree, "--owner", f"{USER}:{USER}")
    _check_records_at_bottom(tree, "absorb")

    out = wd / "user"
    out.mkdir()
    os.chown(out, USER, USER)
    tar = out / "deep.tar"
    shiftfs("export", tree, "-o", tar, user=USER)
    with tarfile.open(tar) as tf:
        members = {m.name.removeprefix("./"): m for m in tf}
    dirs = [n for n, m in members.items() if m.isdir()]
    assert len(dirs) == DEPTH + 1, f"export: {len(dirs)} directories, not {DEPTH + 1}"
    bottom = members[CHAIN]
    assert (bottom.uid, bottom.gid, bottom.mode) == (7, 7, 0o750)
    f = members[CHAIN + "/f"]
    assert (f.isreg(), f.uid, f.gid, f.mode, f.size) == (True, 1000, 1000, 0o4755, 5)
    null = members[CHAIN + "/null"]
    assert (null.ischr(), null.devmajor, null.devminor, null.mode, null.uid) == (True, 1, 3, 0o666, 0)
    link = members[CHAIN + "/l"]
    assert (link.issym(), link.linkname, link.uid, link.gid) == (True, "f", 5, 5)

    imported = out / "imported"
    shiftfs("import", tar, imported, user=USER)
    _check_records_at_bottom(imported, "import")

    # An OCI layer whose whiteout removes the whole chain (the importer's recursive removal).
    layer = out / "layer.tar"
    with tarfile.open(layer, "w") as tf:
        tf.addfile(tarfile.TarInfo(".wh.d"))
    os.chown(layer, USER, USER)
    shiftfs("import", "--oci-layer", layer, imported, user=USER)
    assert sorted(os.listdir(imported)) == [".shiftfs"], "the whiteout left the chain"

    shiftfs("materialize", tree)
    assert not (tree / ".shiftfs").exists()
    with _bottom(tree) as fd:
        st = os.fstat(fd)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (7, 7, 0o750)
        assert _record(fd) is None
        f_st = os.stat("f", dir_fd=fd, follow_symlinks=False)
        assert (f_st.st_uid, f_st.st_gid, stat.S_IMODE(f_st.st_mode)) == (1000, 1000, 0o4755)
        null_st = os.stat("null", dir_fd=fd, follow_symlinks=False)
        assert stat.S_ISCHR(null_st.st_mode) and null_st.st_rdev == os.makedev(1, 3)
        l_st = os.stat("l", dir_fd=fd, follow_symlinks=False)
        assert (l_st.st_uid, l_st.st_gid) == (5, 5)
    with _bottom(tree, DEPTH // 2) as fd:
        st = os.fstat(fd)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o755), "materialize: half way down"


@root_only
@pytest.mark.mount
@pytest.mark.timeout(600)
def test_mount_fixup_walk_on_a_tree_5000_deep(wd):
    """The mount's fix-up of backing modes (shiftfs.ownership.trust.fix_backing_modes) reaches
    the bottom of a 5,000-deep tree, as a user's daemon limited to 1,024 descriptors."""
    if not os.path.exists("/usr/sbin/useradd"):
        pytest.skip("useradd is missing (package passwd)")
    with throwaway_users(with_range=0, without_range=1) as (user,):
        _fixup_walk(wd, user.uid)


def _fixup_walk(wd: Path, uid: int) -> None:
    src, mp = wd / "src", wd / "mp"
    fd = _chain(src, mode=0o700)
    try:
        os.fchmod(fd, 0o777)  # what an older version left for a view 0777 directory
    finally:
        os.close(fd)
    subprocess.run(["chown", "-R", f"{uid}:{uid}", str(src)], check=True)
    mp.mkdir()
    os.chown(mp, uid, uid)
    logs = wd / "logs"
    logs.mkdir()
    os.chown(logs, uid, uid)
    log = logs / "daemon.log"
    m = Mount(src, mp, mode="xattr", opts=["allow_other"], as_uid=uid, nofile=1024, log=log).mount()
    try:
        with _bottom(mp) as fd:  # through the mount: the view keeps the mode
            st = os.fstat(fd)
            assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o777, uid)
    finally:
        m.umount()
    text = log.read_text()
    assert "fixed the backing mode of 1 inode" in text and "Traceback" not in text, text[-3000:]
    with _bottom(src) as fd:
        st = os.fstat(fd)
        assert stat.S_IMODE(st.st_mode) == 0o755, f"backing mode {st.st_mode:o}"
        assert _record(fd) == f"{uid}:{uid}:40777".encode()


# -- the walk itself (no root needed) ---------------------------------------------------------


def _reference(root: Path) -> list[str]:
    """Every path below ``root`` in the walk's order, by plain recursion (shallow trees only)."""
    out = [""]

    def visit(d: Path, rel: str) -> None:
        for name in sorted(os.listdir(d), key=os.fsencode):
            crel = f"{rel}/{name}" if rel else name
            out.append(crel)
            p = d / name
            if p.is_dir() and not p.is_symlink():
                visit(p, crel)

    visit(root, "")
    return out


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_walk_order_and_leaving_with_a_tiny_window(tmp_path):
    """Byte order, parents first, each directory left after its contents; with a window of
    two descriptors every step back up reopens a directory, checked by inode."""
    root = tmp_path / "t"
    for p in ("b/x/y/z", "a/c", "a/b/c/d/e", "B", "é/ü"):
        (root / p).mkdir(parents=True)
    for p in ("a/f", "a/b/c/d/e/g", "b/x/y/h", "é/ü/i"):
        (root / p).write_text(p)
    (root / "a/b/link").symlink_to("../../b")
    fd = os.open(root, _DIR)
    try:
        seen, left = [], []
        for e in walk(fd, keep_open=2, leave=True):
            if e.leaving:
                left.append(e.rel)
                assert os.fstat(e.fd).st_ino == e.st.st_ino and stat.S_ISDIR(os.fstat(e.dirfd).st_mode)
            else:
                seen.append(e.rel)
                if e.rel:
                    parent = os.path.dirname(e.rel)
                    assert os.stat(e.name, dir_fd=e.dirfd, follow_symlinks=False).st_ino == e.st.st_ino
                    assert parent in seen and parent not in left
        assert seen == _reference(root)
        assert sorted(left) == sorted(r for r in seen if (root / r).is_dir() and not (root / r).is_symlink())
        assert left[-1] == "" and left.index("a/b/c/d/e") < left.index("a/b/c/d") < left.index("a")
    finally:
        os.close(fd)


def test_walk_and_remove_tree_keep_few_descriptors_5000_deep(tmp_path, low_fd_limit):
    """No RecursionError and at most KEEP_OPEN directory descriptors, however deep."""
    fd = _chain(tmp_path / "t")
    os.close(fd)
    root = os.open(tmp_path / "t", _DIR)
    try:
        before = _open_fds()
        most = 0
        depth = -1
        for e in walk(root):
            depth = max(depth, e.rel.count("/") + 1 if e.rel else 0)
            if depth % 250 == 0:
                most = max(most, _open_fds() - before)
        assert depth == DEPTH
        assert most <= walk_mod.KEEP_OPEN + 2, most
        assert _open_fds() == before
        remove_tree(root, "d")
        assert os.listdir(root) == []
        assert _open_fds() == before
    finally:
        os.close(root)


def test_walk_reopens_by_inode_when_directories_move(tmp_path):
    """Directories moved during a walk: the way back up follows the inode (``..``, then by
    name from the nearest open ancestor); where neither leads to the same directory the walk
    says ESTALE and leaves the rest of it, instead of walking whatever took its place."""
    for layout in ("moved", "replaced"):
        root = tmp_path / layout
        for p in ("a/b/c", "a/b/z", "a/zz"):
            (root / p).mkdir(parents=True)
        (root / "a/b/c/f").write_text("f")
        fd = os.open(root, _DIR)
        seen, errors = [], []
        try:
            for e in walk(fd, keep_open=2, on_error=lambda rel, exc: errors.append((rel, exc.errno))):
                seen.append(e.rel)
                if e.rel == "a/b/c/f":
                    os.rename(root / "a/b", root / "q")  # b leaves a: ".." of b is no longer a
                    if layout == "replaced":
                        os.rename(root / "a", root / "a_old")
                        (root / "a").mkdir()  # and a is not a by name either
        finally:
            os.close(fd)
        assert "a/b/z" in seen  # b's other name, reached through b's own inode
        if layout == "moved":
            assert errors == [] and "a/zz" in seen
        else:
            assert errors == [("a", errno.ESTALE)] and "a/zz" not in seen


@root_only
def test_remove_tree_stops_at_a_mount(tmp_path):
    """remove_tree never empties another filesystem mounted on the name or below it."""
    top = tmp_path / "top"
    (top / "sub/mnt").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "none", str(top / "sub/mnt")], check=True)
    try:
        (top / "sub/mnt/keep").write_text("keep")
        fd = os.open(top, _DIR)
        try:
            for where, name in ((fd, "sub"), (os.open(top / "sub", _DIR), "mnt")):
                with pytest.raises(OSError) as e:
                    remove_tree(where, name)
                assert e.value.errno == errno.EXDEV
                if where != fd:
                    os.close(where)
        finally:
            os.close(fd)
        assert (top / "sub/mnt/keep").read_text() == "keep"
    finally:
        subprocess.run(["umount", "-l", str(top / "sub/mnt")], check=False)
