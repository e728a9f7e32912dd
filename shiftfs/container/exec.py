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

Process layout, outermost first::

    shiftfs exec            host; relays signals, returns the exit status
    └─ userns helper        new user namespace (maps written by the parent)
       └─ pid 1 of A        private mount namespace; a staging tmpfs with one
          │                 shiftfs view per --shift
          ├─ shiftfs daemons  serve SRC through a descriptor opened before any mount
          └─ pid 1 of B     own mount namespace: the views moved onto their DSTs,
             │              the staging tmpfs gone, a fresh /proc
             └─ COMMAND     cwd and environment of the caller

The views reach their DSTs only in B: the daemons, in A, see the host's
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
import fcntl
import os
import signal
import stat
import sys
from dataclasses import dataclass, field

from . import namespaces as ns
from . import run as _run
from .run import _oserror_text
from .run import (EXIT_CANNOT_EXEC, EXIT_NOT_FOUND, EXIT_SETUP, RunError, _log_tail,
                  _package_paths, _searchable, _wait_pid, check_reachable)

PROG = "shiftfs exec"

_MOUNT_TIMEOUT = 30.0
_DAEMON_EXIT_TIMEOUT = 30.0
#: Descriptor numbers the daemon finds SRC and its log file on.
_SRC_FD = 3
_LOG_FD = 4
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_STAGING_CANDIDATES = ("/run", "/mnt", "/media", "/srv", "/opt", "/var/tmp", "/tmp", "/home")


class ExecError(RunError):
    """A one-line reason, naming the fix, why ``shiftfs exec`` cannot go on."""


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


# --- command line -------------------------------------------------------------

_USAGE = "%(prog)s [--shift SRC[:DST]]... [options] -- COMMAND [ARGS...]"
_DESCRIPTION = """\
Run COMMAND as root of a new user namespace, on the host's filesystem as it is,
with each SRC seen through shiftfs at DST (default: over SRC itself). chown,
chmod u+s, useradd... inside a shifted directory are kept in records (--xattr,
the default); on the host it stays owned by you. 'shiftfs export SRC' writes a
tar with the ownership COMMAND set."""
_EPILOG = """\
View id 0 is you. As a user, view ids 1.. are your ranges in /etc/subuid and
/etc/subgid (newuidmap); as root, a 65536-id block no other namespace uses; without
either, only id 0 exists and chown to other ids fails (EINVAL).

COMMAND keeps your working directory and environment (sbin directories are added to
PATH); it gets its own pid namespace and a fresh /proc. The shiftfs mounts use
allow_other, so user namespaces and sandboxes COMMAND starts can use them. Device
nodes cannot be created in a user namespace (EPERM from the kernel): add them to
the archive instead ('python -m shiftfs.devtable --help'). Export SRC itself, not a
directory inside it: records of symlinks live in SRC/.shiftfs.

Exit status: COMMAND's (128+N if killed by signal N); 125 if the namespace could
not be set up, 126 if COMMAND cannot be executed, 127 if it is not found.
SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1/2 sent to shiftfs exec reach COMMAND.

example:
  mkdir rootfs
  shiftfs exec --shift rootfs -- mmdebstrap --mode=root --variant=minbase bookworm rootfs
  shiftfs export rootfs -o rootfs.tar
"""


def _int_arg(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shift", action="append", default=[], metavar="SRC[:DST]",
                   help="mount directory SRC through shiftfs at DST (default: over SRC); "
                        "repeatable")
    p.add_argument("--xattr", action="store_true",
                   help="keep view ownership in records (user.containers.override_stat); "
                        "the default")
    p.add_argument("--map", action="append", default=[], metavar="u|g|b:DISK:VIEW:COUNT",
                   help="map disk ids to view ids instead of keeping records (repeatable)")
    p.add_argument("--userns", choices=("auto", "full", "single"),
                   help="auto (default): a full 65536-id range if one is available, "
                        "else a single id")
    p.add_argument("--userns-base", type=_int_arg, metavar="N",
                   help="(root) host id of the 65536-id block for view ids 1-65535")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]",
                   help="the command to run as namespace root")


def _parser_kwargs() -> dict:
    return dict(usage=_USAGE, description=_DESCRIPTION, epilog=_EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``exec`` subcommand to the ``shiftfs`` command line."""
    p = subparsers.add_parser(
        "exec", help="run a command as namespace root with directories shifted through shiftfs",
        **_parser_kwargs())
    _add_arguments(p)
    p.set_defaults(func=handler)


def main(argv: list[str] | None = None) -> int:
    """``python -m shiftfs.execcmd``: the subcommand on its own."""
    p = argparse.ArgumentParser(prog=PROG, **_parser_kwargs())
    _add_arguments(p)
    return handler(p.parse_args(argv))


def handler(args: argparse.Namespace) -> int:
    """Entry point of ``shiftfs exec``; returns COMMAND's exit status."""
    try:
        cfg = config_from_args(args)
        idmap, note = ns.choose_idmap(cfg.userns, cfg.userns_base)
        check_config(cfg, idmap)
    except (ExecError, RunError, ns.NamespaceError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_SETUP
    if note:
        print(f"{PROG}: {note}", file=sys.stderr)
    try:
        return run_exec(cfg, idmap)
    except OSError as e:
        print(f"{PROG}: {_oserror_text(e)}", file=sys.stderr)
        return EXIT_SETUP


def _caller_cwd() -> str:
    """The working directory, as the caller's $PWD spells it if that is the
    same directory (keeps the symlinks the shell shows)."""
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        raise ExecError("the working directory was removed; cd somewhere else") from None
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
        raise ExecError(f"--shift {spec!r} is not SRC[:DST]; e.g. --shift ./rootfs or "
                        "--shift ./build:/work/build")
    if not os.path.exists(src):
        raise ExecError(f"--shift {spec}: {src} does not exist; create it with 'mkdir -p {src}'")
    if not os.path.isdir(src):
        raise ExecError(f"--shift {spec}: {src} is not a directory; shiftfs serves directories")
    source, target = os.path.realpath(src), os.path.realpath(dst or src)
    if target == "/":
        raise ExecError(f"--shift {spec}: cannot mount over /; use 'shiftfs run {source}' "
                        "for a whole root filesystem")
    return Shift(source, target)


def _seen_at(path: str, shifts: list[Shift]) -> str:
    """The host path of what COMMAND will find at ``path``: under the
    innermost other view that covers it, that view's SRC."""
    outer = [s for s in shifts if s.target != path and _within(path, s.target)]
    if not outer:
        return path
    s = max(outer, key=lambda s: len(s.target))
    return _seen_at(s.source, [x for x in shifts if x is not s]) + path[len(s.target):]


def check_targets(shifts: list[Shift]) -> None:
    """Every DST must be a directory where COMMAND will see it, and no two
    shifts may share one."""
    seen: dict[str, str] = {}
    for s in shifts:
        if s.target in seen:
            raise ExecError(f"--shift {seen[s.target]} and --shift {s.source} both mount on "
                            f"{s.target}; give each a different DST")
        seen[s.target] = s.source
        where = _seen_at(s.target, shifts)
        shown = s.target if where == s.target else f"{s.target} (that is, {where})"
        if not os.path.exists(where):
            raise ExecError(f"--shift {s.source}:{s.target}: DST {shown} does not exist; "
                            f"create it with 'mkdir -p {where}'")
        if not os.path.isdir(where):
            raise ExecError(f"--shift {s.source}:{s.target}: DST {shown} is not a directory")


def config_from_args(args: argparse.Namespace) -> ExecConfig:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ExecError("no COMMAND given; usage: shiftfs exec [--shift SRC[:DST]]... "
                        "-- COMMAND [ARGS...]")
    if args.map and args.xattr:
        raise ExecError("--xattr and --map exclude each other; give one of them")
    mount_args = ["--xattr"]
    if args.map:
        for spec in args.map:
            f = spec.split(":")
            if len(f) != 4 or f[0] not in ("u", "g", "b") or not all(x.isdigit() for x in f[1:]):
                raise ExecError(f"--map {spec!r} is not u|g|b:DISK:VIEW:COUNT; "
                                "e.g. --map b:0:0:65536")
        mount_args = [a for spec in args.map for a in ("--map", spec)]
    shifts = [parse_shift(s) for s in args.shift]
    check_targets(shifts)
    # Outer views first: a DST inside another one is mounted on top of it.
    shifts.sort(key=lambda s: s.target.count("/"))
    return ExecConfig(command=command, shifts=shifts, mount_args=mount_args,
                      userns=args.userns or "auto", userns_base=args.userns_base,
                      cwd=_caller_cwd())


# --- preflight checks -----------------------------------------------------------


def check_config(cfg: ExecConfig, idmap: ns.IdMap) -> None:
    uid = os.getuid()
    if "--map" in cfg.mount_args and idmap.base is not None and not idmap.base_fixed:
        raise ExecError("--map as root stores disk ids of this run's namespace, whose block "
                        "changes from run to run; add --userns-base N (disk id k>0 is then "
                        "host id N+k), or use --xattr")
    for s in cfg.shifts:
        owner = os.stat(s.source).st_uid
        if owner != uid:
            raise ExecError(f"--shift {s.source}: it is owned by uid {owner}, not by you "
                            f"(uid {uid}); run as uid {owner} or 'chown -R {uid} {s.source}'")
    if cfg.shifts:
        if not os.path.exists("/dev/fuse"):
            raise ExecError("/dev/fuse is missing; load the fuse module ('modprobe fuse') "
                            "or create it with 'mknod -m 0666 /dev/fuse c 10 229'")
        if _searchable("/dev/fuse", uid, {os.getgid(), *os.getgroups()}, 6):
            raise ExecError(f"/dev/fuse (mode {stat.S_IMODE(os.stat('/dev/fuse').st_mode):04o}) "
                            "is not usable by you; as root run 'make setup' or "
                            "'chmod 0666 /dev/fuse'")
        check_reachable(_package_paths(), "running the shiftfs daemon")
        for s in cfg.shifts:
            check_reachable([(s.source, 7)], "serving")


# --- the run --------------------------------------------------------------------


def _fail(msg: str, code: int = EXIT_SETUP) -> None:
    """Report a setup error from inside a child process and exit it."""
    _run._fail(msg, code, prog=PROG)


def _child(func, *args) -> None:
    """Body of a forked child: never returns into the caller's stack."""
    _run._child(func, *args, prog=PROG)


def run_exec(cfg: ExecConfig, idmap: ns.IdMap) -> int:
    """Start the namespaces and wait for COMMAND (the host side)."""
    return _run.start_userns(_userns_helper, cfg, idmap, PROG)


def _userns_helper(cfg: ExecConfig, idmap: ns.IdMap, parent: int, wfd: int, rfd: int) -> int:
    """Enter a new user namespace, wait for the maps, then start pid 1 of
    namespace A and supervise it."""
    ns.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:
        return EXIT_SETUP
    try:
        ns.unshare(ns.CLONE_NEWUSER)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES, errno.ENOSPC, errno.EUSERS):
            raise ExecError(f"cannot create a user namespace ({e.strerror}): "
                            f"{ns.userns_unavailable_hint()}") from None
        raise
    os.write(wfd, b"u")
    os.close(wfd)
    if os.read(rfd, 1) != b"m":
        return EXIT_SETUP
    os.close(rfd)
    ns.become_root(idmap)
    ns.unshare(ns.CLONE_NEWNS | ns.CLONE_NEWPID)
    pid = os.fork()
    if pid == 0:
        _child(_mount_init, cfg)
    return ns.exit_code(ns.supervise(pid))


def _high_fd(fd: int) -> int:
    """Move ``fd`` above the descriptor numbers a daemon is given (so that
    the spawn's dup2 calls cannot overwrite one another)."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


def _start_daemon(cfg: ExecConfig, shift: Shift, src_fd: int, log_fd: int, view: str) -> None:
    """Run ``shiftfs mount`` on ``view`` (as namespace root, so that
    /dev/fuse is opened in this user namespace), serving the directory open
    on ``src_fd``; return once the mount is live. The daemon stays behind as
    our child in pid namespace A, in its own session (a terminal's ^C must
    not reach it)."""
    opts = f"suid,dev,allow_other,log=/proc/self/fd/{_LOG_FD}"
    if not any(c in shift.source for c in ",\\ \t\n"):
        opts += f",fsname={shift.source}"
    argv = [sys.executable, "-m", "shiftfs", "mount", *cfg.mount_args, "-o", opts,
            f"/proc/self/fd/{_SRC_FD}", view]
    before = os.stat(view).st_dev
    log = f"/proc/self/fd/{log_fd}"
    try:
        mounter = os.posix_spawn(
            sys.executable, argv, os.environ,
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                          (os.POSIX_SPAWN_DUP2, log_fd, 1), (os.POSIX_SPAWN_DUP2, log_fd, 2),
                          (os.POSIX_SPAWN_DUP2, src_fd, _SRC_FD),
                          (os.POSIX_SPAWN_DUP2, log_fd, _LOG_FD)],
            setsid=True, setsigmask=set(),
            setsigdef=(*ns.RELAYED, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD))
    except OSError as e:
        raise ExecError(f"cannot start the shiftfs daemon ({sys.executable}): "
                        f"{e.strerror}") from None
    status = _wait_pid(mounter, _MOUNT_TIMEOUT)
    what = f"'shiftfs mount {shift.source}'"
    if status is None:
        raise ExecError(f"{what} did not report a live mount within {_MOUNT_TIMEOUT:.0f} s: "
                        f"{_log_tail(log) or 'no output'}")
    if status != 0:
        raise ExecError(f"{what} failed with status {ns.exit_code(status)}: "
                        f"{_log_tail(log) or 'no output'}")
    if os.stat(view).st_dev == before:
        raise ExecError(f"{what} returned but nothing is mounted; its output: "
                        f"{_log_tail(log) or 'none'}")


def _staging_dir(cfg: ExecConfig) -> str:
    """A host directory that namespace A may hide under the staging tmpfs:
    one that holds no SRC (the engine opens some files in SRC by path), nor
    the interpreter or the shiftfs package."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    needed = [sys.prefix, sys.base_prefix, sys.executable, os.path.realpath(sys.executable),
              pkg, os.path.realpath(pkg), "/dev", "/proc", "/sys",
              *(s.source for s in cfg.shifts)]
    for cand in _STAGING_CANDIDATES:
        if os.path.isdir(cand) and not os.path.islink(cand) and \
                not any(_within(p, cand) for p in needed):
            return cand
    raise ExecError("the SRC directories and the interpreter cover every staging directory "
                    f"({', '.join(_STAGING_CANDIDATES)}); move a SRC elsewhere")


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _mount_init(cfg: ExecConfig) -> int:
    """Pid 1 of namespace A: mount every SRC through shiftfs on a staging
    tmpfs, run COMMAND in namespace B, then unmount and let the daemons write
    everything out.

    The views are not mounted at DST here: the daemons live in this mount
    namespace, and the engine reaches some files in SRC by path (the record
    side table), which must not lead back into its own view."""
    ns.set_parent_death_signal(signal.SIGKILL)
    os.chdir("/")
    ns.make_rprivate("/")
    log_fd = _high_fd(os.memfd_create("shiftfs-exec-log", os.MFD_CLOEXEC))
    log = f"/proc/self/fd/{log_fd}"
    views: list[str] = []
    if cfg.shifts:
        # Every SRC is opened before the first mount, so that none is reached
        # through a view (a SRC under the staging directory, say).
        src_fds = [_high_fd(os.open(s.source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
                   for s in cfg.shifts]
        stage = _staging_dir(cfg)
        ns.mount("tmpfs", stage, "tmpfs", ns.MS_NOSUID | ns.MS_NODEV, "mode=0700,size=1m")
        try:
            for i, (s, fd) in enumerate(zip(cfg.shifts, src_fds)):
                view = os.path.join(stage, f"view{i}")
                os.mkdir(view, 0o755)
                _start_daemon(cfg, s, fd, log_fd, view)
                views.append(view)
        finally:
            for fd in src_fds:
                os.close(fd)
    else:
        stage = ""
    ns.unshare(ns.CLONE_NEWPID)
    pid = os.fork()
    if pid == 0:
        _child(_command_init, cfg, stage, views)
    code = ns.exit_code(ns.supervise(pid, reap_any=True))
    for view in reversed(views):
        try:
            ns.umount2(view)
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            ns.umount2(view, ns.MNT_DETACH)
    statuses = ns.reap_all(_DAEMON_EXIT_TIMEOUT)
    if any(s != 0 for s in statuses):
        print(f"{PROG}: warning: a shiftfs daemon exited with status "
              f"{ns.exit_code(next(s for s in statuses if s))}: "
              f"{_log_tail(log, 3) or 'no output'}", file=sys.stderr)
    return code


def _attach_views(cfg: ExecConfig, stage: str, views: list[str]) -> None:
    """In COMMAND's mount namespace: put each view on its DST, then take the
    staging tmpfs away, so that the host's directory under it shows again."""
    try:
        clones = [ns.open_tree(view) for view in views]
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise
        clones = None  # before Linux 5.2: bind while the views are reachable
    if clones is None:
        for s, view in zip(cfg.shifts, views):
            if _within(s.target, stage):
                raise ExecError(f"--shift {s.source}:{s.target}: DST is under {stage}, which "
                                "this kernel (no open_tree) cannot show; pick another DST")
            ns.bind(view, s.target, recursive=False)
        ns.umount2(stage, ns.MNT_DETACH)
        return
    ns.umount2(stage, ns.MNT_DETACH)
    for s, fd in zip(cfg.shifts, clones):
        try:
            ns.move_mount(fd, s.target)
        except OSError as e:
            raise ExecError(f"--shift {s.source}:{s.target}: cannot mount the view on "
                            f"{s.target}: {e.strerror}") from None
        finally:
            os.close(fd)


def _command_init(cfg: ExecConfig, stage: str, views: list[str]) -> int:
    """Pid 1 of namespace B: own mount namespace with the views on their
    DSTs and a /proc of this pid namespace; run COMMAND and pass on its exit
    status."""
    ns.set_parent_death_signal(signal.SIGKILL)
    ns.unshare(ns.CLONE_NEWNS)
    if views:
        _attach_views(cfg, stage, views)
    try:
        ns.mount("proc", "/proc", "proc", ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC)
    except OSError as e:
        print(f"{PROG}: warning: cannot mount a /proc for the new pid namespace "
              f"({e.strerror}); COMMAND sees the host's", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(_exec_command, cfg)
    return ns.exit_code(ns.supervise(pid, reap_any=True))


def command_env(environ: dict[str, str]) -> dict[str, str]:
    """COMMAND's environment: the caller's, with the sbin directories a
    root's PATH has added at its end."""
    env = dict(environ)
    path = env.get("PATH") or "/usr/local/bin:/usr/bin:/bin"
    dirs = path.split(":")
    env["PATH"] = ":".join(dirs + [d for d in _SBIN if d not in dirs])
    return env


def _exec_command(cfg: ExecConfig) -> int:
    ns.reset_signals()
    env = command_env(dict(os.environ))
    try:
        os.chdir(cfg.cwd)
    except OSError as e:
        raise ExecError(f"cannot enter the working directory {cfg.cwd} inside the "
                        f"namespace: {e.strerror}; cd elsewhere") from None
    env["PWD"] = cfg.cwd
    try:
        os.execvpe(cfg.command[0], cfg.command, env)
    except FileNotFoundError:
        _fail(f"{cfg.command[0]}: command not found", EXIT_NOT_FOUND)
    except OSError as e:
        _fail(f"{cfg.command[0]}: {e.strerror}", EXIT_CANNOT_EXEC)
    return EXIT_CANNOT_EXEC


if __name__ == "__main__":
    sys.exit(main())
