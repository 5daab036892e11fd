"""Scenario 3: rolling reload under continuous load.

While wrk runs, every worker is restarted twice: ours with
``fcgi-toolkit reload``, the baseline with ``supervisorctl restart bench:*``
and uWSGI with a chain reload (master FIFO ``c``, ``--lazy-apps``).
Reported: failed requests, requests/s (ratio against the baseline), the
deepest one-second dip relative to the median second before the first
reload, and whether every worker was really replaced.
"""
from __future__ import annotations

import logging
import time

from bench.contenders import Spec
from bench.scenario import Context, Result, add_ratios, median
from bench.scenario_recycle import measure

log = logging.getLogger("bench")

NAME = "reload"
TITLE = "Rolling reload"
BASELINE = "supervisorctl restart bench:*"
APP = "bench.apps:hello"

COLUMNS = [("contender", "contender", "s"), ("failed", "failed", "d"), ("requests", "requests", "d"),
           ("rps", "req/s", ".0f"), ("ratio", "ratio vs restart bench:*", ".3f"),
           ("dip", "worst second / normal", ".2f"), ("reload_s", "reload s", ".1f"),
           ("replaced", "all replaced", "s")]


def _reloads(stack, times: list, marks: list, stop) -> None:
    """Reload at each offset in ``times`` (seconds after start)."""
    t0 = time.time()
    for offset in times:
        if stop.wait(max(0.0, t0 + offset - time.time())):
            return
        before = set(stack.contender.worker_pids())
        started = time.time()
        stack.contender.reload()
        # Some reloads return at once (uWSGI's FIFO); wait until every worker
        # that served before has been replaced and all are ready again.
        deadline = started + 60
        while time.time() < deadline and not stop.is_set():
            ready = set(stack.contender.ready_pids())
            if len(ready) >= stack.contender.spec.workers and not (ready & before):
                break
            time.sleep(0.1)
        ready = set(stack.contender.ready_pids())
        marks.append({"start": started, "end": time.time(),
                      "replaced": bool(before) and not (ready & before)})


def dip(timeline: list, start: float, marks: list) -> float | None:
    """Worst one-second throughput during the reloads over the median second before them."""
    if not marks:
        return None
    first = marks[0]["start"] - start
    normal = median([b["ok"] for b in timeline if 1 <= b["t"] < first - 1])
    during = [b["ok"] for b in timeline
              if any(m["start"] - start - 1 <= b["t"] <= m["end"] - start for m in marks)]
    if not normal or not during:
        return None
    return round(min(during) / normal, 3)


def run(ctx: Context) -> Result:
    result = Result(NAME, TITLE, BASELINE, COLUMNS)
    duration = 6.0 if ctx.smoke else max(ctx.duration * 4, 20.0)
    times = [2.0] if ctx.smoke else [4.0, duration / 2 + 2]
    plan = [(BASELINE, "flup", Spec(app=APP, workers=ctx.workers)),
            ("ours reload", "ours", Spec(app=APP, workers=ctx.workers)),
            ("uwsgi chain reload", "uwsgi", Spec(app=APP, workers=ctx.workers))]
    for label, kind, stack in ctx.started(plan, result, access_log=True):
        marks: list = []
        m = measure(ctx, stack, duration, lambda stop: _reloads(stack, times, marks, stop))
        r, start = m["result"], m["start"]
        row = {"contender": label, "failed": r.failed, "requests": r.requests, "rps": r.rps,
               "dip": dip(m["timeline"], start, marks),
               "reload_s": median([mk["end"] - mk["start"] for mk in marks]),
               "replaced": "yes" if marks and all(mk["replaced"] for mk in marks) else "NO",
               "reloads": len(marks), "wrk": r.as_dict()}
        log.info("%s: %d failed of %d, %.0f req/s, dip %s", label, r.failed, r.requests, r.rps, row["dip"])
        result.rows.append(row)
        result.series[label] = {"timeline": m["timeline"],
                                "reloads": [[mk["start"] - start, mk["end"] - start] for mk in marks]}
    add_ratios(result.rows, BASELINE, "rps")
    return result
