"""Scenario 1: throughput and latency, hello-world and ~1 ms CPU app.

Every contender runs the same app with the same number of workers behind
the same nginx; all are started first, then measured interleaved
(A B C A B C ...) so a noisy neighbour hits all of them alike.  Reported:
median requests/s, p50 and p99 latency, failed requests, and the
requests/s ratio against bare flup6.  Our worker also runs in variants
(threads, FastCGI keep-alive) to choose its defaults.
"""
from __future__ import annotations

import logging

from bench import wrk
from bench.contenders import Spec
from bench.scenario import Context, Result, add_ratios, median

log = logging.getLogger("bench")

NAME = "throughput"
TITLE = "Throughput and latency"
BASELINE = "flup"

APPS = (("hello", "bench.apps:hello"), ("cpu", "bench.apps:cpu"))

COLUMNS = [("app", "app", "s"), ("contender", "contender", "s"), ("rps", "req/s", ".0f"),
           ("ratio", "ratio vs flup", ".3f"), ("p50_ms", "p50 ms", ".2f"),
           ("p99_ms", "p99 ms", ".2f"), ("failed", "failed", "d"), ("runs", "runs", "d")]


def variants(ctx: Context, app: str) -> list[tuple[str, str, Spec]]:
    """(label, kind, spec) of every contender measured for ``app``."""
    n = ctx.workers
    out = [("flup", "flup", Spec(app=app, workers=n)),
           ("ours", "ours", Spec(app=app, workers=n))]
    if not ctx.smoke:
        # Our config refuses nginx.keepalive >= count * threads (an idle kept
        # connection pins a worker thread), so keep-alive is tried below that.
        out += [("ours threads=4", "ours", Spec(app=app, workers=n, threads=4)),
                ("ours keepalive=%d" % (n - 1), "ours", Spec(app=app, workers=n, keepalive=n - 1)),
                ("ours threads=4 keepalive=%d" % (2 * n), "ours",
                 Spec(app=app, workers=n, threads=4, keepalive=2 * n))]
    out += [("uwsgi", "uwsgi", Spec(app=app, workers=n))]
    return out


def run(ctx: Context) -> Result:
    result = Result(NAME, TITLE, BASELINE, COLUMNS)
    apps = APPS[:1] if ctx.smoke else APPS
    for app_name, app in apps:
        stacks = []
        try:
            for label, kind, spec in variants(ctx, app):
                why = ctx.can_run(kind, spec)
                if why:
                    result.skipped[label] = why
                    continue
                try:
                    stacks.append((label, ctx.session.start(kind, spec, label=label)))
                except Exception as exc:  # report the contender as failed, go on with the others
                    log.exception("%s did not start", label)
                    result.skipped[label] = "did not start: %s" % exc
            runs: dict = {label: [] for label, _ in stacks}
            for label, stack in stacks:           # warm-up: imports, caches, nginx pools
                wrk.run(stack.url, 1, ctx.connections)
            for rnd in range(ctx.rounds):
                for label, stack in stacks:
                    r = wrk.run(stack.url, ctx.duration, ctx.connections)
                    log.info("%s %s round %d: %.0f req/s p99 %.2f ms failed %d",
                             app_name, label, rnd, r.rps, r.p99 * 1e3, r.failed)
                    runs[label].append(r)
            rows = []
            for label, rs in runs.items():
                rows.append({"app": app_name, "contender": label,
                             "rps": median([r.rps for r in rs]),
                             "p50_ms": median([r.p50 * 1e3 for r in rs]),
                             "p99_ms": median([r.p99 * 1e3 for r in rs]),
                             "failed": sum(r.failed for r in rs), "runs": len(rs),
                             "all_rps": [r.rps for r in rs]})
            add_ratios(rows, BASELINE, "rps")
            result.rows += rows
            if app_name == "hello":
                for row in rows:
                    if row["contender"] in ("flup", "ours", "uwsgi") and row["rps"]:
                        ctx.shared["%s_rps_per_worker" % row["contender"]] = row["rps"] / ctx.workers
            ours = next((r for r in rows if r["contender"] == "ours"), None)
            if ours and ours["rps"]:
                # Per-request wall time in one worker, for the scoreboard-cost scenario.
                ctx.shared.setdefault("request_seconds", {})[app_name] = ctx.workers / ours["rps"]
        finally:
            for _, stack in stacks:
                ctx.session.stop(stack)
    result.series["rps"] = {"%s/%s" % (r["app"], r["contender"]): r["all_rps"] for r in result.rows}
    return result
