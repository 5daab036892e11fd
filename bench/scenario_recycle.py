"""Scenario 2: recycle storm under continuous load.

Every worker is replaced every ``PERIOD`` seconds or so while wrk runs:
ours through ``limits.max_requests``, uWSGI through ``--max-requests`` (both
set from the request rate measured first), and the baseline through a loop
that runs ``supervisorctl restart bench:bench_NN`` on one worker at a time
at the same rate.  Reported: failed requests, requests/s (ratio against the
baseline), and how many worker replacements actually happened.
"""
from __future__ import annotations

import logging
import threading
import time

from bench import nginx as nginx_mod
from bench import wrk
from bench.contenders import Spec
from bench.scenario import Context, Result, Sampler, add_ratios, distinct_pids

log = logging.getLogger("bench")

NAME = "recycle"
TITLE = "Recycle storm"
BASELINE = "supervisorctl restart loop"
APP = "bench.apps:hello"
PERIOD = 4.0          # seconds between two replacements of the same worker

COLUMNS = [("contender", "contender", "s"), ("failed", "failed", "d"), ("requests", "requests", "d"),
           ("rps", "req/s", ".0f"), ("ratio", "ratio vs restart loop", ".3f"),
           ("replacements", "replacements", "d")]


def calibrate(ctx: Context, kind: str = "flup") -> float:
    """Requests/s per worker of the hello app served by ``kind`` (measured in
    this run: by the throughput scenario, or here with a short wrk run)."""
    key = "%s_rps_per_worker" % kind
    known = ctx.shared.get(key)
    if known:
        return known
    stack = ctx.session.start(kind, Spec(app=APP, workers=ctx.workers), label="calibration")
    try:
        r = wrk.run(stack.url, 2 if not ctx.smoke else 1, ctx.connections)
    finally:
        ctx.session.stop(stack)
    ctx.shared[key] = max(r.rps / ctx.workers, 50.0)
    return ctx.shared[key]


def _restart_loop(stack, workers: int, period: float, stop: threading.Event, done: list) -> None:
    i = 0
    while not stop.wait(period / workers):
        proc = stack.contender.restart_one(i % workers)
        done.append((time.time(), proc.returncode))
        i += 1


def measure(ctx: Context, stack, duration: float, action=None) -> dict:
    """Run wrk for ``duration`` while sampling worker pids; ``action(stop)`` runs alongside."""
    stack.nginx.reopen_log()
    stop = threading.Event()
    thread = threading.Thread(target=action, args=(stop,), daemon=True) if action else None
    start = time.time()
    with Sampler(stack.contender.worker_pids, 0.2) as pids:
        proc = wrk.start(stack.url, duration, ctx.connections)
        if thread:
            thread.start()
        try:
            r = wrk.finish(proc, duration)
        finally:
            stop.set()
            if thread:
                thread.join(120)
    end = time.time()
    stack.nginx.stop()        # flushes the access log
    initial = set(pids.samples[0][1]) if pids.samples else set()
    return {"result": r, "start": start, "end": end, "replacements": len(distinct_pids(pids.samples) - initial),
            "timeline": nginx_mod.timeline(stack.nginx.access_log, start, end)}


def run(ctx: Context) -> Result:
    result = Result(NAME, TITLE, BASELINE, COLUMNS)
    duration = 4.0 if ctx.smoke else max(ctx.duration * 4, 12.0)
    period = 1.5 if ctx.smoke else PERIOD
    per_worker = calibrate(ctx)
    max_requests = max(50, int(per_worker * period))
    result.notes.append("max_requests = %d (%.0f req/s per worker x %.0f s); the restart loop "
                        "restarts one of %d workers every %.1f s" %
                        (max_requests, per_worker, period, ctx.workers, period / ctx.workers))
    plan = [(BASELINE, "flup", Spec(app=APP, workers=ctx.workers)),
            ("ours max_requests", "ours", Spec(app=APP, workers=ctx.workers, max_requests=max_requests)),
            ("uwsgi --max-requests", "uwsgi", Spec(app=APP, workers=ctx.workers, max_requests=max_requests))]
    for label, kind, stack in ctx.started(plan, result, access_log=True):
        action = None
        if kind == "flup":
            restarts: list = []
            action = lambda stop, s=stack, d=restarts: _restart_loop(s, ctx.workers, period, stop, d)
        m = measure(ctx, stack, duration, action)
        r = m["result"]
        log.info("%s: %d failed of %d, %.0f req/s, %d replacements",
                 label, r.failed, r.requests, r.rps, m["replacements"])
        result.rows.append({"contender": label, "failed": r.failed, "requests": r.requests,
                            "rps": r.rps, "replacements": m["replacements"], "wrk": r.as_dict()})
        result.series[label] = m["timeline"]
    add_ratios(result.rows, BASELINE, "rps")
    return result
