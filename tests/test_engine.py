"""Passthrough conformance of the engine, through real kernel mounts (project issue 2).

Every test mounts SOURCE with the CLI and uses ordinary syscalls on the mount
point, in both ownership modes where the behaviour should be the same:
``table`` (``--map b:100000:0:65536``) and ``xattr`` (``--xattr``). Root runs
the tests, so new files are owned by view uid 0 in both modes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
from asuser import start_py
from fsutil import MAP, have, is_mounted, make_scratch, mount_shiftfs, remove_scratch
from sysx import RENAME_EXCHANGE, RENAME_NOREPLACE, UTIME_NOW, UTIME_OMIT, errno_of, renameat2, utimensat

pytestmark = [pytest.mark.root, pytest.mark.fuse]

MODES = {
    "table": ("--map", MAP),
    "xattr": ("--xattr",),
    # table mode on the kernel backend (an idmapped bind mount, no daemon)
    "table-kernel": ("--map", MAP, "-o", "backend=kernel"),
}


class View:
    """One test's directory inside a shared mount: ``path()`` in the view, ``backing()`` on disk."""

    def __init__(self, mount, mode: str, sub: str):
        self.mount = mount
        self.mode = mode
        self.sub = sub

    def path(self, *parts) -> str:
        return self.mount.path(self.sub, *parts)

    def backing(self, *parts) -> str:
        return self.mount.backing(self.sub, *parts)


@pytest.fixture(scope="module")
def _shared_mounts():
    """One mount per mode for the whole module (mounting costs ~0.7 s of Python start-up)."""
    with contextlib.ExitStack() as stack:
        d = make_scratch()
        stack.callback(remove_scratch, d)
        mounts = {}

        def get(mode):
            m = mounts.get(mode)
            if m is not None and m.alive() and is_mounted(m.mountpoint):
                return m
            n = len(mounts) + sum(1 for _ in d.iterdir())
            src, mp = d / f"{mode}-src{n}", d / f"{mode}-mp{n}"
            src.mkdir()
            mp.mkdir()
            if mode == "table-kernel":
                # root acts as view root: the kernel grants it no DAC override on SOURCE
                # while disk root (outside the table) owns it (docs/kernel-backend.md)
                os.chown(src, 100000, 100000)
            m = stack.enter_context(mount_shiftfs(src, mp, *MODES[mode]))
            mounts[mode] = m
            return m

        yield get


@pytest.fixture(params=sorted(MODES))
def fs(request, _shared_mounts):
    """A fresh directory (made through the mount) in a shared mount of each mode."""
    m = _shared_mounts(request.param)
    request.node._shiftfs_mounts = [m]
    sub = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)
    os.mkdir(m.path(sub))
    yield View(m, request.param.removesuffix("-kernel"), sub)
    if not m.alive():
        pytest.fail(f"the {request.param} daemon died during the test (status {m.status})", pytrace=False)


def write_file(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read_file(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- data ---------------------------------------------------------------------------


def test_read_write_seek(fs):
    p = fs.path("f")
    data = os.urandom(300_000)
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        assert os.write(fd, data) == len(data)
        assert os.lseek(fd, 0, os.SEEK_CUR) == len(data)
        assert os.lseek(fd, 1000, os.SEEK_SET) == 1000
        assert os.read(fd, 10) == data[1000:1010]
        assert os.lseek(fd, -10, os.SEEK_END) == len(data) - 10
        assert os.read(fd, 100) == data[-10:]
        assert os.read(fd, 100) == b""
        os.pwrite(fd, b"XYZ", 5)
        assert os.pread(fd, 5, 3) == data[3:5] + b"XYZ"
        # a write past the end leaves a hole of zeros
        os.pwrite(fd, b"end", len(data) + 100)
        assert os.fstat(fd).st_size == len(data) + 103
        assert os.pread(fd, 103, len(data)) == b"\0" * 100 + b"end"
        os.fsync(fd)
    finally:
        os.close(fd)
    expect = data[:5] + b"XYZ" + data[8:] + b"\0" * 100 + b"end"
    assert read_file(p) == expect
    assert read_file(fs.backing("f")) == expect
    assert os.stat(p).st_size == os.stat(fs.backing("f")).st_size


def test_append(fs):
    p = fs.path("log")
    write_file(p, b"one\n")
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"two\n")
        os.pwrite(fd, b"three\n", 0)  # Linux: pwrite on O_APPEND appends too
    finally:
        os.close(fd)
    # O_APPEND on a newly created file as well
    fd = os.open(fs.path("new"), os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
    try:
        os.write(fd, b"a")
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"b")
    finally:
        os.close(fd)
    # two descriptors appending alternately never overwrite each other
    a = os.open(p, os.O_WRONLY | os.O_APPEND)
    b = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(20):
            os.write(a if i % 2 else b, b"%d\n" % i)
    finally:
        os.close(a)
        os.close(b)
    expect = b"one\ntwo\nthree\n" + b"".join(b"%d\n" % i for i in range(20))
    assert read_file(p) == expect
    assert read_file(fs.backing("log")) == expect
    assert read_file(fs.path("new")) == b"ab"


def test_truncate(fs):
    p = fs.path("t")
    write_file(p, b"0123456789")
    fd = os.open(p, os.O_RDWR)
    try:
        os.ftruncate(fd, 4)
        assert os.fstat(fd).st_size == 4
        assert os.pread(fd, 100, 0) == b"0123"
        os.ftruncate(fd, 8)
        assert os.pread(fd, 100, 0) == b"0123\0\0\0\0"
    finally:
        os.close(fd)
    os.truncate(p, 2)
    assert os.stat(p).st_size == 2
    assert read_file(p) == b"01"
    os.truncate(p, 5000)
    assert read_file(p) == b"01" + b"\0" * 4998
    assert os.stat(fs.backing("t")).st_size == 5000
    os.truncate(p, 0)
    assert read_file(p) == b"" and os.stat(fs.backing("t")).st_size == 0
    # truncating a directory or through a read-only descriptor fails
    os.mkdir(fs.path("d"))
    assert errno_of(os.truncate, fs.path("d"), 0) == errno.EISDIR
    fd = os.open(p, os.O_RDONLY)
    try:
        assert errno_of(os.ftruncate, fd, 1) in (errno.EINVAL, errno.EBADF)
    finally:
        os.close(fd)


def test_o_excl(fs):
    p = fs.path("x")
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.write(fd, b"first")
    os.close(fd)
    assert errno_of(os.open, p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600) == errno.EEXIST
    assert read_file(p) == b"first"
    # O_EXCL refuses a symlink, even a dangling one, and does not follow it
    os.symlink("nowhere", fs.path("dangling"))
    assert errno_of(os.open, fs.path("dangling"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600) == errno.EEXIST
    assert not os.path.lexists(fs.path("nowhere")) and not os.path.lexists(fs.backing("nowhere"))
    os.mkdir(fs.path("dir"))
    assert errno_of(os.open, fs.path("dir"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600) == errno.EEXIST
    # many racing exclusive creators: exactly one wins
    wins = []

    def creator(i):
        try:
            fd = os.open(fs.path("race"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.write(fd, b"%d" % i)
            os.close(fd)
            wins.append(i)
        except FileExistsError:
            pass

    threads = [threading.Thread(target=creator, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert read_file(fs.path("race")) == b"%d" % wins[0]
    assert [n for n in os.listdir(fs.path()) if n.startswith(".shiftfs~")] == []
    assert [n for n in os.listdir(fs.backing()) if n.startswith(".shiftfs~")] == []


def test_o_trunc(fs):
    p = fs.path("f")
    write_file(p, b"some content")
    st0 = os.stat(p)
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert os.stat(p).st_size == 0
    assert os.stat(fs.backing("f")).st_size == 0
    assert os.stat(p).st_ino == st0.st_ino
    write_file(p, b"again")
    fd = os.open(p, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o600)
    try:
        assert os.pread(fd, 100, 0) == b""
        os.write(fd, b"new")
    finally:
        os.close(fd)
    assert read_file(p) == b"new"
    # O_CREAT on an existing file keeps its mode (the create mode is ignored)
    assert stat.S_IMODE(os.stat(p).st_mode) == stat.S_IMODE(st0.st_mode)


def test_open_modes_and_errors(fs):
    write_file(fs.path("f"), b"x")
    os.mkdir(fs.path("d"))
    assert errno_of(os.open, fs.path("missing"), os.O_RDONLY) == errno.ENOENT
    assert errno_of(os.open, fs.path("d"), os.O_WRONLY) == errno.EISDIR
    assert errno_of(os.open, fs.path("f", "x"), os.O_RDONLY) == errno.ENOTDIR
    os.close(os.open(fs.path("d"), os.O_RDONLY | os.O_DIRECTORY))
    assert errno_of(os.open, fs.path("f"), os.O_RDONLY | os.O_DIRECTORY) == errno.ENOTDIR
    os.symlink("f", fs.path("l"))
    assert errno_of(os.open, fs.path("l"), os.O_RDONLY | os.O_NOFOLLOW) == errno.ELOOP
    fd = os.open(fs.path("l"), os.O_RDONLY)
    assert os.read(fd, 10) == b"x"
    os.close(fd)


def test_mmap_and_copy(fs):
    import mmap
    import shutil

    p = fs.path("m")
    write_file(p, b"\0" * 8192)
    with open(p, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 8192)
        mm[100:105] = b"mmapd"
        mm[8000:8003] = b"end"
        mm.flush()
        mm.close()
    data = read_file(fs.backing("m"))
    assert data[100:105] == b"mmapd" and data[8000:8003] == b"end"
    # sendfile (shutil) and copy_file_range within the mount
    shutil.copyfile(p, fs.path("copy"))
    assert read_file(fs.path("copy")) == data
    src = os.open(p, os.O_RDONLY)
    dst = os.open(fs.path("cfr"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        n = 0
        while n < 8192:
            k = os.copy_file_range(src, dst, 8192 - n)
            assert k > 0
            n += k
    finally:
        os.close(src)
        os.close(dst)
    assert read_file(fs.backing("cfr")) == data


def test_large_offsets(fs):
    p = fs.path("sparse")
    off = 5 * 2**30 + 123  # past 2**32
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"far", off)
        assert os.fstat(fd).st_size == off + 3
        assert os.pread(fd, 3, off) == b"far"
        assert os.pread(fd, 4, 2**32) == b"\0" * 4
    finally:
        os.close(fd)
    assert os.stat(fs.backing("sparse")).st_size == off + 3
    os.truncate(p, 2**33)
    assert os.stat(p).st_size == 2**33


def test_two_descriptors_coherent(fs):
    p = fs.path("f")
    a = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    b = os.open(p, os.O_RDWR)
    try:
        os.pwrite(a, b"hello", 0)
        assert os.pread(b, 5, 0) == b"hello"
        os.pwrite(b, b"J", 0)
        assert os.pread(a, 5, 0) == b"Jello"
        os.ftruncate(b, 2)
        assert os.pread(a, 5, 0) == b"Je"
        assert os.fstat(a).st_size == 2
    finally:
        os.close(a)
        os.close(b)


def test_exec_from_mount(fs):
    import shutil

    shutil.copy2("/bin/true", fs.path("true"))
    os.chmod(fs.path("true"), 0o755)
    assert subprocess.run([fs.path("true")]).returncode == 0
    with open(fs.path("script"), "w") as f:
        f.write("#!/bin/sh\necho ran $1\n")
    os.chmod(fs.path("script"), 0o755)
    assert subprocess.run([fs.path("script"), "x"], capture_output=True, text=True).stdout == "ran x\n"


def test_rename_over_open_file(fs):
    write_file(fs.path("old"), b"old content")
    write_file(fs.path("new"), b"new content")
    fd = os.open(fs.path("old"), os.O_RDONLY)
    try:
        os.rename(fs.path("new"), fs.path("old"))
        assert os.pread(fd, 100, 0) == b"old content"
        assert os.fstat(fd).st_nlink == 0
        assert read_file(fs.path("old")) == b"new content"
    finally:
        os.close(fd)
    assert sorted(os.listdir(fs.path())) == ["old"]


def test_directory_rename_keeps_children(fs):
    os.makedirs(fs.path("a", "b", "c"))
    write_file(fs.path("a", "b", "c", "f"), b"deep")
    os.mkdir(fs.path("z"))
    os.rename(fs.path("a", "b"), fs.path("z", "b2"))
    assert read_file(fs.path("z", "b2", "c", "f")) == b"deep"
    assert not os.path.exists(fs.path("a", "b"))
    assert os.stat(fs.path("a")).st_nlink == 2
    assert os.stat(fs.path("z")).st_nlink == 3
    # ".." of the moved directory is its new parent
    assert os.stat(fs.path("z", "b2", "..")).st_ino == os.stat(fs.path("z")).st_ino
    fd = os.open(fs.path("z", "b2", "c"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(fs.path("z"), fs.path("y"))
        assert os.listdir(fd) == ["f"]
        assert read_file(fs.path("y", "b2", "c", "f")) == b"deep"
    finally:
        os.close(fd)


def test_unsupported_calls_fail_cleanly(fs):
    """Calls FUSE cannot pass on (via pyfuse3) fail with a proper errno or fall back, never EIO or hang."""
    import fcntl

    if fs.mount.pids:
        assert errno_of(os.open, fs.path(), os.O_TMPFILE | os.O_RDWR, 0o600) in (errno.EOPNOTSUPP, errno.EISDIR)
    else:  # the kernel backend passes O_TMPFILE on to ext4
        os.close(os.open(fs.path(), os.O_TMPFILE | os.O_RDWR, 0o600))
    p = fs.path("f")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.posix_fallocate(fd, 0, 10000)  # glibc falls back to writing zeros
        assert os.fstat(fd).st_size == 10000
        # locks stay in the kernel and work between processes
        fcntl.flock(fd, fcntl.LOCK_EX)
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                "import fcntl,sys,os; fd=os.open(sys.argv[1], os.O_RDONLY)\n"
                "try:\n fcntl.flock(fd, fcntl.LOCK_EX|fcntl.LOCK_NB); print('got')\n"
                "except BlockingIOError: print('busy')",
                p,
            ],
            capture_output=True,
            text=True,
        )
        assert r.stdout.strip() == "busy", r.stderr
        fcntl.flock(fd, fcntl.LOCK_UN)
        fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
        fcntl.lockf(fd, fcntl.LOCK_UN, 10, 0)
    finally:
        os.close(fd)
    assert os.stat(fs.backing("f")).st_size == 10000


def test_non_utf8_names(fs):
    base = os.fsencode(fs.path())
    names = [b"\xff\xfe", b"caf\xe9", "ünïcødé-名前".encode(), b"tab\there", b"nl\nthere", b"-dash", b" sp "]
    for n in names:
        with open(base + b"/" + n, "wb") as f:
            f.write(n)
    os.mkdir(base + b"/dir\xff")
    os.symlink(b"target\xff\x80", base + b"/link\xfe")
    got = sorted(os.listdir(base))
    assert got == sorted(names + [b"dir\xff", b"link\xfe"])
    assert sorted(os.listdir(os.fsencode(fs.backing()))) == got
    for n in names:
        with open(base + b"/" + n, "rb") as f:
            assert f.read() == n
    assert os.readlink(base + b"/link\xfe") == b"target\xff\x80"
    os.rename(base + b"/\xff\xfe", base + b"/renamed\xff")
    assert os.path.exists(base + b"/renamed\xff")


# -- names ---------------------------------------------------------------------------


def test_mkdir_rmdir(fs):
    d = fs.path("d")
    os.mkdir(d, 0o750)
    st = os.stat(d)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750
    assert st.st_nlink == 2
    assert errno_of(os.mkdir, d) == errno.EEXIST
    os.mkdir(fs.path("d", "sub"))
    assert os.stat(d).st_nlink == 3
    write_file(fs.path("d", "sub", "f"), b"")
    assert errno_of(os.rmdir, d) == errno.ENOTEMPTY
    assert errno_of(os.rmdir, fs.path("d", "sub")) == errno.ENOTEMPTY
    assert errno_of(os.rmdir, fs.path("d", "sub", "f")) == errno.ENOTDIR
    assert errno_of(os.unlink, fs.path("d", "sub")) == errno.EISDIR
    os.unlink(fs.path("d", "sub", "f"))
    os.rmdir(fs.path("d", "sub"))
    assert os.stat(d).st_nlink == 2
    os.rmdir(d)
    assert not os.path.lexists(d)
    assert not os.path.lexists(fs.backing("d"))
    assert errno_of(os.rmdir, d) == errno.ENOENT
    assert errno_of(os.mkdir, fs.path("no", "such")) == errno.ENOENT


def test_symlink_readlink(fs):
    targets = ["plain", "../up/and/over", "/absolute/path", "x" * 1000, "dir/", "with space\nnewline"]
    for i, t in enumerate(targets):
        os.symlink(t, fs.path(f"l{i}"))
        st = os.lstat(fs.path(f"l{i}"))
        assert stat.S_ISLNK(st.st_mode)
        assert st.st_size == len(t.encode())
        assert os.readlink(fs.path(f"l{i}")) == t
        assert os.readlink(fs.backing(f"l{i}")) == t
    write_file(fs.path("target"), b"hello")
    os.symlink("target", fs.path("good"))
    assert read_file(fs.path("good")) == b"hello"
    assert os.path.samefile(fs.path("good"), fs.path("target"))
    assert errno_of(os.symlink, "x", fs.path("good")) == errno.EEXIST
    assert errno_of(os.readlink, fs.path("target")) == errno.EINVAL
    # a link to a directory, followed and not followed
    os.mkdir(fs.path("d"))
    os.symlink("d", fs.path("dl"))
    write_file(fs.path("dl", "inside"), b"1")
    assert os.listdir(fs.path("d")) == ["inside"]
    os.unlink(fs.path("dl"))
    assert os.path.isdir(fs.path("d"))


def test_link(fs):
    write_file(fs.path("a"), b"data")
    os.mkdir(fs.path("d"))
    os.link(fs.path("a"), fs.path("d", "b"))
    sa, sb = os.stat(fs.path("a")), os.stat(fs.path("d", "b"))
    assert sa.st_ino == sb.st_ino and sa.st_nlink == sb.st_nlink == 2
    assert os.stat(fs.backing("a")).st_ino == os.stat(fs.backing("d", "b")).st_ino
    with open(fs.path("d", "b"), "ab") as f:
        f.write(b"+more")
    assert read_file(fs.path("a")) == b"data+more"
    assert errno_of(os.link, fs.path("a"), fs.path("d", "b")) == errno.EEXIST
    assert errno_of(os.link, fs.path("d"), fs.path("dd")) == errno.EPERM
    assert errno_of(os.link, fs.path("missing"), fs.path("z")) == errno.ENOENT
    # links to symlinks link the symlink itself
    os.symlink("a", fs.path("sl"))
    os.link(fs.path("sl"), fs.path("sl2"), follow_symlinks=False)
    assert os.readlink(fs.path("sl2")) == "a"
    assert os.lstat(fs.path("sl2")).st_nlink == 2
    os.unlink(fs.path("a"))
    assert os.stat(fs.path("d", "b")).st_nlink == 1
    assert read_file(fs.path("d", "b")) == b"data+more"


def test_rename(fs):
    write_file(fs.path("a"), b"A")
    write_file(fs.path("b"), b"B")
    ino_a = os.stat(fs.path("a")).st_ino
    # plain rename to a new name
    os.rename(fs.path("a"), fs.path("c"))
    assert not os.path.lexists(fs.path("a"))
    assert os.stat(fs.path("c")).st_ino == ino_a and read_file(fs.path("c")) == b"A"
    # rename over an existing file replaces it
    os.rename(fs.path("c"), fs.path("b"))
    assert read_file(fs.path("b")) == b"A"
    assert os.stat(fs.path("b")).st_ino == ino_a
    assert sorted(os.listdir(fs.path())) == ["b"]
    assert sorted(n for n in os.listdir(fs.backing()) if n != ".shiftfs") == ["b"]
    # across directories
    os.mkdir(fs.path("d1"))
    os.mkdir(fs.path("d2"))
    os.rename(fs.path("b"), fs.path("d1", "x"))
    os.rename(fs.path("d1"), fs.path("d2", "d1"))
    assert read_file(fs.path("d2", "d1", "x")) == b"A"
    # directories: over an empty one works, over a non-empty one does not
    os.mkdir(fs.path("e"))
    os.mkdir(fs.path("full"))
    write_file(fs.path("full", "f"), b"")
    assert errno_of(os.rename, fs.path("e"), fs.path("full")) == errno.ENOTEMPTY
    os.mkdir(fs.path("empty"))
    os.rename(fs.path("e"), fs.path("empty"))
    assert not os.path.lexists(fs.path("e"))
    assert errno_of(os.rename, fs.path("empty"), fs.path("full", "f")) == errno.ENOTDIR
    assert errno_of(os.rename, fs.path("full", "f"), fs.path("empty")) == errno.EISDIR
    assert errno_of(os.rename, fs.path("full"), fs.path("full", "sub")) == errno.EINVAL
    assert errno_of(os.rename, fs.path("missing"), fs.path("z")) == errno.ENOENT


def test_rename_noreplace(fs):
    write_file(fs.path("a"), b"A")
    write_file(fs.path("b"), b"B")
    assert errno_of(renameat2, fs.path("a"), fs.path("b"), RENAME_NOREPLACE) == errno.EEXIST
    assert read_file(fs.path("a")) == b"A" and read_file(fs.path("b")) == b"B"
    assert read_file(fs.backing("a")) == b"A" and read_file(fs.backing("b")) == b"B"
    os.symlink("dangling", fs.path("l"))
    assert errno_of(renameat2, fs.path("a"), fs.path("l"), RENAME_NOREPLACE) == errno.EEXIST
    renameat2(fs.path("a"), fs.path("c"), RENAME_NOREPLACE)
    assert not os.path.lexists(fs.path("a")) and read_file(fs.path("c")) == b"A"


def test_rename_exchange(fs):
    write_file(fs.path("a"), b"A")
    os.mkdir(fs.path("d"))
    write_file(fs.path("d", "inner"), b"I")
    ia, idd = os.stat(fs.path("a")).st_ino, os.stat(fs.path("d")).st_ino
    renameat2(fs.path("a"), fs.path("d"), RENAME_EXCHANGE)
    assert os.path.isdir(fs.path("a")) and os.stat(fs.path("a")).st_ino == idd
    assert read_file(fs.path("a", "inner")) == b"I"
    assert read_file(fs.path("d")) == b"A" and os.stat(fs.path("d")).st_ino == ia
    assert os.path.isdir(fs.backing("a")) and read_file(fs.backing("d")) == b"A"
    # across directories, with a symlink
    os.symlink("target", fs.path("a", "l"))
    renameat2(fs.path("a", "l"), fs.path("d"), RENAME_EXCHANGE)
    assert os.readlink(fs.path("d")) == "target"
    assert read_file(fs.path("a", "l")) == b"A"
    assert errno_of(renameat2, fs.path("d"), fs.path("missing"), RENAME_EXCHANGE) == errno.ENOENT
    assert errno_of(renameat2, fs.path("a"), fs.path("d"), RENAME_EXCHANGE | RENAME_NOREPLACE) == errno.EINVAL


def ns_times(path) -> tuple[int, int]:
    """(atime, mtime) of ``path`` in ns."""
    st = os.stat(path)
    return st.st_atime_ns, st.st_mtime_ns


def test_utimens(fs):
    p = fs.path("f")
    write_file(p, b"x")
    t1, t2 = 1_000_000_123_456_789, 1_500_000_987_654_321
    os.utime(p, ns=(t1, t2))
    assert ns_times(p) == (t1, t2)
    assert ns_times(fs.backing("f")) == (t1, t2)
    # UTIME_OMIT leaves that time exactly as it was
    utimensat(p, UTIME_OMIT, t1)
    assert ns_times(p) == (t1, t1)
    utimensat(p, t2, UTIME_OMIT)
    assert ns_times(p) == (t2, t1)
    assert ns_times(fs.backing("f")) == (t2, t1)
    # both OMIT changes nothing
    utimensat(p, UTIME_OMIT, UTIME_OMIT)
    assert ns_times(p) == (t2, t1)
    # UTIME_NOW sets the current time, OMIT keeps the other
    before = time.time_ns()
    utimensat(p, UTIME_OMIT, UTIME_NOW)
    after = time.time_ns()
    st = os.stat(p)
    assert st.st_atime_ns == t2
    assert before - 10_000_000 <= st.st_mtime_ns <= after + 10_000_000
    utimensat(p, UTIME_NOW, UTIME_OMIT)
    st2 = os.stat(p)
    assert before - 10_000_000 <= st2.st_atime_ns <= time.time_ns() + 10_000_000
    assert st2.st_mtime_ns == st.st_mtime_ns
    # os.utime(None) is "now" for both
    os.utime(p, ns=(t1, t1))
    os.utime(p)
    st = os.stat(p)
    assert st.st_atime_ns > t1 and st.st_mtime_ns > t1
    # on a directory, and on a symlink itself (not its target)
    os.mkdir(fs.path("d"))
    os.utime(fs.path("d"), ns=(t1, t2))
    assert os.stat(fs.path("d")).st_mtime_ns == t2
    os.symlink("f", fs.path("l"))
    os.utime(p, ns=(t2, t2))
    utimensat(fs.path("l"), t1, t1, follow=False)
    assert os.lstat(fs.path("l")).st_mtime_ns == t1
    assert os.stat(p).st_mtime_ns == t2


def test_mtime_ctime_follow_changes(fs):
    p = fs.path("f")
    write_file(p, b"x")
    os.utime(p, ns=(10**18, 10**18))
    os.utime(fs.path(), ns=(10**18, 10**18))
    write_file(p, b"changed")
    st = os.stat(p)
    assert st.st_mtime_ns != 10**18 and st.st_size == 7
    write_file(fs.path("g"), b"")
    assert os.stat(fs.path()).st_mtime_ns != 10**18
    c0 = os.stat(p).st_ctime_ns
    time.sleep(0.02)
    os.chmod(p, 0o640)
    assert os.stat(p).st_ctime_ns > c0


# -- readdir ---------------------------------------------------------------------------

UNLINKER = r"""
import os, sys, random
d, names = sys.argv[1], sys.argv[2:]
random.seed(1)
random.shuffle(names)
print("go", flush=True)
sys.stdin.readline()
errs = 0
for n in names:
    try:
        os.unlink(os.path.join(d, n))
    except OSError as e:
        errs += 1
print("done", errs, flush=True)
"""


def test_readdir_10k_with_concurrent_unlink(fs):
    n = 10_000
    d = fs.backing("big")
    os.mkdir(d)
    # the kernel backend refuses to unlink files whose disk owner is outside the table
    # (EOVERFLOW) and grants root no DAC override on them (docs/kernel-backend.md): own them by view root
    owner = (100000, 100000) if not fs.mount.pids else None
    if owner:
        os.chown(d, *owner)
    names = [f"entry-{i:05d}-{'x' * (i % 40)}" for i in range(n)]
    for name in names:  # made behind the mount's back: faster, and the mount has cached nothing yet
        os.close(os.open(os.path.join(d, name), os.O_CREAT | os.O_WRONLY, 0o644))
        if owner:
            os.chown(os.path.join(d, name), *owner)
    view = fs.path("big")
    # a plain full listing first
    first = os.listdir(view)
    assert len(first) == n and set(first) == set(names)
    doomed = set(names[::2])  # half of them are unlinked while we list
    proc = subprocess.Popen(
        [sys.executable, "-c", UNLINKER, view, *sorted(doomed)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "go"
        proc.stdin.write("\n")
        proc.stdin.flush()
        listings = []
        overlapped = 0
        for _ in range(4):  # a few full listings while the unlinker runs
            seen = []
            with os.scandir(view) as it:
                for e in it:
                    seen.append(e.name)
            listings.append(seen)
            overlapped += proc.poll() is None
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.split() == ["done", "0"], out
    assert overlapped >= 1, "the unlinker finished before a listing did: nothing was concurrent"
    survivors = set(names) - doomed
    for seen in listings:
        dup = {x for x in seen if seen.count(x) > 1} if len(seen) != len(set(seen)) else set()
        assert not dup, f"entries listed twice: {sorted(dup)[:10]}"
        assert set(seen) <= set(names), f"unknown entries {sorted(set(seen) - set(names))[:10]}"
        missing = survivors - set(seen)
        assert not missing, f"{len(missing)} surviving entries not listed, e.g. {sorted(missing)[:5]}"
    assert sorted(os.listdir(view)) == sorted(survivors)
    assert len(os.listdir(d)) == len(survivors)


def test_readdir_types_and_inodes(fs):
    os.mkdir(fs.path("d"))
    write_file(fs.path("f"), b"")
    os.symlink("f", fs.path("l"))
    os.mkfifo(fs.path("p"))
    with os.scandir(fs.path()) as it:
        entries = {e.name: e for e in it}
    assert sorted(entries) == ["d", "f", "l", "p"]
    assert entries["d"].is_dir(follow_symlinks=False)
    assert entries["f"].is_file(follow_symlinks=False)
    assert entries["l"].is_symlink()
    assert stat.S_ISFIFO(entries["p"].stat(follow_symlinks=False).st_mode)
    for name, e in entries.items():
        assert e.inode() == os.lstat(fs.path(name)).st_ino
    # rewinding a directory stream lists everything again
    fd = os.open(fs.path(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        a = sorted(os.listdir(fd))
        os.lseek(fd, 0, os.SEEK_SET)
        b = sorted(os.listdir(fd))
    finally:
        os.close(fd)
    assert a == b == ["d", "f", "l", "p"]


def test_readdir_dot_and_dotdot_inodes(fs):
    """``.`` and ``..`` in a listing carry the directory's and its parent's inode, after a move too."""
    os.makedirs(fs.path("a/sub"))
    os.mkdir(fs.path("b"))

    def dots(d):
        out = subprocess.run(["ls", "-ai", d], capture_output=True, text=True, check=True).stdout.split()
        pairs = dict(zip(out[1::2], (int(x) for x in out[0::2])))
        return pairs["."], pairs[".."]

    sub = fs.path("a/sub")
    assert dots(sub) == (os.stat(sub).st_ino, os.stat(fs.path("a")).st_ino)
    os.rename(sub, fs.path("b/sub"))
    moved = fs.path("b/sub")
    assert dots(moved) == (os.stat(moved).st_ino, os.stat(fs.path("b")).st_ino)
    assert dots(fs.path())[0] == os.stat(fs.path()).st_ino


# -- filesystem-wide -----------------------------------------------------------------


def test_statvfs(fs):
    v, b = os.statvfs(fs.path()), os.statvfs(fs.backing())
    assert v.f_bsize == b.f_bsize
    assert v.f_blocks * v.f_frsize == b.f_blocks * b.f_frsize
    assert v.f_files == b.f_files
    assert v.f_namemax == 255
    # free space is the backing filesystem's (other tenants write too: allow slack)
    assert abs(v.f_bavail * v.f_frsize - b.f_bavail * b.f_frsize) < 512 * 2**20
    assert abs(v.f_ffree - b.f_ffree) < 100_000
    # statvfs of a file in the mount works too
    write_file(fs.path("f"), b"")
    assert os.statvfs(fs.path("f")).f_blocks == v.f_blocks


def test_user_xattrs(fs):
    p = fs.path("f")
    write_file(p, b"")
    os.mkdir(fs.path("d"))
    for target in (p, fs.path("d")):
        os.setxattr(target, "user.one", b"1")
        os.setxattr(target, "user.bin", bytes(range(256)))
        os.setxattr(target, "user.empty", b"")
        assert os.getxattr(target, "user.one") == b"1"
        assert os.getxattr(target, "user.bin") == bytes(range(256))
        assert os.getxattr(target, "user.empty") == b""
        assert {"user.one", "user.bin", "user.empty"} <= set(os.listxattr(target))
        assert errno_of(os.setxattr, target, "user.one", b"x", os.XATTR_CREATE) == errno.EEXIST
        assert errno_of(os.setxattr, target, "user.nope", b"x", os.XATTR_REPLACE) == errno.ENODATA
        os.setxattr(target, "user.one", b"11", os.XATTR_REPLACE)
        assert os.getxattr(target, "user.one") == b"11"
        os.removexattr(target, "user.one")
        assert errno_of(os.getxattr, target, "user.one") == errno.ENODATA
        assert errno_of(os.removexattr, target, "user.one") == errno.ENODATA
        assert "user.one" not in os.listxattr(target)
        assert errno_of(os.getxattr, target, "user.never") == errno.ENODATA
    # what the backing file holds
    bx = set(os.listxattr(fs.backing("f")))
    assert "user.bin" in bx and "user.one" not in bx
    assert os.getxattr(fs.backing("f"), "user.bin") == bytes(range(256))
    # internal names are never shown; a big value round-trips
    assert not [n for n in os.listxattr(p) if n.startswith(("user.containers.", "user.fuseoverlayfs."))]
    big = os.urandom(3000)
    os.setxattr(p, "user.big", big)
    assert os.getxattr(p, "user.big") == big
    # the kernel allows user.* only on regular files and directories
    os.symlink("f", fs.path("l"))
    assert errno_of(os.setxattr, fs.path("l"), "user.x", b"1", follow_symlinks=False) == errno.EPERM
    os.mkfifo(fs.path("p"))
    assert errno_of(os.setxattr, fs.path("p"), "user.x", b"1") == errno.EPERM


def test_xattr_visible_after_remount_and_via_other_name(fs):
    write_file(fs.path("f"), b"")
    os.link(fs.path("f"), fs.path("g"))
    os.setxattr(fs.path("f"), "user.k", b"v")
    assert os.getxattr(fs.path("g"), "user.k") == b"v"
    os.removexattr(fs.path("g"), "user.k")
    assert errno_of(os.getxattr, fs.path("f"), "user.k") == errno.ENODATA


def test_long_names(fs):
    ok = "n" * 255
    bad = "n" * 256
    write_file(fs.path(ok), b"long")
    assert read_file(fs.path(ok)) == b"long"
    assert ok in os.listdir(fs.path())
    assert os.path.exists(fs.backing(ok))
    os.mkdir(fs.path("d" * 255))
    os.symlink("t", fs.path("s" * 255))
    os.rename(fs.path(ok), fs.path("r" * 255))
    for fn in (
        lambda: os.open(fs.path(bad), os.O_CREAT | os.O_WRONLY, 0o644),
        lambda: os.mkdir(fs.path(bad)),
        lambda: os.symlink("t", fs.path(bad)),
        lambda: os.mkfifo(fs.path(bad)),
        lambda: os.link(fs.path("r" * 255), fs.path(bad)),
        lambda: os.rename(fs.path("r" * 255), fs.path(bad)),
        lambda: os.stat(fs.path(bad)),
        lambda: os.unlink(fs.path(bad)),
    ):
        assert errno_of(fn) == errno.ENAMETOOLONG
    assert all(len(n) <= 255 for n in os.listdir(fs.backing()))


def test_fifo_and_socket(fs):
    os.mkfifo(fs.path("fifo"), 0o640)
    st = os.lstat(fs.path("fifo"))
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert stat.S_ISFIFO(os.lstat(fs.backing("fifo")).st_mode)
    # the FIFO works through the mount
    fd = os.open(fs.path("fifo"), os.O_RDWR)
    try:
        os.write(fd, b"through the pipe")
        assert os.read(fd, 100) == b"through the pipe"
    finally:
        os.close(fd)
    os.mknod(fs.path("fifo2"), stat.S_IFIFO | 0o600)
    assert stat.S_ISFIFO(os.lstat(fs.path("fifo2")).st_mode)
    # a unix socket bound through the mount, then connected to through it
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(fs.path("sock"))
        srv.listen(1)
        assert stat.S_ISSOCK(os.lstat(fs.path("sock")).st_mode)
        assert stat.S_ISSOCK(os.lstat(fs.backing("sock")).st_mode)
        cli.settimeout(10)
        cli.connect(fs.path("sock"))
        conn, _ = srv.accept()
        conn.sendall(b"ping")
        assert cli.recv(10) == b"ping"
        conn.close()
    finally:
        cli.close()
        srv.close()
    os.mknod(fs.path("sock2"), stat.S_IFSOCK | 0o600)
    assert stat.S_ISSOCK(os.lstat(fs.path("sock2")).st_mode)
    for n in ("fifo", "fifo2", "sock", "sock2"):
        os.unlink(fs.path(n))
    assert os.listdir(fs.path()) == []


def test_device_nodes(fs):
    dev = os.makedev(1, 3)
    os.mknod(fs.path("null"), stat.S_IFCHR | 0o640, dev)
    os.mknod(fs.path("blk"), stat.S_IFBLK | 0o600, os.makedev(7, 200))
    st = os.lstat(fs.path("null"))
    assert stat.S_ISCHR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert st.st_size == 0
    sb = os.lstat(fs.path("blk"))
    assert stat.S_ISBLK(sb.st_mode) and (os.major(sb.st_rdev), os.minor(sb.st_rdev)) == (7, 200)
    bst = os.lstat(fs.backing("null"))
    if fs.mode == "table":  # a real device node, owned by the mapped root
        assert stat.S_ISCHR(bst.st_mode) and bst.st_rdev == dev
        assert (bst.st_uid, bst.st_gid) == (100000, 100000)
        assert stat.S_ISBLK(os.lstat(fs.backing("blk")).st_mode)
    else:  # a placeholder: a plain file; the record makes it a device in the view
        assert stat.S_ISREG(bst.st_mode) and bst.st_rdev == 0
        assert stat.S_ISREG(os.lstat(fs.backing("blk")).st_mode)
    # the mount is nodev: opening the node through it is refused
    assert errno_of(os.open, fs.path("null"), os.O_RDONLY) in (errno.EACCES, errno.EPERM, errno.ENXIO)
    with os.scandir(fs.path()) as it:
        kinds = {e.name: stat.S_IFMT(e.stat(follow_symlinks=False).st_mode) for e in it}
    assert kinds == {"null": stat.S_IFCHR, "blk": stat.S_IFBLK}
    # rename and link keep the device identity
    os.rename(fs.path("null"), fs.path("null2"))
    os.link(fs.path("null2"), fs.path("null3"))
    for n in ("null2", "null3"):
        s = os.lstat(fs.path(n))
        assert stat.S_ISCHR(s.st_mode) and s.st_rdev == dev and s.st_nlink == 2


# -- hard links and ownership ------------------------------------------------------------


def test_hardlinks_share_attributes(fs):
    os.mkdir(fs.path("a"))
    os.mkdir(fs.path("b"))
    write_file(fs.path("a", "f"), b"x")
    names = [fs.path("a", "f"), fs.path("b", "g"), fs.path("a", "h"), fs.path("top")]
    for n in names[1:]:
        os.link(names[0], n)
    # look every name up (so each is cached in the kernel) before changing anything
    for n in names:
        assert os.stat(n).st_nlink == 4

    def check(mode, uid, gid, nlink):
        for n in names:
            st = os.stat(n)
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_nlink) == (mode, uid, gid, nlink), n

    os.chmod(names[1], 0o604)
    check(0o604, 0, 0, 4)
    os.chown(names[2], 5, 6)
    check(0o604, 5, 6, 4)
    os.chown(names[3], -1, 7)
    check(0o604, 5, 7, 4)
    os.chmod(names[0], 0o2750)
    check(0o2750, 5, 7, 4)
    if fs.mode == "table":
        bst = os.stat(fs.backing("top"))
        assert (bst.st_uid, bst.st_gid, stat.S_IMODE(bst.st_mode)) == (100005, 100007, 0o2750)
    os.unlink(names[3])
    names.pop()
    check(0o2750, 5, 7, 3)
    os.rename(names[2], fs.path("b", "moved"))
    names[2] = fs.path("b", "moved")
    check(0o2750, 5, 7, 3)
    os.link(names[1], fs.path("again"))
    names.append(fs.path("again"))
    check(0o2750, 5, 7, 4)


def test_open_unlinked_file(fs):
    p = fs.path("f")
    write_file(p, b"before")
    os.link(p, fs.path("g"))
    fd = os.open(p, os.O_RDWR)
    try:
        assert os.fstat(fd).st_nlink == 2
        os.unlink(p)
        assert os.fstat(fd).st_nlink == 1
        assert os.stat(fs.path("g")).st_nlink == 1
        os.unlink(fs.path("g"))
        st = os.fstat(fd)
        assert st.st_nlink == 0
        assert st.st_size == 6
        # still fully usable
        os.pwrite(fd, b"after", 6)
        assert os.pread(fd, 100, 0) == b"beforeafter"
        os.fchmod(fd, 0o600)
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
        os.ftruncate(fd, 3)
        assert os.fstat(fd).st_size == 3
    finally:
        os.close(fd)
    assert os.listdir(fs.path()) == []
    assert [n for n in os.listdir(fs.backing()) if n != ".shiftfs"] == []


def test_chmod_chown_basics(fs):
    p = fs.path("f")
    write_file(p, b"")
    for mode in (0o000, 0o777, 0o4755, 0o2755, 0o1777, 0o644):
        os.chmod(p, mode)
        assert stat.S_IMODE(os.stat(p).st_mode) == mode
    os.chown(p, 1234, 2345)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 2345)
    # chown clears set-id bits of an executable, as on any filesystem
    os.chmod(p, 0o6755)
    os.chown(p, 1, 1)
    assert stat.S_IMODE(os.stat(p).st_mode) & 0o6000 == 0
    # symlinks: lchown changes the link, not the target
    os.symlink("f", fs.path("l"))
    os.chown(fs.path("l"), 42, 43, follow_symlinks=False)
    assert (os.lstat(fs.path("l")).st_uid, os.lstat(fs.path("l")).st_gid) == (42, 43)
    assert os.stat(p).st_uid == 1
    if fs.mode == "table":
        assert os.lstat(fs.backing("l")).st_uid == 100042


def test_no_temporary_names_leak(fs):
    for i in range(30):
        os.mkdir(fs.path(f"d{i}"))
        os.symlink("x", fs.path(f"l{i}"))
        os.mkfifo(fs.path(f"p{i}"))
        os.chown(fs.path(f"d{i}"), 3, 3)
        write_file(fs.path(f"f{i}"), b"")
    assert not [n for n in os.listdir(fs.backing()) if n.startswith(".shiftfs~")]
    assert not [n for n in os.listdir(fs.path()) if n.startswith(".shiftfs")]
    assert errno_of(os.stat, fs.path(".shiftfs~t0123456789abcdef")) == errno.ENOENT


def test_names_the_engine_uses_itself(fs):
    """A view name shaped like our temporaries (a shiftfs on a shiftfs) is stored escaped."""
    if not fs.mount.pids:
        pytest.skip("the kernel backend stores every name as given (docs/kernel-backend.md)")
    names = [".shiftfs~t0123456789abcdef", ".shiftfs~plain", ".shiftfs~e.shiftfs~x"]
    for n in names:
        os.mkdir(fs.path(n))
        write_file(fs.path(n, "inside"), b"1")
    write_file(fs.path(".shiftfs~file"), b"f")
    os.rename(fs.path(".shiftfs~file"), fs.path(".shiftfs~renamed"))
    view = sorted(os.listdir(fs.path()))
    assert view == sorted(names + [".shiftfs~renamed"])
    back = sorted(os.listdir(fs.backing()))
    assert len(back) == len(view) and not set(back) & set(view)  # all escaped, none shown raw
    assert read_file(fs.path(".shiftfs~renamed")) == b"f"
    for n in names:
        assert os.listdir(fs.path(n)) == ["inside"]
        os.unlink(fs.path(n, "inside"))
        os.rmdir(fs.path(n))
    os.unlink(fs.path(".shiftfs~renamed"))
    assert os.listdir(fs.backing()) == []
    # escaping makes the backing name longer: a long such name cannot be stored
    assert errno_of(os.mkdir, fs.path(".shiftfs~" + "n" * 246)) == errno.ENAMETOOLONG


@pytest.mark.skipif(not have("fio"), reason="needs fio")
def test_fio_verify(fs):
    r = subprocess.run(
        [
            "fio",
            "--name=verify",
            f"--directory={fs.path()}",
            "--ioengine=psync",
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--size=16m",
            "--numjobs=2",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_state_save=0",
            "--group_reporting",
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=fs.path(),
    )
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    import json

    res = json.loads(r.stdout[r.stdout.index("{") :])
    job = res["jobs"][0]
    assert job["error"] == 0, job
    assert job["write"]["io_bytes"] > 0


@pytest.mark.skipif(not have("setfacl", "getfacl"), reason="needs acl tools")
def test_acls_behave_as_on_disk(fs):
    """A named-user deny entry is enforced, and chmod narrows the ACL mask."""
    os.chmod(fs.path(), 0o755)
    p = fs.path("f")
    write_file(p, b"x")
    os.chmod(p, 0o644)
    subprocess.run(["setfacl", "-m", "u:1000:---", p], check=True)
    r = subprocess.run(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "cat", p], capture_output=True)
    assert r.returncode != 0, "u:1000:--- must deny user 1000"
    subprocess.run(["setfacl", "-m", "u:1000:rw", p], check=True)
    os.chmod(p, 0o600)
    out = subprocess.run(["getfacl", "-n", "-c", "-E", p], capture_output=True, text=True, check=True).stdout
    assert "mask::---" in out.split(), out


# -- concurrent namespace changes ----------------------------------------------------------

STRESS = os.environ.get("SHIFTFS_STRESS") == "1"

WORKER = r"""
import errno, os, random, sys
d, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(seed)
names = [f"n{i}" for i in range(24)]
ok = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR, errno.EPERM, errno.ENXIO}
bad = {}
def p(x):
    return os.path.join(d, x)
def one():
    a, b = rnd.choice(names), rnd.choice(names)
    op = rnd.randrange(11)
    if op == 0:
        os.close(os.open(p(a), os.O_CREAT | os.O_WRONLY | os.O_NONBLOCK, 0o644))
    elif op == 1:
        os.mkdir(p(a))
    elif op == 2:
        os.symlink(b, p(a))
    elif op == 3:
        os.rename(p(a), p(b))
    elif op == 4:
        os.link(p(a), p(b), follow_symlinks=False)
    elif op == 5:
        os.unlink(p(a))
    elif op == 6:
        os.rmdir(p(a))
    elif op == 7:
        os.lstat(p(a))
    elif op == 8:
        os.listdir(d)
    elif op == 9:
        fd = os.open(p(a), os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK)  # FIFO: ENXIO
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
    else:
        os.mkfifo(p(a))
for _ in range(n):
    try:
        one()
    except OSError as e:
        if e.errno not in ok and not (e.errno == errno.ELOOP):
            k = errno.errorcode.get(e.errno, str(e.errno))
            bad[k] = bad.get(k, 0) + 1
print(bad)
"""


def test_stress_concurrent_namespace_ops(fs):
    """Four processes create, link, rename and remove the same few names at once."""
    n = 5000 if STRESS else 1000
    procs = [start_py(WORKER, fs.path(), str(seed), str(n)) for seed in range(4)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.strip() == "{}", f"unexpected errors: {out.strip()}"
    # the view and the disk agree on every name, type, inode and link count
    view = sorted(os.listdir(fs.path()))
    back = sorted(os.listdir(fs.backing()))
    assert view == back
    for name in view:
        v, b = os.lstat(fs.path(name)), os.lstat(fs.backing(name))
        assert stat.S_IFMT(v.st_mode) == stat.S_IFMT(b.st_mode), name
        assert v.st_ino == b.st_ino, name
        assert v.st_nlink == b.st_nlink, name
        assert (v.st_uid, v.st_gid) == (0, 0), name
        if stat.S_ISLNK(v.st_mode):
            assert os.readlink(fs.path(name)) == os.readlink(fs.backing(name))
