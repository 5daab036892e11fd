"""Scenario 7: the memory limit at the defaults a user gets.

The ``leak_rate`` app grows each worker 5 MB/s, then 20 MB/s, of serving
(the bytes kept per request follow the time between requests, so the growth
is the same for every contender whatever its request rate), under continuous
wrk load; the limit is 80 MB.  Unlike the ``leak``
scenario nothing is tuned: ours runs with the default recycle.flap_window
(60 s) and check_interval (1 s), uWSGI with its default min-worker-lifetime
(10 s), memmon on supervisord's TICK_5.

Every worker's RSS and the ready workers are sampled every
:data:`EVERY` seconds.  Reported per leak rate and contender: the highest
RSS, the share of samples over the limit, failed requests, recycles (new
worker pids) and *limit-to-ready*: from the first sample of a worker over
the limit to the first sample showing a new ready worker
(:func:`limit_to_ready`, median and max).  It includes the detection
itself, so it bounds detection-to-ready from above (by one sample, 0.1 s).

Ours runs at its defaults (a warm standby takes over at once,
``workers.warm_standby``) and, beside it, with ``warm_standby = false`` (the
standby slot is started when a replacement is needed): the measurement that
decides that default.  Beside them, :data:`VARIANTS`, each set explicitly:
one standby and one recycle at once, as the defaults were before 2026-12-02
(with the spare slot every standby has since).  The run that decided
``workers.standby``, ``recycle.max_concurrent`` and the spare slots is in
README.rst (Performance).
"""
from __future__ import annotations

import glob
import logging
import os
import re

from bench.contenders import Spec
from bench.scenario import Context, Result, Sampler, median, rss_of
from bench.scenario_recycle import measure

log = logging.getLogger("bench")

NAME = "memlimit"
TITLE = "Memory limit at the defaults"
BASELINE = "memmon"
APP = "bench.apps:leak_rate"
MB = 1024 * 1024
MAX_RSS = 80 * MB
RATES = (5 * MB, 20 * MB)      # growth per worker per second
EVERY = 0.1
COLD = "ours warm_standby = false"
#: Ours's variants beside its defaults, each set explicitly so that a row means
#: the same configuration whatever the defaults are: what decides them.
VARIANTS = (
    ("ours standby 1, max_concurrent 1 (and its spare slot)",
     {"standby": 1, "max_concurrent": 1}),
)

COLUMNS = [("rate", "leak MB/s", "s"), ("contender", "contender", "s"),
           ("max_rss_mb", "peak RSS MB", ".1f"), ("over_pct", "% samples over limit", ".1f"),
           ("failed", "failed", "d"), ("requests", "requests", "d"),
           ("replacements", "recycles", "d"), ("ready_median_s", "limit-to-ready median s", ".2f"),
           ("ready_max_s", "limit-to-ready max s", ".2f"),
           ("took_median_s", "ours: recycle begin-to-ready median s (watchdog log)", ".2f"),
           ("took_max_s", "ours: recycle begin-to-ready max s", ".2f")]

TOOK = re.compile(r"recycled worker=\S+ .* took=([\d.]+)s")


def watchdog_took(contender) -> list[float]:
    """Ours: each recycle's begin-to-ready as the watchdog logs it (``took=``); a
    recycle begins at detection when a standby is free, later when it had to wait
    for one (limit-to-ready includes that wait).  [] for other contenders."""
    log_dir = os.path.join(getattr(contender, "runtime_dir", "") or "/nonexistent", "log")
    out: list[float] = []
    for path in glob.glob(os.path.join(log_dir, "*watchdog*.log")):
        with open(path, encoding="utf-8", errors="replace") as f:
            out += [float(m.group(1)) for m in TOOK.finditer(f.read())]
    return out


def limit_to_ready(samples: list, limit: int) -> list[float]:
    """Seconds from each worker's first sample over ``limit`` to the first later
    sample showing a new ready worker (each new worker answers one offender).

    ``samples``: [(t, ({pid: rss}, [ready pids])), ...] in time order.
    """
    if not samples:
        return []
    crossed: dict[int, float] = {}
    appeared: list[tuple[float, int]] = []
    seen_ready = set(samples[0][1][1])
    for t, (rss, ready) in samples:
        for pid, value in rss.items():
            if value > limit and pid not in crossed:
                crossed[pid] = t
        for pid in ready:
            if pid not in seen_ready:
                seen_ready.add(pid)
                appeared.append((t, pid))
    out, used = [], set()
    for pid, t_over in sorted(crossed.items(), key=lambda kv: kv[1]):
        for t_ready, new in appeared:
            if new not in used and new != pid and t_ready >= t_over:
                used.add(new)
                out.append(t_ready - t_over)
                break
    return out


def run(ctx: Context) -> Result:
    result = Result(NAME, TITLE, BASELINE, COLUMNS)
    duration = 8.0 if ctx.smoke else ctx.duration * 12
    rates = RATES[:1] if ctx.smoke else RATES
    result.notes.append("limit %d MB, %.0f s of wrk load per leak rate and contender, defaults: "
                        "ours recycle.flap_window 60 s, check_interval 1 s, two warm standbys "
                        "with a spare slot each, max_concurrent 2; "
                        "uWSGI min-worker-lifetime 10 s; memmon on TICK_5" % (
                            MAX_RSS // MB, duration))
    result.notes.append("limit-to-ready: first RSS sample over the limit to the first sample "
                        "with a new ready worker (samples every %.1f s)" % EVERY)
    for growth in rates:
        plan = []
        for label, kind, extra in ((BASELINE, "flup", {}),
                                   ("ours defaults", "ours", {}),
                                   (COLD, "ours", {"warm_standby": False}),
                                   ("uwsgi --reload-on-rss", "uwsgi",
                                    {"min_worker_lifetime": None}),
                                   *((label, "ours", extra) for label, extra in VARIANTS)):
            spec = Spec(app=APP, workers=ctx.workers, max_rss=MAX_RSS, extra=extra,
                        env=(("BENCH_LEAK_RATE", str(growth)),))
            plan.append((label, kind, spec))
        for label, kind, stack in ctx.started(plan, result, access_log=True):
            c = stack.contender
            with Sampler(lambda: (rss_of(c.worker_pids()), c.ready_pids()), EVERY) as s:
                m = measure(ctx, stack, duration)
            r = m["result"]
            values = [v for _, (rss, _) in s.samples for v in rss.values()]
            times = limit_to_ready(s.samples, MAX_RSS)
            took = watchdog_took(c)
            row = {"rate": "%d" % (growth // MB), "contender": label, "failed": r.failed,
                   "requests": r.requests,
                   "max_rss_mb": max(values) / MB if values else None,
                   "over_pct": 100.0 * sum(1 for v in values if v > MAX_RSS) / len(values)
                   if values else None,
                   "replacements": m["replacements"], "ready_median_s": median(times),
                   "ready_max_s": max(times) if times else None, "ready_all_s": times,
                   "took_median_s": median(took), "took_max_s": max(took) if took else None}
            log.info("%d MB/s %s: peak %.1f MB, %d failed, %d recycles, limit-to-ready %s",
                     growth // MB, label, row["max_rss_mb"] or 0, r.failed, m["replacements"],
                     ["%.2f" % t for t in times])
            result.rows.append(row)
    return result
