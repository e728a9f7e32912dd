"""A devpts mount with an id the single-id namespace cannot map, done for the caller.

Image builders mount a fresh devpts in the tree they build with the tty
group's id (mmdebstrap: ``uid=5``, others ``gid=5``). With one id in the
namespace the kernel refuses that option (EINVAL), and the whole build
stops. ``mount(2)`` is rare, so the filter traps every call; the supervisor
hands all of them back to the kernel except a devpts mount whose ``uid=`` or
``gid=`` names an id other than 0. That one it makes for the caller without
those options (devpts then gives new ptys the caller's ids, 0): a forked
helper enters the caller's mount namespace, root and working directory and
calls ``mount(2)`` with the caller's source, target and flags, so the target
resolves as it would for the caller. The caller must hold CAP_SYS_ADMIN
(else the kernel answers), and the mount has no more power than one the
caller could make itself with ``uid=0,gid=0``.
"""

from __future__ import annotations

import errno
import os

from ..sys import mounts
from .notify_target import Caller

__all__ = ["devpts_data", "mount_for"]

CAP_SYS_ADMIN = 21


def devpts_data(data: bytes) -> bytes | None:
    """The devpts options without unmappable ``uid=``/``gid=``; None if nothing needs dropping."""
    opts = [o for o in data.split(b",") if o]
    kept = [o for o in opts if not (o.startswith((b"uid=", b"gid=")) and o.split(b"=", 1)[1] != b"0")]
    return None if kept == opts else b",".join(kept)


def mount_for(caller: Caller, source: bytes, target: bytes, flags: int, data: bytes) -> int:
    """Mount devpts as ``caller`` would resolve ``target``; returns 0 or an errno."""
    ns = caller._open_proc("ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    root = caller._open_proc("root")
    cwd = caller._open_proc("cwd")
    try:
        pid = os.fork()
        if pid == 0:
            code = errno.EIO
            try:
                mounts.setns(ns, mounts.CLONE_NEWNS)
                os.fchdir(root)
                os.chroot(".")
                os.fchdir(cwd)
                mounts.mount(source, target, b"devpts", flags, data)
                code = 0
            except OSError as e:
                code = e.errno or errno.EIO
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else errno.EIO
    finally:
        for fd in (ns, root, cwd):
            os.close(fd)
