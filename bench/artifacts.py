"""Cached build artifacts shared by the benchmark and the test suite.

Both need a Debian bookworm minbase tarball, built once with mmdebstrap. Two
rules keep a first run on a fresh machine the same as a developer's hundredth:

* **One cache location, one switch.** :func:`cache_dir` answers where cached
  artifacts live. ``SHIFTFS_CACHE_DIR`` overrides every default (the tests'
  ``/var/cache/shiftfs-test``, the bench's ``bench/cache``, setup's pip cache),
  so CI points it at an empty directory and runs the cold path every time.
* **Never trust what is on disk.** mmdebstrap picks its output format from the
  target's extension (``x.partial`` gives a *directory*), so an artifact is
  built under a name that keeps the real extension (``x.partial.tar``) and is
  renamed only once it is complete and readable. A cached artifact that is not
  a readable tar of a Debian root (a directory, a truncated file) is removed
  and rebuilt, not returned.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tarfile

ENV = "SHIFTFS_CACHE_DIR"
DPKG_STATUS = "./var/lib/dpkg/status"


def cache_dir(default: str) -> str:
    """Where cached artifacts live: ``$SHIFTFS_CACHE_DIR`` if set, else *default*."""
    return os.environ.get(ENV) or default


def partial_name(path: str) -> str:
    """The name *path* is built under: same extension, so tools that choose the
    format from the name (mmdebstrap, tar -a) make the same kind of file."""
    head, name = os.path.split(path)
    if ".tar." in name:  # compressed tar: the format is the whole ".tar.zst"
        stem, _, comp = name.rpartition(".tar.")
        ext = ".tar." + comp
    else:
        stem, ext = os.path.splitext(name)
    return os.path.join(head, f"{stem}.partial{ext}")


def readable_tar(path: str) -> bool:
    """Whether *path* is a regular file that reads as a whole uncompressed tar:
    every member's data lies inside the file and the end-of-archive block
    follows the last one (tarfile alone stops quietly where a file was cut)."""
    try:
        if not os.path.isfile(path) or os.path.islink(path):
            return False
        end = 0
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                end = max(end, m.offset_data + (m.size if m.isreg() else 0))
            after = tf.offset
        with open(path, "rb") as f:
            f.seek(after)
            trailer = f.read(tarfile.BLOCKSIZE)
        return end <= os.path.getsize(path) and trailer == bytes(tarfile.BLOCKSIZE)
    except (OSError, EOFError, tarfile.TarError):
        return False


def dpkg_status(path: str) -> bytes | None:
    """``/var/lib/dpkg/status`` of a root-filesystem tarball, or None if *path*
    is not a whole, readable tar that holds one."""
    if not readable_tar(path):
        return None
    try:
        with tarfile.open(path, "r:") as tf:
            f = tf.extractfile(DPKG_STATUS)
            return f.read() if f else None
    except (OSError, KeyError, EOFError, tarfile.TarError):
        return None


def discard(path: str) -> None:
    """Remove whatever is at *path* (file, symlink or directory); quiet if absent."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def build_minbase(path: str, timeout: float = 1200, quiet: bool = True) -> None:
    """Build ``mmdebstrap --variant=minbase --mode=root bookworm`` into *path*
    (a ``.tar``), atomically: a failure leaves nothing under *path*.

    Raises :class:`RuntimeError` with mmdebstrap's last lines if it fails or
    produces something that is not a Debian root tarball.
    """
    part = partial_name(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    discard(part)
    argv = ["mmdebstrap", "--variant=minbase", "--mode=root", "bookworm", part]
    if quiet:
        argv.insert(1, "--quiet")
    try:
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"mmdebstrap timed out after {timeout:.0f} s") from e
        if res.returncode != 0:
            raise RuntimeError(
                f"mmdebstrap failed (exit {res.returncode}): " + (res.stderr.strip().splitlines() or ["no output"])[-1]
            )
        if dpkg_status(part) is None:
            raise RuntimeError(f"mmdebstrap did not write a Debian root tarball at {part}")
        os.chmod(part, 0o644)
        os.replace(part, path)
    finally:
        discard(part)


def cached_minbase(path: str, timeout: float = 1200) -> str:
    """*path* if it holds a valid minbase tarball; otherwise (absent, or a bad
    leftover such as a directory) rebuild it there first."""
    if dpkg_status(path) is not None:
        return path
    discard(path)
    build_minbase(path, timeout=timeout)
    return path
