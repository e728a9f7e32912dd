"""Table mode: view ownership is real backing ownership, through the id tables.

What a kernel idmapped mount does; the daemon needs the privilege to chown.
"""

from __future__ import annotations

import os
import stat

from ..sys.files import fchown_fd, proc_fd
from .idmap import IdMap
from .policy import CreatePlan, OwnershipPolicy
from .view import backing_view

__all__ = ["TablePolicy"]

_SPECIAL = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX


class TablePolicy(OwnershipPolicy):
    """View ownership is backing ownership through the id tables."""

    def __init__(self, uids: IdMap, gids: IdMap):
        super().__init__(uids, gids)
        self.euid = os.geteuid()
        self.egid = os.getegid()

    def view(self, node, st):
        return backing_view(st, self.uids, self.gids)

    def direct_ok(self, du, dg, mode, parent_st):
        natural_gid = parent_st.st_gid if parent_st.st_mode & stat.S_ISGID else self.egid
        if du != self.euid or dg != natural_gid:
            return False
        special = mode & _SPECIAL
        if stat.S_ISDIR(mode):
            return special == (stat.S_ISGID if parent_st.st_mode & stat.S_ISGID else 0)
        return special == 0

    def stamp(self, node, plan: CreatePlan) -> None:
        fd = node.fd
        st = os.fstat(fd)
        chowned = (st.st_uid, st.st_gid) != (plan.uid, plan.gid)
        if chowned:
            fchown_fd(fd, plan.uid, plan.gid)
        if not stat.S_ISLNK(plan.mode):
            cur = os.fstat(fd).st_mode if chowned else st.st_mode
            if cur & 0o7777 != plan.mode & 0o7777:
                os.chmod(proc_fd(fd), plan.mode & 0o7777)

    def change(self, node, st, uid, gid, mode):
        if uid is not None or gid is not None:
            du, dg = self.disk_ids(uid, gid)
            fchown_fd(node.fd, du, dg)
        if mode is not None and not stat.S_ISLNK(st.st_mode):
            os.chmod(proc_fd(node.fd), mode & 0o7777)
