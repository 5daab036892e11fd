"""Scenario 4: leak capping.

The ``leak`` app keeps some memory on every request, sized from the
measured request rate so that each worker grows by about ``GROWTH`` bytes a
second.  Under continuous load, each contender caps it: ours with
``limits.max_rss``, the baseline with superlance's memmon (TICK_5) on plain
supervisord, uWSGI with ``--reload-on-rss``.  The RSS of every worker is
sampled four times a second (plotted over time); reported are failed
requests, requests/s (ratio against memmon), the highest RSS seen and the
share of samples above the limit.  Ours and uWSGI run at their defaults
(ours recycle.flap_window 60 s, uWSGI --min-worker-lifetime 10 s) and,
labelled tuned, with both guards lowered to 1 s.
"""
from __future__ import annotations

import logging

from bench.contenders import Spec
from bench.scenario import Context, Result, Sampler, add_ratios, rss_of
from bench.scenario_recycle import calibrate, measure

log = logging.getLogger("bench")

NAME = "leak"
TITLE = "Leak capping"
BASELINE = "memmon"
APP = "bench.apps:leak"
MB = 1024 * 1024
MAX_RSS = 80 * MB
GROWTH = 12 * MB       # bytes per second per worker under the bench load

COLUMNS = [("contender", "contender", "s"), ("failed", "failed", "d"), ("requests", "requests", "d"),
           ("rps", "req/s", ".0f"), ("ratio", "ratio vs memmon", ".3f"),
           ("max_rss_mb", "max RSS MB", ".0f"), ("over_pct", "% samples over limit", ".1f"),
           ("replacements", "replacements", "d")]


def run(ctx: Context) -> Result:
    result = Result(NAME, TITLE, BASELINE, COLUMNS)
    duration = 8.0 if ctx.smoke else max(ctx.duration * 5, 25.0)
    result.notes.append("limit %d MB; each contender's app keeps enough bytes per request to grow "
                        "~%d MB/s per worker at that contender's own hello-world rate (the same "
                        "growth in time for all: leak capping is about memory over time)"
                        % (MAX_RSS // MB, GROWTH // MB))
    result.notes.append("defaults: ours recycle.flap_window 60 s, uWSGI --min-worker-lifetime "
                        "10 s; the rows labelled tuned lower both to 1 s")

    rates: dict = {}      # kind -> hello-world req/s per worker, measured once

    def spec(label: str, kind: str, **extra) -> Spec:
        if ctx.can_run(kind, Spec(app=APP, workers=ctx.workers, max_rss=MAX_RSS)):
            return Spec(app=APP, workers=ctx.workers, max_rss=MAX_RSS, **extra)  # skipped below
        if kind not in rates:
            rates[kind] = calibrate(ctx, kind)
        per_worker = rates[kind]
        leak = max(1024, int(GROWTH / per_worker))
        result.notes.append("%s: %d bytes per request (%.0f req/s per worker)" % (label, leak, per_worker))
        return Spec(app=APP, workers=ctx.workers, max_rss=MAX_RSS,
                    env=(("BENCH_LEAK_BYTES", str(leak)),), **extra)

    plan = [(BASELINE, "flup", spec(BASELINE, "flup"))]
    for label, kind, extra in (("ours max_rss", "ours", {}),
                               ("ours max_rss tuned (flap_window 1 s)", "ours",
                                {"flap_window": 1.0}),
                               ("uwsgi --reload-on-rss", "uwsgi", {"min_worker_lifetime": None}),
                               ("uwsgi --reload-on-rss tuned (min-worker-lifetime 1 s)", "uwsgi",
                                {"min_worker_lifetime": 1})):
        if not ctx.smoke or "tuned" not in label:
            plan.append((label, kind, spec(label, kind, extra=extra)))
    for label, kind, stack in ctx.started(plan, result, access_log=True):
        with Sampler(lambda: rss_of(stack.contender.worker_pids()), 0.25) as rss:
            m = measure(ctx, stack, duration)
        r, start = m["result"], m["start"]
        values = [v for _, sample in rss.samples for v in sample.values()]
        over = sum(1 for v in values if v > MAX_RSS)
        # One line per worker pid: [[seconds since start, MB], ...]
        per_pid: dict = {}
        for t, sample in rss.samples:
            for pid, v in sample.items():
                per_pid.setdefault(str(pid), []).append([round(t - start, 2), round(v / MB, 1)])
        row = {"contender": label, "failed": r.failed, "requests": r.requests, "rps": r.rps,
               "max_rss_mb": max(values) / MB if values else None,
               "over_pct": 100.0 * over / len(values) if values else None,
               "replacements": m["replacements"], "wrk": r.as_dict()}
        log.info("%s: %d failed, max RSS %s MB, %s%% over", label, r.failed,
                 row["max_rss_mb"], row["over_pct"])
        result.rows.append(row)
        result.series[label] = {"rss_mb": per_pid, "limit_mb": MAX_RSS / MB}
    add_ratios(result.rows, BASELINE, "rps")
    return result
