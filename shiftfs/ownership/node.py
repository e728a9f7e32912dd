"""What the ownership rules need of an inode: the :class:`PolicyNode` protocol.

The policies (:mod:`shiftfs.ownership.policy` and its modes) work on the
mount's inodes, :class:`shiftfs.fs.inodes.Inode`, but ``ownership/`` sits below
``fs/``: it names only what it uses, and ``fs/inodes.py`` satisfies it
structurally (mypy checks that where the mount hands its inodes over). The
fields a policy writes (``record``, ``default_acl``) are its own; ``xnames``
belongs to the operations, and a policy only reads it.
"""

from __future__ import annotations

import enum
from typing import Final, Literal, Protocol

from .record import Record

__all__ = ["PolicyNode", "UNLOADED", "Unloaded", "CallerIds"]


class Unloaded(enum.Enum):
    """``record`` before the policy looked: a one-member enum so ``is UNLOADED`` narrows the type."""

    UNLOADED = enum.auto()


UNLOADED: Final = Unloaded.UNLOADED


class PolicyNode(Protocol):
    """One live inode of the mount, as the ownership policies see it."""

    #: the FUSE node id
    id: int
    #: backing ``(st_dev, st_ino)``
    key: tuple[int, int]
    #: backing ``S_IFMT`` type
    ftype: int
    #: the cached record (the policy's): None when the inode has no usable one
    record: Record | None | Literal[Unloaded.UNLOADED]
    #: whether the directory carries a default ACL (the policy's; None: not known)
    default_acl: bool | None
    #: backing xattr names, when known (the operations')
    xnames: set[str] | None

    def path_fd(self) -> int:
        """An ``O_PATH`` descriptor of the inode (may reopen it; ``ESTALE`` when gone)."""
        ...

    def view_path(self) -> str:
        """The inode's last known path below the root, for log lines."""
        ...


class CallerIds(Protocol):
    """Who creates a new object: a FUSE request's context, or the control channel's caller."""

    @property
    def uid(self) -> int: ...

    @property
    def gid(self) -> int: ...

    @property
    def umask(self) -> int: ...
