"""Draw bench/scale.py's results: one small panel per metric against the pool size.

    bench/.venv/bin/python bench/scale_chart.py --out chart.png before.json [after.json]

Runs in bench/.venv (matplotlib lives there; `bench/scale.py` installs it and calls this).
The x axis is log2 (1 to 256 workers); y axes are logarithmic where the figures span
decades, so a cost that grows linearly and one that grows with the square of the pool
show as different slopes. Two result files are overlaid (before and after a change);
issue 13's targets are drawn as red dotted lines.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

# (row key, title, y scale, target from issue 13 or None)
PANELS: list[tuple[str, str, str, float | None]] = [
    ("ready_s", "start to all ready (READY=1), s", "log", 2.0),
    ("idle_cpu_pct", "idle master CPU, % of a core", "symlog", 1.0),
    ("scrape_ms", "/metrics scrape ms: median (line), max (dotted)", "log", 100.0),
    ("reload_s", "SIGHUP reload to all ready, s", "log", None),
    ("respawn_ms", "SIGKILL to N/N ready, median ms", "log", None),
    ("rss_mib", "master RSS, MiB", "linear", None),
    ("fds", "master open fds", "log", None),
    ("wakes_per_s", "idle master wake-ups/s (voluntary ctx switches)", "log", None),
]
STYLES = [{"color": "#c0392b", "marker": "o", "linestyle": "-"},
          {"color": "#2471a3", "marker": "s", "linestyle": "--"}]


def series(doc: dict[str, Any], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in doc["rows"]:
        v = r.get(key)
        xs.append(r["workers"])
        ys.append(math.nan if v is None else float(v))
    return xs, ys


def draw(docs: list[dict[str, Any]], out: Path) -> None:
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    for ax, (key, title, yscale, target) in zip(axes.flat, PANELS, strict=True):
        for doc, style in zip(docs, STYLES, strict=False):
            xs, ys = series(doc, key)
            reps = doc.get("reps", 1)
            ax.plot(xs, ys, label=f"{doc['label']} ({doc['date'][:10]}, median of {reps})",
                    **style)
            every = [(r["workers"], v) for r in doc["rows"] for v in r.get(f"{key}_all", [])
                     if v is not None]
            if every:  # each repetition, faint, so the spread shows
                ax.scatter(*zip(*every, strict=True), color=style["color"], s=10, alpha=0.35,
                           zorder=1)
            if key == "scrape_ms":
                _, top = series(doc, "scrape_max_ms")
                ax.plot(xs, top, color=style["color"], marker="v", linestyle=":",
                        linewidth=0.8)
        if target is not None:
            ax.axhline(target, color="red", linestyle=":", linewidth=1)
            ax.annotate(f"target at 128: {target:g}", (1, target), xytext=(2, -10),
                        textcoords="offset points", color="red", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        if yscale == "symlog":
            ax.set_yscale("symlog", linthresh=0.1)
            ax.set_ylim(bottom=0)
        elif yscale == "log":
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_minor_formatter(NullFormatter())
        else:
            ax.set_ylim(bottom=0, top=max(1.0, ax.get_ylim()[1] * 1.15))
        ax.yaxis.set_major_formatter(plain)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("workers", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, which="major", alpha=0.3)
    first = docs[0]
    machine = first["machine"]
    fig.suptitle(f"hello-cluster scale sweep: {' vs '.join(d['label'] for d in docs)} "
                 f"({machine['cores']} cores, {machine['cpu']}; bench/scale.py)", fontsize=12)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(docs), fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.96))
    fig.savefig(out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("results", nargs="+", type=Path, help="one or two scale.py JSON files")
    args = ap.parse_args()
    if len(args.results) > len(STYLES):
        ap.error(f"at most {len(STYLES)} result files")
    draw([json.loads(p.read_text()) for p in args.results], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
