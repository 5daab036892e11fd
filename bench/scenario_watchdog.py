"""Scenario 5: what the watchdog costs.

1. CPU of our listener with 16 workers sampled every 1 s, over a quiet
   window, as a share of one core; the baseline is superlance's memmon
   watching the same 16 workers on plain supervisord (it wakes on TICK_5,
   so it does five times less work by design).
2. The scoreboard's cost per request: ``SlotWriter.begin`` + ``end`` timed
   in a loop, against the per-request time of our worker measured by the
   throughput scenario in the same run (or a short measurement here).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time

from bench import wrk
from bench.contenders import Spec
from bench.scenario import Context, Result

log = logging.getLogger("bench")

NAME = "watchdog"
TITLE = "Watchdog cost"
BASELINE = "memmon"
WORKERS = 16
MB = 1024 * 1024

COLUMNS = [("contender", "measured", "s"), ("cpu_pct", "% of one core", ".3f"),
           ("ratio", "ratio vs memmon", ".2f"), ("per_request_us", "us per request", ".2f"),
           ("share_pct", "% of request time", ".3f")]


def cpu_seconds(pid: int) -> float:
    import psutil
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def listener_pid(stack) -> int | None:
    """The watchdog process: ours names it bench_watchdog, the baseline memmon."""
    rpc = stack.contender.rpc()
    for info in rpc.supervisor.getAllProcessInfo():
        if info["name"] in ("bench_watchdog", "memmon") and info["pid"]:
            return info["pid"]
    return None


def listener_cpu(ctx: Context, kind: str, label: str, window: float) -> dict | str:
    spec = Spec(app="bench.apps:hello", workers=WORKERS, max_rss=1024 * MB, check_interval=1.0)
    why = ctx.can_run(kind, spec)
    if why:
        return why
    stack = ctx.session.start(kind, spec, label=label, timeout=180)
    try:
        time.sleep(2.0)                       # past start-up work
        pid = listener_pid(stack)
        if pid is None:
            return "no listener process found"
        c0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(window)
        c1, t1 = cpu_seconds(pid), time.monotonic()
    finally:
        ctx.session.stop(stack)
    return {"contender": label, "cpu_pct": 100.0 * (c1 - c0) / (t1 - t0),
            "window_s": round(t1 - t0, 1), "workers": WORKERS}


def scoreboard_cost(iterations: int) -> float:
    """Seconds one begin()+end() pair takes in this process."""
    from fcgi_toolkit.scoreboard import SlotWriter
    with tempfile.TemporaryDirectory() as d:
        w = SlotWriter(os.path.join(d, "scoreboard"), 0, 4, os.getpid(), time.time())
        try:
            for _ in range(1000):
                w.end(w.begin("GET", "/warm"))
            t = time.perf_counter()
            for _ in range(iterations):
                w.end(w.begin("GET", "/some/page?x=1"))
            return (time.perf_counter() - t) / iterations
        finally:
            w.close()


def request_seconds(ctx: Context) -> float | None:
    """Per-request wall time in one worker of the hello app (ours, else bare flup)."""
    known = ctx.shared.get("request_seconds", {}).get("hello")
    if known:
        return known
    for kind in ("ours", "flup"):
        spec = Spec(app="bench.apps:hello", workers=ctx.workers)
        if ctx.can_run(kind, spec):
            continue
        stack = ctx.session.start(kind, spec, label="%s (request time)" % kind)
        try:
            r = wrk.run(stack.url, 2, ctx.connections)
        finally:
            ctx.session.stop(stack)
        return ctx.workers / r.rps if r.rps else None
    return None


def run(ctx: Context) -> Result:
    result = Result(NAME, TITLE, BASELINE, COLUMNS)
    window = 5.0 if ctx.smoke else 20.0
    if not ctx.smoke:
        for kind, label in (("flup", BASELINE), ("ours", "ours listener")):
            try:
                row = listener_cpu(ctx, kind, label, window)
            except Exception as exc:
                log.exception("%s did not run", label)
                row = "failed: %s" % exc
            if isinstance(row, str):
                result.skipped[label] = row
            else:
                log.info("%s: %.3f%% of one core for %d workers", label, row["cpu_pct"], WORKERS)
                result.rows.append(row)
        base = next((r["cpu_pct"] for r in result.rows if r["contender"] == BASELINE), None)
        for r in result.rows:
            r["ratio"] = round(r["cpu_pct"] / base, 2) if base else None
        result.notes.append("%d workers, ours sampling every 1 s, memmon on TICK_5; %.0f s quiet window"
                            % (WORKERS, window))
    else:
        result.skipped["listener CPU"] = "not in --smoke (needs 16 workers)"
    try:
        per = scoreboard_cost(20000 if ctx.smoke else 200000)
        req = request_seconds(ctx)
        result.rows.append({"contender": "scoreboard begin+end", "per_request_us": per * 1e6,
                            "share_pct": 100.0 * per / req if req else None,
                            "request_us": req * 1e6 if req else None})
        result.notes.append("scoreboard share = begin+end time / per-request time of one worker "
                            "(%s us, hello app)" % ("%.0f" % (req * 1e6) if req else "?"))
    except ImportError as exc:
        result.skipped["scoreboard"] = "fcgi_toolkit.scoreboard not importable: %s" % exc
    return result
