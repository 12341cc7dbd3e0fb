"""Table and plots of a Hydra sweep (or of one run).

    python -m simulations.report multirun/2026-01-01/12-00-00 [--out reports/]
    python -m simulations.report docs/results/privacy/benchmark_dp.json   # privacy_utility.png beside it

Scans the numbered run directories of a multirun (each with ``.hydra/overrides.yaml`` and
``summary.json``, or ``failed.json`` when the run raised) and writes, into ``--out``
(default: the scanned directory):

- ``report.csv``: one row per run: its overrides (one string, and one column per key),
  status, final federated/centralized recalls and distortion, fed/central 10-R@10 ratio,
  bytes per vector, bytes up per client per round, rounds, wall times, error;
- ``report.md``: the same as a Markdown table (also printed), failures listed below it;
- ``recall_per_round.png``, ``distortion_per_round.png``: one line per successful run;
- ``recall_vs_bytes.png``: final 10-R@10 against bytes per vector, one point per run.

Given ``benchmark_dp.json`` (``simulations.benchmark_privacy --dp``) instead, it draws
``privacy_utility.png`` (``plot_privacy_utility``): recall against epsilon per setting.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

from simulations.check_summary import problems

SUMMARY, FAILED, TIMING, OVERRIDES = "summary.json", "failed.json", "timing.json", ".hydra/overrides.yaml"
PLOTS = ("recall_per_round.png", "distortion_per_round.png", "recall_vs_bytes.png")

# (csv column, markdown header, how to read it from summary["final"])
METRICS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("fed_recall_10_at_10", "fed 10-R@10", ("federated", "recall_10_at_10")),
    ("central_recall_10_at_10", "central 10-R@10", ("centralized", "recall_10_at_10")),
    ("fed_recall_1_at_1", "fed 1-R@1", ("federated", "recall_1_at_1")),
    ("central_recall_1_at_1", "central 1-R@1", ("centralized", "recall_1_at_1")),
    ("fed_distortion", "fed distortion", ("federated", "distortion")),
    ("central_distortion", "central distortion", ("centralized", "distortion")),
)
EXTRA = (  # computed or read elsewhere: (csv column, markdown header)
    ("ratio_10r10_fed_over_central", "fed/central 10-R@10"),
    ("bytes_per_vector", "B/vector"),
    ("bytes_up_per_client_per_round", "B up/client/round"),
    ("rounds", "rounds"),
    ("wall_time_s", "wall s"),
    ("job_time_s", "job s"),
)
BASE_COLUMNS = ("run", "overrides", "status")
TAIL_COLUMNS = tuple(c for c, _, _ in METRICS) + tuple(c for c, _ in EXTRA) + ("error",)


# ---------------------------------------------------------------- loading


def _natural(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _is_run(d: Path) -> bool:
    return (d / SUMMARY).is_file() or (d / FAILED).is_file() or (d / OVERRIDES).is_file()


def find_runs(root: Path) -> list[Path]:
    """Run directories under root (root itself if it is one), in natural order."""
    root = Path(root)
    if _is_run(root):
        return [root]
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        d = Path(dirpath)
        if d != root and _is_run(d):
            found.append(d)
            dirnames.clear()  # a run's own sub-directories are not runs
        else:
            dirnames[:] = [n for n in dirnames if not n.startswith(".")]
    return sorted(found, key=_natural)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """['index.m=4', '+x=1', '~y'] -> {'index.m': '4', 'x': '1', 'y': '~'}"""
    out = {}
    for o in overrides:
        key, sep, value = str(o).partition("=")
        out[key.lstrip("+~")] = value if sep else "~"
    return out


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _num(v: Any) -> float | int | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def load_run(run_dir: Path, root: Path | None = None) -> dict[str, Any]:
    """One run as a flat row (keys BASE_COLUMNS + TAIL_COLUMNS + '_overrides', '_rounds')."""
    run_dir = Path(run_dir)
    summary, failed, timing = (_read_json(run_dir / f) for f in (SUMMARY, FAILED, TIMING))
    overrides: list[str] = []
    if (run_dir / OVERRIDES).is_file():
        overrides = [str(o) for o in (yaml.safe_load((run_dir / OVERRIDES).read_text()) or [])]
    elif failed and isinstance(failed.get("overrides"), list):
        overrides = [str(o) for o in failed["overrides"]]
    name = run_dir.relative_to(root).as_posix() if root and run_dir != root else run_dir.name
    row: dict[str, Any] = {c: None for c in (*BASE_COLUMNS, *TAIL_COLUMNS)}
    row.update(run=name, overrides=" ".join(overrides), _overrides=parse_overrides(overrides), _rounds=[])

    if failed is not None:  # run.py removes a stale failed.json when a run starts again
        row["status"] = "failed"
        row["error"] = f"{failed.get('error_type', 'Error')}: {failed.get('message', '')}".strip()
    elif summary is None:
        row["status"] = "incomplete"  # still running, killed, or summary.json unreadable
        row["error"] = f"no readable {SUMMARY}"
    else:
        found = problems(summary, centralized=False, provenance=False)
        row["status"] = "invalid" if found else "ok"
        row["error"] = "; ".join(found) or None
    if summary is not None and failed is None:
        final = summary.get("final", {})
        for col, _, path in METRICS:
            row[col] = _num(_dig(final, *path))
        fed, cen = row["fed_recall_10_at_10"], row["central_recall_10_at_10"]
        row["ratio_10r10_fed_over_central"] = fed / cen if fed is not None and cen else None
        row["bytes_per_vector"] = _num(final.get("bytes_per_vector"))
        row["bytes_up_per_client_per_round"] = _num(final.get("bytes_up_per_client_per_round"))
        rounds = [r for r in summary.get("rounds") or [] if isinstance(r, dict) and "round" in r]
        row["_rounds"] = sorted(rounds, key=lambda r: r["round"])
        row["rounds"] = _num(_dig(summary, "config", "num_rounds")) or max((r["round"] for r in rounds), default=None)
        row["wall_time_s"] = _num(summary.get("wall_time_s"))
    if timing is not None:
        row["job_time_s"] = _num(timing.get("wall_time_s"))
    elif summary is not None and (run_dir / OVERRIDES).is_file():  # no timing.json: mtimes
        row["job_time_s"] = round((run_dir / SUMMARY).stat().st_mtime - (run_dir / OVERRIDES).stat().st_mtime, 3)
    if row["wall_time_s"] is None:
        row["wall_time_s"] = row["job_time_s"]
    return row


def load_rows(root: Path) -> list[dict[str, Any]]:
    root = Path(root)
    return [load_run(d, root) for d in find_runs(root)]


def override_keys(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(all override keys in first-seen order, the keys whose value differs between runs)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r["_overrides"] if k not in keys]
    varying = [k for k in keys if len({r["_overrides"].get(k) for r in rows}) > 1]
    return keys, varying


def label(row: dict[str, Any], varying: list[str]) -> str:
    """A run's name in legends: '#<run> ' + the overrides that differ between runs."""
    parts = [f"{k}={row['_overrides'][k]}" for k in varying if k in row["_overrides"]]
    return f"#{row['run']} " + (" ".join(parts) or row["overrides"] or "(defaults)")


# ---------------------------------------------------------------- writers


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    keys, _ = override_keys(rows)
    cols = [*BASE_COLUMNS, *keys, *TAIL_COLUMNS]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**{k: r["_overrides"].get(k) for k in keys}, **{k: r[k] for k in BASE_COLUMNS + TAIL_COLUMNS}})
    return path


def _cell(v: Any, col: str = "") -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if col.endswith("_s"):
            return f"{v:.1f}"
        return f"{v:.0f}" if v.is_integer() and col.startswith("bytes") else f"{v:.4f}"
    return str(v).replace("|", "\\|")


def markdown(rows: list[dict[str, Any]], title: str = "Sweep report") -> str:
    keys, varying = override_keys(rows)
    common = [f"{k}={rows[0]['_overrides'][k]}" for k in keys if k not in varying and all(k in r["_overrides"] for r in rows)]
    shown = varying or ([] if common else ["overrides"])
    heads = ["run", *shown, "status", *(h for _, h, _ in METRICS), *(h for _, h in EXTRA)]
    lines = [f"# {title}", ""]
    n_ok = sum(r["status"] == "ok" for r in rows)
    lines.append(f"{len(rows)} run(s): {n_ok} ok, {len(rows) - n_ok} not ok.")
    if common:
        lines.append(f"Common overrides: `{' '.join(common)}`")
    lines += ["", "| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    for r in rows:
        ov = [r["overrides"] if k == "overrides" else r["_overrides"].get(k) for k in shown]
        cols = ["run", *shown, "status", *(c for c, _, _ in METRICS), *(c for c, _ in EXTRA)]
        vals = [r["run"], *ov, r["status"], *(r[c] for c, _, _ in METRICS), *(r[c] for c, _ in EXTRA)]
        lines.append("| " + " | ".join(_cell(v, c) for v, c in zip(vals, cols)) + " |")
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        lines += ["", "## Not ok", ""]
        lines += [f"- `{r['run']}` ({r['status']}) `{r['overrides']}`: {r['error']}" for r in bad]
    return "\n".join(lines) + "\n"


def write_plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """The three PNGs; only successful runs are drawn. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return []
    varying = override_keys(ok)[1] or override_keys(rows)[1]  # what tells the drawn runs apart
    labels = ["\n".join(textwrap.wrap(label(r, varying), 60)) for r in ok]
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(ok))]
    styles = [("-o", "--s", ":^", "-.D")[(i // 10) % 4] for i in range(len(ok))]  # > 10 runs: colour repeats
    written = []

    def finish(fig: Any, ax: Any, name: str, legend_title: str | None = None) -> None:
        if len(ok) <= 8:  # beside the axes
            ax.legend(fontsize=8, title=legend_title, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        else:  # many runs: below the axes, two columns
            ax.legend(fontsize=7, title=legend_title, title_fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
        ax.grid(alpha=0.3)
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(out / name)

    for name, key, ylabel, title in (
        (PLOTS[0], "recall_10_at_10", "10-recall@10 (federated)", "Federated 10-recall@10 per round"),
        (PLOTS[1], "distortion", "distortion  mean ||z - q(z)||²", "Federated distortion per round"),
    ):
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for r, lab, c, st in zip(ok, labels, colors, styles):
            pts = [(p["round"], p[key]) for p in r["_rounds"] if _num(p.get(key)) is not None]
            if pts:
                ax.plot(*zip(*pts), st, ms=4, color=c, label=lab)
        ax.set(xlabel="round (0 = after one-shot init)", ylabel=ylabel, title=title)
        ax.xaxis.get_major_locator().set_params(integer=True)
        finish(fig, ax, name, "runs")

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    names: dict[tuple[float, float], list[str]] = {}  # runs on the same point share one annotation
    for r, lab, c, st in zip(ok, labels, colors, styles):
        x, y = r["bytes_per_vector"], r["fed_recall_10_at_10"]
        if x is None:
            continue
        if y is not None:
            ax.scatter(x, y, color=c, marker=st[-1], s=40, label=lab, zorder=3)
            names.setdefault((x, round(y, 4)), []).append(f"#{r['run']}")
        if r["central_recall_10_at_10"] is not None:
            ax.scatter(x, r["central_recall_10_at_10"], color=c, s=220, marker="_", linewidths=2, zorder=2)
    for (x, y), ns in names.items():
        ax.annotate(",".join(ns), (x, y), xytext=(6, -3), textcoords="offset points", fontsize=7, color="0.25")
    ax.scatter([], [], color="gray", s=220, marker="_", linewidths=2, label="(dash: centralized faiss, same run)")
    ax.set(xlabel="bytes per vector (code size)", ylabel="final 10-recall@10", title="Final 10-recall@10 vs code size (markers: federated)")
    xs = sorted({x for x, _ in names})
    if len(xs) == 1:  # one code size: a single integer tick, not 2.85 ... 3.15
        ax.set_xticks(xs)
        ax.set_xlim(xs[0] - 1, xs[0] + 1)
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.margins(x=0.25)
    ax.margins(y=0.15)
    finish(fig, ax, PLOTS[2], "runs")
    return written


def plot_privacy_utility(source: Path | dict[str, Any], path: Path | None = None) -> Path:
    """Recall against the DP budget from ``benchmark_dp.json`` (its path, or the loaded
    dict; ``simulations.benchmark_privacy --dp``): one line per setting over its DP runs,
    the no-DP run of the same setting as a dashed horizontal line of the same colour.
    Written to ``path`` (default: privacy_utility.png beside the JSON)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = source if isinstance(source, dict) else json.loads(Path(source).read_text())
    if path is None:
        if isinstance(source, dict):
            raise ValueError("plot_privacy_utility: give a path when the source is a dict")
        path = Path(source).with_name("privacy_utility.png")
    path = Path(path)
    curve = [c for c in data.get("curve", []) if _num(c.get("recall_10_at_10")) is not None]
    settings = list(dict.fromkeys(c["setting"] for c in curve))
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for i, setting in enumerate(settings):
        color = plt.get_cmap("tab10")(i % 10)
        pts = sorted((c["epsilon"], c["recall_10_at_10"]) for c in curve if c["setting"] == setting and c["epsilon"] is not None)
        nodp = [c["recall_10_at_10"] for c in curve if c["setting"] == setting and c["epsilon"] is None]
        marker = "o" if len(pts) > 1 else "D"  # a single DP point (the train.lam=0 check): a diamond
        if pts:
            ax.plot(*zip(*pts), "-" + marker, ms=5, color=color, label=setting)
        if nodp:
            ax.axhline(nodp[0], ls="--", lw=1.2, color=color, alpha=0.8, label=None if pts else f"{setting} (no DP)")
    eps = sorted({c["epsilon"] for c in curve if c["epsilon"] is not None})
    if eps:
        ax.set_xscale("log", base=2)
        ax.set_xticks(eps)
        ax.set_xticklabels([f"{e:g}" for e in eps])
    default = data.get("default_epsilon")
    if default is not None:
        ax.axvline(default, color="0.6", lw=0.8, ls=":")
        ax.annotate(f"default eps={default:g}", (default, 0.02), xycoords=("data", "axes fraction"), xytext=(4, 0),
                    textcoords="offset points", fontsize=7, color="0.4")
    ax.plot([], [], "--", color="gray", label="dashed: no DP (privacy=secagg), same setting")
    ax.set(xlabel="DP budget epsilon (delta = 1e-6, over the run's releases)", ylabel="true 10-recall@10 (simulator)",
           title="Privacy / utility: federated 10-recall@10 vs epsilon")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def report(root: Path, out: Path | None = None) -> tuple[list[dict[str, Any]], str]:
    """Load every run under root, write report.csv/.md and the plots into out; (rows, markdown)."""
    root = Path(root)
    out = Path(out) if out else root
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(root)
    md = markdown(rows, title=f"Sweep report: {root}")
    write_csv(rows, out / "report.csv")
    (out / "report.md").write_text(md)
    write_plots(rows, out)
    return rows, md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path, help="a Hydra multirun directory, one run's directory, or a benchmark_dp.json")
    ap.add_argument("--out", type=Path, default=None, help="where to write the report (default: path)")
    args = ap.parse_args(argv)
    if args.path.is_file() and args.path.suffix == ".json":  # benchmark_privacy --dp's raw numbers: the plot
        written = plot_privacy_utility(args.path, args.out / "privacy_utility.png" if args.out else None)
        print(f"wrote {written}", file=sys.stderr)
        return 0
    if not args.path.is_dir():
        print(f"not a directory: {args.path}", file=sys.stderr)
        return 2
    rows, md = report(args.path, args.out)
    if not rows:
        print(f"no runs under {args.path} (no summary.json, failed.json or .hydra/overrides.yaml)", file=sys.stderr)
        return 1
    print(md, end="")
    print(f"wrote {(args.out or args.path) / 'report.md'} (+ report.csv, plots)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
