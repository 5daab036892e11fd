"""Scenario 8: a change of the worker count under load past capacity.

Every contender starts with ``ctx.workers`` (2) single-thread workers of the
``slow`` app (20 ms of sleep per request, so requests/s is the number of
serving workers over 20 ms) while wrk keeps 64 connections busy: more than
the workers serve, so any gap in service shows as a dip, and any request
the contender drops shows as a failure.  The count then goes up by one and,
later, back down, each time the way the contender's users change it:

- ours: ``workers.count`` edited in deploy.toml, then ``fcgi-toolkit apply``
  (``workers.max_slots`` rendered ahead: the new worker + the standby fit);
- uWSGI: ``processes`` edited in its ini file, then the ``touch-reload``
  file touched: a graceful reload of the instance (the master re-reads the
  ini); its default mode first (the app imported by the master, workers
  forked from it), then with ``--lazy-apps``;
- gunicorn: ``workers`` edited in its Python config file, then HUP to the
  master (new workers from the re-read file, the old ones stopped
  gracefully); nginx proxies HTTP to it on a unix socket.

Reported: failed requests (wrk: non-2xx and socket errors, whole run) and
the 99th percentile latency (the queue of 64 connections makes it ~0.7 s
without a change: what a gap in service adds shows there);
requests/s before the first change (median 0.5 s bin of nginx's access log)
and its ratio against ours; per change the worst 0.5 s bin from the trigger
until :data:`SETTLE` after the new count is in effect, over the lower of the
levels before and after that change (the dip: 1.0 is no loss beyond what
the count itself changes, 0.0 a bin without one completed request); the seconds from the trigger until the new count is
in effect (:func:`in_effect`); the level after it.
"""
from __future__ import annotations

import dataclasses
import logging
import subprocess
import time
from dataclasses import dataclass
from typing import Optional

from bench import nginx as nginx_mod
from bench.apps import SLOW_SECONDS
from bench.contenders import Spec
from bench.scenario import Context, Result, add_ratios, median, ratio
from bench.scenario_recycle import measure

log = logging.getLogger("bench")

NAME = "scale"
TITLE = "Worker count change under load"
BASELINE = "ours apply"
APP = "bench.apps:slow"
CONNECTIONS = 64          # past capacity: 2 workers x 1 thread serve 2 at a time
BIN = 0.5                 # seconds per throughput bin
WARMUP = 1.0              # seconds of load before the "before" level starts
SETTLE = 1.0              # seconds after "in effect" still counted as the change
EFFECT_TIMEOUT = 8.0      # seconds a change may take to be in effect

COLUMNS = [("contender", "contender", "s"), ("failed", "failed", "d"), ("requests", "requests", "d"),
           ("rps_before", "req/s before", ".0f"), ("ratio", "ratio vs ours", ".2f"),
           ("up_dip", "+1: dip", ".2f"), ("up_s", "+1: s to in effect", ".1f"),
           ("rps_up", "req/s after +1", ".0f"),
           ("down_dip", "-1: dip", ".2f"), ("down_s", "-1: s to in effect", ".1f"),
           ("rps_down", "req/s after -1", ".0f"), ("p99", "p99 s", ".2f"), ("in_effect", "in effect", "s")]


@dataclass(frozen=True)
class Change:
    """One change of the worker count (times in epoch seconds)."""
    old: int
    new: int
    trigger: float
    effect: Optional[float]       # None: not in effect within EFFECT_TIMEOUT
    trigger_ok: bool = True       # the trigger command (ours: apply) exited 0


def in_effect(live, ready, count: int, before) -> bool:
    """The new ``count`` serves: exactly ``count`` live workers, all ready,
    and none of ``before`` (the workers a reload replaces; empty for ours,
    which starts or stops only the difference)."""
    live = set(live)
    return len(live) == count and live <= set(ready) and not live & set(before)


def _rates(timeline: list, start: float, bin_seconds: float, inside) -> list:
    return [b["ok"] / bin_seconds for b in timeline if inside(start + b["t"], start + b["t"] + bin_seconds)]


def level(timeline: list, start: float, lo: float, hi: float, bin_seconds: float = BIN) -> Optional[float]:
    """Median requests/s of the bins wholly inside [lo, hi) (epoch seconds)."""
    return median(_rates(timeline, start, bin_seconds, lambda a, b: a >= lo and b <= hi))


def worst(timeline: list, start: float, lo: float, hi: float, bin_seconds: float = BIN) -> Optional[float]:
    """Lowest requests/s of the bins overlapping [lo, hi)."""
    rates = _rates(timeline, start, bin_seconds, lambda a, b: a < hi and b > lo)
    return min(rates) if rates else None


def summarize(timeline: list, start: float, end: float, changes: list,
              bin_seconds: float = BIN) -> list[dict]:
    """Per change: the level before it, the level after (from SETTLE after
    in effect until the next change or the end), the dip (the worst bin from
    the trigger until SETTLE after in effect, over the lower of the two
    levels) and the seconds to in effect."""
    out = []
    lo = start + WARMUP
    for i, ch in enumerate(changes):
        nxt = changes[i + 1].trigger if i + 1 < len(changes) else end
        settled = min((ch.effect if ch.effect is not None else nxt) + SETTLE, nxt)
        before = level(timeline, start, lo, ch.trigger, bin_seconds)
        after = None if ch.effect is None else level(timeline, start, settled, nxt, bin_seconds)
        # Fewer workers serve less: a dip is what falls below the lower of
        # the two steady levels (before, for a count that grows).
        floor = min(before, after) if before is not None and after is not None else before
        out.append({"old": ch.old, "new": ch.new, "before": before, "after": after,
                    "dip": ratio(worst(timeline, start, ch.trigger, settled, bin_seconds), floor),
                    "seconds": None if ch.effect is None else round(ch.effect - ch.trigger, 2),
                    "in_effect": ch.effect is not None and ch.trigger_ok})
        lo = settled
    return out


def _change(contender, old: int, new: int, stop) -> Change:
    """Trigger one change and poll until the new count is in effect (bounded)."""
    before = set(contender.worker_pids()) if contender.resize_replaces_workers else set()
    trigger = time.time()
    proc: Optional[subprocess.Popen] = contender.resize(new)
    effect = None
    while time.time() < trigger + EFFECT_TIMEOUT and not stop.is_set():
        if in_effect(contender.serving_pids(), contender.ready_pids(), new, before):
            effect = time.time()
            break
        time.sleep(0.1)
    ok = True
    if proc is not None:
        try:
            ok = proc.wait(60) == 0
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            ok = False
    log.info("%s: %d -> %d %s", contender.label, old, new,
             "in effect after %.2f s" % (effect - trigger) if effect else "NOT in effect")
    return Change(old, new, trigger, effect, ok)


def _changes(stack, steps: list, changes: list, stop) -> None:
    """At each ``(offset, old, new)`` of ``steps`` (seconds after start) change the count."""
    t0 = time.time()
    for offset, old, new in steps:
        if stop.wait(max(0.0, t0 + offset - time.time())):
            return
        changes.append(_change(stack.contender, old, new, stop))


def run(ctx: Context) -> Result:
    result = Result(NAME, TITLE, BASELINE, COLUMNS)
    n = ctx.workers
    duration, up_at, down_at = (12.0, 3.0, 7.5) if ctx.smoke else (24.0, 6.0, 15.0)
    steps = [(up_at, n, n + 1), (down_at, n + 1, n)]
    result.notes.append(
        "%d -> %d workers at %.0f s, back to %d at %.0f s, of %.0f s of wrk with %d connections "
        "on the slow app (%.0f ms per request, 1 thread per worker): req/s follows the workers "
        "serving; 'in effect': the live workers number the new count, all ready, none left from "
        "before a reload; dip: the worst %.1f s bin from the trigger until %.0f s after in effect, "
        "over the lower of the steady levels before and after the change"
        % (n, n + 1, up_at, n, down_at, duration, CONNECTIONS, SLOW_SECONDS * 1000, BIN, SETTLE))
    plan = [(BASELINE, "ours", Spec(app=APP, workers=n, extra={"max_slots": n + 2})),
            ("uwsgi touch-reload", "uwsgi", Spec(app=APP, workers=n, extra={"ini": True, "lazy_apps": False})),
            ("uwsgi touch-reload, lazy-apps", "uwsgi", Spec(app=APP, workers=n,
                                                           extra={"ini": True, "lazy_apps": True})),
            ("gunicorn HUP", "gunicorn", Spec(app=APP, workers=n))]
    load = dataclasses.replace(ctx, connections=CONNECTIONS)
    for label, kind, stack in ctx.started(plan, result, access_log=True):
        changes: list = []
        m = measure(load, stack, duration, lambda stop: _changes(stack, steps, changes, stop))
        r, start = m["result"], m["start"]
        bins = nginx_mod.timeline(stack.nginx.access_log, start, m["end"], BIN)
        s = summarize(bins, start, m["end"], changes) + [{}, {}]
        up, down = s[0], s[1]
        row = {"contender": label, "failed": r.failed, "requests": r.requests,
               "rps_before": up.get("before"), "up_dip": up.get("dip"), "up_s": up.get("seconds"),
               "rps_up": up.get("after"), "down_dip": down.get("dip"), "down_s": down.get("seconds"),
               "rps_down": down.get("after"), "p99": r.p99,
               "in_effect": "yes" if len(changes) == 2 and up["in_effect"] and down["in_effect"] else "NO",
               "changes": s[:len(changes)], "wrk": r.as_dict()}
        log.info("%s: %d failed of %d; dips %s / %s", label, r.failed, r.requests,
                 row["up_dip"], row["down_dip"])
        result.rows.append(row)
        result.series[label] = {
            "timeline": [{"t": b["t"], "ok": b["ok"] / BIN, "failed": b["failed"] / BIN} for b in bins],
            "reloads": [[c.trigger - start, (c.effect or c.trigger) - start] for c in changes]}
    add_ratios(result.rows, BASELINE, "rps_before")
    return result
