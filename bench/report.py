"""Summaries and output files: latest.json, latest.md, latest.png."""

from __future__ import annotations

import json
import os
import statistics

from . import workloads as W


def _median(xs):
    return statistics.median(xs) if xs else None


def summarize(res: dict) -> dict:
    """summary[backing][workload][target] = {...}: medians, min-max, ratios paired by round."""
    recs = res["records"]
    by = {}
    for r in recs:
        if r["workload"] is None:
            continue
        by[(r["backing"], r["workload"], r["target"], r["round"])] = r
    guards: dict[tuple, list[dict]] = {}
    for g in res["guards"]:
        guards.setdefault((g["backing"], g["workload"], g["target"]), []).append(g)
    targets = list(res["targets"])
    out: dict[str, dict] = {}
    for backing in res["backings"]:
        rounds = sorted({r["round"] for r in recs if r["backing"] == backing})
        out[backing] = {}
        for w in W.ALL:
            row = {}
            for t in targets:
                times, ratios, errors, rss, cpu, reqs = [], [], [], [], [], []
                for rd in rounds:
                    rec = by.get((backing, w.name, t, rd))
                    if rec is None:
                        continue
                    if rec["error"]:
                        errors.append(rec["error"])
                        continue
                    times.append(rec["seconds"])
                    nat = by.get((backing, w.name, "native", rd))
                    if nat and not nat["error"] and nat["seconds"]:
                        ratios.append(rec["seconds"] / nat["seconds"])
                    if rec.get("daemon_peak_rss_kib"):
                        rss.append(rec["daemon_peak_rss_kib"])
                    if rec.get("daemon_cpu_s") is not None:
                        cpu.append(rec["daemon_cpu_s"])
                    if rec.get("requests"):
                        reqs.append(rec["requests"])
                gl = guards.get((backing, w.name, t), [])
                if not times and not errors:
                    continue
                cell = {
                    "n": len(times),
                    "median_s": _median(times),
                    "min_s": min(times) if times else None,
                    "max_s": max(times) if times else None,
                    "ratio": _median(ratios),
                    "ratio_min": min(ratios) if ratios else None,
                    "ratio_max": max(ratios) if ratios else None,
                    "errors": errors,
                    "guard": (
                        "n/a"
                        if not w.guard
                        else "pass"
                        if gl and all(g["passed"] for g in gl)
                        else "fail"
                        if gl
                        else "not run"
                    ),
                    "peak_rss_kib": max(rss) if rss else None,
                    "daemon_cpu_s": _median(cpu),
                }
                if reqs:
                    keys = sorted({k for d in reqs for k in d})
                    cell["requests"] = {k: _median([d.get(k, 0) for d in reqs]) for k in keys}
                row[t] = cell
            if row:
                out[backing][w.name] = row
    return out


def summarize_image_build(res: dict) -> dict:
    """summary[backing][build] = {n, median_s, min_s, max_s, ratio (to real root,
    paired by round), errors}: the image build's own table."""
    info = res.get("image_build")
    if not info:
        return {}
    recs = [r for r in res["records"] if r["workload"] == "image_build" and r["target"] in info["builds"]]
    ref = {
        (r["target"], r["backing"], r["round"]): r["seconds"]
        for r in recs
        if r["target"] in ("real-root", "mkosi-real-root") and not r["error"] and r["seconds"]
    }
    out = {}
    for backing in dict.fromkeys(r["backing"] for r in recs):
        row = {}
        for name in info["builds"]:
            mine = [r for r in recs if r["backing"] == backing and r["target"] == name]
            if not mine:
                continue
            times = [r["seconds"] for r in mine if not r["error"]]
            base = "mkosi-real-root" if name.startswith("mkosi-") else "real-root"
            ratios = [
                r["seconds"] / ref[(base, backing, r["round"])]
                for r in mine
                if not r["error"] and (base, backing, r["round"]) in ref
            ]
            cpu = [r["daemon_cpu_s"] for r in mine if r.get("daemon_cpu_s") is not None]
            row[name] = {
                "n": len(times),
                "median_s": _median(times),
                "min_s": min(times) if times else None,
                "max_s": max(times) if times else None,
                "ratio": _median(ratios),
                "ratio_min": min(ratios) if ratios else None,
                "ratio_max": max(ratios) if ratios else None,
                "daemon_cpu_s": _median(cpu),
                "errors": [r["error"] for r in mine if r["error"]],
            }
        out[backing] = row
    return out


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell (tool output carries '|')."""
    return text.replace("|", "\\|").replace("\n", " ")


def image_build_md(res: dict, summary: dict) -> list[str]:
    """The "Image build" section: seconds per build and the ratio to real root."""
    info = res.get("image_build")
    if not info:
        return []
    debs = info.get("debs") or {}
    lines = [
        "## Image build",
        "",
        f"`mmdebstrap --variant=minbase --mode=root {info['suite']} DIR`, the packages from a local cache "
        f"({debs.get('count', '?')} .debs, {debs.get('bytes', 0) / 1e6:.0f} MB, copied into the new root's "
        "/var/cache/apt/archives by a setup hook, so no .deb is downloaded in the timed build; "
        "`apt-get update` still runs and its network time, about 10 s, is in every build). "
        "Ratios are to the real-root build of the same round; lower is better. "
        "The mkosi builds (bench/mkosibuild.py, `--cache-only=always` from a package cache filled once: "
        "no network in the timing) are compared with mkosi as real root.",
        "",
    ]
    for backing, row in summary.items():
        fstype = res["backings"].get(backing, {}).get("fstype", "?")
        lines += [
            f"Backing: {backing} ({fstype})",
            "",
            "| build | how | seconds (median, min–max) | ratio to real root | tree check |",
            "|---|---|---:|---:|---|",
        ]
        checks = {c["build"]: c for c in info["checks"] if c["backing"] == backing}
        for name, b in info["builds"].items():
            c = row.get(name)
            if b["status"].get(backing) == "cannot":
                lines.append(f"| {b['label']} | {b['how']} | cannot | – | {_cell(b.get('reason', ''))} |")
                continue
            if not c:
                continue
            secs = _fmt_s(c["median_s"])
            if c["n"] > 1:
                secs += f" ({c['min_s']:.1f}–{c['max_s']:.1f})"
            if c["errors"]:
                secs += f" ⚠{len(c['errors'])} err"
            ratio = "–" if c["ratio"] is None else f"{c['ratio']:.2f}×"
            if c["n"] > 1 and c["ratio_min"] is not None:
                ratio += f" ({c['ratio_min']:.2f}–{c['ratio_max']:.2f})"
            chk = checks.get(name)
            if name in ("real-root", "mkosi-real-root"):
                verdict = "reference"
            elif chk is None:
                verdict = "not run"
            elif chk["passed"]:
                verdict = (
                    f"same tree ({chk.get('entries_got')} entries, via {chk.get('how')}"
                    + (
                        f"; {chk['dev_not_made']} entries of /dev not made: mmdebstrap populates "
                        "/dev only where mknod works"
                        if chk.get("dev_not_made")
                        else ""
                    )
                    + ")"
                )
            else:
                verdict = f"✗ {chk['mismatches']} differences, e.g. " + "; ".join(f"`{e}`" for e in chk["examples"][:2])
            lines.append(f"| {b['label']} | {b['how']} | {secs} | {ratio} | {_cell(verdict)} |")
        lines.append("")
    for n in info.get("notes", []):
        lines.append(f"- {n}")
    if info.get("notes"):
        lines.append("")
    return lines


def _fmt_ratio(c) -> str:
    if c is None:
        return "–"
    if c["ratio"] is None:
        s = "error" if c["errors"] else "–"
    else:
        r = c["ratio"]
        s = f"{r:.2f}×" if r < 10 else f"{r:.1f}×" if r < 100 else f"{r:.0f}×"
        if c["n"] > 1 and c["ratio_min"] is not None:
            s += f" ({c['ratio_min']:.2g}–{c['ratio_max']:.2g})"
        if c["errors"]:
            s += f" ⚠{len(c['errors'])} err"
    if c["guard"] == "fail":
        s += " ✗guard"
    return s


def _fmt_s(x) -> str:
    if x is None:
        return "–"
    return f"{x:.3f} s" if x < 10 else f"{x:.1f} s"


def _per_request(rows: dict, req_t: list, targets: dict, entries: int) -> list[str]:
    """FUSE requests per tree entry (or per run for I/O workloads) and daemon CPU
    microseconds per request: the numbers the next speed lever is chosen from."""
    lines = [
        "Per-request accounting (medians): FUSE requests per tree entry (I/O workloads: "
        "requests per run) / daemon CPU µs per request. Counted by the kernel's "
        "fuse_request_send tracepoint, the same way for every FUSE daemon.",
        "",
    ]
    lines.append("| workload | " + " | ".join(targets[t]["label"] for t in req_t) + " |")
    lines.append("|---|" + "---:|" * len(req_t))
    for w in W.ALL:
        row = rows.get(w.name)
        if not row:
            continue
        per_entry = w.guard == "tree" or w.needs == "untar"
        cells = []
        for t in req_t:
            c = row.get(t)
            n = sum(c["requests"].values()) if c and c.get("requests") else 0
            if not n:
                cells.append("–")
                continue
            count = f"{n / entries:.2f}" if per_entry else f"{n:.0f}"
            cpu = c.get("daemon_cpu_s")
            cells.append(count + (f" / {cpu * 1e6 / n:.0f} µs" if cpu is not None else ""))
        lines.append(f"| {w.name} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def markdown(res: dict, summary: dict) -> str:
    """latest.md: the per-target tables, then the image build, guard, errors, targets."""
    m = res["machine"]
    tree = res["tree"]
    cfg = res["config"]
    targets = res["targets"]
    shown = [t for t in targets if any(v == "ok" for v in targets[t]["status"].values())]
    lines = [
        f"# shiftfs benchmark — {res['mode']} run, {res['date']}",
        "",
        f"- **Machine:** {m.get('cpu', '?')}, {m.get('cores')} cores, {m.get('mem_gib')} GiB, "
        f"kernel {m.get('kernel')}, {m.get('os', '')}; Python {m.get('python')}, pyfuse3 {m.get('pyfuse3', '?')}, "
        f"libfuse {m.get('libfuse3', '?')}. Shared VM: absolute times are noisy, ratios are paired per round.",
        "- **Backing:** " + "; ".join(f"{b}: {i['fstype']} ({i['options']})" for b, i in res["backings"].items()),
    ]
    if tree:  # a run of only the image build untars no tree
        lines += [
            f"- **Tree:** {tree['kind']} — {tree['entries']} entries "
            f"({', '.join(f'{v} {k}' for k, v in tree['counts'].items() if v)}), {tree['bytes'] / 1e6:.0f} MB; "
            f"{tree['small_files']} files ≤ {cfg['small_limit'] // 1024} KiB read by read_small.",
            f"- **I/O sizes:** sequential {cfg['seq_bytes'] >> 20} MiB in 1 MiB read()/write() calls (write ends "
            f"with fsync); random: fio 4 KiB psync 50/50 read/write, {cfg['rand_io_bytes'] >> 20} MiB of I/O in a "
            f"{cfg['rand_file_bytes'] >> 20} MiB file, page cache, timed by fio's job runtime.",
        ]
    lines += [
        f"- **Method:** {cfg['rounds']} round(s), targets interleaved per phase and rotated each round; "
        "cold = `sync; echo 3 > drop_caches` plus a fresh mount for mounted targets; ownership map "
        f"disk {res['map']['disk']}.. ↔ view {res['map']['view']}.. ×{res['map']['count']}. "
        f"Run took {res['duration_s'] / 60:.1f} min.",
        "",
    ]
    if any(summary.values()):
        lines += [
            "Cells: median time ratio to native (min–max over rounds); lower is better. "
            "✗guard = the tree differed from native's (see below).",
            "",
        ]
    for backing, rows in summary.items():
        if not rows:
            continue
        lines += [f"## Backing: {backing} ({res['backings'][backing]['fstype']})", ""]
        cols = [t for t in shown if t != "native"]
        lines.append("| workload | native | " + " | ".join(targets[t]["label"] for t in cols) + " |")
        lines.append("|---|---:|" + "---:|" * len(cols))
        for w in W.ALL:
            row = rows.get(w.name)
            if not row:
                continue
            nat = row.get("native")
            cells = [_fmt_s(nat["median_s"]) if nat else "–"] + [_fmt_ratio(row.get(t)) for t in cols]
            lines.append(f"| {w.title} | " + " | ".join(cells) + " |")
        lines.append("")
        daemons = [t for t in cols if targets[t]["kind"] == "fuse"]
        if daemons:
            lines.append("Daemon peak RSS, MiB (max over rounds) / daemon CPU seconds (median):")
            lines.append("")
            lines.append("| workload | " + " | ".join(targets[t]["label"] for t in daemons) + " |")
            lines.append("|---|" + "---:|" * len(daemons))
            for w in W.ALL:
                row = rows.get(w.name)
                if not row:
                    continue
                cells = []
                for t in daemons:
                    c = row.get(t)
                    if not c or c["peak_rss_kib"] is None:
                        cells.append("–")
                    else:
                        cpu = f" / {c['daemon_cpu_s']:.2f}" if c.get("daemon_cpu_s") is not None else ""
                        cells.append(f"{c['peak_rss_kib'] / 1024:.0f}{cpu}")
                lines.append(f"| {w.name} | " + " | ".join(cells) + " |")
            lines.append("")
        req_t = [t for t in cols if any(rows.get(w.name, {}).get(t, {}).get("requests") for w in W.ALL)]
        if req_t:
            lines += _per_request(rows, req_t, targets, res["tree"]["entries"])
        for t in req_t:
            lines.append(f"FUSE requests served by {targets[t]['label']} (median per run, top 6):")
            lines.append("")
            for w in W.ALL:
                c = rows.get(w.name, {}).get(t)
                if not c or not c.get("requests"):
                    continue
                top = sorted(c["requests"].items(), key=lambda kv: -kv[1])
                total = sum(v for _, v in top)
                lines.append(f"- {w.name}: {total:.0f} — " + ", ".join(f"{k} {v:.0f}" for k, v in top[:6]))
            lines.append("")
    lines += image_build_md(res, summarize_image_build(res))
    fails = [g for g in res["guards"] if not g["passed"]]
    if res["guards"] or any(summary.values()):
        lines += ["## Correctness guard", ""]
        npass = sum(1 for g in res["guards"] if g["passed"])
        lines.append(
            f"{npass} of {len(res['guards'])} checks passed (view: type, size, mode, owner, group, "
            "link target, rdev, nlink vs native; store: owners as the target should write them)."
        )
        lines.append("")
    seen = set()
    for g in fails:
        key = (g["backing"], g["workload"], g["target"])
        if key in seen:
            continue
        seen.add(key)
        lines.append(
            f"- **{targets[g['target']]['label']}**, {g['workload']} on {g['backing']}: "
            f"{g['mismatches']} mismatches, e.g. " + "; ".join(f"`{e}`" for e in g["examples"][:3])
        )
    errs = [r for r in res["records"] if r["error"]]
    if errs:
        lines += ["", "## Errors", ""]
        for r in errs[:30]:
            lines.append(f"- {r['target']} {r['workload']} ({r['backing']}, round {r['round']}): {r['error']}")
    if targets:
        lines += ["", "## Targets", ""]
    for i in targets.values():
        st = ", ".join(f"{b}: {s}" for b, s in i["status"].items())
        line = f"- **{i['label']}** ({i.get('version') or 'n/a'}): {st}"
        if i.get("skip_reason"):
            line += f" — {i['skip_reason']}"
        if i.get("options"):
            opts = i["options"].replace(res.get("workdir") or "\0", "$WORK")
            line += f"  \n  `{opts}`"
        lines.append(line)
        for n in i.get("notes", []):
            lines.append(f"  - {n}")
    if res.get("workdir"):
        lines.append(f"\n`$WORK` = {res['workdir']} (removed after the run).")
    if res["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def chart(res: dict, summary: dict, path: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    targets = res["targets"]
    backs = list(summary)
    fig, axes = plt.subplots(len(backs), 1, figsize=(12, 4.2 * len(backs)), squeeze=False)
    for ax, backing in zip(axes[:, 0], backs):
        rows = summary[backing]
        wl = [w for w in W.ALL if w.name in rows]
        cols = [t for t in targets if t != "native" and any(t in rows[w.name] for w in wl)]
        width = 0.8 / max(len(cols), 1)
        cmap = plt.get_cmap("tab10")
        for i, t in enumerate(cols):
            xs, ys, lo, hi, fail = [], [], [], [], []
            for j, w in enumerate(wl):
                c = rows[w.name].get(t)
                if not c or c["ratio"] is None:
                    continue
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(c["ratio"])
                lo.append(c["ratio"] - (c["ratio_min"] or c["ratio"]))
                hi.append((c["ratio_max"] or c["ratio"]) - c["ratio"])
                fail.append(c["guard"] == "fail")
            bars = ax.bar(
                xs,
                ys,
                width,
                yerr=[lo, hi],
                capsize=2,
                color=cmap(i % 10),
                label=targets[t]["label"],
                error_kw={"elinewidth": 0.8},
            )
            for b, f in zip(bars, fail):
                if f:
                    b.set_hatch("xxx")
                    b.set_edgecolor("black")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(wl)))
        ax.set_xticklabels([w.name for w in wl], rotation=0, fontsize=8)
        ax.set_ylabel("time / native (log)")
        ax.set_title(
            f"{backing} backing ({res['backings'][backing]['fstype']}) — median of "
            f"{res['config']['rounds']} round(s), bars = min–max; hatched = guard failed",
            fontsize=9,
        )
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=3, loc="upper left")
    m = res["machine"]
    fig.suptitle(
        f"shiftfs benchmark ({res['mode']}, {res['date'][:10]}, {m.get('cores')} cores, "
        f"kernel {m.get('kernel')}, tree {res['tree']['kind']} {res['tree']['entries']} entries)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(res: dict, out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(res)
    res = dict(res, summary=summary)
    if res.get("image_build"):
        res["image_build"] = dict(res["image_build"], summary=summarize_image_build(res))
    paths = {k: os.path.join(out_dir, f"latest.{k}") for k in ("json", "md", "png")}
    tmp = paths["json"] + ".part"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, paths["json"])
    with open(paths["md"], "w") as f:
        f.write(markdown(res, summary))
    try:
        if any(summary.values()):  # nothing to draw for a run of only the image build
            chart(res, summary, paths["png"])
    except Exception as e:  # noqa: BLE001 - the chart is optional, the numbers are not
        res["notes"].append(f"chart not drawn: {e}")
        with open(paths["md"], "a") as f:
            f.write(f"\n(chart not drawn: {e})\n")
    return paths
