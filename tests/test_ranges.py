"""fallocate(2), copy_file_range(2) and SEEK_DATA/SEEK_HOLE through the mount (project issue 27).

Each runs through a real mount in both ownership modes and is compared with what
the backing filesystem (ext4 here) does for the same call: sizes, allocated
blocks, holes, data. Ownership and records must not change. The handlers need
pyfuse3 with shiftfs' patch series (``patches/pyfuse3``); without it fallocate
fails with EOPNOTSUPP and SEEK_HOLE finds no hole.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
from fsutil import MAP, MODE_ARGS, have
from records import RECORD

pytestmark = [pytest.mark.root, pytest.mark.fuse]

MiB = 1 << 20
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20


@pytest.fixture
def m(shiftfs_mount, mode):
    mnt = shiftfs_mount(*MODE_ARGS[mode], stats=True)
    os.chmod(mnt.mountpoint, 0o755)
    return mnt


def _fallocate(args: list[str], path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["fallocate", *args, path], capture_output=True, text=True, timeout=60)


def _owner(m, name: str) -> tuple:
    """What ownership looks like in the view and on disk (record included)."""
    v = os.lstat(m.path(name))
    b = os.lstat(m.backing(name))
    try:
        rec = os.getxattr(m.backing(name), RECORD)
    except OSError:
        rec = None
    return (v.st_uid, v.st_gid, v.st_mode, b.st_uid, b.st_gid, b.st_mode, rec)


def _layout(path: str) -> list[tuple[int, int]]:
    """The data extents of a file as SEEK_DATA/SEEK_HOLE report them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        out, off, size = [], 0, os.fstat(fd).st_size
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                assert e.errno == errno.ENXIO
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            off = end
        return out
    finally:
        os.close(fd)


def _sparse(path: str) -> None:
    """10 MiB with data at 1 MiB and 6 MiB, holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(10 * MiB)
        f.seek(1 * MiB)
        f.write(b"\x11" * 65536)
        f.seek(6 * MiB)
        f.write(b"\x22" * 65536)


@pytest.mark.skipif(not have("fallocate"), reason="needs util-linux fallocate")
def test_fallocate_modes_as_on_backing(m, scratch):
    """fallocate -l, -n, -p, -z and -d give the sizes, blocks and bytes they give on ext4."""
    os.chown(m.path(), 0, 0)
    ref = str(scratch / "ref")
    with open(m.path("f"), "wb") as f:
        f.write(b"\x5a" * (2 * MiB))
    with open(ref, "wb") as f:
        f.write(b"\x5a" * (2 * MiB))
    os.chown(m.path("f"), 1000, 1000)
    os.chmod(m.path("f"), 0o640)
    before = _owner(m, "f")
    steps = [
        ["-l", str(4 * MiB)],  # preallocate and extend
        ["-n", "-o", str(4 * MiB), "-l", str(MiB)],  # KEEP_SIZE past the end
        ["-p", "-o", "4096", "-l", str(64 * 1024)],  # PUNCH_HOLE (implies KEEP_SIZE)
        ["-z", "-o", str(MiB), "-l", "8192"],  # ZERO_RANGE
    ]
    for args in steps:
        r = _fallocate(args, m.path("f"))
        assert r.returncode == 0, f"fallocate {' '.join(args)} through the mount: {r.stderr.strip()}"
        assert _fallocate(args, ref).returncode == 0
        v, e = os.stat(m.path("f")), os.stat(ref)
        assert (v.st_size, v.st_blocks) == (e.st_size, e.st_blocks), args
        with open(m.path("f"), "rb") as a, open(ref, "rb") as b:
            assert a.read() == b.read(), args
    assert _layout(m.path("f")) == _layout(ref) == _layout(m.backing("f"))
    assert _owner(m, "f") == before


@pytest.mark.skipif(not have("fallocate"), reason="needs util-linux fallocate")
def test_fallocate_collapse_insert_refused_by_fuse(m):
    """COLLAPSE_RANGE and INSERT_RANGE (fallocate -c/-i) never reach a FUSE daemon: the kernel's
    FUSE module accepts only KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE (EOPNOTSUPP, file unchanged)."""
    with open(m.path("f"), "wb") as f:
        f.write(os.urandom(4 * 4096))
    data = open(m.path("f"), "rb").read()
    for args in (["-c", "-o", "0", "-l", "4096"], ["-i", "-o", "0", "-l", "4096"]):
        r = _fallocate(args, m.path("f"))
        assert r.returncode != 0 and "not supported" in r.stderr, r.stderr
    assert open(m.path("f"), "rb").read() == data
    assert m.read_stats()["counts"].get("fallocate", 0) == 0


def _fallocate_errno(path: str, flags: int, mode: int, off: int, length: int, fsize: int | None = None) -> int:
    code = f"""
import ctypes, os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
if {fsize!r} is not None:
    resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize!r}, {fsize!r}))
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
fd = os.open({path!r}, {flags})
print(0 if libc.fallocate(fd, {mode}, {off}, {length}) == 0 else ctypes.get_errno())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip())


def test_fallocate_limits(m):
    """A read-only descriptor: EBADF; the caller's RLIMIT_FSIZE: EFBIG; past the backing
    filesystem's largest file: EFBIG (as on ext4); the file is unchanged by each."""
    with open(m.path("f"), "wb") as f:
        f.write(b"x" * 4096)
    assert _fallocate_errno(m.path("f"), os.O_RDONLY, 0, 0, MiB) == errno.EBADF
    assert _fallocate_errno(m.path("f"), os.O_RDWR, 0, 0, MiB, fsize=65536) == errno.EFBIG
    assert _fallocate_errno(m.path("f"), os.O_RDWR, 0, 1 << 62, MiB) == errno.EFBIG
    assert os.stat(m.path("f")).st_size == 4096
    assert os.stat(m.backing("f")).st_size == 4096


def test_fallocate_enospc(shiftfs_mount, mode, scratch):
    """A preallocation larger than the backing filesystem's free space: ENOSPC, as there."""
    src = scratch / "small"
    src.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(src)], check=True)
    try:
        mnt = shiftfs_mount(*MODE_ARGS[mode], source=src)
        with open(mnt.path("f"), "wb"):
            pass
        assert _fallocate_errno(mnt.path("f"), os.O_RDWR, 0, 0, 64 * MiB) == errno.ENOSPC
        assert _fallocate_errno(mnt.path("f"), os.O_RDWR, 0, 0, MiB) == 0
        assert os.stat(mnt.path("f")).st_size == MiB
        mnt.cleanup()
    finally:
        subprocess.run(["umount", "-l", str(src)], check=False)


def test_seek_data_hole(m):
    _sparse(m.backing("f"))
    want = _layout(m.backing("f"))
    assert len(want) == 2
    assert _layout(m.path("f")) == want
    fd = os.open(m.path("f"), os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.lseek(fd, 10 * MiB, os.SEEK_DATA)
        assert e.value.errno == errno.ENXIO
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
    finally:
        os.close(fd)


def test_copy_file_range_and_sparse_cp(m):
    """copy_file_range is one request to the daemon (no READ/WRITE of the data); cp --reflink=auto
    keeps a sparse file sparse; owners and records of both files stay what they were."""
    _sparse(m.path("s"))
    os.chown(m.path("s"), 1000, 1000)
    before = _owner(m, "s")
    with open(m.path("d"), "wb"):
        pass
    counts = m.read_stats()["counts"]
    fi = os.open(m.path("s"), os.O_RDONLY)
    fo = os.open(m.path("d"), os.O_WRONLY)
    try:
        assert os.copy_file_range(fi, fo, 65536, 6 * MiB, 0) == 65536
    finally:
        os.close(fi)
        os.close(fo)
    after = m.read_stats()["counts"]
    assert after.get("copy_file_range", 0) - counts.get("copy_file_range", 0) == 1
    assert after.get("read", 0) == counts.get("read", 0)
    assert open(m.path("d"), "rb").read() == b"\x22" * 65536
    r = subprocess.run(["cp", "--reflink=auto", m.path("s"), m.path("c")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert open(m.path("c"), "rb").read() == open(m.backing("s"), "rb").read()
    assert _layout(m.path("c")) == _layout(m.backing("s"))
    assert os.stat(m.backing("c")).st_blocks <= os.stat(m.backing("s")).st_blocks
    assert _owner(m, "s") == before


def test_seek_data_sees_unwritten_pages(m):
    """With the writeback cache, data written into a hole or past the end that is still only in
    the kernel's pages (the writer keeps the file open) must not be reported as a hole: a sparse
    copy made meanwhile would skip it."""
    _sparse(m.path("f"))
    w = os.open(m.path("f"), os.O_RDWR)
    try:
        os.pwrite(w, b"\x33" * 65536, 3 * MiB)  # into a hole
        fd = os.open(m.path("f"), os.O_RDONLY)
        try:
            data = os.lseek(fd, 2 * MiB, os.SEEK_DATA)
            assert data <= 3 * MiB and os.lseek(fd, data, os.SEEK_HOLE) >= 3 * MiB + 65536
        finally:
            os.close(fd)
    finally:
        os.close(w)
