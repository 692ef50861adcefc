"""Draw bench/memory.py's results: total PSS and USS per worker against the pool size.

    bench/.venv/bin/python bench/memory_chart.py --out chart.png result.json

Runs in bench/.venv (matplotlib lives there; `bench/memory.py` installs it and calls this).
One line per contender. The left panel is what the whole pool costs the machine (the sum
of PSS over the process tree) after every worker served requests, with issue 17's target
drawn at 8 workers (half of uvicorn's total); the middle one the same after a full
`gc.collect()` in every worker; the right one what each worker holds privately (USS,
median; faint: after the collection), the memory a worker's replacement gives back.
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

ORDER = ["hc", "hc-preload", "uvicorn", "gunicorn-uvicorn", "gunicorn-uvicorn-preload"]
STYLES = {
    "hc": {"color": "#c0392b", "marker": "o", "linestyle": "--"},
    "hc-preload": {"color": "#c0392b", "marker": "o", "linestyle": "-"},
    "uvicorn": {"color": "#2471a3", "marker": "s", "linestyle": "-"},
    "gunicorn-uvicorn": {"color": "#1e8449", "marker": "^", "linestyle": "--"},
    "gunicorn-uvicorn-preload": {"color": "#1e8449", "marker": "^", "linestyle": "-"},
}
PANELS = [("memory", "pss_total_mib", "total PSS of the process tree, MiB"),
          ("memory_after_gc", "pss_total_mib",
           "total PSS after gc.collect() in every worker, MiB"),
          ("memory", "worker_uss_median_mib",
           "USS per worker (median), MiB; faint dotted: after gc.collect()")]


def series(doc: dict[str, Any], name: str, reading: str,
           key: str) -> tuple[list[int], list[float]]:
    runs = sorted((r for r in doc["runs"] if r["contender"] == name), key=lambda r: r["workers"])
    ys = [math.nan if (r.get(reading) or {}).get(key) is None else float(r[reading][key])
          for r in runs]
    return [r["workers"] for r in runs], ys


def draw(doc: dict[str, Any], out: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    labels = {r["contender"]: r["label"].replace(f" {r['workers']}", " N") for r in doc["runs"]}
    for ax, (reading, key, title) in zip(axes, PANELS, strict=True):
        for name in ORDER:
            if name not in labels:
                continue
            xs, ys = series(doc, name, reading, key)
            ax.plot(xs, ys, label=labels[name], **STYLES[name])
            if key == "worker_uss_median_mib":  # after the full collection, faint
                _, after = series(doc, name, "memory_after_gc", key)
                ax.plot(xs, after, color=STYLES[name]["color"], marker=STYLES[name]["marker"],
                        linestyle=":", alpha=0.45)
            if key == "pss_total_mib" and xs:
                ax.annotate(f"{ys[-1]:.0f}", (xs[-1], ys[-1]), xytext=(4, 0),
                            textcoords="offset points", fontsize=8, color=STYLES[name]["color"])
        if key == "pss_total_mib" and reading == "memory":
            base = [r for r in doc["runs"] if r["contender"] == "uvicorn" and r["workers"] == 8
                    and r.get("memory")]
            if base:
                goal = doc["target"]["ratio"] * base[0]["memory"]["pss_total_mib"]
                ax.plot([8], [goal], marker="_", markersize=30, color="red")
                ax.annotate(f"target at 8: {goal:.0f} ({doc['target']['ratio']}x uvicorn)",
                            (8, goal), xytext=(6, -14), textcoords="offset points",
                            color="red", fontsize=8)
        ax.set_xticks(sorted({r["workers"] for r in doc["runs"]}))
        ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.08)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("workers", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    m = doc["machine"]
    fig.suptitle(f"Memory of a Starlette app with {doc['app_mb']} MB of objects, "
                 f"{doc['date'][:10]} ({m['cores']} cores, Python {m['python']}; "
                 "bench/memory.py)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("result", type=Path, help="a bench/memory.py JSON file")
    args = ap.parse_args()
    draw(json.loads(args.result.read_text()), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
