"""Id maps: the tables that translate *disk ids* into *view ids* and back.

A map is a list of ranges ``DISK:VIEW:COUNT``, written the way one writes the
``uid_map`` of the user namespace attached to a kernel idmapped mount: the id
``DISK + k`` stored on the backing filesystem is seen as ``VIEW + k`` through
the mount, for ``0 <= k < COUNT``.

Semantics follow kernel idmapped mounts exactly:

* a disk id inside the table reads as its view id;
* a disk id outside the table reads as the overflow id
  (``/proc/sys/fs/overflowuid``, normally 65534);
* a view id outside the table cannot be stored: creating or chowning with it
  fails with ``EOVERFLOW`` (:meth:`IdMap.to_disk` returns ``None``).

An empty table is the identity.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

__all__ = ["IdMap", "IdMapError", "MAX_ID", "parse_map_args", "overflow_ids"]

#: Largest id that can be stored; ``2**32 - 1`` is ``(uid_t) -1``.
MAX_ID = 2**32 - 2


class IdMapError(ValueError):
    """A map given by the user is malformed; the message says how to fix it."""


def _read_overflow(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 65534


def overflow_ids() -> tuple[int, int]:
    """The kernel's overflow uid and gid (what unmapped ids read as)."""
    return (
        _read_overflow("/proc/sys/fs/overflowuid"),
        _read_overflow("/proc/sys/fs/overflowgid"),
    )


@dataclass(frozen=True)
class Range:
    disk: int
    view: int
    count: int


class IdMap:
    """One direction-agnostic id table (for uids or for gids)."""

    def __init__(self, ranges: list[Range] | None = None, overflow: int = 65534, what: str = "uid"):
        self.ranges = sorted(ranges or [], key=lambda r: r.disk)
        self.overflow = overflow
        self.what = what
        self._check()
        self._by_disk = [r.disk for r in self.ranges]
        self._by_view_ranges = sorted(self.ranges, key=lambda r: r.view)
        self._by_view = [r.view for r in self._by_view_ranges]

    @property
    def identity(self) -> bool:
        return not self.ranges

    def _check(self) -> None:
        for r in self.ranges:
            if r.count <= 0:
                raise IdMapError(f"{self.what} map range {r.disk}:{r.view}:{r.count} has a count of 0; give COUNT >= 1")
            for start in (r.disk, r.view):
                if start < 0 or start + r.count - 1 > MAX_ID:
                    raise IdMapError(
                        f"{self.what} map range {r.disk}:{r.view}:{r.count} goes past the largest id "
                        f"{MAX_ID}; shorten COUNT"
                    )
        for key in ("disk", "view"):
            rs = sorted(self.ranges, key=lambda r: getattr(r, key))
            for a, b in zip(rs, rs[1:]):
                if getattr(a, key) + a.count > getattr(b, key):
                    raise IdMapError(
                        f"{self.what} map ranges {a.disk}:{a.view}:{a.count} and {b.disk}:{b.view}:{b.count} "
                        f"overlap on the {key} side; make the ranges disjoint"
                    )

    def to_view(self, disk: int) -> int:
        """The view id of a disk id (the overflow id when unmapped)."""
        if not self.ranges:
            return disk
        i = bisect.bisect_right(self._by_disk, disk) - 1
        if i >= 0:
            r = self.ranges[i]
            if disk < r.disk + r.count:
                return r.view + disk - r.disk
        return self.overflow

    def to_disk(self, view: int) -> int | None:
        """The disk id of a view id, or ``None`` if it has no mapping."""
        if not self.ranges:
            return view if 0 <= view <= MAX_ID else None
        i = bisect.bisect_right(self._by_view, view) - 1
        if i >= 0:
            r = self._by_view_ranges[i]
            if view < r.view + r.count:
                return r.disk + view - r.view
        return None

    def __repr__(self) -> str:
        body = ",".join(f"{r.disk}:{r.view}:{r.count}" for r in self.ranges) or "identity"
        return f"IdMap({self.what}: {body})"


def _parse_triples(text: str, what: str, source: str) -> list[Range]:
    parts = text.split(":")
    if len(parts) % 3 or not text:
        raise IdMapError(
            f"bad {what} map {source!r}: expected DISK:VIEW:COUNT (colon-separated triples), e.g. 100000:0:65536"
        )
    out = []
    for i in range(0, len(parts), 3):
        try:
            d, v, c = (int(p, 10) for p in parts[i : i + 3])
        except ValueError:
            raise IdMapError(
                f"bad {what} map {source!r}: {':'.join(parts[i : i + 3])!r} is not three decimal "
                "numbers DISK:VIEW:COUNT"
            ) from None
        if d < 0 or v < 0 or c < 0:
            raise IdMapError(f"bad {what} map {source!r}: ids and counts must not be negative")
        out.append(Range(d, v, c))
    return out


def parse_map_args(
    maps: list[str] | None = None, uidmap: str | None = None, gidmap: str | None = None
) -> tuple[IdMap, IdMap]:
    """Build the uid and gid maps from ``--map`` arguments and ``-o`` options.

    ``maps`` holds ``u:DISK:VIEW:COUNT``, ``g:…`` or ``b:…`` (both) strings, the
    util-linux ``X-mount.idmap`` shape; ``uidmap``/``gidmap`` hold
    fuse-overlayfs' colon lists ``DISK:VIEW:COUNT[:DISK:VIEW:COUNT…]``.
    """
    uranges: list[Range] = []
    granges: list[Range] = []
    for m in maps or []:
        kind, _, rest = m.partition(":")
        if kind not in ("u", "g", "b") or not rest:
            raise IdMapError(f"bad --map {m!r}: expected u:DISK:VIEW:COUNT, g:DISK:VIEW:COUNT or b:DISK:VIEW:COUNT")
        rs = _parse_triples(rest, "id", m)
        if kind in ("u", "b"):
            uranges += rs
        if kind in ("g", "b"):
            granges += rs
    if uidmap:
        uranges += _parse_triples(uidmap, "uid", "uidmap=" + uidmap)
    if gidmap:
        granges += _parse_triples(gidmap, "gid", "gidmap=" + gidmap)
    ou, og = overflow_ids()
    return IdMap(uranges, ou, "uid"), IdMap(granges, og, "gid")


def add_map_argument(parser) -> None:
    """The ``--map`` option, the same for ``mount`` and the offline tools."""
    parser.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="u|g|b:DISK:VIEW:COUNT",
        help="id table range (repeatable): disk id DISK+k is seen as VIEW+k",
    )
