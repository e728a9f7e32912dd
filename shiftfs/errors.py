"""The errors shiftfs reports to its user, one class per exit status.

Each message is one line naming the problem and the fix; the command line
(:mod:`shiftfs.cli`, :mod:`shiftfs.offline.commands`) prints it.
"""

from __future__ import annotations

__all__ = ["UsageError", "MountError", "ArchiveError", "TreeError"]


class UsageError(Exception):
    """Bad input from the user (exit status 2); the message names the fix."""


class MountError(Exception):
    """The mount failed (exit status 1); the message says why."""


class ArchiveError(Exception):
    """A failure that stops an offline command (exit status 1); names the path and the fix."""


class TreeError(Exception):
    """A problem with one path in a tree; the message names the path."""
