"""Walking a backing tree without a mount.

The offline tools walk a backing tree ("ROOT") through directory
descriptors, never following a symlink and skipping what no view shows: the
record side table ``ROOT/.shiftfs`` and shiftfs' temporary names (see
:mod:`shiftfs.ownership.names`). What each inode looks like is
:mod:`shiftfs.ownership.view`'s business, the same rule the mount follows.

The walk itself is :mod:`shiftfs.sys.walk`'s, the one walk of every tree
shiftfs walks; this module adds the view's name rules to it.

Inodes are named by an ``O_PATH | O_NOFOLLOW`` descriptor. Operations on the
inode itself go through its ``/proc/self/fd`` link, which reaches the inode
(a symlink included) without resolving a backing path string again.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ..errors import TreeError
from ..ownership.names import STORE_DIR, is_temp_name, view_name
from ..ownership.record import RecordError
from ..ownership.store import RecordStore
from ..ownership.trust import offline_trust_note, offline_trusted_uid, owned_by
from ..ownership.view import View, ViewRule
from ..sys.files import DIR_PATH_FLAGS, open_beneath
from ..sys.walk import DIR_FLAGS as _DIR_FLAGS
from ..sys.walk import Entry, OnError
from ..sys.walk import walk as tree_walk

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress

__all__ = [
    "Entry",
    "open_root",
    "open_beneath",
    "open_store",
    "find_root",
    "has_store",
    "walk",
    "view_at",
    "Progress",
    "DIR_PATH_FLAGS",
    "COPY_CHUNK",
]

#: Copy buffer size of the archive tools.
COPY_CHUNK = 1 << 20


# -- walking ---------------------------------------------------------------------


_ROOT_PROBLEMS = {
    FileNotFoundError: "no such directory; give an existing tree root",
    NotADirectoryError: "not a directory; give the root directory of a tree",
    PermissionError: "permission denied; run as the tree's owner (or root)",
}


def open_root(path: str) -> int:
    """An ``O_RDONLY | O_DIRECTORY`` descriptor of a tree's root directory."""
    try:
        return os.open(path, _DIR_FLAGS & ~os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError, PermissionError) as e:
        raise TreeError(f"{path}: {_ROOT_PROBLEMS[type(e)]}") from None


def walk(
    root_fd: int,
    on_error: OnError | None = None,
    on_temp: Callable[[int, str], None] | None = None,
) -> Iterator[Entry]:
    """Yield every inode of the view below ``root_fd`` (root first, parents before children).

    The one walk (:func:`shiftfs.sys.walk.walk`: names in byte order, no
    symlink followed, other filesystems reported as ``EXDEV`` and not
    entered, errors to ``on_error(rel, exc)`` or raised) with the view's
    names: the side table directory at the root is skipped, and so are
    temporary names (left by a killed daemon or tool), which
    ``on_temp(dirfd, name)`` may remove. ``Entry.vrel`` is the path a mount
    shows (differs from ``rel`` only for escaped names).
    """

    def select(dirfd: int, rel: str, name: str) -> str | None:
        bname = os.fsencode(name)
        vbytes = view_name(bname, not rel)
        if vbytes is None:
            if on_temp is not None and is_temp_name(bname):
                on_temp(dirfd, name)
            return None  # the side table, or a mount's temporary name: never part of the view
        return os.fsdecode(vbytes)

    return tree_walk(root_fd, select=select, on_error=on_error)


def view_at(rule: ViewRule, store: RecordStore, fd: int, st: os.stat_result, rel: str = "") -> View:
    """The view of one inode (the mount's rule); a bad record is a TreeError naming ``rel``."""
    try:
        return rule.view(store, fd, st)
    except RecordError as e:
        raise TreeError(f"{rel or '.'}: {e}") from None


def open_store(
    root_fd: int,
    create: bool,
    legacy: bool = False,
    readonly: bool = False,
    check: bool = True,
    *,
    trusted_uid: int | None = None,
    name: str = "",
    say: Callable[[str], None] | None = None,
) -> RecordStore:
    """The record store of a tree: read-only for readers, creating for writers.

    Whose records count is :func:`shiftfs.ownership.trust.offline_trusted_uid`
    (unless ``trusted_uid`` is given): the running user, or for root the
    owner of the tree's root; when that is not the running user, ``say``
    gets one line naming ``name`` and whose records count. A reader on a
    tree that is not the trusted user's reads no side table (nothing in it
    could be that user's). ``check=False`` is for absorb/materialize: root
    rewriting the ownership of the whole tree, side table included, where
    the tree root's owner changes half way and a rerun must read what the
    first run wrote.
    """
    root_st = os.fstat(root_fd)
    if trusted_uid is None:
        trusted_uid = offline_trusted_uid(root_st)
        note = offline_trust_note(name or ".", root_st)
        if note and say is not None:
            say(note)
    theirs = not owned_by(root_st, trusted_uid)
    if readonly:
        store = RecordStore(root_fd, False, readonly=True, trusted_uid=trusted_uid, side_table=not theirs)
    else:
        store = RecordStore(root_fd, create, write_legacy=legacy, trusted_uid=trusted_uid)
    # A side table someone else could have written is refused (shiftfs.ownership.trust).
    if not check or (readonly and theirs):
        return store
    try:
        store.check_private(store.trusted_uid, fix=not readonly)
    except BaseException:
        store.close()
        raise
    return store


def has_store(root_fd: int) -> bool:
    """Whether the tree has a record side table at its root."""
    try:
        os.stat(STORE_DIR, dir_fd=root_fd, follow_symlinks=False)
        return True
    except OSError:
        return False


def find_root(path: str) -> str:
    """The nearest ancestor holding a record side table (else the parent)."""
    cur = os.path.abspath(path)
    start = os.path.dirname(cur) if not os.path.isdir(cur) or os.path.islink(cur) else cur
    d = start
    while True:
        if os.path.isdir(os.path.join(d, STORE_DIR)):
            return d
        up = os.path.dirname(d)
        if up == d:
            return start
        d = up


# -- progress ---------------------------------------------------------------------


class Progress:
    """A rich progress line (files, bytes, throughput) on a terminal, else silent."""

    def __init__(self, what: str, enabled: bool | None = None):
        self.files = 0
        self.bytes = 0
        self._start = time.monotonic()
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._progress: RichProgress | None = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                DownloadColumn,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TransferSpeedColumn,
            )
            from rich.progress import (
                Progress as _RichProgress,
            )

            self._progress = _RichProgress(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                TextColumn("{task.fields[files]} files"),
                TextColumn("{task.fields[rate]:.0f} files/s"),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._task = self._progress.add_task(what, total=None, files=0, rate=0.0)

    def __enter__(self) -> Progress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._update()
            self._progress.stop()

    def advance(self, files: int = 1, nbytes: int = 0) -> None:
        self.files += files
        self.bytes += nbytes
        if self._progress is not None:
            self._update()

    def _update(self) -> None:
        assert self._progress is not None  # callers check: only a shown line is updated
        elapsed = max(time.monotonic() - self._start, 1e-6)
        self._progress.update(self._task, completed=self.bytes, files=self.files, rate=self.files / elapsed)

    def log(self, message: str) -> None:
        """Print a message above the progress line (stderr)."""
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=sys.stderr)
