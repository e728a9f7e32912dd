"""Table mode: view ownership is real backing ownership, through the id tables.

What a kernel idmapped mount does; the daemon needs the privilege to chown.
"""

from __future__ import annotations

import os
import stat

from ..sys.files import fchown_fd, proc_fd
from .idmap import IdMap
from .node import PolicyNode
from .policy import CreatePlan, OwnershipPolicy
from .single_id import SingleIdPresentation
from .view import View, ViewRule

__all__ = ["TablePolicy"]

_SPECIAL = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX


class TablePolicy(OwnershipPolicy):
    """View ownership is backing ownership through the id tables."""

    def __init__(
        self,
        uids: IdMap,
        gids: IdMap,
        *,
        xnames_trusted: bool = False,
        reread: bool = False,
        single_id: SingleIdPresentation | None = None,
    ):
        self.euid = os.geteuid()
        self.egid = os.getegid()
        rule = ViewRule(uids, gids, self.euid, records=False)
        super().__init__(rule, xnames_trusted=xnames_trusted, reread=reread, single_id=single_id)

    view_needs_fd = False

    def view(self, node: PolicyNode, st: os.stat_result) -> View:
        return self.rule.unrecorded(st)

    def direct_ok(self, du: int, dg: int, mode: int, parent_st: os.stat_result) -> bool:
        natural_gid = parent_st.st_gid if parent_st.st_mode & stat.S_ISGID else self.egid
        if du != self.euid or dg != natural_gid:
            return False
        special = mode & _SPECIAL
        if stat.S_ISDIR(mode):
            return special == (stat.S_ISGID if parent_st.st_mode & stat.S_ISGID else 0)
        return special == 0

    def stamped_xattrs(self, plan: CreatePlan) -> set[str] | None:
        return set()  # owner and mode only; a default ACL is the backing filesystem's to copy

    def stamp(self, node: PolicyNode, plan: CreatePlan, st: os.stat_result) -> None:
        fd = node.path_fd()
        want = plan.mode & 0o7777
        fix_mode = st.st_mode & 0o7777 != want
        if (st.st_uid, st.st_gid) != (plan.uid, plan.gid):
            fchown_fd(fd, plan.uid, plan.gid)
            # A chown can only take setuid/setgid away: with none planned, the
            # mode as made is still the mode now (no second fstat).
            fix_mode = fix_mode or bool(want & (stat.S_ISUID | stat.S_ISGID))
        if fix_mode and not stat.S_ISLNK(plan.mode):
            os.chmod(proc_fd(fd), want)

    def change(
        self, node: PolicyNode, st: os.stat_result | None, uid: int | None, gid: int | None, mode: int | None
    ) -> None:
        # Needs no stat: the type is known from the inode (one fstat less per SETATTR).
        if uid is not None or gid is not None:
            du, dg = self.disk_ids(uid, gid)
            fchown_fd(node.path_fd(), du, dg)
        if mode is not None and not stat.S_ISLNK(node.ftype):
            os.chmod(proc_fd(node.path_fd()), mode & 0o7777)
