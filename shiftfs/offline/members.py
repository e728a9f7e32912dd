"""Archive members: the pieces of an entry the archive tools read and write.

:class:`Item` is what :func:`shiftfs.offline.export.scan` works out for each
inode, written by the tar writer (:mod:`shiftfs.offline.export`) and the cpio
writer (:mod:`shiftfs.offline.cpio`) alike.

Times with nanoseconds in pax ``mtime`` records, xattr values as pax text
(raw bytes through ``surrogateescape``), GNU tar's header layout, and the
xattrs an entry carries in the spellings of GNU tar, bsdtar and star.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from typing import Any

from ..ownership import acl
from ..ownership.view import View

__all__ = ["Item", "ns_to_pax", "pax_to_ns", "xattr_str", "xattr_bytes", "GnuTarInfo", "mtime_ns", "xattrs_of"]


@dataclass
class Item:
    """One archive entry worked out from the tree."""

    name: str  # archive name ("." for the root, "./etc/passwd" for others)
    rel: str
    kind: str  # reg, dir, symlink, fifo, sock, chr, blk, hardlink
    view: View
    mtime_ns: int
    size: int = 0
    linkname: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    key: tuple[int, int] = (0, 0)
    nlink: int = 1


def ns_to_pax(ns: int) -> str:
    sign = "-" if ns < 0 else ""
    sec, frac = divmod(abs(ns), 1_000_000_000)
    if not frac:
        return f"{sign}{sec}"
    return f"{sign}{sec}.{frac:09d}".rstrip("0")


def pax_to_ns(text: str) -> int | None:
    text = text.strip()
    neg = text.startswith("-")
    body = text[1:] if neg else text
    sec, _, frac = body.partition(".")
    if not sec.isdigit() or (frac and not frac.isdigit()):
        return None
    ns = int(sec) * 1_000_000_000 + int((frac + "000000000")[:9] or 0)
    return -ns if neg else ns


def xattr_str(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def xattr_bytes(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


class GnuTarInfo(tarfile.TarInfo):
    """A TarInfo that lays out pax headers the way GNU tar does.

    Two differences from the stdlib: names and link targets that fit the
    ustar fields are stored there as raw bytes, even when not ASCII (the
    stdlib moves them to pax ``path`` records, which bsdtar then refuses to
    convert outside a UTF-8 locale); and pax values are raw bytes with no
    ``hdrcharset=BINARY`` marker (GNU tar 1.34 warns about that keyword on
    every entry that has a binary xattr).
    """

    _RAW = ("utf-8", "surrogateescape")

    def create_pax_header(self, info: dict[str, Any], encoding: str) -> bytes:  # type: ignore[override]
        info["magic"] = tarfile.POSIX_MAGIC
        pax = dict(self.pax_headers)
        for fieldname, keyword, limit in (
            ("name", "path", tarfile.LENGTH_NAME),
            ("linkname", "linkpath", tarfile.LENGTH_LINK),
            ("uname", "uname", 32),
            ("gname", "gname", 32),
        ):
            if len(info[fieldname].encode(*self._RAW)) > limit and keyword not in pax:
                pax[keyword] = info[fieldname]
        for fieldname, digits in (("uid", 8), ("gid", 8), ("size", 12), ("mtime", 12)):
            value = info[fieldname]
            if not 0 <= value < 8 ** (digits - 1):
                pax.setdefault(fieldname, str(value))
                info[fieldname] = 0
        head = self._create_pax_generic_header(pax, tarfile.XHDTYPE, encoding) if pax else b""
        # _create_header and _create_payload are tarfile's private header writers
        # (unchanged since Python 3.2; typeshed does not list them).
        return head + self._create_header(info, tarfile.USTAR_FORMAT, *self._RAW)  # type: ignore[attr-defined]

    @classmethod
    def _create_pax_generic_header(cls, pax_headers: dict[str, str], type: bytes, encoding: str) -> bytes:
        records = bytearray()
        for keyword, value in pax_headers.items():
            body = b" " + keyword.encode("utf-8") + b"=" + value.encode("utf-8", "surrogateescape") + b"\n"
            # The record starts with its own total length in decimal.
            length = len(body) + 1
            while len(str(length)) + len(body) != length:
                length = len(str(length)) + len(body)
            records += str(length).encode("ascii") + body
        info = {"name": "././@PaxHeader", "type": type, "size": len(records), "magic": tarfile.POSIX_MAGIC}
        header: bytes = cls._create_header(info, tarfile.USTAR_FORMAT, "ascii", "replace")  # type: ignore[attr-defined]
        return header + cls._create_payload(bytes(records))  # type: ignore[attr-defined]


def mtime_ns(ti: tarfile.TarInfo) -> int:
    text = ti.pax_headers.get("mtime")
    if text is not None:
        ns = pax_to_ns(text)
        if ns is not None:
            return ns
    return int(round(ti.mtime * 1_000_000_000)) if isinstance(ti.mtime, float) else int(ti.mtime) * 1_000_000_000


def xattrs_of(ti, lookup_user=None, lookup_group=None, errors=None, rel="") -> dict[str, bytes]:
    """The xattrs a tar entry carries (GNU tar, bsdtar and star spellings)."""
    import base64
    import urllib.parse

    out: dict[str, bytes] = {}
    hdrs = ti.pax_headers
    for key, value in hdrs.items():
        if key.startswith("SCHILY.xattr."):
            out[key[len("SCHILY.xattr.") :]] = xattr_bytes(value)
    for key, value in hdrs.items():
        if key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr.") :])
            if name not in out:
                try:
                    out[name] = base64.b64decode(value + "=" * (-len(value) % 4))
                except ValueError:
                    if errors is not None:
                        errors.append(f"{rel}: xattr {name} has bad base64 in the archive; skipped")
    if "RHT.security.selinux" in hdrs and "security.selinux" not in out:
        out["security.selinux"] = xattr_bytes(hdrs["RHT.security.selinux"]) + b"\0"
    for key, xname in (
        ("SCHILY.acl.access", "system.posix_acl_access"),
        ("SCHILY.acl.default", "system.posix_acl_default"),
    ):
        if key in hdrs and xname not in out and hdrs[key].strip():
            try:
                out[xname] = acl.from_text(hdrs[key], lookup_user or (lambda n: None), lookup_group or (lambda n: None))
            except ValueError as exc:
                if errors is not None:
                    errors.append(f"{rel}: {key} not stored: {exc}")
    return out
