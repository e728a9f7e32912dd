"""The data handlers of an open file: read, write, fsync, release, and the
byte-range ones (fallocate, copy_file_range, SEEK_DATA/SEEK_HOLE).

Each is the backing system call on the backing descriptor of the open file
(``fh``, the descriptor :meth:`Operations.open`/``create`` opened); ownership
and records are not involved: the inode stays the same, only its data and
size change. FLUSH is answered ENOSYS on purpose (see :meth:`flush`).

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
from collections import Counter

import pyfuse3
from pyfuse3 import FileHandleT

from ..sys.files import fallocate
from .inodes import Inode, InodeTable
from .requestlog import fuse_handler

__all__ = ["FileDataHandlers"]


class FileDataHandlers:
    """The data handlers of :class:`shiftfs.fs.ops.Operations` (open files)."""

    table: InodeTable
    _files: dict[int, Inode]
    counts: Counter[str]  # the error door's request counts (requestlog.Served)
    trace: bool
    enable_writeback_cache: bool

    @fuse_handler
    def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    @fuse_handler
    def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
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
        os.close(fh)
        if node is not None:
            self.table.unpin(node)

    @fuse_handler
    def fsync(self, fh: FileHandleT, datasync: bool) -> None:
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
