"""PNG plots of one run (matplotlib, headless).

- ``throughput.png``: requests/s per contender and app (median, runs as dots).
- ``recycle.png`` / ``reload.png`` / ``scale.png``: completed and failed
  requests per second.
- ``leak.png``: RSS of every worker over time, one panel per contender.

``python -m bench.plot [RESULTS_DIR]`` redraws from results.json.
"""
from __future__ import annotations

import os
import sys
from typing import Optional


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def available() -> Optional[str]:
    """None if matplotlib can be used, else why not."""
    try:
        _pyplot()
    except ImportError as exc:
        return "matplotlib is not installed (%s); tox -e bench installs it" % exc
    return None


def throughput(res: dict, path: str) -> None:
    plt = _pyplot()
    apps = list(dict.fromkeys(r["app"] for r in res["rows"]))
    fig, axes = plt.subplots(1, len(apps), figsize=(6 * len(apps), 4), squeeze=False)
    for ax, app in zip(axes[0], apps):
        rows = [r for r in res["rows"] if r["app"] == app]
        labels = [r["contender"] for r in rows]
        ax.bar(range(len(rows)), [r["rps"] or 0 for r in rows], color="#8fb3d9")
        for i, r in enumerate(rows):
            ax.plot([i] * len(r.get("all_rps", [])), r.get("all_rps", []), "k.", ms=4)
            if r.get("ratio") is not None:
                ax.annotate("%.2f" % r["ratio"], (i, r["rps"] or 0), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_title("%s app: req/s (ratio vs %s)" % (app, res["baseline"]))
        ax.set_ylabel("requests/s")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def timelines(res: dict, path: str) -> None:
    plt = _pyplot()
    series = res["series"]
    fig, axes = plt.subplots(len(series), 1, figsize=(8, 2.4 * len(series)), squeeze=False, sharex=True)
    for ax, (label, data) in zip(axes[:, 0], series.items()):
        timeline = data["timeline"] if isinstance(data, dict) else data
        ts = [b["t"] for b in timeline]
        ax.plot(ts, [b["ok"] for b in timeline], label="completed/s")
        ax.plot(ts, [b["failed"] for b in timeline], "r", label="failed/s")
        if isinstance(data, dict):
            for start, end in data.get("reloads", []):
                ax.axvspan(start, end, color="orange", alpha=0.2)
        ax.set_title(label, fontsize=9)
        ax.set_ylabel("req/s")
        ax.legend(fontsize=7, loc="lower right")
    shaded = {"reload": " (shaded: reload in progress)",
              "scale": " (shaded: from the trigger until the new count is in effect)"}
    axes[-1, 0].set_xlabel("seconds" + shaded.get(res["name"], ""))
    fig.suptitle(res["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def leak(res: dict, path: str) -> None:
    plt = _pyplot()
    series = res["series"]
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.6), squeeze=False, sharey=True)
    for ax, (label, data) in zip(axes[0], series.items()):
        for pid, points in data["rss_mb"].items():
            ax.plot([p[0] for p in points], [p[1] for p in points], lw=1)
        ax.axhline(data["limit_mb"], color="r", ls="--", lw=1, label="limit")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("seconds")
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("RSS of each worker (MB)")
    fig.suptitle(res["title"] + ": one line per worker process")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


DRAW = {"throughput": throughput, "recycle": timelines, "reload": timelines, "scale": timelines,
        "leak": leak}


def draw(res: dict, out_dir: str) -> list[str]:
    """Draw the plot of one scenario result; returns file names written."""
    fn = DRAW.get(res["name"])
    if fn is None or not res.get("rows") or (res["name"] != "throughput" and not res.get("series")):
        return []
    name = res["name"] + ".png"
    fn(res, os.path.join(out_dir, name))
    return [name]


def main(argv=None) -> int:
    from bench import report
    out_dir = (argv or sys.argv[1:] or [os.path.join(os.path.dirname(__file__), "results")])[0]
    doc = report.load(out_dir)
    if doc is None:
        print("no results.json in %s" % out_dir, file=sys.stderr)
        return 1
    for res in doc["scenarios"]:
        print("\n".join(draw(res, out_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
