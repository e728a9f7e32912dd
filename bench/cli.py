"""Command line: python -m bench --quick | --full [options]."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from . import report
from . import targets as T
from . import workloads as W
from .runner import IMAGE_BUILD, Config, MiB, Runner
from .sysutil import log

HERE = os.path.dirname(os.path.abspath(__file__))


def _size(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def parse(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark shiftfs against native, a kernel idmapped mount and "
        "FUSE peers on the same backing filesystem (run as root).",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="tiny sizes, 1 round, disk backing (default)")
    g.add_argument("--full", action="store_true", help="Debian minbase, 1 GiB I/O, 5 rounds, disk + tmpfs")
    p.add_argument(
        "--out",
        help="output directory (default: bench/results for a whole full run, "
        "bench/results/partial with --targets/--workloads, bench/results/quick for --quick)",
    )
    p.add_argument("--rounds", type=int, help="rounds (interleaved repetitions)")
    p.add_argument("--targets", help="comma list, from: " + ",".join(T.BY_NAME))
    p.add_argument(
        "--workloads",
        help="comma list, from: "
        + ",".join([*W.BY_NAME, IMAGE_BUILD])
        + f" ({IMAGE_BUILD}: mmdebstrap minbase as real root, under shiftfs exec and through "
        "peers; in --full by default, in --quick only when named)",
    )
    p.add_argument(
        "--tree",
        choices=["auto", "minbase", "generated"],
        help="archive to untar: cached mmdebstrap minbase, or a generated tree of the same shape",
    )
    p.add_argument("--scale", type=float, help="generated tree size relative to minbase (quick: 0.1)")
    p.add_argument("--seq-size", type=_size, help="sequential file size, e.g. 1g")
    p.add_argument("--rand-size", type=_size, help="random I/O file size")
    p.add_argument("--rand-io", type=_size, help="random I/O volume")
    p.add_argument("--backing", help="comma list of disk,tmpfs")
    p.add_argument("--workdir", help="where the backing directories are made (default /var/tmp)")
    p.add_argument("--timeout", type=float, help="per step time limit, seconds")
    p.add_argument("--shiftfs", help="shiftfs command (default: the venv's shiftfs)")
    p.add_argument("--no-shiftfs-stats", action="store_true", help="don't collect shiftfs request counters")
    p.add_argument(
        "--render", metavar="JSON", help="only redraw latest.md and latest.png from a results JSON (no root needed)"
    )
    a = p.parse_args(argv)
    if a.render:
        return a.render, os.path.abspath(a.out or os.path.dirname(os.path.abspath(a.render)))
    cfg = Config.preset("full" if a.full else "quick")
    if a.rounds:
        cfg.rounds = a.rounds
    if a.targets:
        cfg.targets = [x for x in a.targets.split(",") if x]
        bad = [x for x in cfg.targets if x not in T.BY_NAME]
        if bad:
            p.error(f"unknown target(s): {', '.join(bad)}")
        if "native" not in cfg.targets:
            cfg.targets.insert(0, "native")
    if a.workloads:
        chosen = [x for x in a.workloads.split(",") if x]
        bad = [x for x in chosen if x not in W.BY_NAME and x != IMAGE_BUILD]
        if bad:
            p.error(f"unknown workload(s): {', '.join(bad)}; choose from " + ",".join([*W.BY_NAME, IMAGE_BUILD]))
        phases = [x for x in chosen if x != IMAGE_BUILD]
        full = W.with_needs(phases)
        if len(full) > len(phases):
            added = [x for x in full if x not in phases]
            log(f"also running {', '.join(added)}: the chosen workloads work on what it makes")
        cfg.workloads = full + ([IMAGE_BUILD] if IMAGE_BUILD in chosen else [])
    if a.tree:
        cfg.tree = a.tree
    if a.scale:
        cfg.gen_scale = a.scale
    if a.seq_size:
        cfg.seq_bytes = a.seq_size
    if a.rand_size:
        cfg.rand_file_bytes = a.rand_size
    if a.rand_io:
        cfg.rand_io_bytes = a.rand_io
    if a.backing:
        cfg.backings = [x for x in a.backing.split(",") if x]
        if any(x not in ("disk", "tmpfs") for x in cfg.backings):
            p.error("--backing takes disk and/or tmpfs")
    if a.workdir:
        cfg.workdir = a.workdir
    if a.timeout:
        cfg.step_timeout = a.timeout
    if a.shiftfs:
        cfg.shiftfs_cmd = a.shiftfs.split()
    cfg.shiftfs_stats = not a.no_shiftfs_stats
    # Only a whole full run replaces the published results (bench/results/latest.*);
    # a run of chosen targets or workloads goes beside them.
    sub = "quick" if cfg.mode == "quick" else "partial" if (a.targets or a.workloads) else ""
    out = a.out or os.path.join(HERE, "results", sub)
    return cfg, os.path.abspath(out)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    cfg, out = parse(argv)
    if isinstance(cfg, str):  # --render
        with open(cfg) as f:
            res = json.load(f)
        res.pop("summary", None)
        paths = report.write(res, out)
        log("wrote " + ", ".join(paths.values()))
        return 0
    if os.geteuid() != 0:
        print("bench: run as root (mounts, drop_caches, idmapped mounts)", file=sys.stderr)
        return 2
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _terminate)
    log(
        f"{cfg.mode} run: rounds={cfg.rounds} tree={cfg.tree} seq={cfg.seq_bytes // MiB} MiB "
        f"backings={','.join(cfg.backings)} out={out}"
    )
    res = Runner(cfg).run()
    paths = report.write(res, out)
    log("wrote " + ", ".join(paths.values()))
    with open(paths["md"]) as f:
        print(f.read())
    failed = sum(1 for r in res["records"] if r.get("error"))
    if failed:
        log(f"{failed} step(s) failed: see the Errors section of {paths['md']}")
        return 1
    return 0
