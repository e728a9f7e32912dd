"""Benchmark targets: the same backing directory seen natively, through a kernel
idmapped mount, through shiftfs (table and xattr modes) and through FUSE peers.

All shifting targets use one map: disk 100000..165535 <-> view 0..65535
(DISK:VIEW:COUNT = 100000:0:65536), so root writing through the mount stores
disk ids 100000+.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from shiftfs.fs import idmapped
from shiftfs.ownership.idmap import IdMap, Range

from .sysutil import Cleanup, StepError, mount_entry, run, stop_process, umount, wait_mounted

DISK, VIEW, COUNT = 100000, 0, 65536
MOUNT_TIMEOUT = 30.0


def shifted(uid: int) -> int:
    return uid - VIEW + DISK if VIEW <= uid < VIEW + COUNT else 65534


def default_shiftfs() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "shiftfs")
    if os.path.exists(exe):
        return [exe]
    return [sys.executable, "-m", "shiftfs"]


class Target:
    name = "?"
    label = "?"
    kind = "fuse"  # native | kernel | fuse
    store_style = "plain"  # plain | xattr
    store_root_owner = (DISK, DISK)

    def __init__(self, base: str, cleanup: Cleanup, ids: list[int] | None = None, shiftfs_cmd: list[str] | None = None):
        self.base = os.path.join(base, self.name)
        self.cleanup = cleanup
        self.ids = ids or [0]
        self.shiftfs_cmd = shiftfs_cmd or default_shiftfs()
        self.src = os.path.join(self.base, "src")
        self.mnt = os.path.join(self.base, "mnt")
        self.log = os.path.join(os.path.dirname(self.base), f"{self.name}.log")
        self.proc: subprocess.Popen | None = None
        self.mounted = False
        self.version = ""
        self.options = ""
        self.notes: list[str] = []

    # -- what the workloads use
    @property
    def view(self) -> str:
        return self.mnt

    @property
    def store(self) -> str:
        return self.src

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    stats_file: str | None = None

    def counters(self) -> dict | None:
        """Per-request counters of the daemon so far, if it offers them."""
        return None

    def expect_store(self, v: tuple):
        """Expected store tuple for a native view entry v (see guard.VIEW_FIELDS)."""
        return (shifted(v[3]), shifted(v[4]), v[2])

    # -- lifecycle
    def probe(self) -> str | None:
        """None when usable, else the reason to skip."""
        return None

    def prepare(self) -> None:
        """Fresh, empty backing dir and mount point (unmounted)."""
        self.unmount()
        if os.path.exists(self.base):
            run(["rm", "-rf", "--one-file-system", self.base], timeout=600)
        os.makedirs(self.src)
        os.makedirs(self.mnt)
        os.chown(self.src, *self.store_root_owner)

    def mount(self) -> None:
        raise NotImplementedError

    def unmount(self) -> None:
        if self.mounted:
            self.cleanup.drop_mount(self.mnt)
            umount(self.mnt)
            self.mounted = False
        if self.proc is not None:
            stop_process(self.proc)
            if self.proc in self.cleanup.procs:
                self.cleanup.procs.remove(self.proc)
            self.proc = None

    def healthy(self) -> bool:
        """Mounted, daemon alive and the mount answers."""
        if self.kind == "native":
            return True
        if not self.mounted or mount_entry(self.mnt) is None:
            return False
        if self.proc is not None and self.proc.poll() is not None:
            return False
        try:
            os.stat(self.mnt)
        except OSError:
            return False
        return True

    def remount(self) -> None:
        self.unmount()
        self.mount()

    def destroy(self) -> None:
        self.unmount()
        if os.path.exists(self.base):
            run(["rm", "-rf", "--one-file-system", self.base], timeout=600, check=False)

    # -- helpers for FUSE daemons started in the foreground
    def _start_daemon(self, cmd: list[str]) -> None:
        self.options = " ".join(cmd)
        logf = open(self.log, "ab")
        try:
            logf.write(f"\n$ {self.options}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True
            )
        finally:
            logf.close()
        self.cleanup.procs.append(self.proc)
        self.cleanup.add_mount(self.mnt)
        try:
            wait_mounted(self.mnt, self.proc, MOUNT_TIMEOUT)
        except StepError as e:
            self.mounted = True  # so unmount() cleans up whatever exists
            self.unmount()
            raise StepError(f"{e}; log: {self._log_tail()}") from None
        self.mounted = True

    def _log_tail(self, n=3) -> str:
        try:
            with open(self.log, errors="replace") as f:
                lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("$ ")]
            return " | ".join(lines[-n:])[:400]
        except OSError:
            return ""


class Native(Target):
    name, label, kind = "native", "native", "native"
    store_root_owner = (0, 0)

    @property
    def view(self):
        return self.src

    def expect_store(self, v):
        return None

    def mount(self):
        self.mounted = False

    def unmount(self):
        pass


class KernelIdmap(Target):
    """A plain kernel idmapped bind mount, made by shiftfs's own kernel-backend code
    (``shiftfs.fs.idmapped``): the reference the FUSE targets are held against."""

    name, label, kind = "idmapped", "kernel idmapped mount", "kernel"

    @staticmethod
    def _table() -> IdMap:
        return IdMap([Range(DISK, VIEW, COUNT)])

    def probe(self):
        try:
            os.close(idmapped.userns_fd(self._table(), self._table()))
        except OSError as e:
            return f"cannot create the idmap user namespace: {e}"
        self.version = os.uname().release
        self.options = f"open_tree+mount_setattr(MOUNT_ATTR_IDMAP, uid_map '{DISK} {VIEW} {COUNT}')+move_mount"
        return None

    def mount(self):
        try:
            idmapped.idmapped_bind(self.src, self.mnt, self._table(), self._table())
        except (OSError, idmapped.KernelRefused) as e:
            raise StepError(f"idmapped mount failed: {e}") from None
        self.cleanup.add_mount(self.mnt)
        self.mounted = True


class ShiftfsBase(Target):
    def probe(self):
        try:
            cp = subprocess.run(self.shiftfs_cmd + ["mount", "--help"], capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"shiftfs not runnable: {e}"
        if cp.returncode != 0:
            tail = (cp.stderr or cp.stdout).decode(errors="replace").strip().splitlines()[-1:]
            return "`shiftfs mount` not available yet: " + " ".join(tail)[:300]
        self._note()
        try:
            here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            self.version = subprocess.run(
                ["git", "-C", here, "log", "-1", "--format=%h %cs", "--", "shiftfs"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            self.version = ""
        return None

    def _stats_opts(self) -> list[str]:
        return ["-o", f"stats={self.stats_file}"] if self.stats_file else []

    def counters(self):
        """Ask the daemon (SIGUSR1) to write its request counters and read them."""
        pid = self.pid
        if not pid or not self.stats_file:
            return None
        try:
            before = os.stat(self.stats_file).st_mtime_ns
        except OSError:
            before = None
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                if os.stat(self.stats_file).st_mtime_ns != before:
                    with open(self.stats_file) as f:
                        return dict(json.load(f)["counts"])
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.01)
        return None

    def _note(self):
        self.notes.append("default options (cache=always: long kernel cache timeouts, the mount owns SOURCE)")


class ShiftfsTable(ShiftfsBase):
    name, label = "shiftfs-table", "shiftfs-table (fuse)"

    def mount(self):
        self._start_daemon(
            self.shiftfs_cmd
            + ["mount", "-f", "--map", f"b:{DISK}:{VIEW}:{COUNT}", "-o", "backend=fuse"]
            + self._stats_opts()
            + [self.src, self.mnt]
        )


class ShiftfsTableKernel(ShiftfsBase):
    """Table mode on the kernel backend: ``shiftfs mount`` makes an idmapped bind mount and exits (no daemon)."""

    name, label, kind = "shiftfs-table-kernel", "shiftfs-table (kernel)", "kernel"

    def _note(self):
        self.notes.append("-o backend=kernel: an idmapped bind mount made by `shiftfs mount`; no daemon")

    def mount(self):
        cmd = self.shiftfs_cmd + [
            "mount",
            "--map",
            f"b:{DISK}:{VIEW}:{COUNT}",
            "-o",
            "backend=kernel",
            self.src,
            self.mnt,
        ]
        self.options = " ".join(cmd)
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
        with open(self.log, "a") as f:
            f.write(f"\n$ {self.options}\n{cp.stdout}{cp.stderr}")
        self.cleanup.add_mount(self.mnt)
        self.mounted = True
        if cp.returncode != 0 or mount_entry(self.mnt) is None:
            self.unmount()
            raise StepError(f"shiftfs kernel backend mount failed: {(cp.stderr or cp.stdout).strip()[-300:]}")


class ShiftfsXattr(ShiftfsBase):
    name, label = "shiftfs-xattr", "shiftfs (xattr)"
    store_style = "xattr"
    store_root_owner = (0, 0)

    def expect_store(self, v):
        backing = (os.getuid(), os.getgid())
        if v[0] in ("file", "dir"):
            return (v[3], v[4], v[2], backing)
        return (None, None, None, backing)

    def mount(self):
        self._start_daemon(self.shiftfs_cmd + ["mount", "-f", "--xattr"] + self._stats_opts() + [self.src, self.mnt])


class ShiftfsXattrShared(ShiftfsXattr):
    """``-o shared``: what coherent caching costs (cache=never, no writeback, records re-read)."""

    name, label = "shiftfs-xattr-shared", "shiftfs (xattr, shared)"

    def mount(self):
        self._start_daemon(
            self.shiftfs_cmd + ["mount", "-f", "--xattr", "-o", "shared"] + self._stats_opts() + [self.src, self.mnt]
        )


class Bindfs(Target):
    name, label = "bindfs", "bindfs"

    def probe(self):
        if not shutil.which("bindfs"):
            return "bindfs is not installed"
        cp = subprocess.run(["bindfs", "--version"], capture_output=True, text=True)
        self.version = cp.stdout.strip().splitlines()[0] if cp.stdout.strip() else ""
        self.notes.append(
            "kernel entry/attribute timeouts 0 (bindfs default): every lookup and stat "
            "reaches the daemon; libfuse2 build, single-threaded"
        )
        self.notes.append(
            "bindfs 1.14 has no range map and its negative --uid-offset stores wrong ids on "
            "create, so --map lists each id the workload uses (disk 100000+i <-> view i)"
        )
        return None

    def mount(self):
        pairs = []
        for i in sorted(set(self.ids)):
            pairs.append(f"{shifted(i)}/{i}")
            pairs.append(f"@{shifted(i)}/@{i}")
        self._start_daemon(["bindfs", "-f", "--map=" + ":".join(pairs), self.src, self.mnt])


class FuseOverlayfs(Target):
    name, label = "fuse-overlayfs", "fuse-overlayfs (map)"
    extra = f"uidmapping={DISK}:{VIEW}:{COUNT},gidmapping={DISK}:{VIEW}:{COUNT}"

    def probe(self):
        if not shutil.which("fuse-overlayfs"):
            return "fuse-overlayfs is not installed"
        cp = subprocess.run(["fuse-overlayfs", "--version"], capture_output=True, text=True)
        lines = [ln for ln in (cp.stdout + cp.stderr).splitlines() if ln.startswith("fuse-overlayfs")]
        self.version = lines[0] if lines else ""
        self.notes.append(
            "kernel cache timeouts 1e9 s and writeback cache (fuse-overlayfs defaults); "
            "empty lowerdir, the tree lives in upperdir"
        )
        return None

    def prepare(self):
        super().prepare()
        for d in ("lower", "work"):
            os.makedirs(os.path.join(self.base, d))

    def mount(self):
        b = self.base
        opts = f"lowerdir={b}/lower,upperdir={self.src},workdir={b}/work,{self.extra}"
        self._start_daemon(["fuse-overlayfs", "-f", "-o", opts, self.mnt])


class FuseOverlayfsXattr(FuseOverlayfs):
    name, label = "fuse-overlayfs-xattr", "fuse-overlayfs (xattr)"
    extra = "xattr_permissions=2"
    store_style = "xattr"
    store_root_owner = (0, 0)

    def expect_store(self, v):
        backing = (os.getuid(), os.getgid())
        if v[0] in ("file", "dir"):
            return (v[3], v[4], v[2], backing)
        return (None, None, None, backing)


ALL = [
    Native,
    KernelIdmap,
    ShiftfsTable,
    ShiftfsTableKernel,
    ShiftfsXattr,
    ShiftfsXattrShared,
    Bindfs,
    FuseOverlayfs,
    FuseOverlayfsXattr,
]
BY_NAME = {t.name: t for t in ALL}
