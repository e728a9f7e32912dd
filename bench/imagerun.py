"""Running the image-build step of a benchmark run (see :mod:`bench.imagebuild`).

One backing at a time: the builds of a round run back to back, their order
rotating from round to round like the targets' order; each starts with
``sync`` and a fresh, empty root. The first round's trees are checked
against the real-root tree before they are removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from . import imagebuild as IB
from . import mkosibuild
from . import targets as T
from .subusers import throwaway_user
from .sysutil import StepError, cpu_seconds, log

PEERS = ("fuse-overlayfs-xattr", "bindfs")
#: Lines of a failed build's output that name the cause (dpkg's progress lines
#: mention package names such as libgpg-error0; mmdebstrap's last line is the command).
_CAUSE = re.compile(r"error|failed|denied|not permitted", re.I)
_NOISE = re.compile(r"(Selecting|Preparing|Unpacking|Setting up|E: setup failed|E: mmdebstrap failed)")


def _timed(argv: list[str], timeout: float, cwd: str | None = None) -> float:
    """Run argv in its own process group; seconds it took. On a timeout the
    whole group (everything the build started) is killed, by its id."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        argv,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise StepError(f"timeout after {timeout:.0f}s: {' '.join(argv)[:160]}") from None
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        # mmdebstrap ends with the failed command line; the cause is in an earlier error line
        cause = [ln.strip() for ln in lines[:-1] if _CAUSE.search(ln) and not _NOISE.match(ln)]
        tail = " | ".join(cause[:3] + lines[-1:])
        raise StepError(f"{os.path.basename(argv[0])} exited {p.returncode}: {tail[:400]}")
    return seconds


def _exec_daemon(stats: str) -> tuple[float | None, int | None]:
    """The CPU seconds and request count a ``shiftfs exec`` build's daemon wrote at its exit
    (``-o stats=FILE``; the daemon lives in the launcher's namespaces, out of the bench's sight)."""
    try:
        with open(stats) as f:
            data = json.load(f)
        return round(data["cpu_s"]["user"] + data["cpu_s"]["system"], 3), sum(data["counts"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def exec_build(
    shiftfs_cmd: list[str], user, work: str, options: Sequence[str], staged: str, timeout: float
) -> tuple[str, float, float | None, int | None]:
    """One timed mmdebstrap build as ``user`` under ``shiftfs exec OPTIONS --shift ./rootfs``
    in a new directory ``work``: (the tree, seconds, the daemon's CPU seconds and requests)."""
    os.makedirs(work, mode=0o755)
    tree = os.path.join(work, "rootfs")
    os.makedirs(tree, mode=0o755)
    for d in (work, tree):
        os.chown(d, user.uid, user.gid)
    os.sync()
    stats = os.path.join(work, "daemon-stats.json")
    argv = user.wrap(
        [*shiftfs_cmd, "exec", *options, "-o", f"stats={stats}", "--shift", "./rootfs", "--"]
        + IB.mmdebstrap_argv(staged, "./rootfs")
    )
    seconds = _timed(argv, timeout, cwd=work)
    cpu, requests = _exec_daemon(stats)
    return tree, seconds, cpu, requests


#: Image-build rounds at most (each is one mmdebstrap per build, minutes long).
MAX_ROUNDS = 3


class ImageBuilds:
    """The image-build step for one run: owns its info block of the results."""

    def __init__(self, runner, cache: str):
        self.r = runner
        self.cfg = runner.cfg
        self.cache = cache
        self.timeout = max(self.cfg.step_timeout, 1200.0)
        self.shiftfs_cmd = self.cfg.shiftfs_cmd or T.default_shiftfs()
        self.info: dict[str, Any] = {
            "suite": IB.SUITE,
            "variant": "minbase",
            "command": " ".join(IB.mmdebstrap_argv("DEBS", "DIR")),
            "builds": {n: {"label": lab, "how": how, "status": {}} for n, (lab, how) in IB.BUILDS.items()},
            "checks": [],
            "notes": [],
            "debs": None,
        }
        self.debs: list[str] = []
        self.mkosi_packages: str | None = None
        self.mkosi_why: str | None = "not prepared"

    # ------------------------------------------------------------------
    def prepare(self, base: str) -> bool:
        """Fill the package cache (untimed) once per run; False if impossible."""
        if not shutil.which("mmdebstrap"):
            self.info["notes"].append("mmdebstrap is not installed: no image build")
            return False
        try:
            self.debs = IB.ensure_debs(self.cache, base, self.timeout)
        except StepError as e:
            self.info["notes"].append(f"could not fill the package cache: {e}")
            log(f"image build: could not fill the package cache: {e}")
            return False
        self.info["debs"] = {
            "dir": IB.debs_dir(self.cache),
            "count": len(self.debs),
            "bytes": sum(os.path.getsize(p) for p in self.debs),
        }
        why = mkosibuild.unavailable()
        if why is None:
            try:
                self.mkosi_packages = mkosibuild.fill_packages(self.cache, self.timeout)
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                why = f"could not fill mkosi's package cache: {e}"
        self.mkosi_why = why
        if why:
            log(f"image build: no mkosi build: {why}")
        # the throwaway user walks into the work dir (mkdtemp made it 0700)
        os.chmod(base, 0o711)
        return True

    def run_backing(self, backing: str, root: str) -> None:
        ib = os.path.join(root, "image_build")
        os.makedirs(ib, mode=0o755)
        staged = IB.stage_debs(self.debs, os.path.join(ib, "debs"))
        builds = ["real-root"]
        why = IB.can_exec_as_user()
        self._status("shiftfs-exec", backing, "cannot" if why else "ok", why)
        if not why:
            builds.append("shiftfs-exec")
        if self.mkosi_packages:
            builds.append("mkosi-real-root")
            self._status("mkosi-real-root", backing, "ok")
            if not why:
                builds.append("mkosi-shiftfs-exec")
            self._status("mkosi-shiftfs-exec", backing, "cannot" if why else "ok", why)
        else:
            for name in IB.MKOSI_BUILDS:
                self._status(name, backing, "cannot", self.mkosi_why)
        peers = {}
        for name in PEERS:
            t = T.BY_NAME[name](ib, self.r.cleanup, ids=IB.MINBASE_IDS, shiftfs_cmd=self.cfg.shiftfs_cmd)
            why = t.probe()
            if why:
                self._status(name, backing, "cannot", why)
                continue
            peers[name] = t
            builds.append(name)
            self._status(name, backing, "ok")
        self._status("real-root", backing, "ok")
        user_cm = throwaway_user() if "shiftfs-exec" in builds else _no_user()
        # mkosi trees live in WORK/build/out/image: remove WORK
        with user_cm as user:
            rounds = min(self.cfg.rounds, MAX_ROUNDS)
            for r in range(rounds):
                k = r % len(builds)
                order = builds[k:] + builds[:k]
                log(f"[{backing}] image build round {r + 1}/{rounds}: {' '.join(order)}")
                trees = {}
                for name in order:
                    if self.info["builds"][name]["status"].get(backing) == "cannot":
                        continue
                    trees[name] = self._build(backing, r, name, ib, staged, user, peers.get(name))
                if r == 0:
                    self._check(backing, trees, user)
                for name, tree in trees.items():
                    if name in peers:
                        peers[name].destroy()
                    elif tree and name in IB.MKOSI_BUILDS:
                        IB.remove_tree(os.path.join(ib, name))
                    elif tree:
                        IB.remove_tree(os.path.dirname(tree))
        IB.remove_tree(staged)

    # ------------------------------------------------------------------
    def _status(self, name, backing, status, why=None):
        b = self.info["builds"][name]
        b["status"][backing] = status
        if why:
            b.setdefault("reason", why)

    def _build(self, backing, r, name, ib, staged, user, peer):
        """One timed build; returns where its tree is (or a snapshot for a peer)."""
        seconds = err = cpu = requests = None
        tree = None
        try:
            if name in IB.MKOSI_BUILDS:
                tree, seconds = self._mkosi(name, ib, user)
                if name == "mkosi-shiftfs-exec":
                    cpu, requests = _exec_daemon(os.path.join(ib, name, "daemon-stats.json"))
            elif name == "real-root":
                work = os.path.join(ib, name)
                os.makedirs(work)
                tree = os.path.join(work, "rootfs")
                os.sync()
                seconds = _timed(IB.mmdebstrap_argv(staged, tree), self.timeout)
                missing = IB.missing_from_cache(tree, self.debs)
                if missing:
                    self._stale(missing)
            elif name == "shiftfs-exec":
                work = os.path.join(ib, name)
                tree, seconds, cpu, requests = exec_build(
                    self.shiftfs_cmd, user, work, IB.EXEC_OPTIONS, staged, self.timeout
                )
            else:
                peer.prepare()
                peer.mount()
                tree = os.path.join(peer.view, "rootfs")
                os.sync()
                cpu0 = cpu_seconds(peer.pid)
                seconds = _timed(IB.mmdebstrap_argv(staged, tree), self.timeout)
                c1 = cpu_seconds(peer.pid)
                cpu = round(c1 - cpu0, 3) if c1 is not None and cpu0 is not None else None
                tree = IB.dir_snapshot(tree) if r == 0 else None
        except (StepError, OSError) as e:
            err = str(e) if isinstance(e, StepError) else f"{type(e).__name__}: {e}"
            if name in PEERS and r == 0:
                # a peer that cannot build in the first round is listed, not counted as an error
                self._status(name, backing, "cannot", f"the build failed: {err}")
                log(f"  image_build {name:<21} cannot: {err}")
                return None
            tree = None
        finally:
            if peer is not None:
                peer.unmount()
        rec = {
            "backing": backing,
            "round": r,
            "target": name,
            "workload": "image_build",
            "seconds": round(seconds, 3) if seconds is not None else None,
            "error": err,
        }
        if cpu is not None:
            rec["daemon_cpu_s"] = cpu
        if requests is not None:
            rec["daemon_requests"] = requests
        self.r.records.append(rec)
        log(f"  image_build {name:<21} " + (f"{seconds:8.1f}s" if err is None else f"ERROR {err}"))
        return tree

    def _mkosi(self, name, ib, user):
        """One timed mkosi build (the package cache is copied in first, untimed)."""
        work = os.path.join(ib, name)
        os.makedirs(work, mode=0o755)
        project, build = os.path.join(work, "project"), os.path.join(work, "build")
        mkosibuild.write_project(project, build)
        mkosibuild.prepare_build(build)
        argv = mkosibuild.argv(project, cache_only=True)
        assert self.mkosi_packages is not None, "mkosi builds run only once prepare() filled the package cache"
        try:
            if name == "mkosi-shiftfs-exec":
                mkosibuild.stage_packages(self.mkosi_packages, build, (user.uid, user.gid))
                subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", work], check=True)
                stats = os.path.join(work, "daemon-stats.json")
                argv = user.wrap(mkosibuild.exec_argv(list(self.shiftfs_cmd), project, build, True, stats))
            else:
                mkosibuild.stage_packages(self.mkosi_packages, build)
        except subprocess.CalledProcessError as e:
            raise StepError(f"could not stage mkosi's package cache: {e}") from None
        os.sync()
        return mkosibuild.image(build), _timed(argv, self.timeout, cwd=project)

    def _stale(self, missing):
        note = (
            f"{len(missing)} installed package(s) were not in the local cache, so apt downloaded them "
            f"in the timed build (the mirror moved on), e.g. {', '.join(missing[:3])}; "
            "the cache is refilled on the next run"
        )
        if note not in self.info["notes"]:
            self.info["notes"].append(note)
            log("image build: " + note)
        try:
            os.unlink(os.path.join(IB.debs_dir(self.cache), IB.COMPLETE))
        except OSError:
            pass

    def _check(self, backing, trees, user):
        refs = {}
        for name, tree in trees.items():
            ref_name = "mkosi-real-root" if name in IB.MKOSI_BUILDS else "real-root"
            if name == ref_name or not tree or not trees.get(ref_name):
                continue
            try:
                if ref_name not in refs:
                    refs[ref_name] = IB.dir_snapshot(trees[ref_name])
                ref = refs[ref_name]
                if name in ("shiftfs-exec", "mkosi-shiftfs-exec"):
                    out = os.path.join(os.path.dirname(tree), "export.tar")
                    IB.export(user.wrap([]), self.shiftfs_cmd, tree, out, self.timeout)
                    got = IB.tar_snapshot(out)
                    os.unlink(out)
                else:
                    got = tree
                res = IB.compare_trees(ref, got, name)
            except (StepError, OSError) as e:
                res = {"passed": False, "checked": 0, "mismatches": 0, "examples": [f"check failed: {e}"]}
            res.update(
                {
                    "backing": backing,
                    "build": name,
                    "how": "shiftfs export, then the tar" if "shiftfs-exec" in name else "the view",
                }
            )
            self.info["checks"].append(res)
            log(
                f"  image_build check {name}: {'pass' if res['passed'] else 'FAIL'} "
                f"({res.get('entries_got', 0)} entries vs {res.get('entries_ref', 0)}; "
                f"{res['mismatches']} mismatches)"
            )


class _no_user:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
