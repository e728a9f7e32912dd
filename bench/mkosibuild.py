"""The mkosi image build: one project, built by real root and under ``shiftfs exec``.

The README's recipe ("Building images with mkosi"), shared by the test
(``tests/test_mkosi.py``) and the bench's mkosi build, so both run the same:

* a project directory with ``mkosi.conf`` (Debian bookworm, ``Format=directory``,
  a few packages whose tree has files of several owners, setuid/setgid modes
  and an ACL: systemd, dbus, passwd, polkitd) and ``mkosi.pkgmngr/`` holding
  the apt sources (mkosi 24 also adds the ``debian-debug`` archive, which not
  every mirror or proxy serves; naming the sources keeps the build to the
  archives it needs);
* one build directory (``BUILD``) holding the workspace, the cache and the
  output: mkosi makes its tree in the workspace and moves it to the output,
  so all three on one shifted mount means one ``--shift`` and no copy;
* ``mkosi -C PROJECT -f build``: as real root (the reference), or as a user
  inside ``shiftfs exec -o xattr_probes=off,nowriteback --shift BUILD``
  (:data:`bench.imagebuild.EXEC_OPTIONS`); the user's image is then written by
  ``shiftfs export BUILD/out/image``.

The reference is built once and cached as a tar (GNU tar with ``--acls
--xattrs``) named by a hash of the configuration, like the minbase tarball
(:mod:`bench.artifacts`); it is rebuilt when the mirror has moved on (its
package versions differ from a new build's).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time

from . import artifacts
from .imagebuild import EXEC_OPTIONS

#: mkosi.conf; ``{build}`` is the build directory. In mkosi 24 the directories are
#: [Output] settings (later versions moved them to [Build]).
CONFIG = """\
[Distribution]
Distribution=debian
Release=bookworm

[Output]
Format=directory
OutputDirectory={build}/out
WorkspaceDirectory={build}/ws
CacheDirectory={build}/cache
PackageCacheDirectory={build}/cache/packages

[Content]
Bootable=no
Packages=systemd
         dbus
         passwd
         polkitd
"""
#: mkosi.pkgmngr/etc/apt/sources.list.d/mkosi.sources
SOURCES = """\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
#: mkosi.finalize for a build in a single-id namespace (no subordinate range): systemd-sysusers
#: rewrites /etc/shadow and /etc/gshadow with the owner it reads from the old file's stat, which
#: shows 0 inside; the script gives them their group back (the README's "mkosi with one id").
SINGLE_ID_FINALIZE = """\
#!/bin/sh
set -e
for f in /etc/shadow /etc/gshadow /etc/shadow- /etc/gshadow-; do
    if [ -e "$BUILDROOT$f" ]; then mkosi-chroot chgrp shadow "$f"; fi
done
"""
#: The oldest mkosi this recipe was made for (Debian's bookworm-backports has 24.3).
MIN_VERSION = 24


def version() -> int | None:
    """mkosi's major version, or None if it is not installed or does not answer."""
    if not shutil.which("mkosi"):
        return None
    try:
        out = subprocess.run(["mkosi", "--version"], capture_output=True, text=True, timeout=60).stdout
        return int(out.split()[1].split(".")[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def unavailable() -> str | None:
    """Why the mkosi build cannot run here, or None."""
    v = version()
    if v is None:
        return "mkosi is missing ('make setup' installs it: apt-get install -t bookworm-backports mkosi)"
    if v < MIN_VERSION:
        return f"mkosi {v} is too old (Debian 12's 14 cannot build in a user namespace); 'make setup' installs 24.3"
    if not shutil.which("bwrap"):
        return "bubblewrap is missing (apt-get install bubblewrap)"
    return None


def write_project(project: str, build: str, single_id: bool = False) -> None:
    """The project directory (mkosi.conf, mkosi.pkgmngr; with ``single_id`` mkosi.finalize) for a build in ``build``."""
    sources = os.path.join(project, "mkosi.pkgmngr", "etc", "apt", "sources.list.d")
    os.makedirs(sources, exist_ok=True)
    with open(os.path.join(project, "mkosi.conf"), "w") as f:
        f.write(CONFIG.format(build=build))
    with open(os.path.join(sources, "mkosi.sources"), "w") as f:
        f.write(SOURCES)
    if single_id:
        script = os.path.join(project, "mkosi.finalize")
        with open(script, "w") as f:
            f.write(SINGLE_ID_FINALIZE)
        os.chmod(script, 0o755)


def prepare_build(build: str) -> None:
    """The build directory: private (mode 0700, as shiftfs exec wants a SOURCE), with the
    workspace, cache and output directories mkosi expects to exist."""
    os.makedirs(build, mode=0o700, exist_ok=True)
    os.chmod(build, 0o700)
    for sub in ("ws", "cache", "out"):
        os.makedirs(os.path.join(build, sub), exist_ok=True)


def argv(project: str, cache_only: bool = False) -> list[str]:
    """The build command; ``cache_only``: no network (repository metadata and packages from
    the package cache, :func:`stage_packages`), as the bench times it."""
    return ["mkosi", *(["--cache-only=always"] if cache_only else []), "-C", project, "-f", "build"]


def exec_argv(
    shiftfs: list[str], project: str, build: str, cache_only: bool = False, stats: str | None = None
) -> list[str]:
    """The user's build: ``shiftfs exec`` (``shiftfs`` is how to run it) with the recipe's
    options, shifting ``build``, running :func:`argv`; ``stats``: where the daemon writes its
    counters and CPU seconds (``-o stats=FILE``, not part of the recipe)."""
    extra = ["-o", f"stats={stats}"] if stats else []
    return [*shiftfs, "exec", *EXEC_OPTIONS, *extra, "--shift", build, "--", *argv(project, cache_only)]


def image(build: str) -> str:
    return os.path.join(build, "out", "image")


def _key() -> str:
    """Names cached artifacts after the configuration they were built with."""
    return hashlib.sha256((CONFIG + SOURCES).encode()).hexdigest()[:12]


def reference_path(cache: str) -> str:
    return os.path.join(cache, f"mkosi-bookworm-{_key()}.tar")


def build_reference(path: str, timeout: float = 1800) -> float:
    """Build the image as real root and store it as a tar at ``path`` (atomically);
    returns the build's seconds. Raises RuntimeError with mkosi's last lines."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    d = tempfile.mkdtemp(prefix="mkosi-ref-", dir="/var/tmp")
    try:
        project, build = os.path.join(d, "project"), os.path.join(d, "build")
        write_project(project, build)
        prepare_build(build)
        t0 = time.monotonic()
        res = subprocess.run(argv(project), capture_output=True, text=True, timeout=timeout, cwd=project)
        took = time.monotonic() - t0
        if res.returncode != 0:
            raise RuntimeError(f"mkosi as root failed ({res.returncode}): {res.stderr[-3000:]}")
        partial = artifacts.partial_name(path)
        tar = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "-cpf", partial]
        subprocess.run([*tar, "-C", image(build), "."], check=True, capture_output=True, timeout=600)
        os.replace(partial, path)
        return took
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", d], capture_output=True)


def packages_dir(cache: str) -> str:
    return os.path.join(cache, f"mkosi-packages-{_key()}")


def fill_packages(cache: str, timeout: float = 1800) -> str:
    """The package cache of one untimed real-root build (apt lists and .debs), kept in
    ``cache`` once complete (a marker file), for builds that must not download."""
    dest = packages_dir(cache)
    if os.path.exists(os.path.join(dest, ".complete")):
        return dest
    d = tempfile.mkdtemp(prefix="mkosi-fill-", dir="/var/tmp")
    try:
        project, build = os.path.join(d, "project"), os.path.join(d, "build")
        write_project(project, build)
        prepare_build(build)
        res = subprocess.run(argv(project), capture_output=True, text=True, timeout=timeout, cwd=project)
        if res.returncode != 0:
            raise RuntimeError(f"mkosi as root failed ({res.returncode}): {res.stderr[-2000:]}")
        artifacts.discard(dest)
        os.makedirs(cache, exist_ok=True)
        shutil.move(os.path.join(build, "cache", "packages"), dest)
        with open(os.path.join(dest, ".complete"), "w") as f:
            f.write(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
        return dest
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", d], capture_output=True)


def stage_packages(packages: str, build: str, owner: tuple[int, int] | None = None) -> None:
    """Copy the package cache into ``build`` (untimed), owned by ``owner`` if given."""
    dest = os.path.join(build, "cache", "packages")
    artifacts.discard(dest)
    subprocess.run(["cp", "-a", packages, dest], check=True)
    if owner is not None:
        subprocess.run(["chown", "-R", f"{owner[0]}:{owner[1]}", dest], check=True)


def cached_reference(cache: str, timeout: float = 1800) -> str:
    """The cached real-root build (built first if absent or unreadable)."""
    path = reference_path(cache)
    if artifacts.dpkg_status(path) is None:
        artifacts.discard(path)
        build_reference(path, timeout)
    return path
