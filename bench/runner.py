"""Orchestration: backings x rounds x phases x targets (interleaved), guards, records."""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from . import guard, trees
from . import targets as T
from . import workloads as W
from .fusetrace import RequestTrace
from .imagerun import ImageBuilds
from .sysutil import Cleanup, StepError, cpu_seconds, drop_caches, fs_of, log, reset_hwm, run, status_kib

MiB = 1 << 20
#: Not a per-target phase workload: its own step after the phases (bench.imagerun).
IMAGE_BUILD = "image_build"


@dataclass
class Config:
    mode: str = "quick"
    rounds: int = 1
    tree: str = "generated"  # auto | minbase | generated
    gen_scale: float = 0.1
    seq_bytes: int = 64 * MiB
    rand_file_bytes: int = 16 * MiB
    rand_io_bytes: int = 8 * MiB
    small_limit: int = 64 * 1024
    backings: list = field(default_factory=lambda: ["disk"])
    tmpfs_size: str = "6g"
    #: size of the fresh ext4 image the disk backing is made on (sparse)
    disk_size: int = 20 * 1024 * MiB
    step_timeout: float = 300.0
    workdir: str = "/var/tmp"
    targets: list = field(default_factory=lambda: [t.name for t in T.ALL])
    workloads: list = field(default_factory=lambda: [w.name for w in W.ALL])
    shiftfs_cmd: list | None = None
    shiftfs_stats: bool = True

    @classmethod
    def preset(cls, mode: str) -> Config:
        if mode == "full":
            return cls(
                mode="full",
                rounds=5,
                tree="auto",
                gen_scale=1.0,
                seq_bytes=1024 * MiB,
                rand_file_bytes=256 * MiB,
                rand_io_bytes=64 * MiB,
                backings=["disk", "tmpfs"],
                step_timeout=1800.0,
                workloads=[w.name for w in W.ALL] + [IMAGE_BUILD],
            )
        return cls()


class Watchdog:
    """Kill the target's daemon if a step hangs past its time limit (that aborts the
    FUSE connection, so a blocked client call returns instead of hanging the run)."""

    def __init__(self, target, seconds):
        self.target, self.seconds, self.fired = target, seconds, False
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True

    def _fire(self):
        self.fired = True
        p = self.target.proc
        if p is not None and p.poll() is None:
            p.kill()

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        return False


def machine_info(path: str) -> dict:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    info["os"] = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    try:
        import pyfuse3  # noqa: PLC0415

        info["pyfuse3"] = pyfuse3.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        info["libfuse3"] = (
            subprocess.run(["fusermount3", "--version"], capture_output=True, text=True, timeout=10)
            .stdout.strip()
            .split()[-1]
        )
    except Exception:  # noqa: BLE001
        pass
    for tool in ("fio", "tar"):
        try:
            info[tool] = (
                subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=10)
                .stdout.strip()
                .splitlines()[0]
            )
        except Exception:  # noqa: BLE001
            pass
    e = fs_of(path)
    info["workdir_fs"] = {
        "fstype": e.get("fstype"),
        "source": e.get("source"),
        "options": e.get("super_options"),
        "mountpoint": e.get("mountpoint"),
    }
    return info


def loadavg() -> list:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return []


class Runner:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.cleanup = Cleanup()
        self.records: list[dict] = []
        self.guards: list[dict] = []
        self.target_info: dict = {}
        self.backing_info: dict = {}
        self.notes: list[str] = []
        self.rounds_meta: list[dict] = []
        self.workdir: str | None = None
        self.trace: RequestTrace | None = None
        self.images: ImageBuilds | None = None

    @property
    def phase_workloads(self) -> list[str]:
        return [w for w in self.cfg.workloads if w in W.BY_NAME]

    # ------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        started = time.time()
        machine: dict[str, Any] = {}
        tree_desc: dict[str, Any] = {}
        ctx: W.Ctx | None = None
        ids = [0]
        try:
            if self.phase_workloads:
                archive, tree_desc = trees.obtain(cfg.tree, cfg.gen_scale)
                st = trees.stats(archive)
                tree_desc.update({k: st[k] for k in ("sha256", "bytes", "entries", "counts", "ids")})
                tree_desc["archive"] = os.path.relpath(archive, os.path.dirname(trees.HERE))
                small = [rel for rel, size in st["regular"] if size <= cfg.small_limit]
                tree_desc["small_files"] = len(small)
                self.notes.extend(tree_desc.get("notes", []))
                ctx = W.Ctx(
                    archive=archive,
                    small_files=small,
                    seq_bytes=cfg.seq_bytes,
                    rand_file_bytes=cfg.rand_file_bytes,
                    rand_io_bytes=cfg.rand_io_bytes,
                    timeout=cfg.step_timeout,
                )
                ids = sorted(set(st["ids"]) | set(ctx.chown_to) | {0})

            os.makedirs(cfg.workdir, exist_ok=True)
            base = tempfile.mkdtemp(prefix="shiftfs-bench.", dir=cfg.workdir)
            self.workdir = base
            self.cleanup.dirs.append(base)
            # a private bind of the work dir: nothing we mount propagates elsewhere,
            # and one lazy unmount of it detaches everything if cleanup has to force it
            run(["mount", "--bind", base, base])
            self.cleanup.add_mount(base)
            run(["mount", "--make-private", base])
            machine = machine_info(base)

            if ctx is not None:
                self.trace = RequestTrace()
                if not self.trace.available:
                    self.notes.append("no fuse:fuse_request_send tracepoint: request counts are shiftfs's own only")
            if IMAGE_BUILD in cfg.workloads:
                images = ImageBuilds(self, trees.CACHE)
                if images.prepare(base):
                    self.images = images
                else:
                    self.notes.extend(images.info["notes"])
            for backing in cfg.backings:
                self._run_backing(base, backing, ctx, ids)
        finally:
            if self.trace:
                self.trace.close()
            problems = self.cleanup.run()
            for p in problems:
                log(f"cleanup: {p}")
                self.notes.append(f"cleanup problem: {p}")
        return {
            "schema": 1,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "duration_s": round(time.time() - started, 1),
            "mode": cfg.mode,
            "config": {k: v for k, v in cfg.__dict__.items() if k != "shiftfs_cmd"},
            "map": {"disk": T.DISK, "view": T.VIEW, "count": T.COUNT},
            "machine": machine,
            "tree": {k: v for k, v in tree_desc.items() if k != "notes"},
            "targets": self.target_info,
            "backings": self.backing_info,
            "rounds": self.rounds_meta,
            "records": self.records,
            "guards": self.guards,
            "notes": self.notes,
            "workdir": self.workdir,
            **({"image_build": self.images.info} if self.images else {}),
        }

    # ------------------------------------------------------------------
    def _run_backing(self, base: str, backing: str, ctx: W.Ctx | None, ids: list[int]) -> None:
        cfg = self.cfg
        root = os.path.join(base, backing)
        os.makedirs(root)
        if backing == "tmpfs":
            run(["mount", "-t", "tmpfs", "-o", f"size={cfg.tmpfs_size},mode=0755", "bench-tmpfs", root])
            self.cleanup.add_mount(root)
        elif backing == "disk":
            self._fresh_ext4(root)
        e = fs_of(root)
        self.backing_info[backing] = {
            "fstype": e.get("fstype"),
            "options": e.get("super_options"),
            "source": e.get("source"),
        }
        log(f"backing '{backing}': {e.get('fstype')} at {root}")
        if ctx is not None:
            self._run_targets(root, backing, ctx, ids)
        # The image build is a whole mmdebstrap per build (minutes): on the first backing only.
        if self.images is not None and backing == self.cfg.backings[0]:
            try:
                self.images.run_backing(backing, root)
            except (StepError, OSError, RuntimeError, subprocess.SubprocessError) as e:
                msg = f"image build stopped: {type(e).__name__}: {e}"
                log(msg)
                self.records.append(
                    {
                        "backing": backing,
                        "round": 0,
                        "target": "image build",
                        "workload": IMAGE_BUILD,
                        "seconds": None,
                        "error": msg,
                    }
                )
        if backing in ("tmpfs", "disk") and root in self.cleanup.mounts:
            self.cleanup.drop_mount(root)
            run(["umount", root], check=False)

    def _fresh_ext4(self, root: str) -> None:
        """Make the disk backing a new ext4 (journal, mkfs defaults) on a loop image under the workdir.

        Every run starts from the same state: a directory on a long-used
        filesystem carries the history of earlier runs (on a journal-less
        ext4, allocating an inode scans the recently deleted ones, which
        charged a third of one untar's daemon CPU to whichever target ran
        right after an rm -rf). Inode tables are written at mkfs time so no
        lazy-init thread runs during the measurements. Where no loop device
        can be had, the backing is a plain directory of the workdir (noted).
        """
        img = os.path.join(os.path.dirname(root), "disk.ext4")
        try:
            with open(img, "wb") as f:
                f.truncate(self.cfg.disk_size)
            run(["mkfs.ext4", "-q", "-F", "-N", "1048576", "-E", "lazy_itable_init=0,lazy_journal_init=0", img])
            run(["mount", "-o", "loop", img, root])
        except (StepError, OSError, subprocess.SubprocessError) as e:
            note = f"disk backing: no fresh ext4 image ({e}); a plain directory of {self.workdir} is used"
            log(note)
            self.notes.append(note)
            return
        self.cleanup.add_mount(root)

    def _run_targets(self, root: str, backing: str, ctx: W.Ctx, ids: list[int]) -> None:
        """The per-target phases: rounds x phases x targets, interleaved."""
        cfg = self.cfg
        base = os.path.dirname(root)
        targets = []
        for name in cfg.targets:
            cls = T.BY_NAME[name]
            t = cls(root, self.cleanup, ids=ids, shiftfs_cmd=cfg.shiftfs_cmd)
            info = self.target_info.setdefault(name, {"label": t.label, "kind": t.kind, "status": {}, "notes": []})
            why = t.probe()
            info["version"] = t.version
            for n in t.notes:
                if n not in info["notes"]:
                    info["notes"].append(n)
            if why:
                info["status"][backing] = "skipped"
                info.setdefault("skip_reason", why)
                log(f"  skip {name}: {why}")
                continue
            if name.startswith("shiftfs") and cfg.shiftfs_stats:
                t.stats_file = os.path.join(base, f"{backing}-{name}.stats.json")
            targets.append(t)
        if not any(t.name == "native" for t in targets):
            raise SystemExit("the native target is required (ratios are relative to it)")

        if "untar" in cfg.workloads:
            # untimed warm-up on the backing: page cache for tar and the archive, allocator state
            warm = os.path.join(root, "warmup")
            os.makedirs(warm)
            run(["tar", "--numeric-owner", "-xpf", ctx.archive, "-C", warm], timeout=cfg.step_timeout)
            run(["rm", "-rf", warm], timeout=cfg.step_timeout)
            os.sync()
        for r in range(cfg.rounds):
            k = r % len(targets)
            order = targets[k:] + targets[:k]
            self.rounds_meta.append(
                {"backing": backing, "round": r, "order": [t.name for t in order], "loadavg_start": loadavg()}
            )
            log(f"[{backing}] round {r + 1}/{cfg.rounds}: {' '.join(t.name for t in order)}")
            alive = {}
            for t in order:
                try:
                    t.prepare()
                    t.mount()
                    alive[t.name] = True
                    self.target_info[t.name]["status"][backing] = "ok"
                    self.target_info[t.name]["options"] = t.options
                except (StepError, OSError) as e:
                    alive[t.name] = False
                    msg = f"mount failed: {e}"
                    log(f"  {t.name}: {msg}")
                    if r == 0:
                        self.target_info[t.name]["status"][backing] = "skipped"
                        self.target_info[t.name].setdefault("skip_reason", msg)
                    else:
                        self._record(backing, r, t, None, error=msg)
                    t.destroy()
            for phase in W.PHASES:
                phase = [w for w in phase if w.name in cfg.workloads]
                if not phase:
                    continue
                snaps: dict[str, dict] = {}
                for t in order:
                    if not alive[t.name]:
                        continue
                    for w in phase:
                        ok = self._step(backing, r, t, w, ctx, snaps)
                        if not ok and not t.healthy():
                            # the daemon died or the mount is gone: one fresh mount, else give up
                            try:
                                t.remount()
                                log(f"  {t.name}: remounted after the error")
                            except (StepError, OSError) as e:
                                log(f"  {t.name}: dead for the rest of this round ({e})")
                                alive[t.name] = False
                                try:
                                    t.unmount()
                                except Exception:  # noqa: BLE001
                                    pass
                                break
                self._judge(backing, r, phase, order, snaps)
            for t in order:
                t.destroy()
            self.rounds_meta[-1]["loadavg_end"] = loadavg()

    # ------------------------------------------------------------------
    def _step(self, backing, r, t, w: W.Workload, ctx: W.Ctx, snaps) -> bool:
        extra = None
        err = None
        seconds = None
        hwm = cpu = None
        counters = None
        try:
            with Watchdog(t, self.cfg.step_timeout + 60) as wd:
                if w.prep:
                    w.prep(t, ctx)
                if w.cold:
                    if t.kind != "native":
                        t.remount()
                    drop_caches()
                else:
                    os.sync()  # don't charge the previous step's writeback to this one
                pid = t.pid
                reset_hwm(pid)
                cpu0 = cpu_seconds(pid)
                c0 = t.counters()
                trace = self.trace if t.kind != "native" else None
                if trace is not None:
                    trace.start(t.view)
                t0 = time.perf_counter()
                extra = w.run(t, ctx)
                seconds = time.perf_counter() - t0
                kernel_counts = trace.stop() if trace is not None else None
                if extra and "seconds" in extra:  # the tool timed itself (fio)
                    extra["wall_s"] = round(seconds, 6)
                    seconds = extra.pop("seconds")
                if pid:
                    hwm = status_kib(pid, "VmHWM")
                    c1 = cpu_seconds(pid)
                    cpu = round(c1 - cpu0, 3) if c1 is not None and cpu0 is not None else None
                c1 = t.counters()
                if c0 is not None and c1 is not None:
                    counters = {k: v - c0.get(k, 0) for k, v in c1.items() if v - c0.get(k, 0)}
                if kernel_counts:  # what the kernel sent: the same count for every FUSE daemon
                    counters = kernel_counts
                if w.guard:
                    snaps[(t.name, w.name)] = self._snapshot(t, w.guard)
                if w.after:
                    w.after(t, ctx)
            if wd.fired:
                raise StepError(f"watchdog: step exceeded {self.cfg.step_timeout + 60:.0f}s, daemon killed")
        except (StepError, OSError) as e:
            err = str(e)
            if isinstance(e, OSError) and not isinstance(e, StepError):
                err = f"{type(e).__name__}: {e}"
        self._record(backing, r, t, w, seconds=seconds, error=err, extra=extra, hwm=hwm, cpu=cpu, counters=counters)
        status = f"{seconds:8.3f}s" if err is None else f"ERROR {err}"
        log(f"  {w.name:<10} {t.name:<21} {status}" + (f"  rss {hwm // 1024} MiB" if hwm else ""))
        return err is None

    def _record(self, backing, r, t, w, seconds=None, error=None, extra=None, hwm=None, cpu=None, counters=None):
        rec = {
            "backing": backing,
            "round": r,
            "target": t.name,
            "workload": w.name if w else None,
            "seconds": round(seconds, 6) if seconds is not None else None,
            "error": error,
        }
        if extra:
            rec["extra"] = extra
        if hwm is not None:
            rec["daemon_peak_rss_kib"] = hwm
        if cpu is not None:
            rec["daemon_cpu_s"] = cpu
        if counters:
            rec["requests"] = counters
        self.records.append(rec)

    def _snapshot(self, t, sub: str):
        view = guard.view_snapshot(os.path.join(t.view, sub))
        store = None
        if t.kind != "native":
            store = guard.store_snapshot(os.path.join(t.store, sub), t.store_style)
        return view, store

    def _judge(self, backing, r, phase, order, snaps) -> None:
        for w in phase:
            if not w.guard:
                continue
            ref = snaps.get(("native", w.name))
            for t in order:
                got = snaps.get((t.name, w.name))
                if got is None:
                    continue  # the step failed; the error is recorded
                res: dict[str, Any]
                if ref is None:
                    res = {
                        "passed": False,
                        "checked": 0,
                        "mismatches": 0,
                        "examples": ["no native reference (native failed)"],
                    }
                else:
                    res = guard.compare(t.name, ref[0], got[0], got[1], t.expect_store if t.kind != "native" else None)
                res.update({"backing": backing, "round": r, "target": t.name, "workload": w.name})
                self.guards.append(res)
                if not res["passed"]:
                    log(
                        f"  GUARD FAILED {w.name} {t.name}: {res['mismatches']} mismatches, e.g. "
                        + "; ".join(res["examples"][:3])
                    )
