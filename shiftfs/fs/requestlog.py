"""The request log and error door of the FUSE handlers.

Every handler of :class:`shiftfs.fs.ops.Operations` is wrapped by
:func:`fuse_handler`: it counts the request (``-o stats``), traces it with
``-o debug``, and maps what the handler raises to one errno. Unexpected
errors are logged as one line naming the request and the view path.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import pyfuse3

from ..ownership.store import SideTableError
from .inodes import Inode

__all__ = ["fuse_handler"]

log = logging.getLogger("shiftfs.fs.ops")

#: backing errnos that mean something is wrong with the daemon or the disk: logged
_LOGGED_ERRNOS = {
    errno.EIO,
    errno.EMFILE,
    errno.ENFILE,
    errno.ENOMEM,
    errno.EBADF,
    errno.EFAULT,
    errno.EUCLEAN,
    errno.EBADMSG,
    errno.EDEADLK,
    errno.ENOTCONN,
}
# handlers whose first argument is a file handle / a directory handle, not an inode
_FH_OPS = {"read", "write", "flush", "release", "fsync", "fallocate", "copy_file_range", "lseek"}
_DH_OPS = {"readdir", "releasedir", "fsyncdir"}
# handlers whose first two arguments are a directory inode and a name in it
_NAMED_OPS = {"lookup", "mknod", "mkdir", "symlink", "unlink", "rmdir", "create"}


def _printable(s: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def _view_path(ops, node: Inode | None, inode_id=None) -> str:
    """The last known view path of an inode, for the log."""
    if node is None:
        return f"<inode {inode_id}>"
    return node.view_path()


def _describe(ops, name: str, args: tuple) -> str:
    """A request in one log line: inodes and handles as view paths, buffers as lengths."""
    try:
        args = tuple(a for a in args if not isinstance(a, pyfuse3.RequestContext))
        if not args:
            return ""
        first, rest = args[0], list(args[1:])
        if name in _FH_OPS:
            head = _view_path(ops, ops.open_file_node(first), f"fh {first}")
        elif name in _DH_OPS:
            head = _view_path(ops, ops.open_dir_node(first), f"dh {first}")
        elif isinstance(first, int):
            head = _view_path(ops, ops.table.get(first), first)
        else:
            head = repr(first)
        if name in _NAMED_OPS and rest and isinstance(rest[0], bytes):
            head = head.rstrip("/") + "/" + _printable(os.fsdecode(rest.pop(0)))
        elif name == "link" and len(rest) >= 2:
            head += (
                " -> "
                + _view_path(ops, ops.table.get(rest[0]), rest[0]).rstrip("/")
                + "/"
                + _printable(os.fsdecode(rest[1]))
            )
            rest = rest[2:]
        elif name == "rename" and len(rest) >= 3:
            head = (
                head.rstrip("/")
                + "/"
                + _printable(os.fsdecode(rest[0]))
                + " -> "
                + _view_path(ops, ops.table.get(rest[1]), rest[1]).rstrip("/")
                + "/"
                + _printable(os.fsdecode(rest[2]))
            )
            rest = rest[3:]
        shown = []
        for a in rest:
            if isinstance(a, (bytes, bytearray, memoryview)) and len(a) > 64:
                shown.append(f"<{len(a)} bytes>")
            elif isinstance(a, (int, bytes, str, type(None))):
                shown.append(repr(a))
        return " ".join([head] + shown)
    except Exception:  # never let the log line break the request
        return _printable(repr(args)[:200])


class Served(Protocol):
    """What the error door needs of the operations object it wraps."""

    counts: Counter[str]
    trace: bool


_S = TypeVar("_S", bound=Served)
_P = ParamSpec("_P")
_R = TypeVar("_R")


def fuse_handler(fn: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], Coroutine[Any, Any, _R]]:
    """Run a synchronous handler as a pyfuse3 coroutine; map errors to errnos.

    Unexpected errors are logged as one line naming the request and the view
    path (the traceback only with ``-o debug``); ``-o debug`` traces requests.
    The wrapper keeps the handler's signature, so mypy checks each handler
    against its callers and against pyfuse3's ``Operations``.
    """
    name = fn.__name__

    @functools.wraps(fn)
    async def handler(self: _S, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        self.counts[name] += 1
        if self.trace:
            log.debug("-> %s %s", name, _describe(self, name, args))
        try:
            return fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except SideTableError as e:
            if e.errno != errno.ENOSPC:
                log.error("%s %s: %s", name, _describe(self, name, args), _printable(e.strerror or str(e)))
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except OSError as e:
            if e.errno in _LOGGED_ERRNOS or not e.errno:
                log.warning("%s %s: %s", name, _describe(self, name, args), _printable(str(e)))
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception as e:
            log.error(
                "%s %s: unexpected %s: %s",
                name,
                _describe(self, name, args),
                type(e).__name__,
                _printable(str(e)),
                exc_info=self.trace,
            )
            raise pyfuse3.FUSEError(errno.EIO) from None

    return handler
