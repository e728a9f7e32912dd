"""``-o single_id``: show ids the daemon's user namespace cannot map as its root (0).

In a user namespace with one id (a user without an /etc/subuid range, see
:mod:`shiftfs.fs.control`), the kernel would show every other id as 65534, and
root of the namespace then has no capabilities over such an inode: a package
manager's ``fchmod``/``utime``/``rename`` after its ``fchown`` would fail. So
the view *presents* those ids as 0 to the kernel, while records keep the real
ids (``shiftfs export`` shows them) and the true owner stays readable as the
read-only xattr :data:`OWNER_XATTR`, which tools that copy owners (``cp -a``,
``rsync -a``) copy along; the seccomp supervisor turns that copy into a chown
(:mod:`shiftfs.container.seccomp_notify`).

This is a presentation on top of a policy's view, not a second id table: a
policy constructed with a :class:`SingleIdPresentation` applies it in
:meth:`~shiftfs.ownership.policy.OwnershipPolicy.shown` (what the kernel is
told) and nowhere else; every ownership decision (a setgid directory's group,
group membership for an ACL write) still sees the true view.
"""

from __future__ import annotations

from .view import View

__all__ = ["OWNER_XATTR", "SingleIdPresentation"]

#: The true owner ``UID:GID`` of an inode whose presented owner differs (read-only through the mount).
OWNER_XATTR = "user.shiftfs.owner"


def _mapped_ranges(path: str) -> list[tuple[int, int]]:
    out = []
    with open(path) as f:
        for line in f:
            inside, _outside, count = (int(x) for x in line.split())
            out.append((inside, count))
    return out


class SingleIdPresentation:
    """Ids outside the daemon's user namespace maps are presented as 0."""

    def __init__(self, uids: list[tuple[int, int]], gids: list[tuple[int, int]]):
        #: (first id, count) ranges the namespace maps
        self._uids = uids
        self._gids = gids

    @classmethod
    def of_this_namespace(cls) -> SingleIdPresentation:
        """The ranges of the user namespace the daemon runs in."""
        return cls(_mapped_ranges("/proc/self/uid_map"), _mapped_ranges("/proc/self/gid_map"))

    @staticmethod
    def _mapped(ranges: list[tuple[int, int]], xid: int) -> bool:
        return any(lo <= xid < lo + n for lo, n in ranges)

    def present(self, view: View) -> View:
        """``view`` as the kernel is shown it."""
        uid = view.uid if self._mapped(self._uids, view.uid) else 0
        gid = view.gid if self._mapped(self._gids, view.gid) else 0
        if (uid, gid) == (view.uid, view.gid):
            return view
        return view._replace(uid=uid, gid=gid)
