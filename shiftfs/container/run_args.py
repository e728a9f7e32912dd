"""
``shiftfs run``'s command line: its options, texts and checks, read into a
:class:`RunConfig`. The container's layout is :mod:`.run`'s.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field

from ..errors import SetupError
from . import preflight, rootfs

PROG = "shiftfs run"

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
    #: -o for every view (preflight.view_options)
    view_opts: str = ""
    #: leave /proc and /sys unmasked (rootfs.MASKED_PATHS): containers inside need it
    unmask: bool = False

    @property
    def fresh_root(self) -> bool:
        """Root's container gets a root of its own (shiftfs.container.userns)."""
        return not self.host_root


# --- command line -------------------------------------------------------------


def _add_options(p: argparse.ArgumentParser) -> None:
    preflight.add_namespace_options(p)
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


def add_arguments(p: argparse.ArgumentParser) -> None:
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
            "-o",
            "--mount-opt",
        }
        while i < len(rest) and (rest[i].startswith("--") or rest[i] == "-o"):
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


USAGE = "%(prog)s [options] ROOT [--] COMMAND [ARGS...]"
DESCRIPTION = """\
Run COMMAND in new namespaces with ROOT, seen through shiftfs, as /. ROOT stays
owned by you; the ownership set inside is kept in records (--xattr, the default)."""
EPILOG = """The container gets a fresh /proc (own pid namespace), a minimal /dev (null, zero,
full, random, urandom, tty, fuse, a devpts with ptmx, shm), /sys read-only, /tmp on
tmpfs and the --bind mounts (with shift, a bind is seen through shiftfs as well, so
files the container creates there stay yours too). As root, every view id (0 too) is
host id BASE+N of a 65536-id block no other namespace uses: container root is not host
root (--host-root makes it so); the files in ROOT stay yours. As a user, view id 0 is
you and view ids 1.. are your ranges in
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
    mount_args = preflight.mount_args(args)
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
        view_opts=preflight.view_options(args),
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
