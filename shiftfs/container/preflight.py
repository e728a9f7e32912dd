"""
What ``shiftfs run`` and ``shiftfs exec`` both take on their command lines
and check on the host before anything is forked: the namespace options,
whether the daemon can start and reach what it serves (inside the namespace
it has no capabilities on host files), private sources, one daemon per
source, and the staging directory the views are made on.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Sequence

from ..errors import SetupError
from ..fs import sourcelock
from ..ownership import trust
from . import userns

_STAGING_CANDIDATES = ("/run", "/mnt", "/media", "/srv", "/opt", "/var/tmp", "/tmp", "/home")
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- options both commands take ---------------------------------------------------


def int_arg(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def add_namespace_options(p: argparse.ArgumentParser) -> None:
    """--xattr, --map, --userns, --userns-base and --allow-shared-source."""
    p.add_argument(
        "--xattr",
        action="store_true",
        help="keep view ownership in records (user.containers.override_stat); the default",
    )
    p.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="u|g|b:DISK:VIEW:COUNT",
        help="map disk ids to view ids instead of keeping records (repeatable)",
    )
    p.add_argument(
        "--userns",
        choices=("auto", "full", "single"),
        help="auto (default): a full 65536-id range if one is available, else a single id",
    )
    p.add_argument(
        "--userns-base", type=int_arg, metavar="N", help="(root) host id of the 65536-id block for view ids 1-65535"
    )
    p.add_argument(
        "-o",
        "--mount-opt",
        action="append",
        default=[],
        metavar="OPTS",
        help=f"options for every view, as 'shiftfs mount -o' takes them: {', '.join(VIEW_OPTIONS)} "
        "(repeatable; e.g. -o nowriteback,xattr_probes=off)",
    )
    p.add_argument(
        "--allow-shared-source",
        action="store_true",
        help="serve a tree that other users could write into (refused otherwise in xattr mode, "
        "since they could plant records): it keeps its mode, and records count only on your own inodes",
    )


#: ``-o`` options a view of ``run``/``exec`` takes: the daemon's own (cache, writeback,
#: probes, ACL enforcement, request loop, records); the mount itself is the launcher's.
VIEW_OPTIONS = (
    "cache",
    "writeback",
    "nowriteback",
    "xattr_probes",
    "acl",
    "early_writeback",
    "spin",
    "default_owner",
    "legacy_xattr",
    "stats",
)


def view_options(args: argparse.Namespace) -> str:
    """The ``-o`` options for every view (ROOT and ``,shift`` binds), checked
    the way ``shiftfs mount`` checks them."""
    from ..errors import UsageError
    from ..fs.options import parse_options

    given = [o.strip() for group in getattr(args, "mount_opt", None) or [] for o in group.split(",") if o.strip()]
    for opt in given:
        if opt.partition("=")[0] not in VIEW_OPTIONS:
            raise SetupError(
                f"-o {opt}: not an option of the views here; they take {', '.join(VIEW_OPTIONS)} "
                "(see 'shiftfs mount --help')"
            )
    try:
        parse_options([",".join(given)], [], "--xattr" in mount_args(args), "/", "/")
    except UsageError as e:
        raise SetupError(str(e)) from None
    # stats=FILE: written by daemons that run elsewhere (cwd, namespace), so named absolutely here
    given = [f"stats={os.path.abspath(o[6:])}" if o.startswith("stats=") else o for o in given]
    return ",".join(given)


def view_stats(mount_opts: str, index: int) -> str:
    """``-o`` of view number ``index``: with ``stats=FILE`` the first view writes FILE, the
    others FILE.1, FILE.2 … (one daemon per view, each with its own counters)."""
    if index == 0:
        return mount_opts
    return ",".join(f"{o}.{index}" if o.startswith("stats=") else o for o in mount_opts.split(","))


def mount_args(args: argparse.Namespace) -> list[str]:
    """The daemon's mode options from --xattr / --map, checked."""
    if args.map and args.xattr:
        raise SetupError("--xattr and --map exclude each other; give one of them")
    for spec in args.map:
        f = spec.split(":")
        if len(f) != 4 or f[0] not in ("u", "g", "b") or not all(x.isdigit() for x in f[1:]):
            raise SetupError(f"--map {spec!r} is not u|g|b:DISK:VIEW:COUNT; e.g. --map b:0:0:65536")
    if args.map:
        return [a for spec in args.map for a in ("--map", spec)]
    return ["--xattr"]


# --- checks before anything is forked -------------------------------------------


def blocked_component(path: str, uid: int, gids: set[int], want: int) -> str | None:
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


def check_reachable(paths: Sequence[tuple[str, int]], what: str) -> None:
    """Inside the namespace the daemon is the invoking user *without*
    capabilities on host files, so plain permission bits must let it reach
    the interpreter, the shiftfs package and what it serves."""
    uid = os.getuid()
    gids = {os.getgid(), *os.getgroups()}
    for path, want in paths:
        for variant in dict.fromkeys((path, os.path.realpath(path))):
            bad = blocked_component(variant, uid, gids, want)
            if bad:
                st = os.stat(bad) if os.path.exists(bad) else None
                mode = f" (mode {stat.S_IMODE(st.st_mode):04o}, owner {st.st_uid})" if st else ""
                raise SetupError(
                    f"{bad}{mode} blocks uid {uid} from {what} {variant}, and the namespace "
                    f"has no capabilities on host files; move it under a directory every "
                    f"user can enter (e.g. /opt or /work) or 'chmod o+x {bad}'"
                )


def check_private_source(sources: Sequence[str], mode_args: Sequence[str], allow_shared: bool) -> None:
    """Xattr mode: nobody else may write into a served tree (shiftfs.ownership.trust).

    Checked here on the host, as the invoking user; inside the namespace the
    owners of the directories above SOURCE are unmapped, so the daemon is
    told ``source_checked`` (see :func:`.daemons.start_daemon`).
    """
    if "--xattr" not in mode_args or allow_shared:
        return
    for source in sources:
        problem = trust.source_problem(source, os.getuid(), "--allow-shared-source")
        if problem:
            raise SetupError(problem)


def check_daemon_can_start(mode_args: Sequence[str], idmap: userns.NamespaceMaps) -> None:
    """What every shiftfs daemon of a run needs: a usable /dev/fuse, a
    reachable interpreter and package, and disk ids that stay put."""
    if "--map" in mode_args and idmap.base is not None and not idmap.base_fixed:
        raise SetupError(
            "--map as root stores disk ids of this run's namespace, whose block "
            "changes from run to run; add --userns-base N (disk id k>0 is then "
            "host id N+k), or use --xattr"
        )
    if not os.path.exists("/dev/fuse"):
        raise SetupError(
            "/dev/fuse is missing; load the fuse module ('modprobe fuse') "
            "or create it with 'mknod -m 0666 /dev/fuse c 10 229'"
        )
    if blocked_component("/dev/fuse", os.getuid(), {os.getgid(), *os.getgroups()}, 6):
        raise SetupError(
            f"/dev/fuse (mode {stat.S_IMODE(os.stat('/dev/fuse').st_mode):04o}) "
            "is not usable by you; as root run 'make setup' or "
            "'chmod 0666 /dev/fuse'"
        )
    check_reachable(
        [(sys.executable, 5), (os.path.realpath(sys.executable), 5), (os.path.join(_PACKAGE, "__init__.py"), 4)],
        "running the shiftfs daemon",
    )


def check_sources_free(sources: Sequence[str]) -> None:
    """One daemon per SOURCE (shiftfs.fs.sourcelock): refuse a directory that a
    live mount or container serves, naming it, before anything is forked."""
    for source in sources:
        try:
            held = sourcelock.probe(source)
        except OSError:
            continue  # the daemon's own open says why
        if held:
            raise SetupError(sourcelock.describe(source, held))


def within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def staging_dir(sources: Sequence[str], needed: Sequence[str]) -> str:
    """A host directory that namespace A may hide under the staging tmpfs:
    one that holds nothing the daemons or namespace B still need."""
    needed = [
        sys.prefix,
        sys.base_prefix,
        sys.executable,
        os.path.realpath(sys.executable),
        _PACKAGE,
        os.path.realpath(_PACKAGE),
        "/dev",
        "/proc",
        "/sys",
        *sources,
        *needed,
    ]
    for cand in _STAGING_CANDIDATES:
        if os.path.isdir(cand) and not os.path.islink(cand) and not any(within(p, cand) for p in needed):
            return cand
    raise SetupError(
        "the directories to serve or bind and the interpreter cover every "
        f"staging directory ({', '.join(_STAGING_CANDIDATES)}); move one of "
        "them elsewhere"
    )
