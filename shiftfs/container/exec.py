"""
``shiftfs exec``: run a command as namespace root on the host's own
filesystem, with chosen directories seen through shiftfs.

    shiftfs exec --shift ./rootfs -- mmdebstrap --mode=root bookworm ./rootfs

COMMAND gets a new user namespace (the same id ranges as ``shiftfs run``:
/etc/subuid via newuidmap for a user, a free 65536-id block for root, else a
single id) and a new mount namespace in which the host's filesystem is
visible as it is. Each ``--shift SRC[:DST]`` mounts SRC through shiftfs at
DST (by default over SRC itself), so that the ownership COMMAND sets with
chown/chmod there lives in records and SRC stays owned by the invoking user.
COMMAND runs as view id 0 with all capabilities of the namespace, in the
caller's working directory and environment.

The namespaces, the daemons and supervision are :mod:`.launcher`'s; this
module is exec's own layout. The views reach their DSTs only in namespace B,
after the staging tmpfs is gone: the daemons, in A, see the host's
directories unshadowed (the engine opens its record side table in SRC by
path, which must not lead back into its own view). The mounts carry
``allow_other``, so processes in user namespaces COMMAND creates (apt's _apt
user, sandboxes, ``unshare -r``) can use them too. When COMMAND exits, pid
namespace B takes every process and mount COMMAND made with it; pid 1 of A
then unmounts the views and waits for the daemons to write everything out.
Nothing is ever mounted in the host's namespace.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import os
import sys
from dataclasses import dataclass, field

from ..errors import SetupError
from ..sys import mounts
from . import launcher, preflight, rootfs, supervise, userns

PROG = "shiftfs exec"

_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


@dataclass(frozen=True)
class Shift:
    source: str  # host directory served by the daemon
    target: str  # where the view is mounted (the host path COMMAND uses)


@dataclass
class ExecConfig:
    command: list[str]
    shifts: list[Shift] = field(default_factory=list)
    mount_args: list[str] = field(default_factory=lambda: ["--xattr"])
    userns: str = "auto"
    userns_base: int | None = None
    cwd: str = "/"
    allow_shared_source: bool = False
    #: -o for every view (preflight.view_options)
    view_opts: str = ""


# --- command line -------------------------------------------------------------

_USAGE = "%(prog)s [--shift SRC[:DST]]... [options] -- COMMAND [ARGS...]"
_DESCRIPTION = """\
Run COMMAND as root of a new user namespace, on the host's filesystem as it is,
with each SRC seen through shiftfs at DST (default: over SRC itself). chown,
chmod u+s, useradd... inside a shifted directory are kept in records (--xattr,
the default); on the host it stays owned by you. 'shiftfs export SRC' writes a
tar with the ownership COMMAND set.

exec is not a sandbox: COMMAND sees the host (your working directory, environment,
network, and as root host root's rights). It gets nothing of the launcher's (stdio
only); for isolation use 'shiftfs run'."""
_EPILOG = """\
View id 0 is you. As a user, view ids 1.. are your ranges in /etc/subuid and
/etc/subgid (newuidmap); as root, a 65536-id block no other namespace uses; without
either, only id 0 exists: chown to other ids and mknod of devices in the shifted
directories are then trapped (seccomp, python3-seccomp) and recorded, elsewhere chown
fails (EINVAL), no process can switch uid (su), and apt needs
-o APT::Sandbox::User=root.

COMMAND keeps your working directory and environment (sbin directories are added to
PATH); it gets its own pid namespace and a fresh /proc. The shiftfs mounts use
allow_other, so user namespaces and sandboxes COMMAND starts can use them. Device
nodes cannot be created in a user namespace (EPERM from the kernel): add them to
the archive instead ('shiftfs devtable --help'). Export SRC itself, not a
directory inside it: records of symlinks live in SRC/.shiftfs.

Exit status: COMMAND's (128+N if killed by signal N); 125 if the namespace could
not be set up, 126 if COMMAND cannot be executed, 127 if it is not found.
SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1/2 sent to shiftfs exec reach COMMAND.

example:
  mkdir -m 700 rootfs
  shiftfs exec --shift rootfs -- mmdebstrap --mode=root --variant=minbase bookworm rootfs
  shiftfs export rootfs -o rootfs.tar
"""


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shift",
        action="append",
        default=[],
        metavar="SRC[:DST]",
        help="mount directory SRC through shiftfs at DST (default: over SRC); repeatable",
    )
    preflight.add_namespace_options(p)
    p.add_argument(
        "command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]", help="the command to run as namespace root"
    )


def _caller_cwd() -> str:
    """The working directory, as the caller's $PWD spells it if that is the
    same directory (keeps the symlinks the shell shows)."""
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        raise SetupError("the working directory was removed; cd somewhere else") from None
    pwd = os.environ.get("PWD", "")
    if pwd.startswith("/"):
        with contextlib.suppress(OSError):
            if os.path.samestat(os.stat(pwd), os.stat(cwd)):
                return pwd
    return cwd


def parse_shift(spec: str) -> Shift:
    """SRC[:DST]; relative paths are taken from the working directory. DST
    is checked later, by :func:`check_targets`: it may lie inside another
    shift's view."""
    src, sep, dst = spec.partition(":")
    if not src or (sep and not dst):
        raise SetupError(f"--shift {spec!r} is not SRC[:DST]; e.g. --shift ./rootfs or --shift ./build:/work/build")
    if not os.path.exists(src):
        raise SetupError(f"--shift {spec}: {src} does not exist; create it with 'mkdir -p {src}'")
    if not os.path.isdir(src):
        raise SetupError(f"--shift {spec}: {src} is not a directory; shiftfs serves directories")
    source, target = os.path.realpath(src), os.path.realpath(dst or src)
    if target == "/":
        raise SetupError(f"--shift {spec}: cannot mount over /; use 'shiftfs run {source}' for a whole root filesystem")
    return Shift(source, target)


def _seen_at(path: str, shifts: list[Shift]) -> str:
    """The host path of what COMMAND will find at ``path``: under the
    innermost other view that covers it, that view's SRC."""
    outer = [s for s in shifts if s.target != path and preflight.within(path, s.target)]
    if not outer:
        return path
    s = max(outer, key=lambda s: len(s.target))
    return _seen_at(s.source, [x for x in shifts if x is not s]) + path[len(s.target) :]


def check_targets(shifts: list[Shift]) -> None:
    """Every DST must be a directory where COMMAND will see it, and no two
    shifts may share one."""
    seen: dict[str, str] = {}
    for s in shifts:
        if s.target in seen:
            raise SetupError(
                f"--shift {seen[s.target]} and --shift {s.source} both mount on {s.target}; give each a different DST"
            )
        seen[s.target] = s.source
        where = _seen_at(s.target, shifts)
        shown = s.target if where == s.target else f"{s.target} (that is, {where})"
        if not os.path.exists(where):
            raise SetupError(
                f"--shift {s.source}:{s.target}: DST {shown} does not exist; create it with 'mkdir -p {where}'"
            )
        if not os.path.isdir(where):
            raise SetupError(f"--shift {s.source}:{s.target}: DST {shown} is not a directory")


def config_from_args(args: argparse.Namespace) -> ExecConfig:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise SetupError("no COMMAND given; usage: shiftfs exec [--shift SRC[:DST]]... -- COMMAND [ARGS...]")
    mount_args = preflight.mount_args(args)
    shifts = [parse_shift(s) for s in args.shift]
    check_targets(shifts)
    # Outer views first: a DST inside another one is mounted on top of it.
    shifts.sort(key=lambda s: s.target.count("/"))
    return ExecConfig(
        command=command,
        shifts=shifts,
        mount_args=mount_args,
        userns=args.userns or "auto",
        userns_base=args.userns_base,
        cwd=_caller_cwd(),
        allow_shared_source=args.allow_shared_source,
        view_opts=preflight.view_options(args),
    )


# --- preflight checks -----------------------------------------------------------


def check_config(cfg: ExecConfig, idmap: userns.NamespaceMaps) -> None:
    uid = os.getuid()
    for s in cfg.shifts:
        owner = os.stat(s.source).st_uid
        if owner != uid:
            raise SetupError(
                f"--shift {s.source}: it is owned by uid {owner}, not by you "
                f"(uid {uid}); run as uid {owner} or 'chown -R {uid} {s.source}'"
            )
    if cfg.shifts:
        preflight.check_daemon_can_start(cfg.mount_args, idmap)
        for s in cfg.shifts:
            preflight.check_reachable([(s.source, 7)], "serving")
        preflight.check_private_source([s.source for s in cfg.shifts], cfg.mount_args, cfg.allow_shared_source)


def plan(cfg: ExecConfig, idmap: userns.NamespaceMaps) -> launcher.Layout:
    """Check ``cfg`` and describe exec's part of the launch: every SRC is
    served; the views carry allow_other, so that user namespaces and
    sandboxes COMMAND starts can use them too."""
    check_config(cfg, idmap)
    return launcher.Layout(
        prog=PROG,
        sources=tuple(s.source for s in cfg.shifts),
        mode_args=tuple(cfg.mount_args),
        mount_opts=cfg.view_opts,
        inner=functools.partial(_command_init, cfg),
    )


def _attach_views(cfg: ExecConfig, stage: str, views: list[str]) -> None:
    """In COMMAND's mount namespace: put each view on its DST, then take the
    staging tmpfs away, so that the host's directory under it shows again."""
    try:
        clones = [mounts.open_tree(view) for view in views]
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise
        clones = None  # before Linux 5.2: bind while the views are reachable
    if clones is None:
        for s, view in zip(cfg.shifts, views):
            if preflight.within(s.target, stage):
                raise SetupError(
                    f"--shift {s.source}:{s.target}: DST is under {stage}, which "
                    "this kernel (no open_tree) cannot show; pick another DST"
                )
            rootfs.bind(view, s.target, recursive=False)
        mounts.umount2(stage, mounts.MNT_DETACH)
        return
    mounts.umount2(stage, mounts.MNT_DETACH)
    for s, fd in zip(cfg.shifts, clones):
        try:
            mounts.move_mount(fd, s.target)
        except OSError as e:
            raise SetupError(
                f"--shift {s.source}:{s.target}: cannot mount the view on {s.target}: {e.strerror}"
            ) from None
        finally:
            os.close(fd)


def _command_init(cfg: ExecConfig, stage: str, views: list[str]) -> int:
    """Pid 1 of namespace B: own mount namespace with the views on their
    DSTs and a /proc of this pid namespace; run COMMAND and pass on its exit
    status."""
    mounts.set_parent_death_signal()
    mounts.unshare(mounts.CLONE_NEWNS)
    if views:
        _attach_views(cfg, stage, views)
    try:
        mounts.mount("proc", "/proc", "proc", mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC)
    except OSError as e:
        print(
            f"{PROG}: warning: cannot mount a /proc for the new pid namespace ({e.strerror}); COMMAND sees the host's",
            file=sys.stderr,
        )
    return supervise.fork_and_supervise(PROG, _exec_command, cfg)


def command_env(environ: dict[str, str]) -> dict[str, str]:
    """COMMAND's environment: the caller's, with the sbin directories a
    root's PATH has added at its end."""
    env = dict(environ)
    path = env.get("PATH") or "/usr/local/bin:/usr/bin:/bin"
    dirs = path.split(":")
    env["PATH"] = ":".join(dirs + [d for d in _SBIN if d not in dirs])
    return env


def _exec_command(cfg: ExecConfig) -> int:
    env = command_env(dict(os.environ))
    try:
        os.chdir(cfg.cwd)
    except OSError as e:
        raise SetupError(
            f"cannot enter the working directory {cfg.cwd} inside the namespace: {e.strerror}; cd elsewhere"
        ) from None
    env["PWD"] = cfg.cwd
    return supervise.exec_command(PROG, cfg.command, env)


_SUMMARY = "run a command as namespace root with directories shifted through shiftfs"
#: In CommandLine's field order: prog, summary, usage, description, epilog, add_arguments, configure, plan.
COMMAND_LINE = launcher.CommandLine(
    PROG, _SUMMARY, _USAGE, _DESCRIPTION, _EPILOG, _add_arguments, config_from_args, plan
)
register = COMMAND_LINE.register
