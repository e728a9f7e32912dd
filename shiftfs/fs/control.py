"""The daemon's private control channel, for a single-id namespace.

In a user namespace with one id (a user without an /etc/subuid range), the
kernel refuses ``chown`` to any other id (EINVAL) and ``mknod`` of devices
(EPERM) before FUSE sees the request. ``shiftfs run``/``exec`` then trap those
calls with a seccomp user-notification filter
(:mod:`shiftfs.container.seccomp_notify`); the supervisor resolves the target
the way the kernel would and, for a target in this view, asks this daemon over
a socket it was given at start (``-o control_fd=N``), never through the file
system:

* ``{"op": "chown", "ino": N, "uid": U|null, "gid": G|null}``: the inode with
  FUSE node id N (the ``st_ino`` the view shows) gets that owner, as a
  privileged caller's chown would record it (setuid and group-executable
  setgid bits of a non-directory are cleared, as the kernel does);
* ``{"op": "mknod", "parent": N, "name": HEX, "mode": M, "rdev": R, "uid": U,
  "gid": G, "umask": K}``: a device node NAME in directory N, made like a
  FUSE MKNOD of a privileged caller (a placeholder file plus its record);
* ``{"op": "setxattr", "ino": N, "name": "system.posix_acl_access"|
  "system.posix_acl_default", "value": HEX, "fsetid": B}``: a POSIX ACL
  naming ids the namespace cannot map (the kernel refuses it with EINVAL),
  stored as a FUSE SETXATTR would store it: escaped in xattr mode, the mode
  kept in step, the setgid bit cleared unless ``fsetid`` (the caller's only
  group is 0, so it is in no other file group).

Each answer is ``{"errno": E}`` (0: done). The kernel's cached attributes or
entry are invalidated before answering, from a worker thread: the
invalidation may wait for a directory lock that a process holds while it
waits for a FUSE reply this loop must give.

``-o single_id`` also makes the view present every id the daemon's namespace
cannot map as that namespace's root (0): :mod:`shiftfs.ownership.single_id`.
Every ownership decision behind these requests is the policy's
(:meth:`~shiftfs.ownership.policy.OwnershipPolicy.privileged_chown`,
:meth:`~shiftfs.ownership.policy.OwnershipPolicy.acl_written`, the create
plan of :meth:`~shiftfs.fs.ops.Operations.make_node`); this module only
decodes requests and invalidates the kernel's caches.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import stat
from collections.abc import Callable
from typing import Any, NamedTuple

import pyfuse3
import trio

from ..ownership import acl
from .ops import Operations

__all__ = ["serve_control"]

log = logging.getLogger(__name__)


def _chown(ops: Operations, req: dict[str, Any]) -> Callable[[], None]:
    node = ops.table[int(req["ino"])]
    ops.policy.privileged_chown(node, req.get("uid"), req.get("gid"))
    ino = node.id
    return lambda: pyfuse3.invalidate_inode(ino, attr_only=True)


class _Caller(NamedTuple):
    """The trapped caller of a control-channel mknod (what a FUSE request's context says)."""

    uid: int
    gid: int
    umask: int


def _mknod(ops: Operations, req: dict[str, Any]) -> Callable[[], None]:
    parent = ops.table[int(req["parent"])]
    name = bytes.fromhex(req["name"])
    mode = int(req["mode"])
    if not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
        raise OSError(errno.EINVAL, "not a device")
    caller = _Caller(int(req["uid"]), int(req["gid"]), int(req["umask"]))
    entry = ops.make_node(parent, name, mode, int(req["rdev"]), caller)
    # The kernel never saw this entry: give back the lookup make_node counted.
    ops.table.forget(entry.st_ino, 1)
    pid = parent.id

    def invalidate() -> None:
        # the parent's cached listing (FOPEN_CACHE_DIR) too: the entry may have no dentry to invalidate
        pyfuse3.invalidate_inode(pid)
        pyfuse3.invalidate_entry(pid, name)

    return invalidate


def _setxattr(ops: Operations, req: dict[str, Any]) -> Callable[[], None]:
    name = str(req["name"])
    if name not in acl.ACL_NAMES:
        raise OSError(errno.EINVAL, "only POSIX ACLs are set through the control channel")
    value = bytes.fromhex(req["value"])
    acl.check_valid(acl.parse(value))
    node, vname, bname = ops.writable_xattr(int(req["ino"]), name.encode())
    fsetid = bool(req["fsetid"])
    ops.store_xattr(node, vname, bname, value, lambda view: fsetid or view.gid == 0)
    ino = node.id
    # attributes (the mode may follow the ACL) and the kernel's cached ACLs
    return lambda: pyfuse3.invalidate_inode(ino, attr_only=True)


_OPS = {"chown": _chown, "mknod": _mknod, "setxattr": _setxattr}


def _handle(ops: Operations, data: bytes) -> tuple[int, Callable[[], None] | None]:
    try:
        req = json.loads(data)
        return 0, _OPS[req["op"]](ops, req)
    except pyfuse3.FUSEError as e:
        return e.errno, None
    except OSError as e:
        return e.errno or errno.EIO, None
    except (ValueError, KeyError, TypeError) as e:
        log.warning("control: bad request %r: %s", data[:200], e)
        return errno.EINVAL, None


async def serve_control(ops: Operations, fd: int) -> None:
    """Answer requests on ``fd`` (a SOCK_SEQPACKET socket) until the other end closes it."""
    sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
    with sock:
        while True:
            try:
                data = await sock.recv(65536)
            except OSError as e:
                log.warning("control channel: %s", e)
                return
            if not data:
                return
            ops.counts["control"] += 1
            err, invalidate = _handle(ops, data)
            if invalidate is not None:
                try:
                    await trio.to_thread.run_sync(invalidate)
                except OSError as e:  # the kernel no longer knows the inode or name: nothing to invalidate
                    log.debug("control: invalidation: %s", e)
            await sock.send(json.dumps({"errno": err}).encode())
