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
cannot map as that namespace's root (0). The kernel would show such ids as
65534, and root of the namespace then has no capabilities over the inode, so
a package manager's ``fchmod``/``utime``/``rename`` after its ``fchown``
would fail. Records keep the real ids: ``shiftfs export`` shows them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import pyfuse3
import trio

from ..ownership import acl
from .ops import Ctx, Operations

__all__ = ["serve_control", "single_id_presenter"]

log = logging.getLogger(__name__)


def _mapped_ranges(path: str) -> list[tuple[int, int]]:
    out = []
    with open(path) as f:
        for line in f:
            inside, _outside, count = (int(x) for x in line.split())
            out.append((inside, count))
    return out


def single_id_presenter() -> Callable[[int, int], tuple[int, int]]:
    """``present(uid, gid)``: ids our user namespace cannot map become 0 (see the module docstring)."""
    uids = _mapped_ranges("/proc/self/uid_map")
    gids = _mapped_ranges("/proc/self/gid_map")

    def mapped(ranges: list[tuple[int, int]], xid: int) -> bool:
        return any(lo <= xid < lo + n for lo, n in ranges)

    def present(uid: int, gid: int) -> tuple[int, int]:
        return (uid if mapped(uids, uid) else 0, gid if mapped(gids, gid) else 0)

    return present


def _chown(ops: Operations, req: dict[str, Any]) -> Callable[[], None]:
    node = ops.table[int(req["ino"])]
    uid, gid = req.get("uid"), req.get("gid")
    st = os.fstat(node.fd)
    mode = None
    if not stat.S_ISDIR(st.st_mode) and (uid is not None or gid is not None):
        cur = ops.policy.view(node, st).mode
        kill = stat.S_ISUID | (stat.S_ISGID if cur & stat.S_IXGRP else 0)
        if cur & kill:
            mode = cur & ~kill
    ops.policy.change(node, st, uid, gid, mode)
    ino = node.id
    return lambda: pyfuse3.invalidate_inode(ino, attr_only=True)


def _mknod(ops: Operations, req: dict[str, Any]) -> Callable[[], None]:
    parent = ops.table[int(req["parent"])]
    name = bytes.fromhex(req["name"])
    mode = int(req["mode"])
    if not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
        raise OSError(errno.EINVAL, "not a device")
    ctx = SimpleNamespace(uid=int(req["uid"]), gid=int(req["gid"]), umask=int(req["umask"]), pid=0)
    entry = ops._make(parent, name, mode, int(req["rdev"]), cast(Ctx, ctx))
    # The kernel never saw this entry: give back the lookup _make counted.
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
    node, vname, bname = ops._writable_xattr(int(req["ino"]), name.encode())
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
