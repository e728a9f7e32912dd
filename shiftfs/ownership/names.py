"""The one name codec: view names ↔ backing names, for files and for xattrs.

File names. Every backing name that starts with :data:`RESERVED_PREFIX`
belongs to shiftfs and is never shown through a mount or by an offline tool:

* ``RESERVED_PREFIX + "t" + …`` (:data:`TEMP_PREFIX`) is a temporary name:
  the mount makes new objects under one before renaming them into place,
  and absorb/materialize build replacements under one. A stale one (a killed
  daemon or tool) is safe to delete.
* ``RESERVED_PREFIX + "e" + NAME`` (:data:`ESCAPE_PREFIX`) stores a view name
  that itself starts with the reserved prefix (or is ``.shiftfs`` at the
  root), so one shiftfs can sit on another.

``.shiftfs`` at the root (:data:`STORE_DIR`) holds the record side table.

Xattr names. Some xattrs set through the mount cannot be stored under their
own names: ``security.*`` and ``trusted.*`` need privilege, POSIX ACLs would
change who may access the backing file, and names under our own prefixes
would forge or overwrite a record. All of these are stored as
``user.containers.override_<name>``, the encoding fuse-overlayfs uses with
``xattr_permissions=2`` (``user.containers.override_security.capability``).
Every other name is stored as is. Decoding is the exact inverse of encoding:
a backing name encoding could not have produced (the record itself,
fuse-overlayfs' internal names, the backing inode's own ``security.*`` or ACL
xattrs, which belong to the host) is hidden, so every backing name has at
most one view name.
"""

from __future__ import annotations

import secrets

__all__ = [
    "STORE_DIR",
    "SIDE_TABLE",
    "RESERVED_PREFIX",
    "TEMP_PREFIX",
    "ESCAPE_PREFIX",
    "OUR_XATTR_PREFIXES",
    "backing_name",
    "view_name",
    "temp_name",
    "is_temp_name",
    "escape_xattr_name",
    "unescape_xattr_name",
    "is_privileged_xattr",
]

#: Name of the directory at the backing root that holds the side table.
STORE_DIR = ".shiftfs"
#: The side table's file in it (SQLite also opens it with ``-wal``, ``-shm`` and ``-journal``).
SIDE_TABLE = "records.db"
#: Every backing name under this prefix is shiftfs' own (see the module docstring).
RESERVED_PREFIX = b".shiftfs~"
#: Temporary names: TEMP_PREFIX + a random or inode-derived suffix.
TEMP_PREFIX = RESERVED_PREFIX + b"t"
#: Escaped view names: ESCAPE_PREFIX + the view name.
ESCAPE_PREFIX = RESERVED_PREFIX + b"e"
_STORE_NAME = STORE_DIR.encode()

#: Xattr prefixes that are ours (records, fuse-overlayfs' names): never shown as they are.
OUR_XATTR_PREFIXES = ("user.containers.", "user.fuseoverlayfs.")
_XATTR_ESCAPE = "user.containers.override_"
_PRIVILEGED_XATTR_PREFIXES = ("security.", "trusted.")
_ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")


def backing_name(name: bytes, at_root: bool) -> bytes:
    """The name a view name is stored under (may exceed NAME_MAX: check it)."""
    if name.startswith(RESERVED_PREFIX) or (at_root and name == _STORE_NAME):
        return ESCAPE_PREFIX + name
    return name


def view_name(name: bytes, at_root: bool) -> bytes | None:
    """The view name of a backing name, or None for one of shiftfs' own."""
    if name.startswith(RESERVED_PREFIX):
        return name[len(ESCAPE_PREFIX) :] if name.startswith(ESCAPE_PREFIX) else None
    if at_root and name == _STORE_NAME:
        return None
    return name


def temp_name(suffix: str | None = None) -> bytes:
    """A temporary name (random unless ``suffix`` is given), hidden from every view."""
    return TEMP_PREFIX + (suffix.encode() if suffix is not None else secrets.token_hex(8).encode())


def is_temp_name(name: bytes) -> bool:
    """Whether a backing name is a (possibly stale) temporary of ours."""
    return name.startswith(RESERVED_PREFIX) and not name.startswith(ESCAPE_PREFIX)


def is_privileged_xattr(name: str) -> bool:
    """Names escaped because of what they control (capabilities, labels, ACLs)."""
    return name.startswith(_PRIVILEGED_XATTR_PREFIXES) or name in _ACL_XATTRS


def _needs_escape(name: str) -> bool:
    return is_privileged_xattr(name) or name.startswith(OUR_XATTR_PREFIXES)


def escape_xattr_name(name: str) -> str:
    """The backing name under which an xattr set through the mount is stored.

    The result can exceed the kernel's 255-byte name limit; setting it then
    fails with ``ERANGE``, as it would for any overlong name.
    """
    if _needs_escape(name):
        return _XATTR_ESCAPE + name
    return name


def unescape_xattr_name(backing: str) -> str | None:
    """The view name of a backing xattr name, or ``None`` if it must be hidden."""
    if backing.startswith(_XATTR_ESCAPE):
        inner = backing[len(_XATTR_ESCAPE) :]
        if _needs_escape(inner):
            return inner
        return None
    if _needs_escape(backing):
        # The backing inode's own security.*, trusted.* and ACL xattrs belong
        # to the host, and our own names are never shown.
        return None
    return backing
