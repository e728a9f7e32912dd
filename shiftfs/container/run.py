"""
``shiftfs run``: run a command in a container whose ``/`` is a directory seen
through shiftfs.

The backing directory (ROOT) stays owned by the invoking user; the ownership
the command sets with chown/chmod lives in each file's record, and the
command sees it as *view ids*. Nothing needs root: an unprivileged user gets
a user namespace mapped from /etc/subuid and /etc/subgid (or a single-id one).

Process layout, outermost first::

    shiftfs run            host; relays signals, returns the exit status
    └─ userns helper       new user namespace (maps written by the parent)
       └─ pid 1 of A       mount namespace with ROOT mounted through shiftfs
          ├─ shiftfs daemon  opens /dev/fuse inside the user namespace
          └─ pid 1 of B    own mount namespace, pivot_root into the mount,
             └─ COMMAND    fresh /proc, minimal /dev, /sys ro, /tmp, binds

The daemon never sees the pivot (it lives in A's mount namespace) and cannot
outlive the run (it lives in pid namespace A, whose pid 1 unmounts the view
and waits for it to flush before exiting). Every mount is made in a private
namespace, so nothing can leak onto the host.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import os
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass, field

from . import namespaces as ns

PROG = "shiftfs run"

#: Exit statuses of the run itself, as docker/podman use them.
EXIT_SETUP = 125  # shiftfs run could not set up the container
EXIT_CANNOT_EXEC = 126  # COMMAND exists but cannot be executed
EXIT_NOT_FOUND = 127  # COMMAND not found

_DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty", "fuse")
_STAGING_CANDIDATES = ("/run", "/mnt", "/media", "/srv", "/tmp", "/var/tmp", "/opt", "/home")
_MOUNT_TIMEOUT = 30.0
_DAEMON_EXIT_TIMEOUT = 30.0


class RunError(Exception):
    """A one-line reason, naming the fix, why ``shiftfs run`` cannot go on."""


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
    user_env: dict[str, str] = field(default_factory=dict)
    chdir: str = "/"
    hostname: str | None = None


# --- command line -------------------------------------------------------------


def _add_options(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--bind", action="append", default=[], metavar="SRC:DST[:ro][,shift]",
                   help="bind-mount host SRC on DST in the container (repeatable); with "
                        "shift, SRC is seen through shiftfs like ROOT")
    p.add_argument("--user", metavar="UID[:GID]",
                   help="run COMMAND as this view uid/gid (or a name from ROOT/etc/passwd)")
    p.add_argument("--chdir", metavar="DIR",
                   help="working directory of COMMAND inside the container (default /)")
    p.add_argument("--hostname", metavar="NAME", help="host name inside the container")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    _add_options(p)
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="ROOT [--] COMMAND [ARGS...]",
                   help="directory to use as the container's /, and the command to run; "
                        "options may also come between ROOT and --")


class _LateOptions(argparse.ArgumentParser):
    """Parses the options given between ROOT and ``--``."""

    def error(self, message: str):
        raise RunError(f"{message}; see 'shiftfs run --help'")


def _split_rest(args: argparse.Namespace) -> None:
    """Fill ``args.root`` and ``args.command`` from ``args.rest`` and merge
    options written after ROOT (``ROOT --bind a:b -- cmd``)."""
    rest = list(args.rest)
    if not rest or rest[0].startswith("-") and rest[0] != "-":
        raise RunError("no ROOT given; usage: shiftfs run [options] ROOT -- COMMAND [ARGS...]")
    args.root, rest = rest[0], rest[1:]
    if "--" in rest:
        i = rest.index("--")
        late, args.command = rest[:i], rest[i + 1:]
    else:
        # Without --, the command starts at the first word that is not an option.
        late, i = [], 0
        valued = {"--map", "--userns", "--userns-base", "--bind", "--user", "--chdir",
                  "--hostname"}
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


def _int_arg(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


_USAGE = "%(prog)s [options] ROOT [--] COMMAND [ARGS...]"
_DESCRIPTION = """\
Run COMMAND in new namespaces with ROOT, seen through shiftfs, as /. ROOT stays
owned by you; the ownership set inside is kept in records (--xattr, the default)."""
_EPILOG = """The container gets a fresh /proc (own pid namespace), a minimal /dev (null, zero,
full, random, urandom, tty, fuse, a devpts with ptmx, shm), /sys read-only, /tmp on
tmpfs and the --bind mounts (with shift, a bind is seen through shiftfs as well, so
files the container creates there stay yours too). View id 0 is you. As root, view ids 1-65535 are a
65536-id block no other namespace uses (host id BASE+N); as a user, your ranges in
/etc/subuid and /etc/subgid (newuidmap), else only id 0 exists.

Exit status: COMMAND's (128+N if killed by signal N); 125 if the container could
not be set up, 126 if COMMAND cannot be executed, 127 if it is not found.
SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1/2 sent to shiftfs run reach COMMAND.
"""


def _parser_kwargs() -> dict:
    return dict(usage=_USAGE, description=_DESCRIPTION, epilog=_EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``run`` subcommand to the ``shiftfs`` command line."""
    p = subparsers.add_parser(
        "run", help="run a command in a container whose root is seen through shiftfs",
        **_parser_kwargs())
    _add_arguments(p)
    p.set_defaults(func=handler)


def main(argv: list[str] | None = None) -> int:
    """``python -m shiftfs.run``: the subcommand on its own."""
    p = argparse.ArgumentParser(prog=PROG, **_parser_kwargs())
    _add_arguments(p)
    return handler(p.parse_args(argv))


def handler(args: argparse.Namespace) -> int:
    """Entry point of ``shiftfs run``; returns the command's exit status."""
    try:
        cfg = config_from_args(args)
        idmap, note = ns.choose_idmap(cfg.userns, cfg.userns_base)
        check_config(cfg, idmap)
    except (RunError, ns.NamespaceError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_SETUP
    if note:
        print(f"{PROG}: {note}", file=sys.stderr)
    try:
        return run(cfg, idmap)
    except OSError as e:
        print(f"{PROG}: {_oserror_text(e)}", file=sys.stderr)
        return EXIT_SETUP


def _parse_bind(spec: str) -> Bind:
    """SRC[:DST[:OPTS]] with OPTS a comma list of ro, rw and shift."""
    parts = spec.split(":")
    flags: set[str] = set()
    if len(parts) == 3:
        flags = set(parts.pop().split(","))
        if not flags <= {"ro", "rw", "shift"} or {"ro", "rw"} <= flags:
            raise RunError(f"--bind {spec!r}: options are ro, rw and shift, comma separated; "
                           "e.g. --bind ~/data:/data:rw,shift")
    if len(parts) == 1:
        parts.append(parts[0])
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise RunError(f"--bind {spec!r} is not SRC:DST[:ro]; e.g. --bind /srv/data:/data:ro")
    src, dst = parts
    if not os.path.exists(src):
        raise RunError(f"--bind {spec}: {src} does not exist; create it or fix the path")
    if not dst.startswith("/"):
        raise RunError(f"--bind {spec}: DST must be an absolute path inside the container, "
                       f"e.g. /{dst}")
    if "shift" in flags and not os.path.isdir(src):
        raise RunError(f"--bind {spec}: shift needs a directory (shiftfs serves directories); "
                       "bind the directory that holds it")
    return Bind(os.path.realpath(src), os.path.normpath(dst), "ro" in flags, "shift" in flags)


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
        raise RunError(f"--user {spec}: no user {name!r} in ROOT/etc/passwd; "
                       "give a numeric UID[:GID]")
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            g = _find_db_entry(root, "/etc/group", group, by_id=False)
            if not g:
                raise RunError(f"--user {spec}: no group {group!r} in ROOT/etc/group; "
                               "give a numeric GID")
            gid = int(g[2])
    if gid is None:
        gid = uid
    return uid, gid, env


def _find_db_entry(root: str, path: str, key: str, by_id: bool) -> list[str] | None:
    try:
        with open(ns.resolve_in_root(root, path), errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 4 and fields[2 if by_id else 0] == key:
                    return fields + [""] * (7 - len(fields))
    except (OSError, ns.NamespaceError):
        pass
    return None


def config_from_args(args: argparse.Namespace) -> RunConfig:
    _split_rest(args)
    command = list(args.command)
    if not command:
        raise RunError("no COMMAND given; usage: shiftfs run [options] ROOT -- COMMAND [ARGS...]")
    root = os.path.realpath(args.root)
    if not os.path.isdir(root):
        raise RunError(f"ROOT {args.root} is not a directory; create it or fix the path")
    mount_args = ["--xattr"]
    if args.map and args.xattr:
        raise RunError("--xattr and --map exclude each other; give one of them")
    if args.map:
        mount_args = [a for spec in args.map for a in ("--map", spec)]
        for spec in args.map:
            f = spec.split(":")
            if len(f) != 4 or f[0] not in ("u", "g", "b") or not all(x.isdigit() for x in f[1:]):
                raise RunError(f"--map {spec!r} is not u|g|b:DISK:VIEW:COUNT; "
                               "e.g. --map b:0:0:65536")
    chdir = args.chdir or "/"
    if not chdir.startswith("/"):
        raise RunError(f"--chdir {chdir}: give an absolute path inside the container, "
                       f"e.g. /{chdir}")
    if args.hostname is not None and not 0 < len(args.hostname.encode()) <= 64:
        raise RunError(f"--hostname {args.hostname!r} must be 1 to 64 bytes long")
    cfg = RunConfig(root=root, command=command, mount_args=mount_args, userns=args.userns or "auto",
                    userns_base=args.userns_base,
                    binds=[_parse_bind(b) for b in args.bind], chdir=chdir,
                    hostname=args.hostname)
    if args.user:
        uid, gid, env = _lookup_user(root, args.user)
        cfg.user, cfg.user_env = (uid, gid), env
    else:  # HOME and USER of the container's root, not the caller's
        entry = _find_db_entry(root, "/etc/passwd", "0", by_id=True)
        if entry:
            cfg.user_env = {"HOME": entry[5] or "/", "USER": entry[0], "LOGNAME": entry[0]}
    return cfg


# --- preflight checks -----------------------------------------------------------


def _searchable(path: str, uid: int, gids: set[int], want: int) -> str | None:
    """The first component of ``path`` that ``uid`` cannot use without
    capabilities (``want`` is the access the last component needs), or None."""
    components = []
    p = os.path.abspath(path)
    while True:
        components.append(p)
        if p == "/":
            break
        p = os.path.dirname(p)
    for i, comp in enumerate(reversed(components)):
        last = i == len(components) - 1
        try:
            st = os.stat(comp)
        except OSError:
            return comp
        need = want if last else 1
        if st.st_uid == uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid in gids:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        if bits & need != need:
            return comp
    return None


def check_reachable(paths: list[tuple[str, int]], what: str) -> None:
    """Inside the namespace the daemon is the invoking user *without*
    capabilities on host files, so plain permission bits must let it reach
    the interpreter, the shiftfs package and ROOT."""
    uid = os.getuid()
    gids = {os.getgid(), *os.getgroups()}
    for path, want in paths:
        for variant in dict.fromkeys((path, os.path.realpath(path))):
            bad = _searchable(variant, uid, gids, want)
            if bad:
                st = os.stat(bad) if os.path.exists(bad) else None
                mode = f" (mode {stat.S_IMODE(st.st_mode):04o}, owner {st.st_uid})" if st else ""
                raise RunError(
                    f"{bad}{mode} blocks uid {uid} from {what} {variant}, and the namespace "
                    f"has no capabilities on host files; move it under a directory every "
                    f"user can enter (e.g. /opt or /work) or 'chmod o+x {bad}'")


def _package_paths() -> list[tuple[str, int]]:
    pkg = os.path.dirname(os.path.abspath(__file__))
    return [(sys.executable, 5), (os.path.realpath(sys.executable), 5),
            (os.path.join(pkg, "__init__.py"), 4)]


def check_config(cfg: RunConfig, idmap: ns.IdMap) -> None:
    uid = os.getuid()
    if "--map" in cfg.mount_args and idmap.base is not None and not idmap.base_fixed:
        raise RunError("--map as root stores disk ids of this run's namespace, whose block "
                       "changes from run to run; add --userns-base N (disk id k>0 is then "
                       "host id N+k), or use --xattr")
    st = os.stat(cfg.root)
    if st.st_uid != uid:
        raise RunError(f"ROOT {cfg.root} is owned by uid {st.st_uid}, not by you (uid {uid}); "
                       f"run as uid {st.st_uid} or 'chown -R {uid} {cfg.root}'")
    if not os.path.exists("/dev/fuse"):
        raise RunError("/dev/fuse is missing; load the fuse module ('modprobe fuse') "
                       "or create it with 'mknod -m 0666 /dev/fuse c 10 229'")
    if _searchable("/dev/fuse", uid, {os.getgid(), *os.getgroups()}, 6):
        raise RunError(f"/dev/fuse (mode {stat.S_IMODE(os.stat('/dev/fuse').st_mode):04o}) "
                       "is not usable by you; as root run 'make setup' or "
                       "'chmod 0666 /dev/fuse'")
    check_reachable(_package_paths(), "running the shiftfs daemon")
    check_reachable([(cfg.root, 5)], "serving ROOT")
    for b in cfg.binds:
        check_reachable([(b.source, 4 if not os.path.isdir(b.source) else 5)],
                        "bind-mounting")
        owner = os.stat(b.source).st_uid
        if b.shift and owner != uid:
            raise RunError(f"--bind {b.source}:{b.target}:shift: {b.source} is owned by uid "
                           f"{owner}, not by you (uid {uid}); drop shift or "
                           f"'chown -R {uid} {b.source}'")
    if cfg.user:
        vuid, vgid = cfg.user
        if not idmap.maps_uid(vuid) or not idmap.maps_gid(vgid):
            hint = ("this is a single-id namespace: set up /etc/subuid and /etc/subgid "
                    "(see 'usermod --add-subuids') or use --user 0"
                    if idmap.kind == "single" else "use an id inside the namespace's range")
            raise RunError(f"--user {vuid}:{vgid} is not mapped ({idmap.describe()}); {hint}")
    _staging_dir(cfg)


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _staging_dir(cfg: RunConfig) -> str:
    """A host directory to hide under the staging tmpfs: one that holds
    nothing the daemon or the container setup still needs."""
    needed = [cfg.root, sys.prefix, sys.base_prefix, sys.executable,
              os.path.realpath(sys.executable), os.path.dirname(os.path.abspath(__file__)),
              os.path.realpath(os.path.dirname(os.path.abspath(__file__))),
              "/dev", "/proc", "/sys", *(b.source for b in cfg.binds)]
    for cand in _STAGING_CANDIDATES:
        if os.path.isdir(cand) and not os.path.islink(cand) and \
                not any(_within(p, cand) for p in needed):
            return cand
    raise RunError("ROOT, the binds and the interpreter cover every staging directory "
                   f"({', '.join(_STAGING_CANDIDATES)}); move ROOT elsewhere")


# --- the run --------------------------------------------------------------------


def _fail(msg: str, code: int = EXIT_SETUP, prog: str = PROG) -> None:
    """Report a setup error from inside a child process and exit it."""
    try:
        print(f"{prog}: {msg}", file=sys.stderr, flush=True)
    finally:
        os._exit(code)


def _child(func, *args, prog: str = PROG) -> None:
    """Body of a forked child: never returns into the caller's stack."""
    code = EXIT_SETUP
    try:
        code = func(*args)
    except (RunError, ns.NamespaceError) as e:
        _fail(str(e), prog=prog)
    except OSError as e:
        _fail(_oserror_text(e), prog=prog)
    except BaseException as e:  # noqa: BLE001 - a child must never unwind
        _fail(f"internal error: {type(e).__name__}: {e}", prog=prog)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _oserror_text(e: OSError) -> str:
    text = e.strerror or str(e)
    if e.filename and str(e.filename) not in text:
        text += f": {e.filename}"
    return text


def run(cfg: RunConfig, idmap: ns.IdMap) -> int:
    """Start the container and wait for it (the host side)."""
    return start_userns(_userns_helper, cfg, idmap, PROG)


def start_userns(helper, cfg, idmap: ns.IdMap, prog: str) -> int:
    """Fork ``helper(cfg, idmap, parent, wfd, rfd)`` into a new user namespace,
    write its id maps when it asks, and supervise it (shared by run and exec)."""
    sys.stdout.flush()
    sys.stderr.flush()
    old_mask = ns.block_signals()
    try:
        to_parent_r, to_parent_w = os.pipe()
        to_child_r, to_child_w = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            os.close(to_parent_r)
            os.close(to_child_w)
            _child(helper, cfg, idmap, parent, to_parent_w, to_child_r, prog=prog)
        os.close(to_parent_w)
        os.close(to_child_r)
        ready = os.read(to_parent_r, 1)
        os.close(to_parent_r)
        if ready == b"u":
            try:
                ns.claim_idmap(pid, idmap)
            except ns.NamespaceError as e:
                print(f"{prog}: {e}", file=sys.stderr)
                os.write(to_child_w, b"x")
            else:
                os.write(to_child_w, b"m")
        os.close(to_child_w)
        return ns.exit_code(ns.supervise(pid))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _userns_helper(cfg: RunConfig, idmap: ns.IdMap, parent: int, wfd: int, rfd: int) -> int:
    """Child of ``shiftfs run``: enter a new user namespace, wait for the
    maps, then start pid 1 of namespace A and supervise it."""
    ns.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:
        return EXIT_SETUP
    try:
        ns.unshare(ns.CLONE_NEWUSER)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES, errno.ENOSPC, errno.EUSERS):
            raise RunError(f"cannot create a user namespace ({e.strerror}): "
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
        _child(_mount_init, cfg, idmap)
    return ns.exit_code(ns.supervise(pid))


def _start_daemon(cfg: RunConfig, source: str, mountpoint: str, log: str) -> None:
    """Run ``shiftfs mount`` (as namespace root, so /dev/fuse is opened in
    this user namespace) and return once the mount is live. The daemon stays
    behind as our child in pid namespace A, in its own session so that a
    terminal's ^C does not reach it."""
    argv = [sys.executable, "-m", "shiftfs", "mount", *cfg.mount_args,
            "-o", f"suid,dev,log={log}", source, mountpoint]
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        mounter = os.posix_spawn(
            sys.executable, argv, os.environ,
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                          (os.POSIX_SPAWN_DUP2, log_fd, 1), (os.POSIX_SPAWN_DUP2, log_fd, 2)],
            setsid=True, setsigmask=set(),
            setsigdef=(*ns.RELAYED, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD))
    except OSError as e:
        raise RunError(f"cannot start the shiftfs daemon ({sys.executable}): "
                       f"{e.strerror}") from None
    finally:
        os.close(log_fd)
    status = _wait_pid(mounter, _MOUNT_TIMEOUT)
    if status is None:
        raise RunError(f"'shiftfs mount {source}' did not report a live mount within "
                       f"{_MOUNT_TIMEOUT:.0f} s: {_log_tail(log) or 'no output'}")
    if status != 0:
        raise RunError(f"'shiftfs mount {source}' failed with status "
                       f"{ns.exit_code(status)}: {_log_tail(log) or 'no output'}")
    if os.stat(mountpoint).st_dev == os.stat(os.path.dirname(mountpoint)).st_dev:
        raise RunError(f"'shiftfs mount {source}' returned but nothing is mounted; "
                       f"its output: {_log_tail(log) or 'none'}")


def _log_tail(path: str, lines: int = 1) -> str:
    try:
        with open(path, errors="replace") as f:
            text = [line.strip() for line in f.read().splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _wait_pid(pid: int, timeout: float) -> int | None:
    """Wait status of child ``pid``, or None after ``timeout`` seconds
    (SIGCHLD must be blocked)."""
    deadline = time.monotonic() + timeout
    while True:
        wpid, status = os.waitpid(pid, os.WNOHANG)
        if wpid:
            return status
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        signal.sigtimedwait({signal.SIGCHLD}, min(left, 0.2))


def _mount_init(cfg: RunConfig, idmap: ns.IdMap) -> int:
    """Pid 1 of namespace A: mount ROOT through shiftfs on a staging tmpfs,
    run the container in namespace B, then unmount and let the daemon flush."""
    ns.set_parent_death_signal(signal.SIGKILL)
    os.chdir("/")
    ns.make_rprivate("/")
    stage = _staging_dir(cfg)
    ns.mount("tmpfs", stage, "tmpfs", ns.MS_NOSUID | ns.MS_NODEV, "mode=0700,size=1m")
    log = os.path.join(stage, "daemon.log")
    mnt = os.path.join(stage, "root")
    views = [mnt]
    os.mkdir(mnt, 0o755)
    _start_daemon(cfg, cfg.root, mnt, log)
    binds = []
    for i, b in enumerate(cfg.binds):
        if b.shift and os.path.isdir(b.source):
            view = os.path.join(stage, f"bind{i}")
            os.mkdir(view, 0o755)
            _start_daemon(cfg, b.source, view, log)
            views.append(view)
            b = dataclasses.replace(b, source=view)
        binds.append(b)
    cfg = dataclasses.replace(cfg, binds=binds)
    ns.unshare(ns.CLONE_NEWPID)
    pid = os.fork()
    if pid == 0:
        _child(_container_init, cfg, idmap, mnt)
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
        print(f"{PROG}: warning: the shiftfs daemon exited with status "
              f"{ns.exit_code(next(s for s in statuses if s))}: "
              f"{_log_tail(log, 3) or 'no output'}", file=sys.stderr)
    return code


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


def _setup_root(cfg: RunConfig, idmap: ns.IdMap, root: str) -> None:
    """Mount /proc, /dev, /sys, /tmp and the binds under ``root``."""
    proc = ns.make_mountpoint(root, "/proc")
    ns.mount("proc", proc, "proc", ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC)

    dev = ns.make_mountpoint(root, "/dev")
    ns.mount("tmpfs", dev, "tmpfs", ns.MS_NOSUID | ns.MS_NOEXEC, "mode=0755,size=1m")
    for name in _DEV_NODES:
        host = f"/dev/{name}"
        if os.path.exists(host):
            target = os.path.join(dev, name)
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666))
            ns.bind(host, target, recursive=False)
    console = _terminal()
    if console:  # so that ttyname() finds the terminal inside: it scans /dev
        target = os.path.join(dev, "console")
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        ns.bind(console, target, recursive=False)
    pts = os.path.join(dev, "pts")
    os.mkdir(pts, 0o755)
    opts = "newinstance,ptmxmode=0666,mode=0620" + (",gid=5" if idmap.maps_gid(5) else "")
    ns.mount("devpts", pts, "devpts", ns.MS_NOSUID | ns.MS_NOEXEC, opts)
    os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    shm = os.path.join(dev, "shm")
    os.mkdir(shm, 0o1777)
    ns.mount("tmpfs", shm, "tmpfs", ns.MS_NOSUID | ns.MS_NODEV, "mode=1777")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                         ("core", "/proc/kcore")):
        os.symlink(target, os.path.join(dev, name))

    sys_dir = ns.make_mountpoint(root, "/sys")
    ns.bind("/sys", sys_dir, readonly=True)

    tmp = ns.make_mountpoint(root, "/tmp")
    ns.mount("tmpfs", tmp, "tmpfs", ns.MS_NOSUID | ns.MS_NODEV, "mode=1777")

    for b in cfg.binds:
        target = ns.make_mountpoint(root, b.target, directory=os.path.isdir(b.source))
        try:
            ns.bind(b.source, target, readonly=b.readonly)
        except OSError as e:
            raise RunError(f"--bind {b.source}:{b.target}: {e.strerror}") from None


def _container_init(cfg: RunConfig, idmap: ns.IdMap, mnt: str) -> int:
    """Pid 1 of namespace B: build the container's mounts, pivot into the
    shiftfs view, run COMMAND and pass on its exit status."""
    ns.set_parent_death_signal(signal.SIGKILL)
    ns.unshare(ns.CLONE_NEWNS | ns.CLONE_NEWUTS | ns.CLONE_NEWIPC)
    if cfg.hostname:
        socket.sethostname(cfg.hostname)
    _setup_root(cfg, idmap, mnt)
    ns.pivot_into(mnt)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(_exec_command, cfg)
    return ns.exit_code(ns.supervise(pid, reap_any=True))


def _exec_command(cfg: RunConfig) -> int:
    ns.reset_signals()
    env = dict(os.environ)
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env["PWD"] = cfg.chdir
    uid, gid = cfg.user or (0, 0)
    env.update(cfg.user_env)
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
        raise RunError(f"--chdir {cfg.chdir}: {e.strerror} inside the container") from None
    try:
        os.execvpe(cfg.command[0], cfg.command, env)
    except FileNotFoundError:
        _fail(f"{cfg.command[0]}: command not found inside the container", EXIT_NOT_FOUND)
    except PermissionError as e:
        _fail(f"{cfg.command[0]}: {e.strerror}", EXIT_CANNOT_EXEC)
    except OSError as e:
        _fail(f"{cfg.command[0]}: {e.strerror}", EXIT_CANNOT_EXEC)
    return EXIT_CANNOT_EXEC


if __name__ == "__main__":
    sys.exit(main())
