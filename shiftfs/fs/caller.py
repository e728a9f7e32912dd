"""What the kernel knows about the process behind a request, and FUSE does not pass on.

A request carries the caller's pid, fsuid and fsgid only. Where the kernel
leaves a decision to the daemon (FUSE_POSIX_ACL makes the daemon responsible
for the mode an ACL write implies) we read the rest from ``/proc/PID``:
supplementary groups, effective capabilities and the user namespace. All ids
read there are in the daemon's user namespace, which is the one the mount's
view ids live in.
"""

from __future__ import annotations

import os

__all__ = ["in_group_or_capable", "sees_trusted"]

CAP_FSETID = 4
CAP_SYS_ADMIN = 21


def _status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            out[key] = val.strip()
    return out


def _mapped(pid: int, what: str, xid: int) -> bool:
    """Whether ``xid`` (a daemon-namespace id) has a mapping in the caller's user namespace."""
    with open(f"/proc/{pid}/{what}_map") as f:
        for line in f:
            inside, outside, count = (int(x) for x in line.split())
            if outside <= xid < outside + count:
                return True
    return False


def in_group_or_capable(pid: int, fsgid: int, uid: int, gid: int) -> bool:
    """The kernel's ``in_group_or_capable`` for a file of view ``uid:gid``: may the caller keep its SGID bit?

    True when ``gid`` is the caller's fsgid or one of its groups, or when the
    caller has CAP_FSETID in a user namespace where the file's ids are mapped.
    A caller that is gone by now (or a /proc we cannot read) counts as a
    member only through its fsgid.
    """
    if gid == fsgid:
        return True
    try:
        st = _status(pid)
        if str(gid) in st.get("Groups", "").split():
            return True
        if not int(st.get("CapEff", "0"), 16) & (1 << CAP_FSETID):
            return False
        if os.stat(f"/proc/{pid}/ns/user").st_ino == os.stat("/proc/self/ns/user").st_ino:
            return True
        return _mapped(pid, "uid", uid) and _mapped(pid, "gid", gid)
    except (OSError, ValueError):
        return False


def sees_trusted(pid: int) -> bool:
    """Whether the caller may see ``trusted.*`` names: CAP_SYS_ADMIN in the initial user namespace.

    What a local filesystem's listxattr checks (``capable()``); the kernel
    passes a FUSE daemon's list through as it is.
    """
    try:
        if not int(_status(pid).get("CapEff", "0"), 16) & (1 << CAP_SYS_ADMIN):
            return False
        with open(f"/proc/{pid}/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except (OSError, ValueError):
        return False
