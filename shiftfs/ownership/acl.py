"""The one POSIX ACL codec, for the mount and the offline tools.

The xattr value is a little-endian u32 version (2) followed by 8-byte
entries (u16 tag, u16 perm, u32 id), sorted by tag and then id. Besides the
binary form this module does the kernel's ``posix_acl_*`` arithmetic (for
ACLs the xattr mode keeps escaped, which the backing filesystem neither
enforces nor inherits), translates the ids of named entries through an id
table, and converts to and from the text form tar archives carry.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

__all__ = [
    "ACL_ACCESS",
    "ACL_DEFAULT",
    "ACL_NAMES",
    "AclError",
    "UnmappedAclId",
    "parse",
    "pack",
    "named_ids",
    "check_valid",
    "equiv_mode",
    "create_masq",
    "chmod_masq",
    "map_ids",
    "to_text",
    "from_text",
]

ACL_ACCESS = "system.posix_acl_access"
ACL_DEFAULT = "system.posix_acl_default"
ACL_NAMES = (ACL_ACCESS, ACL_DEFAULT)

_VERSION = 2
_UNDEFINED_ID = 0xFFFFFFFF
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_NAMED = (USER, GROUP)
_TAG_TEXT = {USER_OBJ: "user", USER: "user", GROUP_OBJ: "group", GROUP: "group", MASK: "mask", OTHER: "other"}

Entry = tuple[int, int, int]  # (tag, perm, id)


class AclError(ValueError):
    """An ACL is malformed; the message names the problem."""


class UnmappedAclId(AclError):
    """A named entry's id has no image in the id table (EOVERFLOW through a mount)."""


def parse(value: bytes) -> list[Entry]:
    if len(value) < 4 or (len(value) - 4) % 8:
        raise AclError(f"ACL xattr of {len(value)} bytes is not 4 + 8*n; it is corrupt")
    (version,) = struct.unpack_from("<I", value)
    if version != _VERSION:
        raise AclError(f"ACL xattr version {version} is not 2; it is corrupt")
    return [struct.unpack_from("<HHI", value, off) for off in range(4, len(value), 8)]


def pack(entries: list[Entry]) -> bytes:
    entries = sorted(entries, key=lambda e: (e[0], e[2] if e[0] in _NAMED else 0))
    return struct.pack("<I", _VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)


def named_ids(entries: list[Entry]) -> tuple[set[int], set[int]]:
    """The uids and the gids that named entries give permissions to."""
    return {i for t, _, i in entries if t == USER}, {i for t, _, i in entries if t == GROUP}


def check_valid(entries: list[Entry]) -> None:
    """Raise AclError unless the kernel would take this ACL (its posix_acl_valid):
    one owner, owning-group and other entry, a mask when there are named
    entries, no id named twice, permissions within rwx, entries in order."""
    seen: set[tuple[int, int]] = set()
    counts = dict.fromkeys((USER_OBJ, GROUP_OBJ, MASK, OTHER), 0)
    last = (0, -1)
    for tag, perm, qid in entries:
        if perm & ~7:
            raise AclError(f"ACL permission {perm:#o} is not within rwx")
        if tag in _NAMED:
            if (tag, qid) in seen:
                raise AclError(f"ACL names {_TAG_TEXT[tag]} {qid} twice")
            seen.add((tag, qid))
            key = (tag, qid)
        elif tag in counts:
            counts[tag] += 1
            key = (tag, -1)
        else:
            raise AclError(f"ACL entry tag {tag:#x} is unknown")
        if key < last:
            raise AclError("ACL entries are not in order")
        last = key
    if counts[USER_OBJ] != 1 or counts[GROUP_OBJ] != 1 or counts[OTHER] != 1 or counts[MASK] > 1:
        raise AclError("an ACL needs exactly one owner, owning-group and other entry")
    if seen and not counts[MASK]:
        raise AclError("an ACL with named entries needs a mask entry")


def equiv_mode(entries: list[Entry]) -> tuple[int, bool]:
    """The permission bits an access ACL implies, and whether the mode says it all."""
    mode, equiv, mask = 0, True, None
    for tag, perm, _ in entries:
        if tag == USER_OBJ:
            mode |= (perm & 7) << 6
        elif tag == GROUP_OBJ:
            mode |= (perm & 7) << 3
        elif tag == OTHER:
            mode |= perm & 7
        elif tag == MASK:
            mask, equiv = perm & 7, False
        else:
            equiv = False
    if mask is not None:
        mode = (mode & ~0o070) | (mask << 3)
    return mode, equiv


def create_masq(entries: list[Entry], mode: int) -> tuple[list[Entry], int, bool]:
    """A new inode's access ACL from its parent's default ACL (posix_acl_create_masq)."""
    out = [list(e) for e in entries]
    m = mode & 0o777
    not_equiv = False
    group_obj = mask_obj = None
    for e in out:
        tag = e[0]
        if tag == USER_OBJ:
            e[1] &= (m >> 6) & 7
            m &= (e[1] << 6) | ~0o700
        elif tag == OTHER:
            e[1] &= m & 7
            m &= e[1] | ~0o007
        elif tag == GROUP_OBJ:
            group_obj = e
        elif tag == MASK:
            mask_obj, not_equiv = e, True
        else:
            not_equiv = True
    target = mask_obj if mask_obj is not None else group_obj
    if target is not None:
        target[1] &= (m >> 3) & 7
        m &= (target[1] << 3) | ~0o070
    return [(t, p, i) for t, p, i in out], (mode & ~0o777) | (m & 0o777), not_equiv


def chmod_masq(entries: list[Entry], mode: int) -> list[Entry]:
    """An access ACL after a chmod (posix_acl_chmod_masq)."""
    out = [list(e) for e in entries]
    group_obj = mask_obj = None
    for e in out:
        if e[0] == USER_OBJ:
            e[1] = (mode >> 6) & 7
        elif e[0] == OTHER:
            e[1] = mode & 7
        elif e[0] == GROUP_OBJ:
            group_obj = e
        elif e[0] == MASK:
            mask_obj = e
    target = mask_obj if mask_obj is not None else group_obj
    if target is not None:
        target[1] = (mode >> 3) & 7
    return [(t, p, i) for t, p, i in out]


def map_ids(value: bytes, to_uid: Callable[[int], int | None], to_gid: Callable[[int], int | None]) -> bytes:
    """Translate the ids of named entries; raises UnmappedAclId if one has no image."""
    out = []
    for tag, perm, qid in parse(value):
        if tag in _NAMED:
            new = (to_uid if tag == USER else to_gid)(qid)
            if new is None:
                raise UnmappedAclId(f"ACL names {_TAG_TEXT[tag]} {qid}, which the id map does not cover; extend --map")
            qid = new
        out.append((tag, perm, qid))
    return pack(out)


def _perm_text(perm: int) -> str:
    return ("r" if perm & 4 else "-") + ("w" if perm & 2 else "-") + ("x" if perm & 1 else "-")


def to_text(value: bytes) -> str:
    """GNU tar's ``SCHILY.acl.*`` form with numeric ids: one entry a line."""
    lines = []
    for tag, perm, qid in parse(value):
        if tag not in _TAG_TEXT:
            raise AclError(f"ACL entry tag {tag:#x} is unknown; the ACL is corrupt")
        q = str(qid) if tag in _NAMED else ""
        lines.append(f"{_TAG_TEXT[tag]}:{q}:{_perm_text(perm)}\n")
    return "".join(lines)


def _no_lookup(name: str) -> int | None:
    return None


def _perm_of(item: str, perms: str) -> int:
    perm = 0
    for ch in perms:
        if ch in "rwx":
            perm |= {"r": 4, "w": 2, "x": 1}[ch]
        elif ch != "-":
            raise AclError(f"ACL entry {item!r} has bad permissions {perms!r}; use r, w, x and -")
    return perm


def from_text(
    text: str,
    lookup_user: Callable[[str], int | None] = _no_lookup,
    lookup_group: Callable[[str], int | None] = _no_lookup,
) -> bytes:
    """Parse the ACL text of GNU tar or bsdtar into the xattr form.

    Entries are separated by newlines or commas; ``u``/``g``/``m``/``o``
    abbreviations, numeric qualifiers and bsdtar's trailing ``:ID`` field are
    accepted. Names without an id are resolved with the lookup functions.
    """
    entries = []
    for raw in text.replace(",", "\n").splitlines():
        item = raw.split("#", 1)[0].strip()
        if not item:
            continue
        fields = item.split(":")
        if fields[0] == "default" or fields[0] == "d":
            fields = fields[1:]
        if len(fields) not in (3, 4):
            raise AclError(f"ACL entry {item!r} is not TAG:QUALIFIER:PERMS[:ID]")
        tname, qual, perm = fields[0], fields[1], _perm_of(item, fields[2])
        tname = {"u": "user", "g": "group", "m": "mask", "o": "other"}.get(tname, tname)
        if tname in ("mask", "other"):
            entries.append((MASK if tname == "mask" else OTHER, perm, _UNDEFINED_ID))
            continue
        if tname not in ("user", "group"):
            raise AclError(f"ACL entry {item!r} has unknown tag {tname!r}; use user, group, mask or other")
        if not qual:
            entries.append((USER_OBJ if tname == "user" else GROUP_OBJ, perm, _UNDEFINED_ID))
            continue
        if len(fields) == 4 and fields[3].isdigit():
            qid = int(fields[3])
        elif qual.isdigit():
            qid = int(qual)
        else:
            found = (lookup_user if tname == "user" else lookup_group)(qual)
            if found is None:
                raise AclError(f"ACL entry {item!r} names {tname} {qual!r}, which has no known id")
            qid = found
        entries.append((USER if tname == "user" else GROUP, perm, qid))
    if not entries:
        raise AclError("ACL text is empty")
    return pack(entries)
