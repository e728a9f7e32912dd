"""
``shiftfs run``: run a command in a container whose ``/`` is a directory seen
through shiftfs.

The backing directory (ROOT) stays owned by the invoking user; the ownership
the command sets with chown/chmod lives in each file's record, and the
command sees it as *view ids*. Nothing needs root: an unprivileged user gets
a user namespace mapped from /etc/subuid and /etc/subgid (or a single-id one).

The namespaces, the daemons and supervision are :mod:`.launcher`'s; this
module is run's own layout. Pid 1 of namespace B gets its own mount, UTS and
IPC namespaces, pivots into the view of ROOT and mounts a fresh /proc, a
minimal /dev, /sys read-only, /tmp and the binds (those with ``shift`` are
views of their own), then runs COMMAND. The daemons never see the pivot:
they live in A's mount namespace.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import pwd
import re
import socket
from dataclasses import dataclass, field

from ..errors import SetupError
from ..sys import mounts
from . import join, launcher, rootfs, supervise, userns

PROG = "shiftfs run"

_DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty", "fuse")
#: PATH in the container, as podman and systemd-nspawn set it for root.
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BIND_FORMS = "SRC:DST[:ro|rw][,shift]"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Bind:
    source: str
    target: str
    readonly: bool = False
    shift: bool = False  # through its own shiftfs daemon, like ROOT


@dataclass
class RunConfig:
    root: str
    command: list[str]
    mount_args: list[str] = field(default_factory=lambda: ["--xattr"])
    userns: str = "auto"
    userns_base: int | None = None
    binds: list[Bind] = field(default_factory=list)
    user: tuple[int, int] | None = None
    user_env: dict[str, str] = field(default_factory=dict)  # HOME, USER, LOGNAME inside
    setenv: dict[str, str] = field(default_factory=dict)  # --setenv, over everything
    term: str | None = None  # the caller's TERM
    chdir: str = "/"
    hostname: str | None = None
    allow_shared_source: bool = False
    #: a live container of ROOT: "auto" joins it, "join" must, "new" refuses (shiftfs.container.join)
    attach: str = "auto"
    #: (root) container root is host root: the pre-1.0 behaviour, only on request (--host-root)
    host_root: bool = False
    #: leave /proc and /sys unmasked (rootfs.MASKED_PATHS): containers inside need it
    unmask: bool = False

    @property
    def fresh_root(self) -> bool:
        """Root's container gets a root of its own (shiftfs.container.userns)."""
        return not self.host_root


# --- command line -------------------------------------------------------------


def _add_options(p: argparse.ArgumentParser) -> None:
    launcher.add_namespace_options(p)
    p.add_argument(
        "--bind",
        action="append",
        default=[],
        metavar=BIND_FORMS,
        help="bind-mount host SRC on DST in the container (repeatable), read-write "
        "unless ro; with shift, SRC is seen through shiftfs like ROOT",
    )
    p.add_argument(
        "--setenv",
        "--env",
        action="append",
        default=[],
        dest="setenv",
        metavar="NAME[=VALUE]",
        help="set NAME in COMMAND's environment (repeatable); NAME alone passes your value on",
    )
    p.add_argument(
        "--user", metavar="UID[:GID]", help="run COMMAND as this view uid/gid (or a name from ROOT/etc/passwd)"
    )
    p.add_argument("--chdir", metavar="DIR", help="working directory of COMMAND inside the container (default /)")
    p.add_argument("--hostname", metavar="NAME", help="host name inside the container")
    p.add_argument(
        "--unmask",
        action="store_true",
        help="do not hide /proc/keys, /proc/acpi, /sys/firmware ... nor make /proc/sys read-only "
        "(as podman's --security-opt unmask=ALL): a container that starts containers needs it, "
        "since the kernel mounts a new /proc only where one is fully visible",
    )
    p.add_argument(
        "--host-root",
        action="store_true",
        help="(root) make the container's root host root (uid 0) instead of the first id of its "
        "fresh block; only for commands you trust with the whole machine",
    )
    p.add_argument(
        "--join",
        dest="attach",
        action="store_const",
        const="join",
        help="enter the container your earlier 'shiftfs run' of ROOT still runs (the default when there is one)",
    )
    p.add_argument(
        "--new",
        dest="attach",
        action="store_const",
        const="new",
        help="start a new container; refused while one runs on ROOT (one daemon per ROOT)",
    )


def _add_arguments(p: argparse.ArgumentParser) -> None:
    _add_options(p)
    p.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        metavar="ROOT [--] COMMAND [ARGS...]",
        help="directory to use as the container's /, and the command to run; options may also come between ROOT and --",
    )


class _LateOptions(argparse.ArgumentParser):
    """Parses the options given between ROOT and ``--``."""

    def error(self, message: str):
        raise SetupError(f"{message}; see 'shiftfs run --help'")


def _split_rest(args: argparse.Namespace) -> None:
    """Fill ``args.root`` and ``args.command`` from ``args.rest`` and merge
    options written after ROOT (``ROOT --bind a:b -- cmd``)."""
    rest = list(args.rest)
    if not rest or rest[0].startswith("-") and rest[0] != "-":
        raise SetupError("no ROOT given; usage: shiftfs run [options] ROOT -- COMMAND [ARGS...]")
    args.root, rest = rest[0], rest[1:]
    if "--" in rest:
        i = rest.index("--")
        late, args.command = rest[:i], rest[i + 1 :]
    else:
        # Without --, the command starts at the first word that is not an option.
        late, i = [], 0
        valued = {
            "--map",
            "--userns",
            "--userns-base",
            "--bind",
            "--user",
            "--chdir",
            "--hostname",
            "--setenv",
            "--env",
        }
        while i < len(rest) and rest[i].startswith("--"):
            late.append(rest[i])
            if rest[i] in valued and i + 1 < len(rest):
                late.append(rest[i + 1])
                i += 1
            i += 1
        args.command = rest[i:]
    if late:
        p = _LateOptions(prog=PROG, add_help=False)
        _add_options(p)
        extra = p.parse_args(late)
        for key, value in vars(extra).items():
            if isinstance(value, list):
                setattr(args, key, getattr(args, key) + value)
            elif value not in (None, False):
                setattr(args, key, value)


_USAGE = "%(prog)s [options] ROOT [--] COMMAND [ARGS...]"
_DESCRIPTION = """\
Run COMMAND in new namespaces with ROOT, seen through shiftfs, as /. ROOT stays
owned by you; the ownership set inside is kept in records (--xattr, the default)."""
_EPILOG = """The container gets a fresh /proc (own pid namespace), a minimal /dev (null, zero,
full, random, urandom, tty, fuse, a devpts with ptmx, shm), /sys read-only, /tmp on
tmpfs and the --bind mounts (with shift, a bind is seen through shiftfs as well, so
files the container creates there stay yours too). View id 0 is you. As root, view ids 1-65535 are a
65536-id block no other namespace uses (host id BASE+N); as a user, your ranges in
/etc/subuid and /etc/subgid (newuidmap), else only id 0 exists: chown to other ids and
mknod of devices in ROOT and ,shift binds are then trapped (seccomp, python3-seccomp)
and recorded, elsewhere chown fails (EINVAL), no process can switch uid (su to another
account fails), and apt needs -o APT::Sandbox::User=root.

--bind forms: SRC:DST (read-write), SRC:DST:ro, SRC:DST:rw, and any of them with
,shift at the end (SRC:DST,shift or SRC:DST:ro,shift; SRC:DST:shift is the same as
SRC:DST,shift). SRC is a host path, DST an absolute path inside the container;
neither may contain ':' or ','.

COMMAND starts with a clean environment, as in podman and systemd-nspawn:
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin, HOME, USER and
LOGNAME of the user inside (from ROOT/etc/passwd), TERM if you have one, and
container=shiftfs. Add more with --setenv NAME=VALUE (or --env; NAME alone passes
your value on).

A tree whose ownership is shifted on disk (owned by 100000.., say, for lxc or
rootless podman) cannot be run: its ids do not exist in run's user namespace.
As root, mount it with 'shiftfs mount --map b:100000:0:65536 TREE VIEW' and start
'systemd-nspawn -D VIEW' or 'podman run --rootfs VIEW COMMAND'.

One daemon serves ROOT: a second run of ROOT while yours runs (a second shell)
joins that container (its namespaces and root; its binds and host name stay), as
'podman exec' does, and ends with it. --join insists on joining, --new on a new
container (refused while one runs). 'shiftfs exec --shift ROOT' and 'shiftfs
mount ROOT' are refused meanwhile.

Exit status: COMMAND's (128+N if killed by signal N); 125 if the container could
not be set up, 126 if COMMAND cannot be executed, 127 if it is not found.
SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1/2 sent to shiftfs run reach COMMAND.
"""


def _parse_bind(spec: str) -> Bind:
    """One --bind in the forms the help shows: SRC:DST[:ro|rw][,shift]."""

    def bad(problem: str) -> SetupError:
        return SetupError(f"--bind {spec!r}: {problem}; write {BIND_FORMS}, e.g. --bind ~/data:/data:rw,shift")

    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise bad(
            "SRC and DST are separated by one ':', options by a second"
            if len(parts) < 2
            else "too many ':' (paths with ':' cannot be bound)"
        )
    src, dst = parts[0], parts[1]
    opts = parts[2] if len(parts) == 3 else ""
    if len(parts) == 2 and "," in dst:
        dst, _, opts = dst.partition(",")
        if opts != "shift":
            raise bad(f"only ,shift may follow DST directly; ro and rw go after a colon (SRC:DST:{opts})")
    if "," in src or "," in dst:
        raise bad("a path with ',' cannot be bound")
    flags = opts.split(",") if opts else []
    if (
        len(parts) == 3
        and flags[:1] not in (["ro"], ["rw"], ["shift"])
        or flags[1:] not in ([], ["shift"])
        or len(set(flags)) != len(flags)
    ):
        raise bad(f"options {opts!r}: the options are ro, rw and shift, given as ro, rw, shift, ro,shift or rw,shift")
    if not src or not dst:
        raise bad("SRC and DST must not be empty")
    if not os.path.exists(src):
        raise SetupError(f"--bind {spec}: {src} does not exist; create it or fix the path")
    if not dst.startswith("/"):
        raise SetupError(f"--bind {spec}: DST must be an absolute path inside the container, e.g. /{dst}")
    if os.path.normpath(dst) == "/":
        raise SetupError(f"--bind {spec}: DST / is ROOT itself; bind on a directory inside")
    if "shift" in flags and not os.path.isdir(src):
        raise SetupError(
            f"--bind {spec}: shift needs a directory (shiftfs serves directories); bind the directory that holds it"
        )
    return Bind(os.path.realpath(src), os.path.normpath(dst), "ro" in flags, "shift" in flags)


def _parse_setenv(specs: list[str]) -> dict[str, str]:
    """--setenv NAME=VALUE, or NAME alone for the caller's value (skipped if unset)."""
    env: dict[str, str] = {}
    for spec in specs:
        name, eq, value = spec.partition("=")
        if not _ENV_NAME.match(name):
            raise SetupError(
                f"--setenv {spec!r}: NAME must be letters, digits and '_', not "
                "starting with a digit; e.g. --setenv LANG=C.UTF-8"
            )
        if eq:
            env[name] = value
        elif name in os.environ:
            env[name] = os.environ[name]
    return env


def _lookup_user(root: str, spec: str) -> tuple[int, int, dict[str, str]]:
    """UID[:GID], where names are looked up in ROOT/etc/passwd and /etc/group."""
    name, _, group = spec.partition(":")
    env: dict[str, str] = {}
    uid = gid = None
    if name.isdigit():
        uid = int(name)
    entry = _find_db_entry(root, "/etc/passwd", name, by_id=name.isdigit())
    if entry:
        uid = int(entry[2]) if uid is None else uid
        gid = int(entry[3])
        env = {"HOME": entry[5] or "/", "USER": entry[0], "LOGNAME": entry[0]}
    if uid is None:
        raise SetupError(f"--user {spec}: no user {name!r} in ROOT/etc/passwd; give a numeric UID[:GID]")
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            g = _find_db_entry(root, "/etc/group", group, by_id=False)
            if not g:
                raise SetupError(f"--user {spec}: no group {group!r} in ROOT/etc/group; give a numeric GID")
            gid = int(g[2])
    if gid is None:
        gid = uid
    return uid, gid, env


def _find_db_entry(root: str, path: str, key: str, by_id: bool) -> list[str] | None:
    try:
        with open(rootfs.resolve_in_root(root, path), errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 4 and fields[2 if by_id else 0] == key:
                    return fields + [""] * (7 - len(fields))
    except (OSError, SetupError):
        pass
    return None


def config_from_args(args: argparse.Namespace) -> RunConfig:
    _split_rest(args)
    command = list(args.command)
    if not command:
        raise SetupError("no COMMAND given; usage: shiftfs run [options] ROOT -- COMMAND [ARGS...]")
    root = os.path.realpath(args.root)
    if not os.path.isdir(root):
        raise SetupError(f"ROOT {args.root} is not a directory; create it or fix the path")
    mount_args = launcher.mount_args(args)
    chdir = args.chdir or "/"
    if not chdir.startswith("/"):
        raise SetupError(f"--chdir {chdir}: give an absolute path inside the container, e.g. /{chdir}")
    if args.hostname is not None and not 0 < len(args.hostname.encode()) <= 64:
        raise SetupError(f"--hostname {args.hostname!r} must be 1 to 64 bytes long")
    cfg = RunConfig(
        root=root,
        command=command,
        mount_args=mount_args,
        userns=args.userns or "auto",
        userns_base=args.userns_base,
        binds=[_parse_bind(b) for b in args.bind],
        chdir=chdir,
        hostname=args.hostname,
        setenv=_parse_setenv(args.setenv),
        term=os.environ.get("TERM"),
        allow_shared_source=args.allow_shared_source,
        attach=args.attach or "auto",
        host_root=args.host_root,
        unmask=args.unmask,
    )
    if cfg.host_root and os.getuid() != 0:
        raise SetupError("--host-root needs root (as a user, the container's root is always you); drop it")
    if args.user:
        uid, gid, env = _lookup_user(root, args.user)
        cfg.user, cfg.user_env = (uid, gid), env
    else:  # HOME and USER of the container's root, not the caller's
        entry = _find_db_entry(root, "/etc/passwd", "0", by_id=True)
        cfg.user_env = {"HOME": "/root"}
        if entry:
            cfg.user_env = {"HOME": entry[5] or "/", "USER": entry[0], "LOGNAME": entry[0]}
    return cfg


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
    launcher.check_daemon_can_start(cfg.mount_args, idmap)
    launcher.check_reachable([(cfg.root, 5)], "serving ROOT")
    for b in cfg.binds:
        launcher.check_reachable([(b.source, 4 if not os.path.isdir(b.source) else 5)], "bind-mounting")
        owner = os.stat(b.source).st_uid
        if b.shift and owner != uid:
            raise SetupError(
                f"--bind {b.source}:{b.target}:shift: {b.source} is owned by uid "
                f"{owner}, not by you (uid {uid}); drop shift or "
                f"'chown -R {uid} {b.source}'"
            )
    launcher.check_private_source(
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
    """Mount /proc, /dev, /sys, /tmp and the binds under ``root``."""
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
    if not cfg.unmask:
        rootfs.mask_paths(mnt)
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
    PROG, _SUMMARY, _USAGE, _DESCRIPTION, _EPILOG, _add_arguments, config_from_args, plan, divert
)
register = COMMAND_LINE.register
