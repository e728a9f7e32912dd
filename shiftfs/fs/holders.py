"""Who else holds a FUSE mount: copies in other mount namespaces.

Why. A mount namespace made after ``shiftfs mount`` (``unshare --mount``,
podman's pause process, a container) gets its own *copy* of the mount. With
private propagation (the default of ``unshare --mount``, and of a machine
without systemd) ``shiftfs umount`` removes only the copy in the caller's
namespace; the FUSE connection lives on, and the daemon keeps serving the
other copies until their last process exits. The reverse holds inside a user
namespace: a copy that came from outside it is *locked* (the kernel refuses
to unmount it there, lazily too, with EINVAL: "not mounted").

How. Every copy of one FUSE mount has the connection's device number (the
``MAJOR:MINOR`` of mountinfo, ``st_dev`` of the mount root), so the holders
are the processes whose ``/proc/PID/mountinfo`` lists that device. Reading
mountinfo needs no privilege; the ``ns/mnt`` link that tells namespaces apart
does (another user's processes), so copies are told apart by it where
readable and by their mount ids otherwise (a mount id names one copy in one
namespace). Nothing here stats the mount point: a hung daemon would hang us.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field

__all__ = ["MountEntry", "Holder", "entry_of", "other_holders", "describe", "held_by"]


@dataclass(frozen=True)
class MountEntry:
    mount_id: str
    dev: str  # "MAJOR:MINOR" of the FUSE connection
    mountpoint: str
    fstype: str


@dataclass
class Holder:
    """One other mount namespace (or, unreadable, one set of copies) holding the mount."""

    mountpoints: set[str] = field(default_factory=set)
    pids: list[int] = field(default_factory=list)
    commands: set[str] = field(default_factory=set)  # /proc/PID/comm of the pids


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _entries(pid: str = "self") -> list[MountEntry]:
    out = []
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                parts = left.split()
                if len(parts) < 5 or not right:
                    continue
                out.append(MountEntry(parts[0], parts[2], _unescape(parts[4]), right.split()[0]))
    except OSError:
        pass
    return out


def entry_of(mountpoint: str) -> MountEntry | None:
    """The topmost mount on ``mountpoint`` in our own namespace."""
    found = None
    for e in _entries():
        if e.mountpoint == mountpoint:
            found = e
    return found


def other_holders(dev: str, own_ids: Collection[str] = (), fstype: str = "") -> list[Holder]:
    """Mount namespaces other than ours with a mount of device ``dev``.

    ``own_ids`` are the mount ids of our own copies (ours are skipped even if
    still listed). Processes we cannot read are skipped; processes of one
    namespace count once.
    """
    try:
        mine = os.readlink("/proc/self/ns/mnt")
    except OSError:
        mine = None
    me = os.getpid()
    by_key: dict[object, Holder] = {}
    seen_ns: dict[str, object | None] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            ns = os.readlink(f"/proc/{name}/ns/mnt")
        except OSError:
            ns = None  # another user's process, or gone
        if ns is not None and ns == mine:
            continue
        if ns is not None and ns in seen_ns:
            key = seen_ns[ns]
            if key is not None:
                _add(by_key[key], name)
            continue
        hits = [
            e
            for e in _entries(name)
            if e.dev == dev and e.mount_id not in own_ids and (not fstype or e.fstype == fstype)
        ]
        key = ns if ns is not None else tuple(sorted(e.mount_id for e in hits))
        if ns is not None:
            seen_ns[ns] = key if hits else None
        if not hits:
            continue
        h = by_key.setdefault(key, Holder())
        h.mountpoints.update(e.mountpoint for e in hits)
        _add(h, name)
    return list(by_key.values())


def _add(h: Holder, pid: str) -> None:
    h.pids.append(int(pid))
    try:
        with open(f"/proc/{pid}/comm") as f:
            h.commands.add(f.read().strip())
    except OSError:
        pass


def _pids_text(holders: list[Holder]) -> str:
    pids = sorted(p for h in holders for p in h.pids)
    shown = ", ".join(map(str, pids[:5])) + (f" and {len(pids) - 5} more" if len(pids) > 5 else "")
    return f"pid{'s' if len(pids) != 1 else ''} {shown}"


def _podman(holders: list[Holder]) -> str:
    if any("podman pause" in h.commands for h in holders):
        return "; one is rootless podman's pause process: 'podman system migrate' stops it"
    return ""


def held_by(holders: list[Holder]) -> str:
    """``still held by N other mount namespace(s) (pids …: comm, at …)`` for a refusal."""
    n = len(holders)
    comms = sorted({c for h in holders for c in h.commands})
    what = f": {', '.join(comms[:3])}" if comms else ""
    where = sorted({m for h in holders for m in h.mountpoints})
    at = f", at {', '.join(where[:3])}" if where else ""
    return (
        f"still held by {n} other mount namespace{'s' if n != 1 else ''} ({_pids_text(holders)}{what}{at})"
        f"{_podman(holders)}"
    )


def describe(mountpoint: str, holders: list[Holder]) -> str:
    """One line: what ``shiftfs umount`` did and why the daemon still runs."""
    n = len(holders)
    pids = sorted(p for h in holders for p in h.pids)
    shown = ", ".join(map(str, pids[:5])) + (f" and {len(pids) - 5} more" if len(pids) > 5 else "")
    where = sorted({m for h in holders for m in h.mountpoints} - {mountpoint})
    at = f", at {', '.join(where[:3])}" if where else ""
    them = "it" if n == 1 else "them"
    return (
        f"{mountpoint} is unmounted here, but {n} other mount namespace{'s' if n != 1 else ''} "
        f"(pid{'s' if len(pids) != 1 else ''} {shown}{at}) still hold{'s' if n == 1 else ''} a copy; "
        f"the daemon keeps serving {them} until those processes exit or unmount {them} "
        f"(stopping the daemon cuts {them} off with ENOTCONN)"
        + (
            "; one is rootless podman's pause process: 'podman system migrate' stops it"
            if any("podman pause" in h.commands for h in holders)
            else ""
        )
    )
