"""
User namespaces for ``shiftfs run`` and ``shiftfs exec``: which ids the new
namespace gets, writing its maps, and becoming its root.

Id maps follow the usual rule that the namespace's root (*view id* 0) is the
invoking user, so everything the shiftfs daemon writes on the backing
filesystem is owned by that user:

* as root, view ids 1..65535 go to a 65536-id block that no running namespace
  and no /etc/subuid entry uses (see :func:`free_block`). For ``shiftfs run``
  view 0 goes there too: the container's root is host id BASE, never host
  root (as ``podman --userns=auto`` and ``systemd-nspawn -U``). The daemons
  still need the invoking root's own id for the backing files, so the
  launch has two namespaces: the daemons' (view 0 is host 0, 1..65535 are
  BASE+1.., and 65536 is BASE) and, nested in it, the container's (*C*:
  view 0 is the daemons' 65536, 1..65535 are theirs), which numbers every
  id as the daemons do but 0 (see :attr:`NamespaceMaps.container`);
* as an unprivileged user, view ids 1.. go to the user's ranges in /etc/subuid
  and /etc/subgid, written with the setuid helpers newuidmap/newgidmap, like
  rootless podman;
* otherwise only view id 0 exists (a *single-id* namespace), and the kernel
  refuses chown to any other id with EINVAL before the filesystem sees it
  (in xattr views shiftfs traps and records it: shiftfs.container.seccomp_notify).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import random
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from ..errors import SetupError
from ..ownership.idmap import Range
from ..sys import mounts
from ..sys.mounts import set_dumpable

#: Size of the id block a full namespace gets, and the range root picks it
#: from (the one systemd-nspawn uses for containers).
BLOCK = 0x10000
CONTAINER_RANGE = (0x00080000, 0x6FFFFFFF)


def userns_unavailable_hint() -> str:
    """The sysctl that most likely forbids unprivileged user namespaces."""
    checks = [
        ("/proc/sys/kernel/unprivileged_userns_clone", "0", "sysctl -w kernel.unprivileged_userns_clone=1"),
        ("/proc/sys/user/max_user_namespaces", "0", "sysctl -w user.max_user_namespaces=15000"),
        (
            "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
            "1",
            "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0",
        ),
    ]
    for path, bad, fix in checks:
        try:
            with open(path) as f:
                if f.read().strip() == bad:
                    return f"{path} is {bad}; as root run '{fix}'"
        except OSError:
            pass
    return "check that the kernel allows unprivileged user namespaces"


# --- id maps ------------------------------------------------------------------


# A namespace's map line "INSIDE OUTSIDE COUNT" is an ownership Range read the
# shiftfs way: the id a process inside sees is the *view* id, the id the host
# kernel stores is the *disk* id. One Range type serves the mount's tables and
# the namespaces' maps, so no triple order has to be remembered.
@dataclass(frozen=True)
class NamespaceMaps:
    """The uid and gid maps of one user namespace.

    ``kind`` is ``"full"`` or ``"single"``; ``helper`` says whether the maps
    are written by newuidmap/newgidmap (subordinate ranges) or directly.
    """

    kind: str
    uid_map: tuple[Range, ...]
    gid_map: tuple[Range, ...]
    helper: bool = False
    base: int | None = None
    base_fixed: bool = False
    #: the container's own namespace inside this one (ids of this one as ``disk``), or None
    container: NamespaceMaps | None = None

    def maps_uid(self, view_id: int) -> bool:
        return any(r.view <= view_id < r.view + r.count for r in self.uid_map)

    def maps_gid(self, view_id: int) -> bool:
        return any(r.view <= view_id < r.view + r.count for r in self.gid_map)

    @property
    def setgroups_allowed(self) -> bool:
        # Unprivileged direct writes need setgroups=deny first.
        return self.helper or os.geteuid() == 0

    def describe(self) -> str:
        def fmt(ranges: Sequence[Range]) -> str:
            return ", ".join(
                f"{r.view}-{r.view + r.count - 1}->{r.disk}" if r.count > 1 else f"{r.view}->{r.disk}" for r in ranges
            )

        return f"uid {fmt(self.uid_map)}; gid {fmt(self.gid_map)}"


def parse_subid_file(path: str, user: str | None, uid: int) -> list[tuple[int, int]]:
    """The (start, count) ranges /etc/subuid or /etc/subgid gives to a user,
    matched by name or by numeric uid, in file order."""
    ranges = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) != 3 or line.lstrip().startswith("#"):
            continue
        owner, start, count = fields
        if owner not in (user, str(uid)):
            continue
        try:
            start_i, count_i = int(start), int(count)
        except ValueError:
            continue
        if count_i > 0:
            ranges.append((start_i, count_i))
    return ranges


def _all_subid_ranges() -> list[tuple[int, int]]:
    out = []
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            with open(path) as f:
                for line in f:
                    fields = line.strip().split(":")
                    if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                        out.append((int(fields[1]), int(fields[2])))
        except OSError:
            pass
    return out


def ranges_in_use() -> list[tuple[int, int]]:
    """Host id ranges (start, count) taken by running user namespaces
    (/proc/*/uid_map and gid_map) and by /etc/subuid and /etc/subgid."""
    used = set(_all_subid_ranges())
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        for name in ("uid_map", "gid_map"):
            try:
                with open(f"/proc/{pid}/{name}") as f:
                    text = f.read()
            except OSError:
                continue
            for line in text.splitlines():
                fields = line.split()
                if len(fields) != 3:
                    continue
                _, outside, count = (int(x) for x in fields)
                if count >= 0xFFFFFFFF:  # the initial namespace's identity map
                    continue
                used.add((outside, count))
    return sorted(used)


def _overlaps(start: int, count: int, used: Iterable[tuple[int, int]]) -> bool:
    return any(start < s + n and s < start + count for s, n in used)


def free_block(used: Sequence[tuple[int, int]] | None = None, rng: random.Random | None = None) -> int:
    """A 65536-aligned block inside :data:`CONTAINER_RANGE` that overlaps no
    range in ``used`` (default: :func:`ranges_in_use`). The search starts at a
    random block so that parallel runs rarely race for the same one."""
    if used is None:
        used = ranges_in_use()
    first = CONTAINER_RANGE[0] // BLOCK
    last = (CONTAINER_RANGE[1] + 1) // BLOCK - 1
    nblocks = last - first + 1
    start = (rng or random).randrange(nblocks)
    for i in range(nblocks):
        base = (first + (start + i) % nblocks) * BLOCK
        if not _overlaps(base, BLOCK, used):
            return base
    raise SetupError("no free 65536-id block left in 0x80000-0x6fffffff; pass --userns-base N with a free block")


def _block_map(host0: int, base: int, fresh_root: bool = False) -> tuple[Range, ...]:
    """View 0 is ``host0``; view 1..65535 are ``base+1``..; with ``fresh_root``
    view 65536 is ``base``, the container's root (see :data:`CONTAINER_MAP`)."""
    extra = (Range(base, BLOCK, 1),) if fresh_root else ()
    return (Range(host0, 0, 1), Range(base + 1, 1, BLOCK - 1), *extra)


#: The container namespace of root's run, in the daemons' namespace's ids:
#: view 0 is their 65536 (host BASE), view 1..65535 are theirs (BASE+1..).
_INNER = (Range(BLOCK, 0, 1), Range(1, 1, BLOCK - 1))


def _root_maps(base: int, fixed: bool, fresh_root: bool) -> NamespaceMaps:
    """Root's maps with the block at ``base`` (and the container's own namespace)."""
    container = NamespaceMaps("full", _INNER, _INNER) if fresh_root else None
    m = _block_map(0, base, fresh_root)
    return NamespaceMaps("full", m, m, base=base, base_fixed=fixed, container=container)


def _subid_map(host0: int, ranges: Sequence[tuple[int, int]]) -> tuple[Range, ...]:
    """View 0 is ``host0``; then the subordinate ranges, one after another."""
    out = [Range(host0, 0, 1)]
    view = 1
    for start, count in ranges:
        out.append(Range(start, view, count))
        view += count
    return tuple(out)


def suggest_subid_range() -> tuple[int, int]:
    """A 65536-id range after every range in /etc/subuid and /etc/subgid."""
    start = max([100000] + [s + n for s, n in _all_subid_ranges()])
    return start, start + BLOCK - 1


def single_id_note(user: str, recorded: bool = False) -> str:
    """The one-time notice for a single-id namespace; ``recorded``: chown and
    mknod in the shifted directories are trapped and kept (shiftfs.container.seccomp_notify)."""
    lo, hi = suggest_subid_range()
    head = f"note: single-id namespace ({user} has no range in /etc/subuid and /etc/subgid, or newuidmap is missing): "
    fix = (
        f"to get 65536 ids, as root run 'usermod --add-subuids {lo}-{hi} "
        f"--add-subgids {lo}-{hi} {user}' (newuidmap comes with package uidmap)"
    )
    if not recorded:
        return head + "chown to any id but 0 fails with EINVAL; " + fix
    return (
        head + "chown to other ids and mknod of devices in the shifted directories are recorded "
        "(they show as 0 inside and as asked in 'shiftfs export'); elsewhere chown to any id but 0 "
        "fails with EINVAL. No process can switch to another uid: su or setpriv to another "
        "account fails, and apt needs -o APT::Sandbox::User=root (mmdebstrap: "
        "--aptopt='APT::Sandbox::User \"root\"'). " + fix[0].upper() + fix[1:]
    )


def caller_name() -> str:
    """The calling user's name (its uid if it has none), for messages."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def choose_idmap(
    mode: str = "auto", base: int | None = None, fresh_root: bool = False
) -> tuple[NamespaceMaps, str | None]:
    """Pick the id map for a new namespace of the calling user.

    ``mode`` is ``auto``, ``full`` or ``single``; ``base`` forces root's
    block; ``fresh_root`` (``run``): root's container gets a root of its own
    in that block. Returns the map and, for an automatic single-id
    fallback, the note to print once.
    """
    uid, gid = os.getuid(), os.getgid()
    if mode not in ("auto", "full", "single"):
        raise SetupError(f"--userns {mode!r} is not a mode; use auto, full or single")
    if base is not None and uid != 0:
        raise SetupError(
            "--userns-base needs root; unprivileged runs take their range from /etc/subuid and /etc/subgid"
        )
    if base is not None and mode == "single":
        raise SetupError("--userns-base conflicts with --userns single; drop one")
    if mode == "single" and uid == 0 and fresh_root and in_initial_userns():
        raise SetupError(
            "--userns single is for users without a subordinate range; as root every container "
            "gets a fresh 65536-id block whose first id is its root: drop --userns single"
        )
    if mode == "single":
        return NamespaceMaps("single", (Range(uid, 0, 1),), (Range(gid, 0, 1),)), None
    cfg_base = base
    if uid == 0 and base is None and not in_initial_userns():
        # Nested: hand the ids of this namespace on unchanged.
        return NamespaceMaps("full", _own_extents("uid_map"), _own_extents("gid_map")), None
    if uid == 0:
        if base is None:
            base = free_block()
        else:
            if base < 1 or base % BLOCK or base + BLOCK > 0xFFFFFFFF:
                raise SetupError(
                    f"--userns-base {base} must be a positive multiple of "
                    f"65536 below {0xFFFFFFFF - BLOCK + 1}; e.g. 524288"
                )
            if _overlaps(base, BLOCK, ranges_in_use()):
                raise SetupError(
                    f"--userns-base {base} overlaps ids of a running "
                    "namespace or /etc/subuid; pick another block or "
                    "omit --userns-base"
                )
        return _root_maps(base, cfg_base is not None, fresh_root), None
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = None
    subuids = parse_subid_file("/etc/subuid", user, uid)
    subgids = parse_subid_file("/etc/subgid", user, uid)
    helpers = all(_which(t) for t in ("newuidmap", "newgidmap"))
    if subuids and subgids and helpers:
        return NamespaceMaps("full", _subid_map(uid, subuids), _subid_map(gid, subgids), helper=True), None
    name = user or str(uid)
    if mode == "full":
        if not helpers:
            raise SetupError(
                "--userns full needs newuidmap and newgidmap; as root "
                "run 'apt-get install uidmap' (or use --userns single)"
            )
        lo, hi = suggest_subid_range()
        raise SetupError(
            f"--userns full needs ranges for {name} in /etc/subuid and "
            f"/etc/subgid; as root run 'usermod --add-subuids {lo}-{hi} "
            f"--add-subgids {lo}-{hi} {name}'"
        )
    return NamespaceMaps("single", (Range(uid, 0, 1),), (Range(gid, 0, 1),)), single_id_note(name)


def in_initial_userns() -> bool:
    """Whether we run in the initial user namespace (identity map of all ids)."""
    try:
        return _own_extents("uid_map") == (Range(0, 0, 0xFFFFFFFF),)
    except (OSError, ValueError):
        return True


def _own_extents(name: str) -> tuple[Range, ...]:
    """This namespace's own ids, each mapped to itself (to hand on unchanged)."""
    with open(f"/proc/self/{name}") as f:
        rows = [line.split() for line in f if line.strip()]
    return tuple(Range(int(r[0]), int(r[0]), int(r[2])) for r in rows)


def _which(tool: str) -> str | None:
    for d in ("/usr/bin", "/usr/sbin", "/bin", "/sbin"):
        p = os.path.join(d, tool)
        if os.access(p, os.X_OK):
            return p
    return None


@contextlib.contextmanager
def id_block_lock() -> Iterator[None]:
    """Serialise root's final block check and map write with other runs (a
    no-op for unprivileged users). Fork nothing while holding it: a child
    would inherit the lock."""
    try:
        if os.geteuid() != 0:
            raise PermissionError
        fd = os.open("/run/shiftfs-userns.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def claim_idmap(pid: int, idmap: NamespaceMaps) -> NamespaceMaps:
    """Write the maps of ``pid``; root's block is checked again under
    :func:`id_block_lock` first and moved if a namespace started since
    :func:`choose_idmap` took it. Returns the map written."""
    if idmap.base is None:
        write_idmap(pid, idmap)
        return idmap
    with id_block_lock():
        if _overlaps(idmap.base, BLOCK, ranges_in_use()):
            if idmap.base_fixed:
                raise SetupError(
                    f"--userns-base {idmap.base} was taken by another namespace meanwhile; pick another block"
                )
            idmap = _root_maps(free_block(), False, idmap.container is not None)
        write_idmap(pid, idmap)
    return idmap


def write_idmap(pid: int, idmap: NamespaceMaps) -> None:
    """Write the uid and gid maps of process ``pid``, which has just called
    ``unshare(CLONE_NEWUSER)``."""
    if idmap.helper:
        for tool, extents in (("newuidmap", idmap.uid_map), ("newgidmap", idmap.gid_map)):
            argv = [_which(tool) or tool, str(pid)]
            argv += [str(x) for r in extents for x in (r.view, r.disk, r.count)]
            res = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            if res.returncode != 0:
                msg = " ".join(res.stdout.split()) or f"exit status {res.returncode}"
                raise SetupError(
                    f"{tool} failed: {msg}; check /etc/subuid, /etc/subgid "
                    f"and that {tool} is setuid root (package uidmap)"
                )
        return
    try:
        if not idmap.setgroups_allowed:
            with open(f"/proc/{pid}/setgroups", "w") as f:
                f.write("deny")
        for name, extents in (("uid_map", idmap.uid_map), ("gid_map", idmap.gid_map)):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write("".join(f"{r.view} {r.disk} {r.count}\n" for r in extents))
    except OSError as e:
        raise SetupError(f"cannot write the id map of process {pid}: {e.strerror}") from None


def write_inner_idmap(pid: int, container: NamespaceMaps) -> None:
    """As root of the daemons' namespace (pid 1 of A): write the maps of the
    container's namespace, which B0 (our child ``pid``) has just made. Our
    /proc is the host's, which numbers B0 otherwise: a procfs of our own pid
    namespace is made for it, attached nowhere."""
    try:
        proc = mounts.open_own_proc()
        try:
            for name, extents in (("gid_map", container.gid_map), ("uid_map", container.uid_map)):
                fd = os.open(f"{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC, dir_fd=proc)
                try:
                    os.write(fd, "".join(f"{r.view} {r.disk} {r.count}\n" for r in extents).encode())
                finally:
                    os.close(fd)
        finally:
            os.close(proc)
    except OSError as e:
        raise SetupError(f"cannot write the id map of the container's user namespace: {e.strerror}") from None


def enter_as_root() -> None:
    """In the container's freshly mapped namespace (B0): become its root and
    drop the host's supplementary groups (host root's would be gid 0)."""
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def become_root(idmap: NamespaceMaps) -> None:
    """Inside a freshly mapped namespace: switch to view id 0 with all the
    namespace's capabilities, and stay dumpable. Supplementary groups are
    kept: through them the user may reach files a daemon has to serve."""
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    set_dumpable()
