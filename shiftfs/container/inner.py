"""
The container side of a launch: namespace B, its views, and its pid 1.

Why a process of its own. The FUSE views must belong to the user namespace
the command runs in: the kernel numbers a request's caller in the ids of
the namespace that *mounted* the view, and only processes of that namespace
(or below) may use a view mounted with ``allow_other``. As root, ``shiftfs
run`` gives the container a user namespace of its own (*C*, nested in the
daemons' namespace, see :mod:`.userns`), whose root is a fresh host id and
not host root; so the views are mounted from inside C, and the daemons,
which stay outside, serve them through the ``/dev/fuse`` descriptors handed
to them.

Process layout below pid 1 of A (:mod:`.launcher`)::

    pid 1 of A       daemons' user namespace; starts a daemon per view with
    │                the /dev/fuse descriptor B0 hands over
    └─ B0            (pid namespace A: invisible from the container)
       │             enters C (root's run), then unshares mount, pid (and for
       │             run UTS and IPC) namespaces; opens /dev/fuse and mounts
       │             each view; supervises B1; dumpable only where it must be
       │             (see :func:`serve_b`)
       └─ B1         pid 1 of B: non-dumpable from its first instruction,
                     runs ``Layout.inner`` (run: builds the root, pivots,
                     closes every descriptor but stdio, reaps; exec: the
                     views on their targets)

The A-B0 link is a SEQPACKET socket; its messages, in order:
``u`` (B0 entered C) -> ``m`` (A wrote C's maps); ``f`` + the /dev/fuse
descriptors -> ``r`` (every daemon serves) or ``x``+reason; ``d`` + the views'
device numbers (the seccomp supervisor and read-ahead need them) -> ``g``.

Where each descriptor ends (so that nothing of the host reaches B):
the link closes in B0 once B1 runs and in B1 before ``inner``; the /dev/fuse
descriptors close in B0 once handed over (the daemons hold their copies);
the note pipe to the host side (:mod:`.join`) closes in B0 once the note is
sent; B1's pivot signal pipe closes when signalled; everything else B1
inherited is closed by ``inner`` (run: ``close_fds_except`` after the pivot).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import SetupError
from ..fs import sourcelock
from ..sys import mounts
from . import join, supervise, userns

__all__ = ["Link", "serve_b"]

#: The FUSE mount's options: the kernel checks permissions against the view;
#: every process of the container's user namespace may use it.
_FUSE_OPTS = "rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other"


@dataclass
class Link:
    """B0's end of the A-B0 socket, with its message helpers."""

    sock: socket.socket

    def send(self, msg: bytes, fds: Sequence[int] = ()) -> None:
        if fds:
            socket.send_fds(self.sock, [msg], list(fds))
        else:
            self.sock.send(msg)

    def expect(self, tag: bytes) -> bytes:
        data = self.sock.recv(65536)
        if data[:1] == b"x":
            raise SetupError(data[1:].decode(errors="replace") or "the launcher gave up")
        if data[:1] != tag:
            raise SetupError("the launcher went away while the container was being set up")
        return data[1:]


def _mount_view(source: str, view: str) -> int:
    """Mount a FUSE view of ``source`` on ``view`` from this namespace; return
    its /dev/fuse descriptor (the daemon will serve it)."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    fsname = source if not any(c in source for c in ",\\ \t\n") else "shiftfs"
    try:
        mounts.mount(fsname, view, "fuse.shiftfs", 0, f"fd={fd},{_FUSE_OPTS}")
    except OSError:
        os.close(fd)
        raise
    return fd


def serve_b(
    prog: str,
    link: socket.socket,
    sources: Sequence[str],
    views: Sequence[str],
    unshare: int,
    container: userns.NamespaceMaps | None,
    inner: Callable[[str, list[str]], int],
    stage: str,
    note_fd: int | None,
) -> int:
    """B0: become the container's namespaces, mount its views, run B1."""
    mounts.set_parent_death_signal()
    ln = Link(link)
    if container is not None:
        mounts.unshare(mounts.CLONE_NEWUSER)
        ln.send(b"u")
        ln.expect(b"m")
        userns.enter_as_root()
    mounts.unshare(unshare | mounts.CLONE_NEWPID)
    fuse_fds: list[int] = []
    try:
        for source, view in zip(sources, views):
            fuse_fds.append(_mount_view(source, view))
        if fuse_fds:
            ln.send(b"f", fuse_fds)
            ln.expect(b"r")
    finally:
        for fd in fuse_fds:
            os.close(fd)
    devs = [os.stat(v).st_dev for v in views]
    ln.send(b"d" + json.dumps(devs).encode())
    ln.expect(b"g")
    link.close()
    me = sourcelock.own_pid()  # as the host numbers us: our root is still A's, with the host's /proc
    pivoted_r, pivoted_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(pivoted_r)
        supervise.child(prog, _pid1, inner, stage, list(views), pivoted_w, note_fd)
    os.close(pivoted_w)
    if note_fd is not None:
        # B1 says when it stands in its new root; only then may a second shell join us.
        if os.read(pivoted_r, 1) == b"p":
            with contextlib.suppress(OSError):
                os.write(note_fd, json.dumps({"pid": me}).encode())
        os.close(note_fd)
    os.close(pivoted_r)
    return supervise.exit_code(supervise.supervise(pid))


def _pid1(
    inner: Callable[[str, list[str]], int], stage: str, views: list[str], pivoted: int, note_fd: int | None
) -> int:
    """B1, pid 1 of B: nothing in B may read our memory or descriptors."""
    mounts.set_dumpable(False)
    mounts.set_parent_death_signal()
    if note_fd is not None:
        os.close(note_fd)
    join.set_pivot_pipe(pivoted)
    return inner(stage, views)
