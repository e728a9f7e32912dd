"""The floor of a request: one GETATTR round trip, and the daemon's CPU for it.

``python -m bench.floor`` (as root) times a loop of ``fstat`` on one open file
with attribute caching off, so each call is one GETATTR to the daemon, through:

* ``native``: the tmpfs itself (no FUSE);
* ``pyfuse3-null``: a pyfuse3 filesystem whose handlers only return a
  prepared answer, on shiftfs's request loop (:mod:`shiftfs.fs.loop`) with its
  default spin: what pyfuse3 and the interpreter cost before any handler work;
* ``shiftfs``: a table mount with ``cache=never,nowriteback``;
* ``bindfs`` and ``fuse-overlayfs`` with their attribute timeouts at 0.

For each: microseconds per ``fstat`` (the caller's wall time) and the daemon's
CPU per request (``/proc/PID/stat``; a daemon that polls for the next request
counts its polling). ``--spin 0`` runs both Python filesystems without the poll.

It answers how much of a request's cost is left to the handler once the
dispatch is paid (docs/speed-round5.md); the full bench measures workloads.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time

from .sysutil import run

_N = 100_000


def _null_fs(mountpoint: str, spin_us: int) -> None:
    """Serve a root directory and one file ``f``; every answer is prepared once."""
    import pyfuse3
    import trio

    from shiftfs.fs import loop

    def attrs(ino: int, mode: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.st_mode = mode
        e.st_nlink = 1
        e.entry_timeout = 0
        e.attr_timeout = 0
        return e

    root, f = attrs(1, stat.S_IFDIR | 0o755), attrs(2, stat.S_IFREG | 0o644)

    class Null(pyfuse3.Operations):
        async def getattr(self, inode, ctx=None):
            return root if inode == 1 else f

        async def lookup(self, parent_inode, name, ctx=None):
            if name == b"f":
                return f
            raise pyfuse3.FUSEError(errno.ENOENT)

    loop.install(spin_us)
    pyfuse3.init(Null(), mountpoint, {"fsname=pyfuse3-null", "default_permissions"})
    try:
        trio.run(pyfuse3.main, 1, 1)
    finally:
        pyfuse3.close()


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _fstat_loop(path: str, n: int) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(1000):
            os.fstat(fd)
        t = time.perf_counter()
        for _ in range(n):
            os.fstat(fd)
        return (time.perf_counter() - t) / n * 1e6
    finally:
        os.close(fd)


def _mounted(mp: str, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.path.ismount(mp):
            return True
        time.sleep(0.05)
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spin", type=int, default=100, help="spin of the Python filesystems (shiftfs's -o spin)")
    ap.add_argument("-n", type=int, default=_N, help="fstat calls per target")
    ap.add_argument("--null-fs", metavar="MOUNTPOINT", help=argparse.SUPPRESS)  # the child's entry
    a = ap.parse_args(argv)
    if a.null_fs:
        _null_fs(a.null_fs, a.spin)
        return 0
    shiftfs = shutil.which("shiftfs") or os.path.join(os.path.dirname(sys.executable), "shiftfs")
    work = tempfile.mkdtemp(prefix="shiftfs-floor.", dir="/var/tmp")
    run(["mount", "-t", "tmpfs", "tmpfs", work])
    try:
        for d in ("src", "upper", "ovlwork", "mnt"):
            os.mkdir(os.path.join(work, d))
        src, mnt = os.path.join(work, "src"), os.path.join(work, "mnt")
        with open(os.path.join(src, "f"), "w") as fh:
            fh.write("x")
        targets = {
            "pyfuse3-null": [sys.executable, "-m", "bench.floor", "--spin", str(a.spin), "--null-fs", mnt],
            "shiftfs": [shiftfs, "mount", "-f", "--map", "b:100000:0:65536"]
            + ["-o", f"backend=fuse,cache=never,nowriteback,spin={a.spin}", src, mnt],
            "bindfs": ["bindfs", "-f", "-o", "attr_timeout=0,entry_timeout=0", "--map=100000/0", src, mnt],
            "fuse-overlayfs": ["fuse-overlayfs", "-f", "-o"]
            + [f"lowerdir={src},upperdir={work}/upper,workdir={work}/ovlwork,timeout=0", mnt],
        }
        print("| target | µs per fstat (caller) | daemon CPU µs per request |")
        print("|---|---:|---:|")
        print(f"| native | {_fstat_loop(os.path.join(src, 'f'), a.n):.2f} | – |")
        for name, argv_ in targets.items():
            if not shutil.which(argv_[0]):
                print(f"| {name} | missing | – |")
                continue
            p = subprocess.Popen(argv_, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            try:
                if not _mounted(mnt):
                    print(f"| {name} | did not mount | – |")
                    continue
                c0 = _cpu_s(p.pid)
                us = _fstat_loop(os.path.join(mnt, "f"), a.n)
                cpu = (_cpu_s(p.pid) - c0) / a.n * 1e6
                print(f"| {name} | {us:.2f} | {cpu:.1f} |")
            finally:
                subprocess.run(["umount", mnt], check=False)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    finally:
        subprocess.run(["umount", "-l", work], check=False)
        os.rmdir(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
