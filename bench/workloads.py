"""Workloads.  Each one runs against target.view; only `run` is timed.

Workloads are grouped in phases.  Targets are interleaved per phase (A B C, then
the next phase A B C ...), and within a phase one target runs the phase's
workloads back to back (so at most one big sequential-I/O file exists at a time).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

from .sysutil import StepError, run


@dataclass
class Ctx:
    archive: str
    small_files: list  # relpaths of regular files <= small_limit
    seq_bytes: int
    rand_file_bytes: int
    rand_io_bytes: int
    timeout: float
    chown_to: tuple = (1234, 2345)


@dataclass
class Workload:
    name: str
    title: str
    run: Callable
    cold: bool = False
    prep: Callable | None = None  # untimed, before the cold remount
    after: Callable | None = None  # untimed, after the guard snapshot
    guard: str | None = None  # subtree of view/store compared with native ("tree", "io")
    needs: str | None = None  # workload that makes what this one works on (run first)
    unit: str = "s"
    extra: dict = field(default_factory=dict)


def tree(t) -> str:
    return os.path.join(t.view, "tree")


def iodir(t) -> str:
    return os.path.join(t.view, "io")


# ---- untar ---------------------------------------------------------------


def untar_prep(t, c: Ctx):
    os.makedirs(tree(t), exist_ok=True)
    # keep the archive itself in the page cache so every target reads it warm
    with open(c.archive, "rb") as f:
        while f.read(1 << 22):
            pass


def untar(t, c: Ctx):
    run(["tar", "--numeric-owner", "-xpf", c.archive, "-C", tree(t)], timeout=c.timeout)


# ---- stat storms --------------------------------------------------------------


def stat_storm(t, c: Ctx):
    run(["find", tree(t), "-printf", "%u %g %m %p\n"], timeout=c.timeout)


# ---- small files --------------------------------------------------------------


def read_small(t, c: Ctx):
    root = tree(t)
    n = nbytes = 0
    for rel in c.small_files:
        fd = os.open(os.path.join(root, rel), os.O_RDONLY)  # as cat(1) does
        try:
            while True:
                b = os.read(fd, 1 << 17)
                if not b:
                    break
                nbytes += len(b)
        finally:
            os.close(fd)
        n += 1
    return {"files": n, "bytes": nbytes}


# ---- chown / rm ---------------------------------------------------------------


def chown_r(t, c: Ctx):
    run(["chown", "-R", f"{c.chown_to[0]}:{c.chown_to[1]}", tree(t)], timeout=c.timeout)


def rm_rf(t, c: Ctx):
    run(["rm", "-rf", tree(t)], timeout=c.timeout)


# ---- sequential and random I/O --------------------------------------------------

_BLOCK = 1 << 20
_PATTERN = os.urandom(_BLOCK)  # one incompressible block, written repeatedly


def _write_file(path: str, size: int, fsync: bool = True) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(_PATTERN)
        left = size
        while left > 0:
            n = os.write(fd, view[: min(left, _BLOCK)])
            left -= n
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def seq_prep(t, c: Ctx):
    os.makedirs(iodir(t), exist_ok=True)


def seq_write(t, c: Ctx):
    """Write seq_bytes in 1 MiB blocks and fsync (so writeback is counted)."""
    _write_file(os.path.join(iodir(t), "seq.dat"), c.seq_bytes)
    return {"bytes": c.seq_bytes}


def seq_read(t, c: Ctx):
    fd = os.open(os.path.join(iodir(t), "seq.dat"), os.O_RDONLY)
    n = 0
    try:
        while True:
            b = os.read(fd, _BLOCK)
            if not b:
                break
            n += len(b)
    finally:
        os.close(fd)
    if n != c.seq_bytes:
        raise StepError(f"read {n} bytes, expected {c.seq_bytes}")
    return {"bytes": n}


def seq_after(t, c: Ctx):
    p = os.path.join(iodir(t), "seq.dat")
    if os.path.exists(p):
        os.unlink(p)


def rand_prep(t, c: Ctx):
    os.makedirs(iodir(t), exist_ok=True)
    _write_file(os.path.join(iodir(t), "rand.dat"), c.rand_file_bytes)


def rand_rw(t, c: Ctx):
    """fio 4 KiB random 50/50 read/write through the page cache (no fsync): the
    per-request cost.  Timed by fio itself (job_runtime), so fio's ~0.3 s start-up
    is not counted; the runner uses extra['seconds'] when present."""
    cp = run(
        [
            "fio",
            "--name=randrw",
            f"--filename={os.path.join(iodir(t), 'rand.dat')}",
            "--ioengine=psync",
            "--rw=randrw",
            "--rwmixread=50",
            "--bs=4k",
            f"--size={c.rand_file_bytes}",
            f"--io_size={c.rand_io_bytes}",
            "--randrepeat=1",
            "--norandommap",
            "--output-format=json",
        ],
        timeout=c.timeout,
        stdout=subprocess.PIPE,
    )
    try:
        job = json.loads(cp.stdout[cp.stdout.index(b"{") :])["jobs"][0]
    except (ValueError, KeyError, IndexError) as e:
        raise StepError(f"cannot parse fio output: {e}") from None
    out = {"seconds": job["job_runtime"] / 1000.0}
    for d in ("read", "write"):
        out[f"{d}_iops"] = round(job[d]["iops"])
    return out


def rand_after(t, c: Ctx):
    p = os.path.join(iodir(t), "rand.dat")
    if os.path.exists(p):
        os.unlink(p)


PHASES = [
    [Workload("untar", "untar root filesystem", untar, prep=untar_prep, guard="tree")],
    [
        Workload("stat_cold", "stat storm, cold (find -printf)", stat_storm, cold=True, needs="untar"),
        Workload("stat_warm", "stat storm, warm", stat_storm, needs="untar"),
    ],
    [Workload("read_small", "read every small file, cold", read_small, cold=True, needs="untar")],
    [Workload("chown_r", "chown -R", chown_r, guard="tree", needs="untar")],
    [
        Workload("seq_write", "sequential write + fsync", seq_write, prep=seq_prep, guard="io"),
        Workload("seq_read", "sequential read, cold", seq_read, cold=True, after=seq_after, needs="seq_write"),
    ],
    [Workload("rand_rw", "random 4 KiB read/write (fio)", rand_rw, prep=rand_prep, after=rand_after, guard="io")],
    [Workload("rm_rf", "rm -rf tree", rm_rf, guard="tree", needs="untar")],
]
ALL = [w for ph in PHASES for w in ph]
BY_NAME = {w.name: w for w in ALL}


def with_needs(names: list[str]) -> list[str]:
    """*names* plus the workloads they need (``stat_cold`` works on the tree that
    ``untar`` makes), in run order."""
    want = set(names)
    for n in names:
        need = BY_NAME[n].needs
        while need:
            want.add(need)
            need = BY_NAME[need].needs
    return [w.name for w in ALL if w.name in want]
