"""Asynchronous O_DIRECT writes and buffered readers of the same file (project issue 27).

With FUSE_CAP_ASYNC_DIO (libfuse's default), an O_DIRECT write submitted through Linux
AIO returns -EIOCBQUEUED in the kernel, which then skips the page-cache invalidation
after the write, and the completion does none: a buffered READ landing between the
invalidation before the write and the daemon's WRITE caches the old bytes, and the
writeback cache or keep_cache keep them for every later open (stale pages; the backing
file is right). The mount turns ASYNC_DIO off (shiftfs.fs.connection). Both patterns of
the issue, in both modes, with the writeback cache on and off, default cache.

AIO is driven with the raw system calls (io_setup, io_submit, io_getevents), no libaio.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from fsutil import MAP, MODE_ARGS

pytestmark = [pytest.mark.root, pytest.mark.fuse]


# The writer: an AIO O_DIRECT writer of whole patterns; prints the number of stale read-backs.
AIO = r"""
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS_io_setup, SYS_io_destroy, SYS_io_getevents, SYS_io_submit = 206, 207, 208, 209

class Iocb(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32), ("rw_flags", ctypes.c_int32),
                ("opcode", ctypes.c_uint16), ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_int64),
                ("reserved2", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]

class Event(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]

ctx = ctypes.c_ulong(0)
assert libc.syscall(SYS_io_setup, 64, ctypes.byref(ctx)) == 0, ctypes.get_errno()

def aio_write(fd, buf, chunk, depth):
    # the whole buffer at offset 0, ``chunk`` bytes per request, ``depth`` in flight
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    cbs = [Iocb(opcode=1, fildes=fd, buf=addr + off, nbytes=chunk, offset=off) for off in range(0, len(buf), chunk)]
    done = 0
    for i in range(0, len(cbs), depth):
        batch = cbs[i:i + depth]
        arr = (ctypes.POINTER(Iocb) * len(batch))(*[ctypes.pointer(c) for c in batch])
        assert libc.syscall(SYS_io_submit, ctx, len(batch), arr) == len(batch), ctypes.get_errno()
        evs = (Event * len(batch))()
        got = 0
        while got < len(batch):
            ev = ctypes.byref(evs, got * ctypes.sizeof(Event))
            n = libc.syscall(SYS_io_getevents, ctx, 1, len(batch) - got, ev, None)
            assert n > 0, ctypes.get_errno()
            got += n
        assert all(e.res == chunk for e in evs), [e.res for e in evs]
        done += len(batch)
    return done
"""

# Pattern 1 (odirect.py): two processes keep opening the file and reading it buffered;
# each round writes a new pattern with one AIO O_DIRECT write, then reads it back
# through a fresh open.
PATTERN1 = (
    AIO
    + r"""
path, rounds, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
w = os.open(path, os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, size)
stale = 0
for i in range(1, rounds + 1):
    pat = bytes([i % 251 + 1]) * size
    buf.seek(0)
    buf.write(pat)
    aio_write(w, buf, size, 1)
    fd = os.open(path, os.O_RDONLY)
    got = os.pread(fd, size, 0)
    os.close(fd)
    stale += got != pat
print(stale)
"""
)

# Pattern 2: AIO O_DIRECT writes of a new pattern, many in flight, while another process
# reads the same ranges buffered; afterwards every page must show the last pattern.
PATTERN2 = (
    AIO
    + r"""
path, passes, size, chunk, depth = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
w = os.open(path, os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, size)
stale = 0
for p in range(passes):
    pat = p % 251 + 1
    buf.seek(0)
    buf.write(bytes([pat]) * size)
    aio_write(w, buf, chunk, depth)
    fd = os.open(path, os.O_RDONLY)
    got = os.pread(fd, size, 0)
    os.close(fd)
    stale += sum(1 for off in range(0, size, 4096) if got[off] != pat)
print(stale, pat)
"""
)

READER = r"""
import os, sys
path, size, chunk, stop, fresh = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
fd = os.open(path, os.O_RDONLY)
while not os.path.exists(stop):
    if fresh:
        os.close(fd)
        fd = os.open(path, os.O_RDONLY)
    for off in range(0, size, chunk):
        os.pread(fd, chunk, off)
"""


@pytest.fixture(params=["writeback", "nowriteback"])
def m(shiftfs_mount, mode, request):
    opts = ("-o", "nowriteback") if request.param == "nowriteback" else ()
    mnt = shiftfs_mount(*MODE_ARGS[mode], *opts)
    os.chmod(mnt.mountpoint, 0o755)
    return mnt


def _readers(path: str, size: int, chunk: int, n: int, fresh: bool) -> tuple[list[subprocess.Popen], str]:
    stop = path + ".stop"
    procs = [
        subprocess.Popen([sys.executable, "-c", READER, path, str(size), str(chunk), stop, "1" if fresh else "0"])
        for _ in range(n)
    ]
    return procs, stop


def _stop(procs: list[subprocess.Popen], stop: str) -> None:
    open(stop, "w").close()
    for p in procs:
        p.wait(60)
    os.unlink(stop)


def test_aio_direct_write_read_back(m):
    """Pattern 1: after each AIO O_DIRECT write, a fresh buffered open reads that write."""
    size = 640 << 10
    with open(m.path("f"), "wb") as f:
        f.write(b"\0" * size)
    procs, stop = _readers(m.path("f"), size, size, 2, fresh=True)
    try:
        r = subprocess.run(
            [sys.executable, "-c", PATTERN1, m.path("f"), "150", str(size)], capture_output=True, text=True, timeout=300
        )
    finally:
        _stop(procs, stop)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == 0, f"{r.stdout.strip()} of 150 read-backs saw stale pages"


def test_aio_direct_writes_racing_buffered_reader(m):
    """Pattern 2 (odrace.c): 4 KiB AIO O_DIRECT writes, 32 in flight, of a new pattern while two
    buffered readers keep reading the same ranges through descriptors they hold open; after each
    pass a fresh open must read the new pattern in every page, and so must the reader's kind of
    descriptor at the end; the backing file holds the last pattern."""
    size, chunk = 256 << 10, 4096
    with open(m.path("f"), "wb") as f:
        f.write(b"\x55" * size)
    procs, stop = _readers(m.path("f"), size, chunk, 2, fresh=False)
    try:
        r = subprocess.run(
            [sys.executable, "-c", PATTERN2, m.path("f"), "100", str(size), str(chunk), "32"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        _stop(procs, stop)
    assert r.returncode == 0, r.stderr
    stale, last = map(int, r.stdout.split())
    assert stale == 0, f"{stale} stale pages in 100 passes of {size // 4096} pages"
    assert open(m.backing("f"), "rb").read() == bytes([last]) * size
    fd = os.open(m.path("f"), os.O_RDONLY)
    try:
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    assert data == bytes([last]) * size
