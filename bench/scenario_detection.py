"""Scenario 6: detection latency.

A worker of the ``grow`` app takes ``GROW_BYTES`` at once (``GET /grow``,
which answers with its pid and the time), crossing ``MAX_RSS``.  Measured:
seconds from that moment until a replacement worker is ready (it has
imported the app; for ours also its scoreboard slot says ready), with no
other load.  Ours samples every ``recycle.check_interval`` (1 s here),
memmon on supervisord's TICK_5, uWSGI after each request.  Repeated
``REPS`` times; the median is reported with the ratio against memmon.
"""
from __future__ import annotations

import logging
import time

from bench.contenders import Spec
from bench.scenario import Context, Result, add_ratios, http_get, median

log = logging.getLogger("bench")

NAME = "detection"
TITLE = "Detection latency"
BASELINE = "memmon"
APP = "bench.apps:grow"
MB = 1024 * 1024
MAX_RSS = 80 * MB
GROW = 96 * MB
TIMEOUT = 30.0
SETTLE = 2.0

COLUMNS = [("contender", "contender", "s"), ("median_s", "median s", ".2f"), ("max_s", "max s", ".2f"),
           ("ratio", "ratio vs memmon", ".3f"), ("detected", "detected", "s")]


def one(stack, timeout: float = TIMEOUT) -> float | None:
    """Grow one worker; seconds until a new worker is ready (None: not replaced in time)."""
    c = stack.contender
    c.wait_ready(60)
    # Let fresh workers age past both flap guards (1 s) before growing one.
    time.sleep(SETTLE)
    before = set(c.worker_pids())
    status, body = http_get(stack.url + "grow", timeout=30)
    if status != 200:
        log.warning("%s: /grow answered %s", c.label, status)
        return None
    pid, t0 = body.split()
    pid, t0 = int(pid), float(t0)
    deadline = time.time() + timeout
    while time.time() < deadline:
        ready = set(c.ready_pids())
        if pid not in ready and (ready - before):
            return time.time() - t0
        time.sleep(0.02)
    return None


def run(ctx: Context) -> Result:
    result = Result(NAME, TITLE, BASELINE, COLUMNS)
    reps = 1 if ctx.smoke else 4
    env = (("BENCH_GROW_BYTES", str(GROW)),)
    plan = [(BASELINE, "flup", Spec(app=APP, workers=ctx.workers, max_rss=MAX_RSS, env=env)),
            ("ours max_rss", "ours", Spec(app=APP, workers=ctx.workers, max_rss=MAX_RSS, env=env,
                                          check_interval=1.0, extra={"flap_window": 1.0})),
            ("uwsgi --reload-on-rss", "uwsgi", Spec(app=APP, workers=ctx.workers, max_rss=MAX_RSS, env=env))]
    result.notes.append("limit %d MB, one request adds %d MB; ours checks every 1 s, memmon on TICK_5"
                        % (MAX_RSS // MB, GROW // MB))
    result.notes.append("flap guards lowered to 1 s: ours recycle.flap_window, "
                        "uWSGI --min-worker-lifetime (default 10 s)")
    for label, kind, stack in ctx.started(plan, result):
        times = [one(stack) for _ in range(reps)]
        found = [t for t in times if t is not None]
        log.info("%s: detection %s", label, ["%.2f" % t if t is not None else "-" for t in times])
        result.rows.append({"contender": label, "median_s": median(found),
                            "max_s": max(found) if found else None,
                            "detected": "%d/%d" % (len(found), reps), "all_s": times})
    add_ratios(result.rows, BASELINE, "median_s")
    return result
