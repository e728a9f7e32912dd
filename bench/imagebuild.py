"""The image-build workload: a Debian bookworm minbase made with mmdebstrap.

It is not a per-target phase workload: each build makes its own root
filesystem, one way per *build*:

* ``real-root``: ``mmdebstrap --mode=root`` as real root into a plain directory
  (the reference every ratio is taken against);
* ``shiftfs-exec``: the same command, unprivileged, as a throwaway user with a
  subordinate id range, under ``shiftfs exec -o xattr_probes=off,nowriteback
  --shift ./rootfs`` (xattr mode; the README's recipe, :data:`EXEC_OPTIONS`);
* ``mkosi-real-root`` and ``mkosi-shiftfs-exec``: the README's mkosi recipe
  (:mod:`bench.mkosibuild`) as real root and as the throwaway user, both from
  a package cache filled once (``--cache-only=always``: no network in the
  timing); the user's export is compared with the real-root mkosi tree;
* peers, as root into their mount (``fuse-overlayfs -o xattr_permissions=2``,
  ``bindfs --map``), when they can do it; otherwise they are listed as
  "cannot" with the reason.

Downloads are out of the timing: the .debs come from a local package cache
(:func:`ensure_debs`, filled once by an untimed mmdebstrap run), copied into
the new root's /var/cache/apt/archives by a setup hook; apt then finds every
package there and downloads none. ``apt-get update`` still runs (mmdebstrap
1.3.5 has no way to reuse lists without skipping its update step), so about
10 s of network time stays in every build, the same for each.

After the builds of a round, the shiftfs tree is exported with ``shiftfs
export`` and compared with the real-root tree (type, mode, owner, group,
symlink target) through :func:`bench.guard.compare`.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import tarfile
import time

from . import guard
from .sysutil import StepError, log, run

SUITE = "bookworm"
DEBS_NAME = f"debs-{SUITE}-minbase"
COMPLETE = ".complete"
MMDEBSTRAP = ["mmdebstrap", "--variant=minbase", "--mode=root"]
#: ``shiftfs exec`` options of the README's build recipes (mmdebstrap and mkosi): without the
#: kernel's security.capability probes before writes (xattr_probes=off) and the writeback
#: cache's mtime SETATTRs and GETATTRs (nowriteback, for some more, smaller WRITEs) the daemon
#: serves a sixth to a fifth fewer requests with less CPU, and the image stays equal to real
#: root's. Chosen by paired A/B rounds of both builds (bench/execab.py for mmdebstrap: 2.21x
#: real root without them, 1.83x with them; acl=off added nothing).
EXEC_OPTIONS = ("-o", "xattr_probes=off,nowriteback")
#: Every build: real root first (the reference), then shiftfs exec, then peers.
BUILDS = {
    "real-root": ("real root", "mmdebstrap --mode=root as root into a plain directory"),
    "shiftfs-exec": (
        "shiftfs exec (xattr, unprivileged)",
        "a throwaway user with a subordinate range: "
        "shiftfs exec -o xattr_probes=off,nowriteback --shift ./rootfs -- mmdebstrap ...",
    ),
    "fuse-overlayfs-xattr": (
        "fuse-overlayfs (xattr)",
        "as root into fuse-overlayfs -o xattr_permissions=2 (empty lowerdir)",
    ),
    "bindfs": ("bindfs", "as root into bindfs --map (disk 100000+i <-> view i)"),
    "mkosi-real-root": (
        "mkosi, real root",
        "mkosi 24 (bench/mkosibuild.py: Debian bookworm, systemd dbus passwd polkitd) as root, packages cached",
    ),
    "mkosi-shiftfs-exec": (
        "mkosi, shiftfs exec (unprivileged)",
        "the same as a throwaway user with a range: "
        "shiftfs exec -o xattr_probes=off,nowriteback --shift BUILD -- mkosi ... build",
    ),
}
#: mkosi builds, compared with each other (not with mmdebstrap's tree).
MKOSI_BUILDS = ("mkosi-real-root", "mkosi-shiftfs-exec")
#: Ids a minbase build uses (root, shadow 42, utmp 43, staff 50, mail 8, _apt 42, nogroup).
MINBASE_IDS = [0, 8, 42, 43, 50, 65534]


def debs_dir(cache: str) -> str:
    return os.path.join(cache, DEBS_NAME)


def cached_debs(cache: str) -> list[str]:
    """The cached .debs, or [] when the cache is absent or was never completed."""
    d = debs_dir(cache)
    if not os.path.exists(os.path.join(d, COMPLETE)):
        return []
    return sorted(glob.glob(os.path.join(d, "*.deb")))


def ensure_debs(cache: str, workdir: str, timeout: float) -> list[str]:
    """Fill the local package cache once (untimed): a real-root mmdebstrap run
    that keeps its downloads and copies every .deb out. The cache counts only
    once its marker is written, so a cut-off fill is redone, not trusted."""
    debs = cached_debs(cache)
    if debs:
        return debs
    d = debs_dir(cache)
    part = d + ".partial"
    shutil.rmtree(part, ignore_errors=True)
    os.makedirs(part)
    scratch = os.path.join(workdir, "fill-rootfs")
    log(f"filling the image-build package cache {d} (one untimed mmdebstrap run with downloads)")
    try:
        run(
            [
                *MMDEBSTRAP,
                "--skip=cleanup/apt/cache,essential/unlink",
                f'--customize-hook=cp "$1"/var/cache/apt/archives/*.deb {shlex.quote(part)}/',
                SUITE,
                scratch,
            ],
            timeout=timeout,
        )
        if not glob.glob(os.path.join(part, "*.deb")):
            raise StepError("the cache fill copied no .deb out of /var/cache/apt/archives")
        with open(os.path.join(part, COMPLETE), "w") as f:
            f.write(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
        shutil.rmtree(d, ignore_errors=True)
        os.replace(part, d)
    finally:
        shutil.rmtree(part, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return cached_debs(cache)


def stage_debs(debs: list[str], dest: str) -> str:
    """A world-readable copy of the cache beside the builds (untimed), so the
    throwaway user reads it whatever the permissions on the way to the cache."""
    os.makedirs(dest, mode=0o755, exist_ok=True)
    os.chmod(dest, 0o755)
    for p in debs:
        out = os.path.join(dest, os.path.basename(p))
        shutil.copyfile(p, out)
        os.chmod(out, 0o644)
    return dest


def mmdebstrap_argv(debs: str, target: str) -> list[str]:
    """The timed build: packages from *debs*, the apt cache cleaned afterwards
    as in any build (so the trees compare equal)."""
    hook = f'mkdir -p "$1"/var/cache/apt/archives && cp {shlex.quote(debs)}/*.deb "$1"/var/cache/apt/archives/'
    # not --quiet: a failed build's reason is in dpkg's output (see imagerun._timed)
    return [*MMDEBSTRAP, f"--setup-hook={hook}", SUITE, target]


def missing_from_cache(rootfs: str, debs: list[str]) -> list[str]:
    """Installed packages (name_version) with no .deb in the cache: what apt had
    to download in the timed build because the mirror moved on."""
    have = {
        os.path.basename(p).split("_")[0] + "_" + os.path.basename(p).split("_")[1].replace("%3a", ":") for p in debs
    }
    out = []
    try:
        with open(os.path.join(rootfs, "var/lib/dpkg/status"), errors="replace") as f:
            text = f.read()
    except OSError:
        return []
    for para in text.split("\n\n"):
        fields = dict(ln.split(": ", 1) for ln in para.splitlines() if ": " in ln and not ln.startswith(" "))
        if "Package" in fields and "install ok installed" in fields.get("Status", ""):
            key = f"{fields['Package']}_{fields.get('Version', '')}"
            if key not in have:
                out.append(key)
    return out


# ---- comparing the trees ------------------------------------------------------


def _entry(t, mode, uid, gid, link):
    # guard.VIEW_FIELDS order; size, rdev and nlink are not compared
    # (logs and caches differ in size between two builds)
    return (t, None, oct(mode & 0o7777), uid, gid, link, None, None)


def dir_snapshot(root: str) -> dict:
    snap = {}
    for rel, v in guard.view_snapshot(root).items():
        if v[0] == "error":
            snap[rel] = v
            continue
        snap[rel] = _entry(v[0], int(v[2], 8), v[3], v[4], v[5])
    return snap


_TAR_TYPES = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.LNKTYPE: "file",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.CHRTYPE: "chr",
    tarfile.BLKTYPE: "blk",
    tarfile.FIFOTYPE: "fifo",
}


def tar_snapshot(path: str) -> dict:
    snap = {}
    with tarfile.open(path) as tf:
        for m in tf:
            rel = os.path.normpath(m.name.lstrip("/"))
            rel = "." if rel in ("", ".") else rel.removeprefix("./")
            snap[rel] = _entry(
                _TAR_TYPES.get(m.type, "other"), m.mode, m.uid, m.gid, m.linkname if m.type == tarfile.SYMTYPE else None
            )
    return snap


def compare_trees(ref: dict, got: dict, name: str = "shiftfs-exec") -> dict:
    """guard.compare of two build trees. What the reference has under /dev and
    the other lacks is counted apart: mmdebstrap populates /dev (device nodes,
    fd/std* links, pts, shm) only where mknod works, which it does not in a
    user namespace (shiftfs run/export put /dev back from a device table)."""
    dev = [r for r in ref if r.startswith("dev/") and r not in got]
    res = guard.compare(name, {r: v for r, v in ref.items() if r not in dev}, got, None, None)
    res["dev_not_made"] = len(dev)
    res["entries_ref"], res["entries_got"] = len(ref), len(got)
    return res


def export(argv_prefix: list[str], shiftfs_cmd: list[str], rootfs: str, out: str, timeout: float) -> None:
    """``shiftfs export ROOTFS -o OUT`` as the user who owns ROOTFS."""
    run(argv_prefix + [*shiftfs_cmd, "export", rootfs, "-o", out], timeout=timeout, cwd="/")


def can_exec_as_user() -> str | None:
    """None when the unprivileged build can run here, else why not."""
    for tool in ("useradd", "userdel", "runuser", "newuidmap", "newgidmap", "mmdebstrap"):
        if not shutil.which(tool):
            return f"{tool} is not installed (apt-get install passwd util-linux uidmap mmdebstrap)"
    return None


def remove_tree(path: str) -> None:
    if os.path.lexists(path):
        subprocess.run(["rm", "-rf", "--one-file-system", path], check=False)
