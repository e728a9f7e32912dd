"""The FUSE connection's capabilities, and the patched pyfuse3 they need.

pyfuse3 is built from its released sdist with the patch series in
``patches/pyfuse3`` (``scripts/pyfuse3.sh``, run by ``make setup``); the
patches add ``Operations.init_connection``, through which the daemon chooses
these ``conn->want`` bits of libfuse 3.14:

- ``FUSE_CAP_DONT_MASK`` on: the kernel passes the mode of a create, mkdir
  or mknod unmasked, with the caller's umask beside it, so a default ACL on
  the parent decides the mode as on ext4 (the policy's ``create_mode``
  applies the umask itself where there is none).
- ``FUSE_CAP_ASYNC_DIO`` off: the kernel then sends the WRITE of an
  asynchronous O_DIRECT write (io_submit, io_uring) before the call returns,
  and drops the cached pages of the range after the WRITE is answered. With
  it on, such a write returns -EIOCBQUEUED, the page cache invalidation after
  the write is skipped and the completion does none, so a buffered READ that
  lands between the invalidation before the write and the daemon's WRITE
  caches the old data, which the writeback cache or ``keep_cache`` keep for
  good (stale pages, ``tests/test_odirect.py``). This holds for every cache
  mode; the cost is that several asynchronous O_DIRECT writes of one task
  go one after another (the daemon serves one request at a time anyway).
- ``FUSE_CAP_CACHE_SYMLINKS`` on with ``cache=always``: symlink targets stay
  in the page cache (a symlink's target never changes), one READLINK each.
"""

from __future__ import annotations

import logging
from typing import Any

import pyfuse3

from ..errors import MountError
from .options import CacheConfig

__all__ = ["ConnectionHandlers", "require_patched", "PATCHED"]

log = logging.getLogger(__name__)

#: what the patch series adds, as shiftfs uses it
_NEEDED = ("ConnectionInfo", "FUSE_CAP_DONT_MASK")
_NEEDED_OPS = ("fallocate", "copy_file_range", "lseek", "init_connection")
PATCHED = all(hasattr(pyfuse3, n) for n in _NEEDED) and all(hasattr(pyfuse3.Operations, n) for n in _NEEDED_OPS)


def require_patched() -> None:
    """Refuse to mount with a pyfuse3 that lacks shiftfs' patch series."""
    if not PATCHED:
        raise MountError(
            f"pyfuse3 {pyfuse3.__version__} ({pyfuse3.__file__}) lacks shiftfs' patches "
            "(patches/pyfuse3: fallocate, copy_file_range, lseek, cached listings, connection flags); "
            "run 'make setup' in the shiftfs checkout to build it"
        )


class ConnectionHandlers:
    """``init_connection`` of :class:`shiftfs.fs.ops.Operations`."""

    cache: CacheConfig

    def init_connection(self, conn: Any) -> None:
        want = conn.want | pyfuse3.FUSE_CAP_DONT_MASK
        want &= ~pyfuse3.FUSE_CAP_ASYNC_DIO
        if self.cache.mode == "always":
            want |= pyfuse3.FUSE_CAP_CACHE_SYMLINKS
        conn.want = want & conn.capable
        log.debug("connection: capable 0x%x, want 0x%x", conn.capable, conn.want)
