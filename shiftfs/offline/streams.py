"""The tar stream inside an archive file (or stdin) for ``shiftfs import``.

Plain tar, gzip, xz, bzip2 or zstd, told by the first bytes, not by the name;
zstd through the ``zstandard`` package, else through the ``zstd`` tool fed
from our buffer. Kept apart from :mod:`shiftfs.offline.importer`, which only
unpacks what this hands it.
"""

from __future__ import annotations

import gzip
import io
import lzma
import shutil
import subprocess
import sys
import threading
from typing import IO, cast

from ..errors import ArchiveError, UsageError
from .walk import COPY_CHUNK

__all__ = ["open_archive_stream"]


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


# What tarfile reads: the decompressors' streams are BufferedIOBase, a pipe is IO[bytes].
_TarStream = io.BufferedIOBase | IO[bytes]


def open_archive_stream(path: str) -> tuple[_TarStream, subprocess.Popen[bytes] | None]:
    """A readable stream of the tar inside ``path`` (``-`` is stdin)."""
    raw: IO[bytes]
    if path == "-":
        raw = sys.stdin.buffer
    else:
        try:
            raw = open(path, "rb")
        except FileNotFoundError:
            raise UsageError(f"{path}: no such archive; give an existing tar file (or - for stdin)") from None
        except IsADirectoryError:
            raise UsageError(f"{path}: is a directory; give a tar file") from None
        except PermissionError:
            raise ArchiveError(f"{path}: permission denied; make the archive readable") from None
    # Only a replaced stdin is wrapped; typeshed calls it BinaryIO, which lacks the readinto
    # BufferedReader needs (and the stdin a test or embedder substitutes has).
    buf = io.BufferedReader(cast(io.RawIOBase, raw), 1 << 16) if not isinstance(raw, io.BufferedReader) else raw
    head = buf.peek(6)[:6]
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=buf, mode="rb"), None
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(buf, "rb"), None
    if head.startswith(b"BZh"):
        import bz2

        return bz2.BZ2File(buf, "rb"), None
    if head.startswith(_ZSTD_MAGIC):
        try:
            import zstandard
        except ImportError:
            zstd = shutil.which("zstd")
            if zstd is None:
                raise ArchiveError(
                    f"{path}: zstd-compressed; install the zstandard Python package or the zstd tool, "
                    "or decompress it first"
                ) from None
            # Our buffer already holds the first bytes: feed zstd from it.
            proc = subprocess.Popen([zstd, "-dcq"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            to_zstd, from_zstd = proc.stdin, proc.stdout
            assert to_zstd is not None and from_zstd is not None  # both asked for as pipes

            def feed() -> None:
                try:
                    shutil.copyfileobj(buf, to_zstd, COPY_CHUNK)
                except (BrokenPipeError, OSError, ValueError):
                    pass
                finally:
                    try:
                        to_zstd.close()
                    except OSError:
                        pass

            threading.Thread(target=feed, daemon=True).start()
            return from_zstd, proc
        return zstandard.ZstdDecompressor().stream_reader(buf, read_across_frames=True), None
    return buf, None
