"""
The launcher shared by ``shiftfs run`` and ``shiftfs exec``: the options
both take, the checks made before anything is forked, the user namespace,
the shiftfs daemons, the staging directory, supervision and exit statuses.
A command describes only its own layout as a :class:`Layout`: which host
directories to serve, and what pid 1 of the inner namespace B does with
the views.

Process layout, outermost first::

    shiftfs run|exec        host; writes the id maps, relays signals, keeps the
    │                       note directory and start lock of a run (.join),
    │                       returns COMMAND's exit status
    └─ userns helper        new user namespace (the daemons'), becomes its root
       └─ pid 1 of A        private mount namespace; a staging tmpfs with one
          │                 empty directory per served directory
          ├─ shiftfs daemons  serve each directory through a descriptor opened
          │                   before any mount, over the /dev/fuse descriptor B0
          │                   mounted its view with (.daemons)
          ├─ seccomp          single-id namespace only: answers the chown/mknod
          │  supervisor       calls B's filter traps (seccomp_notify)
          └─ B0             the container's namespaces (root's run: its own user
             │              namespace, whose root is not host root); mounts the
             │              views (.inner)
             └─ pid 1 of B  Layout.inner: the command's own mounts, COMMAND

The daemons live in A, so nothing B does to its mounts (pivot_root, moving
the views onto their targets) reaches them, and they cannot outlive the run:
they are in pid namespace A, and their views live only in B's mount
namespace, which ends with B's last process. Every mount is made in a
private namespace, so nothing leaks onto the host; nothing below B0 can see
A, its daemons or its supervisor.

Where the launcher's descriptors end: the host's id-map pipes with the maps;
the note pipe in B0 once the container is registered (.join); the daemon log
(a memfd) with pid 1 of A (B0 closes its copy first thing); the served
directories once each daemon holds its copy; the /dev/fuse descriptors in A
once each daemon runs and in B0 once handed over; the A-B0 link in B0
before pid 1 of B is forked. The helper closes everything of the host
(``close_fds_except``) before it enters any namespace, and COMMAND gets
stdio only (:func:`.supervise.exec_command`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import SetupError
from ..sys import mounts
from . import daemons, join, preflight, supervise, userns
from . import inner as inner_mod
from .supervise import EXIT_SETUP

_DAEMON_EXIT_TIMEOUT = 30.0


# --- what a command asks of the launcher -------------------------------------------


@dataclass(frozen=True)
class Layout:
    """One command's part of a launch.

    ``inner(stage, views)`` is pid 1 of namespace B, forked once every
    directory in ``sources`` is served: ``views[i]`` is the shiftfs view of
    ``sources[i]``, on the staging tmpfs mounted at ``stage``. B starts in a
    copy of A's mount namespace, so it must leave ``stage`` or pivot away
    from it. ``needed`` are further host paths B uses after the staging
    tmpfs is mounted (the staging directory must not hide them)."""

    prog: str
    sources: tuple[str, ...]
    mode_args: tuple[str, ...]
    inner: Callable[[str, list[str]], int]
    mount_opts: str = ""
    needed: tuple[str, ...] = ()
    #: single-id namespace, xattr mode: trap chown/mknod and record them (seccomp_notify)
    trap_ids: bool = False
    #: namespaces B0 unshares besides the pid namespace (mount at least)
    unshare: int = mounts.CLONE_NEWNS
    #: the container's own user namespace inside the daemons' one (root's run), or None
    container: userns.NamespaceMaps | None = None
    #: --allow-shared-source: the daemons serve SOURCE as shared (it keeps its mode)
    allow_shared_source: bool = False


@dataclass(frozen=True)
class CommandLine:
    """A launcher command's command line: its texts, its arguments, how
    ``configure(args)`` reads them into a config (with ``userns`` and
    ``userns_base``) and how ``plan(cfg, idmap)`` checks it into a layout."""

    prog: str
    summary: str
    usage: str
    description: str
    epilog: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    configure: Callable[[argparse.Namespace], Any]
    plan: Callable[[Any, userns.NamespaceMaps], Layout]
    #: run on the host after ``configure``: an exit code ends the command there
    #: (``run`` joining a live container of ROOT), None goes on to launch
    divert: Callable[[Any], int | None] | None = None

    def _texts(self) -> dict[str, Any]:
        return dict(
            usage=self.usage,
            description=self.description,
            epilog=self.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    def register(self, subparsers: Any) -> None:
        """Add the subcommand to the ``shiftfs`` command line."""
        p = subparsers.add_parser(self.prog.split()[-1], help=self.summary, **self._texts())
        self.add_arguments(p)
        p.set_defaults(func=self.handler)

    def main(self, argv: list[str] | None = None) -> int:
        """``python -m shiftfs.container.<module>``: the subcommand on its own."""
        p = argparse.ArgumentParser(prog=self.prog, **self._texts())
        self.add_arguments(p)
        return self.handler(p.parse_args(argv))

    def handler(self, args: argparse.Namespace) -> int:
        """Returns COMMAND's exit status."""
        return launch_command(self.prog, lambda: self.configure(args), self.plan, self.divert)


def launch_command(
    prog: str,
    configure: Callable[[], Any],
    plan: Callable[[Any, userns.NamespaceMaps], Layout],
    divert: Callable[[Any], int | None] | None = None,
) -> int:
    """The whole of ``shiftfs run`` or ``shiftfs exec``: ``configure()``
    reads the command line into a config with ``userns`` and
    ``userns_base``; ``plan(cfg, idmap)`` checks it and returns the layout.
    Returns COMMAND's exit status, or 125 with one line on stderr."""
    try:
        return _launch_command(prog, configure, plan, divert)
    finally:
        join.end_turn()  # a start lock ``divert`` took (shiftfs.container.join), also when we failed early


def _launch_command(
    prog: str,
    configure: Callable[[], Any],
    plan: Callable[[Any, userns.NamespaceMaps], Layout],
    divert: Callable[[Any], int | None] | None,
) -> int:
    try:
        cfg = configure()
        if divert is not None:
            code = divert(cfg)
            if code is not None:
                return code
        idmap, note = userns.choose_idmap(cfg.userns, cfg.userns_base, getattr(cfg, "fresh_root", False))
        layout = plan(cfg, idmap)
        preflight.check_sources_free(layout.sources)
        if idmap.kind == "single" and "--xattr" in layout.mode_args and layout.sources:
            from . import seccomp_notify

            missing = seccomp_notify.binding_missing()
            if missing is None:
                layout = dataclasses.replace(layout, trap_ids=True)
                if note:
                    note = userns.single_id_note(userns.caller_name(), recorded=True)
            elif note:
                note += f"; to keep the owners chown asks for instead: {missing}"
        if layout.sources:
            preflight.staging_dir(layout.sources, layout.needed)
    except SetupError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_SETUP
    if note:
        print(f"{prog}: {note}", file=sys.stderr)
    try:
        return launch(layout, idmap)
    except OSError as e:
        print(f"{prog}: {supervise.oserror_text(e)}", file=sys.stderr)
        return EXIT_SETUP


# --- the launch ----------------------------------------------------------------------


def launch(layout: Layout, idmap: userns.NamespaceMaps) -> int:
    """Fork the user-namespace helper, write its id maps when it asks, and
    supervise it (the host side). The host side alone keeps what belongs to
    the host: the note directory and start lock of a run (shiftfs.container.join)
    stay here, and the helper closes every descriptor but its pipes first thing."""
    sys.stdout.flush()
    sys.stderr.flush()
    old_mask = supervise.block_signals()
    note_r = note_w = None
    try:
        to_parent_r, to_parent_w = os.pipe()
        to_child_r, to_child_w = os.pipe()
        if join.wants_note():
            note_r, note_w = os.pipe2(os.O_CLOEXEC)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            mounts.close_fds_except({to_parent_w, to_child_r, *([note_w] if note_w is not None else [])})
            supervise.child(layout.prog, _userns_helper, layout, idmap, parent, to_parent_w, to_child_r, note_w)
        os.close(to_parent_w)
        os.close(to_child_r)
        if note_w is not None and note_r is not None:
            os.close(note_w)
            join.await_note(note_r)  # a thread: registers the container once B0 reports it
        ready = os.read(to_parent_r, 1)
        os.close(to_parent_r)
        if ready == b"u":
            try:
                userns.claim_idmap(pid, idmap)
            except SetupError as e:
                print(f"{layout.prog}: {e}", file=sys.stderr)
                os.write(to_child_w, b"x")
            else:
                os.write(to_child_w, b"m")
        os.close(to_child_w)
        return supervise.exit_code(supervise.supervise(pid))
    finally:
        join.unregister()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _userns_helper(
    layout: Layout, idmap: userns.NamespaceMaps, parent: int, wfd: int, rfd: int, note_fd: int | None
) -> int:
    """Enter a new user namespace, wait for the maps, then start pid 1 of
    namespace A and supervise it."""
    mounts.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:
        return EXIT_SETUP
    try:
        mounts.unshare(mounts.CLONE_NEWUSER)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES, errno.ENOSPC, errno.EUSERS):
            raise SetupError(
                f"cannot create a user namespace ({e.strerror}): {userns.userns_unavailable_hint()}"
            ) from None
        raise
    os.write(wfd, b"u")
    os.close(wfd)
    if os.read(rfd, 1) != b"m":
        return EXIT_SETUP
    os.close(rfd)
    userns.become_root(idmap)
    mounts.unshare(mounts.CLONE_NEWNS | mounts.CLONE_NEWPID)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        supervise.child(layout.prog, _serve_and_run, layout, note_fd)
    if note_fd is not None:
        os.close(note_fd)  # the host reads to its end: only B0 may hold it open
    return supervise.exit_code(supervise.supervise(pid))


def _high_fd(fd: int) -> int:
    """Move ``fd`` above the descriptor numbers a daemon is given (so that
    the spawn's dup2 calls cannot overwrite one another)."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


class _B0:
    """Pid 1 of A's end of the link to B0 (shiftfs.container.inner)."""

    def __init__(self, sock: socket.socket, pid: int):
        self.sock, self.pid = sock, pid

    def recv(self, tag: bytes, nfds: int = 0) -> tuple[bytes, list[int]]:
        msg, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, max(nfds, 1))
        if msg[:1] != tag:
            for fd in fds:
                os.close(fd)
            raise _B0Gone
        return msg[1:], fds

    def refuse(self, why: str) -> None:
        with contextlib.suppress(OSError):
            self.sock.send(b"x" + why.encode()[:60000])


class _B0Gone(Exception):
    """B0 failed (it said why on stderr) before the next step."""


def _serve_and_run(layout: Layout, note_fd: int | None) -> int:
    """Pid 1 of namespace A: fork B0, which mounts the views in the
    container's namespaces (shiftfs.container.inner); serve each one with a
    daemon; once B0 is gone, let the daemons write everything out."""
    mounts.set_parent_death_signal(signal.SIGKILL)
    os.chdir("/")
    mounts.make_rprivate("/")
    # Ends with pid 1 of A; B0 closes its copy first thing.
    log_fd = _high_fd(os.memfd_create("shiftfs-daemon-log", os.MFD_CLOEXEC))
    log = f"/proc/self/fd/{log_fd}"
    views: list[str] = []
    stage = ""
    # Every source is opened before the first mount, so that none is reached
    # through a view; they end once every daemon holds its copy.
    src_fds = [_high_fd(os.open(s, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)) for s in layout.sources]
    if layout.sources:
        stage = preflight.staging_dir(layout.sources, layout.needed)
        # 0711: B0, root of the container's namespace, passes through to mount the views
        mounts.mount("tmpfs", stage, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, "mode=0711,size=1m")
        for i in range(len(layout.sources)):
            views.append(os.path.join(stage, f"view{i}"))
            os.mkdir(views[-1], 0o755)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sup_end = b_end = None
    inner = layout.inner
    if layout.trap_ids:
        from . import seccomp_notify

        sup_end, b_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        inner = seccomp_notify.pid1_with_filter(layout.inner, b_end)
    keep = {theirs.fileno(), *([note_fd] if note_fd is not None else []), *([b_end.fileno()] if b_end else [])}
    pid = os.fork()
    if pid == 0:
        mounts.close_fds_except(keep)
        supervise.child(
            layout.prog,
            inner_mod.serve_b,
            layout.prog,
            theirs,
            layout.sources,
            views,
            layout.unshare,
            layout.container,
            inner,
            stage,
            note_fd,
        )
    theirs.close()
    if b_end is not None:
        b_end.close()
    if note_fd is not None:
        os.close(note_fd)
    b0 = _B0(ours, pid)
    try:
        if layout.container is not None:
            b0.recv(b"u")
            userns.write_inner_idmap(pid, layout.container)
            ours.send(b"m")
        controls: list[socket.socket] = []
        if layout.sources:
            _msg, received = b0.recv(b"f", len(layout.sources))
            fuse_fds = [_high_fd(fd) for fd in received]  # above the numbers the spawn dup2s onto
            try:
                for i, (source, fd, fuse_fd) in enumerate(zip(layout.sources, src_fds, fuse_fds)):
                    control = None
                    theirs_c = None
                    if layout.trap_ids:
                        ours_c, theirs_c = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                        controls.append(ours_c)
                        control = _high_fd(os.dup(theirs_c.fileno()))
                    try:
                        daemons.start_daemon(
                            layout.mode_args,
                            preflight.view_stats(layout.mount_opts, i),
                            source,
                            fd,
                            log_fd,
                            fuse_fd,
                            views[i],
                            control,
                            layout.allow_shared_source,
                        )
                    finally:
                        if theirs_c is not None:
                            theirs_c.close()
                        if control is not None:
                            os.close(control)
            finally:
                for fd in fuse_fds + src_fds:
                    os.close(fd)
            ours.send(b"r")
        devs_text, _ = b0.recv(b"d")
        devs = json.loads(devs_text)
        if sup_end is not None:
            from . import seccomp_notify

            seccomp_notify.start_supervisor_for(layout.prog, sup_end, devs, controls)
        if os.geteuid() == 0:
            for dev in devs:
                daemons.tune_readahead(dev)
        ours.send(b"g")
    except _B0Gone:
        pass  # B0 said why
    except SetupError as e:
        b0.refuse(str(e))  # B0 says it, as every setup failure of the container is said
    finally:
        ours.close()
        if sup_end is not None:
            sup_end.close()
    code = supervise.exit_code(supervise.supervise(pid, reap_any=True))
    # B's mount namespace, and the views with it, went with B0's last process:
    # the kernel has written back and closed each connection, so the daemons exit.
    statuses = supervise.reap_all(_DAEMON_EXIT_TIMEOUT)
    if any(s != 0 for s in statuses):
        print(
            f"{layout.prog}: warning: a shiftfs daemon exited with status "
            f"{supervise.exit_code(next(s for s in statuses if s))}: "
            f"{daemons.log_tail(log, 3) or 'no output'}",
            file=sys.stderr,
        )
    return code
