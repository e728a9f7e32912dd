"""The data handlers of an open file: read, write, fsync, release, and the
byte-range ones (fallocate, copy_file_range, SEEK_DATA/SEEK_HOLE).

Each is the backing system call on the backing descriptor of the open file
(``fh``, the descriptor :meth:`Operations.open`/``create`` opened); ownership
and records are not involved: the inode stays the same, only its data and
size change. FLUSH is answered ENOSYS on purpose (see :meth:`flush`).

Early writeback (``-o early_writeback=off`` turns it off): a program that
makes its files durable one by one, as dpkg does, writes a file, asks for its
writeback with ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, closes it, and
fsyncs it later, when the disk has already written most of it. FUSE does not
pass ``sync_file_range`` on, so every later FSYNC found the backing file's
pages still dirty: in a Debian minbase build (mmdebstrap, fresh ext4) the
daemon's 7,600 fsyncs waited 5.3 s, real root's 8,500 fsyncs 2.5 s. So once
the mount has served an FSYNC or FSYNCDIR in the last :data:`SYNC_WINDOW_S`
seconds, the release of a handle that wrote starts the backing file's
writeback, as the program asked. A program that never syncs (tar, cp) is
left as it was: its data stays in the page cache until the kernel's own
writeback. The hint waits for nothing; a write error still comes from the
program's fsync, which is where it looks for one.

The byte-range handlers: The kernel checks the caller's side before the
request comes (a file opened read-only: EBADF; RLIMIT_FSIZE and the mount's
size limit: EFBIG; ``ro``: EROFS); the backing filesystem answers the rest
(ENOSPC, EFBIG at its own limit, EOPNOTSUPP for a mode it lacks), as on the
backing filesystem itself. These handlers need the patched pyfuse3
(``patches/pyfuse3``); without them the kernel answers EOPNOTSUPP (fallocate),
copies through READ/WRITE (copy_file_range) and calls the whole file data.

SEEK_DATA/SEEK_HOLE and the writeback cache: the kernel sends FUSE_LSEEK
without writing its dirty pages back first, so while the file is open for
writing somewhere (the only time it can hold dirty pages: every close writes
them back) the backing file may lack data that the view has. A hole reported
there would make a sparse-aware copy (``cp``) skip that data. So in that state
the file is reported as all data up to the backing file's end, as the kernel
does for a filesystem without SEEK_DATA (SEEK_DATA returns the offset,
SEEK_HOLE the end; ENXIO at or past the end). What is still only in the
kernel past that end (an append not written back yet) reads as past the end.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections import Counter

import pyfuse3
from pyfuse3 import FileHandleT

from ..sys.files import fallocate, start_writeback
from .inodes import Inode, InodeTable
from .requestlog import fuse_handler

__all__ = ["FileDataHandlers", "SYNC_WINDOW_S"]

#: how long after an FSYNC/FSYNCDIR a release of a written handle starts its writeback
SYNC_WINDOW_S = 10.0


class FileDataHandlers:
    """The data handlers of :class:`shiftfs.fs.ops.Operations` (open files)."""

    table: InodeTable
    _files: dict[int, Inode]
    counts: Counter[str]  # the error door's request counts (requestlog.Served)
    trace: bool
    enable_writeback_cache: bool
    #: ``-o early_writeback=on`` (default): see the design note
    early_writeback: bool
    #: handles written since they were opened (only tracked with early_writeback)
    _written: set[int]
    #: time.monotonic() of the last FSYNC or FSYNCDIR served
    _synced_at: float
    #: releases that started their file's writeback (``-o stats``)
    writebacks_started: int

    @fuse_handler
    def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    @fuse_handler
    def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        if self.early_writeback:
            self._written.add(fh)
        return os.pwrite(fh, buf, off)

    async def flush(self, fh: FileHandleT) -> None:
        """Not implemented, on purpose: the first ENOSYS makes the kernel stop
        sending FLUSH on this connection (one request less per close). Nothing
        is lost: every WRITE is a pwrite already on the backing file, the kernel
        still writes dirty pages back and reports their errors at close, and
        locks stay in the kernel (we implement no lock handlers)."""
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_handler
    def release(self, fh: FileHandleT) -> None:
        node = self._files.pop(fh, None)
        if fh in self._written:
            self._written.discard(fh)
            if time.monotonic() - self._synced_at < SYNC_WINDOW_S:
                try:
                    start_writeback(fh)
                    self.writebacks_started += 1
                except OSError:
                    pass  # a hint: the program's fsync reports what went wrong
        os.close(fh)
        if node is not None:
            self.table.unpin(node)

    @fuse_handler
    def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        self._synced_at = time.monotonic()
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)

    @fuse_handler
    def fallocate(self, fh: FileHandleT, mode: int, off: int, length: int) -> None:
        fallocate(fh, mode, off, length)

    @fuse_handler
    def copy_file_range(
        self, fh_in: FileHandleT, off_in: int, fh_out: FileHandleT, off_out: int, length: int, flags: int
    ) -> int:
        # flags is 0 (the kernel refuses others); backing copy_file_range may
        # be a reflink, a server-side copy or an in-kernel copy
        return os.copy_file_range(fh_in, fh_out, length, off_in, off_out)

    @fuse_handler
    def lseek(self, fh: FileHandleT, off: int, whence: int) -> int:
        if self.enable_writeback_cache and self._open_for_writing(self._files.get(fh)):
            end = os.fstat(fh).st_size
            if off >= end:
                raise OSError(errno.ENXIO, "past the end")
            return off if whence == os.SEEK_DATA else end
        return os.lseek(fh, off, whence)

    def _open_for_writing(self, node: Inode | None) -> bool:
        """Whether some open handle of ``node`` can write (its pages may be dirty)."""
        if node is None:
            return True
        for fd, other in self._files.items():
            if other is node and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
                return True
        return False
