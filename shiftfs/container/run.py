"""
``shiftfs run``: run a command in a container whose ``/`` is a directory seen
through shiftfs.

The backing directory (ROOT) stays owned by the invoking user; the ownership
the command sets with chown/chmod lives in each file's record, and the
command sees it as *view ids*. Nothing needs root: an unprivileged user gets
a user namespace mapped from /etc/subuid and /etc/subgid (or a single-id one).

The namespaces, the daemons and supervision are :mod:`.launcher`'s and
:mod:`.inner`'s, the command line :mod:`.run_args`'; this module is run's own
layout. Pid 1 of namespace B (its own mount, UTS, IPC and, as root, user
namespace, made by B0) mounts a fresh /proc, a minimal /dev, /sys read-only,
/tmp and the binds (those with ``shift`` are views of their own) in the view
of ROOT, masks podman's masked paths, pivots into it, closes everything but
stdio and runs COMMAND as its child, reaping. The daemons never see the
pivot: they live in A's mount namespace. What this guarantees is the
README's "Security model" (tests/test_escape.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import pwd
import socket

from ..errors import SetupError
from ..sys import mounts
from . import join, launcher, preflight, rootfs, supervise, userns
from .run_args import (
    DESCRIPTION,
    EPILOG,
    PROG,
    USAGE,
    RunConfig,
    add_arguments,
    config_from_args,
)

_DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty", "fuse")
#: PATH in the container, as podman and systemd-nspawn set it for root.
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def container_env(cfg: RunConfig) -> dict[str, str]:
    """COMMAND's environment: nothing of the caller's but TERM (podman and
    systemd-nspawn do the same), so that a host PATH without sbin, MAIL or
    OLDPWD never leaks in; --setenv comes last and wins."""
    env = {"PATH": ROOT_PATH, "HOME": "/", "container": "shiftfs"}
    if cfg.term:
        env["TERM"] = cfg.term
    env.update(cfg.user_env)
    env["PWD"] = cfg.chdir
    env.update(cfg.setenv)
    return env


# --- preflight checks -----------------------------------------------------------


def check_config(cfg: RunConfig, idmap: userns.NamespaceMaps) -> None:
    uid = os.getuid()
    owner = os.stat(cfg.root).st_uid
    if owner != uid and ("--map" in cfg.mount_args or not _named_user(owner)):
        # Never advise chown -R here: on a tree shifted on disk it would wipe
        # the ownership that the shift encodes.
        raise SetupError(
            f"ROOT {cfg.root} is owned by uid {owner}, not by you (uid {uid}): its ownership "
            f"is shifted on disk, and run's user namespace cannot reach those ids; as root, "
            f"'shiftfs mount --map b:{owner}:0:65536 {cfg.root} VIEW' and then "
            f"'systemd-nspawn -D VIEW' or 'podman run --rootfs VIEW COMMAND'"
        )
    if owner != uid:
        raise SetupError(
            f"ROOT {cfg.root} is owned by uid {owner}, not by you (uid {uid}); "
            f"run as uid {owner} or 'chown -R {uid} {cfg.root}'"
        )
    preflight.check_daemon_can_start(cfg.mount_args, idmap)
    preflight.check_reachable([(cfg.root, 5)], "serving ROOT")
    for b in cfg.binds:
        preflight.check_reachable([(b.source, 4 if not os.path.isdir(b.source) else 5)], "bind-mounting")
        owner = os.stat(b.source).st_uid
        if b.shift and owner != uid:
            raise SetupError(
                f"--bind {b.source}:{b.target}:shift: {b.source} is owned by uid "
                f"{owner}, not by you (uid {uid}); drop shift or "
                f"'chown -R {uid} {b.source}'"
            )
    preflight.check_private_source(
        [cfg.root] + [b.source for b in cfg.binds if b.shift], cfg.mount_args, cfg.allow_shared_source
    )
    if cfg.user:
        vuid, vgid = cfg.user
        if not idmap.maps_uid(vuid) or not idmap.maps_gid(vgid):
            hint = (
                "this is a single-id namespace: set up /etc/subuid and /etc/subgid "
                "(see 'usermod --add-subuids') or use --user 0"
                if idmap.kind == "single"
                else "use an id inside the namespace's range"
            )
            raise SetupError(f"--user {vuid}:{vgid} is not mapped ({idmap.describe()}); {hint}")


def _named_user(uid: int) -> bool:
    """Whether ``uid`` is a user of this host (not a shifted id)."""
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def plan(cfg: RunConfig, idmap: userns.NamespaceMaps) -> launcher.Layout:
    """Check ``cfg`` and describe run's part of the launch: ROOT and every
    shifted bind are served, in that order."""
    check_config(cfg, idmap)
    shifted = [b.source for b in cfg.binds if b.shift]
    return launcher.Layout(
        prog=PROG,
        sources=(cfg.root, *shifted),
        mode_args=tuple(cfg.mount_args),
        mount_opts=cfg.view_opts,
        allow_shared_source=cfg.allow_shared_source,
        inner=functools.partial(_container_init, cfg, idmap),
        needed=tuple(b.source for b in cfg.binds if not b.shift),
        unshare=mounts.CLONE_NEWNS | mounts.CLONE_NEWUTS | mounts.CLONE_NEWIPC,
        container=idmap.container,
    )


def divert(cfg: RunConfig) -> int | None:
    """On the host, before launching: join the live container of ROOT (shiftfs.container.join)."""
    return join.divert(PROG, cfg, _exec_command)


def _terminal() -> str | None:
    """The host path of the terminal on stdin, if any."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd):
                path = os.ttyname(fd)
                if path.startswith("/dev/") and os.path.exists(path):
                    return path
        except OSError:
            pass
    return None


def _setup_root(cfg: RunConfig, idmap: userns.NamespaceMaps, root: str) -> None:
    """Mount /proc, /dev, /sys (podman's masked paths hidden), /tmp and the binds under ``root``."""
    proc = rootfs.make_mountpoint(root, "/proc")
    mounts.mount("proc", proc, "proc", mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC)

    dev = rootfs.make_mountpoint(root, "/dev")
    mounts.mount("tmpfs", dev, "tmpfs", mounts.MS_NOSUID | mounts.MS_NOEXEC, "mode=0755,size=1m")
    for name in _DEV_NODES:
        host = f"/dev/{name}"
        if os.path.exists(host):
            target = os.path.join(dev, name)
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666))
            rootfs.bind(host, target, recursive=False)
    console = _terminal()
    if console:  # so that ttyname() finds the terminal inside: it scans /dev
        target = os.path.join(dev, "console")
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        rootfs.bind(console, target, recursive=False)
    pts = os.path.join(dev, "pts")
    os.mkdir(pts, 0o755)
    opts = "newinstance,ptmxmode=0666,mode=0620" + (",gid=5" if idmap.maps_gid(5) else "")
    mounts.mount("devpts", pts, "devpts", mounts.MS_NOSUID | mounts.MS_NOEXEC, opts)
    os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    shm = os.path.join(dev, "shm")
    os.mkdir(shm, 0o1777)
    mounts.mount("tmpfs", shm, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, "mode=1777")
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("core", "/proc/kcore"),
    ):
        os.symlink(target, os.path.join(dev, name))

    sys_dir = rootfs.make_mountpoint(root, "/sys")
    rootfs.bind("/sys", sys_dir, readonly=True)

    tmp = rootfs.make_mountpoint(root, "/tmp")
    mounts.mount("tmpfs", tmp, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, "mode=1777")

    if not cfg.unmask:
        rootfs.mask_paths(proc, sys_dir)
    for b in cfg.binds:
        target = rootfs.make_mountpoint(root, b.target, directory=os.path.isdir(b.source))
        try:
            rootfs.bind(b.source, target, readonly=b.readonly)
        except OSError as e:
            raise SetupError(f"--bind {b.source}:{b.target}: {e.strerror}") from None


def _container_init(cfg: RunConfig, idmap: userns.NamespaceMaps, stage: str, views: list[str]) -> int:
    """Pid 1 of namespace B (non-dumpable, in the namespaces B0 made:
    shiftfs.container.inner): build the container's mounts, pivot into the
    view of ROOT (``views[0]``; the shifted binds follow in order), keep
    nothing but stdio, run COMMAND and reap until it exits."""
    if cfg.hostname:
        socket.sethostname(cfg.hostname)
    shifted = iter(views[1:])
    binds = [dataclasses.replace(b, source=next(shifted)) if b.shift else b for b in cfg.binds]
    mnt = views[0]
    _setup_root(dataclasses.replace(cfg, binds=binds), idmap, mnt)
    rootfs.pivot_into(mnt)
    join.pivoted()  # B0 registers the container for a second shell now
    mounts.close_fds_except()  # nothing of the host stays with pid 1 but stdio
    return supervise.fork_and_supervise(PROG, _exec_command, cfg)


def _exec_command(cfg: RunConfig) -> int:
    env = container_env(cfg)
    uid, gid = cfg.user or (0, 0)
    # Drop the host's supplementary groups (kept so far for the daemon's sake),
    # unless the namespace forbids setgroups (single id, unprivileged).
    with contextlib.suppress(PermissionError):
        os.setgroups([gid] if cfg.user else [])
    if cfg.user:
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    try:
        os.chdir(cfg.chdir)
    except OSError as e:
        raise SetupError(f"--chdir {cfg.chdir}: {e.strerror} inside the container") from None
    return supervise.exec_command(PROG, cfg.command, env, " inside the container")


_SUMMARY = "run a command in a container whose root is seen through shiftfs"
#: In CommandLine's field order: prog, summary, usage, description, epilog, add_arguments, configure, plan.
COMMAND_LINE = launcher.CommandLine(
    PROG, _SUMMARY, USAGE, DESCRIPTION, EPILOG, add_arguments, config_from_args, plan, divert
)
register = COMMAND_LINE.register
