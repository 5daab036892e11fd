"""The watchdog for real: supervisord, workers, the listener, nginx, HTTP on loopback.

Each test keeps its load bounded (threads x duration) and asserts outcomes:
zero failed requests, which pids changed, what the logs and the state file say.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from harness import wait_for

pytestmark = pytest.mark.integration

MB = 1024 * 1024
FAST = {"check_interval": 0.5, "ready_timeout": "20s"}
RECYCLED = re.compile(r"recycled worker=(\w+) old_pid=(\d+) replacement=(\w+) new_pid=(\d+)"
                      r" reason='([^']*)'")


def recycled(c):
    return RECYCLED.findall(c.watchdog_log())


def state(c):
    with open(c.dep.state_path, encoding="utf-8") as f:
        return json.load(f)


def wait_idle(c, timeout=30):
    """Until the watchdog has no recycle in progress (its state file says so)."""
    wait_for(lambda: not state(c).get("recycle"), timeout, "the watchdog to finish its recycles")


class PidWatcher(threading.Thread):
    """Collects every worker pid seen and the fewest ready workers (a replacement
    still STARTING whose slot says ready counts, as for the watchdog), until stopped."""

    def __init__(self, cluster, interval=0.2):
        super().__init__(daemon=True)
        self.c, self.interval = cluster, interval
        self.seen: set[int] = set()
        self.min_ready = None
        self.halt = threading.Event()

    def run(self):
        while not self.halt.wait(self.interval):
            try:
                ready = self.c.ready_workers(starting=True)
                self.seen.update(self.c.pids().values())
            except OSError:
                continue
            n = len(ready)
            self.min_ready = n if self.min_ready is None else min(self.min_ready, n)

    def stop(self):
        self.halt.set()
        self.join(10)


def test_leaking_workers_are_recycled_before_the_limit_plus_one_interval(cluster):
    # The leak takes seconds to reach the limit: not flapping (flap_window 2 s).  Two
    # standby slots and max_concurrent 2: both workers may cross the limit together.
    c = cluster("wd_leak:application", name="wd", limits={"max_rss": "80MB"},
                workers={"count": 2, "standby": 2},
                recycle=dict(FAST, flap_window="2s", max_concurrent=2))
    first = c.ready_workers()
    # At most 2 clients x 10 requests/s = 20 MB/s of leak in all, so at most
    # 10 MB in one 0.5 s check interval even if one worker got every request.
    growth_per_interval = 10
    load = c.load("/", threads=2, duration=15, pause=0.1).start()
    load.join()
    assert load.failed == 0, load.summary()
    done = recycled(c)
    assert {old for _, old, _, _, _ in done} >= {str(p) for p in first.values()}, done
    for worker, old, _, new, reason in done:
        m = re.match(r"rss ([\d.]+)MB > 80MB", reason)
        assert m, reason
        assert float(m.group(1)) <= 80 + growth_per_interval + 1, (worker, reason)
    assert c.access_log_statuses().keys() <= {200}


def test_max_requests_recycles_only_offenders_with_zero_failures(cluster):
    c = cluster("wd_sleep:application", name="wd", limits={"max_requests": 50}, recycle=FAST)
    watcher = PidWatcher(c)
    watcher.start()
    try:
        load = c.load("/", threads=4, duration=15).start()
        load.join()
    finally:
        watcher.stop()
    assert load.failed == 0, load.summary()
    # A recycle may have begun just before the load ended: compare what changed
    # with what the watchdog did only once it has finished every recycle.
    wait_idle(c)
    done = recycled(c)
    assert len(done) >= 4, done
    assert all(reason.startswith("requests ") for *_, reason in done)
    # Only offenders' pids changed: every pid that went away was recycled by the watchdog.
    gone = watcher.seen - set(c.pids().values())
    assert gone <= {int(old) for _, old, _, _, _ in done}
    statuses = c.access_log_statuses()
    assert statuses[502] == 0 and statuses[504] == 0, statuses
    assert watcher.min_ready >= 2


def test_request_past_request_timeout_is_killed_and_others_keep_succeeding(cluster):
    c = cluster("wd_sleep:application", name="wd", recycle=FAST,
                limits={"request_timeout": "3s"}, workers={"count": 2, "threads": 2})
    before = c.pids()
    outcome = {}

    def stuck():
        outcome["sent"] = time.time()
        t0 = time.monotonic()
        try:
            outcome["status"] = c.get("/sleep?s=30", timeout=40).status
        except OSError as exc:
            outcome["status"] = repr(exc)
        outcome["took"] = time.monotonic() - t0

    t = threading.Thread(target=stuck, daemon=True)
    t.start()
    load = c.load("/", threads=2, duration=8, pause=0.02).start()
    t.join(20)
    load.join()
    assert not t.is_alive()
    assert outcome["status"] == 502, outcome           # nginx's answer for the killed request
    assert load.failed == 0, load.summary()
    log = c.watchdog_log()
    m = re.search(r"^(\S+ \S+) WARNING \S+ killing wd_0\d pid \d+: request_timeout"
                  r" GET /sleep\?s=30 running 3s", log, re.M)
    assert m, log
    # Killed within request_timeout + check_interval + 1 s of the request's start.
    killed_at = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    assert killed_at - outcome["sent"] <= 3 + 0.5 + 1, (killed_at - outcome["sent"], outcome)
    c.wait_ready(2, timeout=20)
    after = c.pids()
    assert len(set(before.values()) - set(after.values())) == 1


def test_slow_request_dumps_the_stack_naming_the_sleeping_function(cluster):
    c = cluster("wd_sleep:application", name="wd", recycle=FAST, limits={"slow_request": "1s"})
    r = c.get("/sleep?s=3", timeout=20)
    assert r.status == 200
    slot = r.text.split()[1]
    worker = next(n for n, p in c.pids().items() if str(p) == slot)
    logs = wait_for(lambda: "sleepy_handler" in c.worker_log(worker) and c.worker_log(worker),
                    10, "a stack dump in %s's log" % worker)
    assert "wd_sleep.py" in logs
    assert c.watchdog_log().count("slow_request GET /sleep?s=3") == 1


def test_fresh_workers_over_the_limit_cause_no_restart_storm(cluster):
    # Every fresh worker is over the limit, so each warm standby is promoted
    # soon after it waits (a flapping slot's own restart backs off): there is
    # no steady state with a waiting standby to start from, only ready workers.
    c = cluster("wd_fat:application", name="wd", recycle=FAST, limits={"max_rss": "40MB"},
                steady=False)
    load = c.load("/", threads=2, duration=15, pause=0.05).start()
    load.join()
    assert load.failed == 0, load.summary()
    st = state(c)
    total = sum(s["recycles"] for s in st["slots"].values())
    # Backoff 2, 4, 8 s...: a handful of recycles in 15 s, not one per check interval.
    assert 1 <= total <= 5, st
    assert any(s["flapping"] for s in st["slots"].values()), st
    log = c.watchdog_log()
    assert "is flapping: rss" in log and "raise the limit or fix the app" in log
    # A recycle may be finishing (its replacement ready but still STARTING): wait for it.
    assert len(c.wait_ready(2, timeout=30)) >= 2


def test_listener_killed_mid_recycle_resumes_and_nothing_is_lost(cluster):
    c = cluster("wd_sleep:application", name="wd", recycle=FAST, workers={"graceful_timeout": "20s"})
    before = c.ready_workers()
    # The serving slots depend on which warm standbys were promoted first.
    victim, other = sorted(before)
    # A slow request on every worker keeps the offender draining for a while.
    results = []

    def slow():
        try:
            results.append(c.get("/sleep?s=5", timeout=30).status)
        except OSError as exc:
            results.append(repr(exc))

    threads = [threading.Thread(target=slow, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    # Both slow requests are being served (each worker's scoreboard shows one in flight).
    wait_for(lambda: sum(1 for r in c.scoreboard() if r is not None and r.inflight) == 2,
             20, "a slow request in flight on each worker")
    ctl = subprocess.Popen([sys.executable, "-m", "fcgi_toolkit", "recycle", "-c", c.deploy_path,
                            victim, "--timeout", "60"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (state(c).get("recycle") or {}).get(victim, {}).get("phase") == "stopping",
                 20, "the recycle to reach its stopping phase")
        old_listener = c.rpc.supervisor.getProcessInfo("wd_watchdog")["pid"]
        os.kill(old_listener, signal.SIGKILL)
        out, _ = ctl.communicate(timeout=60)
    finally:
        if ctl.poll() is None:
            ctl.kill()
            ctl.wait(5)
    for t in threads:
        t.join(30)
    assert ctl.returncode == 0, out
    assert results == [200, 200], results
    new_listener = c.rpc.supervisor.getProcessInfo("wd_watchdog")["pid"]
    assert new_listener != old_listener
    after = c.wait_ready(2, timeout=20)
    st = state(c)
    assert st["recycle"] is None and st["slots"][victim]["recycles"] == 1, st
    assert after[other] == before[other] and before[victim] not in after.values(), (before, after)
    # The recycled slot is the next warm standby: 2 serve, 1 waits.
    warm = c.wait_warm(1)
    assert len(after) == 2 and len(warm) == 1 and not set(after) & set(warm)
    assert set(after) | set(warm) <= set(c.dep.slot_names())    # the rest: spare slots
    assert "resuming recycle of %s" % victim in c.watchdog_log()


def test_published_rss_is_caught_between_timed_checks(cluster):
    # check_interval 60 s: no timed pass runs during this test, so only the fast
    # poll of the RSS the workers publish in the scoreboard can notice the leak.
    c = cluster("wd_leak:application", name="wd", limits={"max_rss": "60MB"},
                recycle={"check_interval": "60s", "ready_timeout": "20s", "flap_window": "1s"})
    first = c.ready_workers()
    # One client, about 10 requests (10 MB) a second.
    load = c.load("/", threads=1, duration=30, pause=0.1).start()
    try:
        wait_for(lambda: recycled(c), 25, "a recycle by the fast poll")
    finally:
        load.stop()
        load.join()
    assert load.failed == 0, load.summary()
    done = recycled(c)
    assert done[0][1] in {str(p) for p in first.values()}, done
    for worker, old, _, new, reason in done:
        m = re.match(r"rss ([\d.]+)MB > 60MB", reason)
        assert m, reason
        # Caught within a few requests of the limit, not a check interval (60 s) later.
        assert float(m.group(1)) <= 60 + 5, (worker, reason)
    assert re.search(r"wd_0\d pid %s published rss [\d.]+MB > 60MB: checking now" % done[0][1],
                     c.watchdog_log()), c.watchdog_log()
    assert len(c.wait_ready(2, timeout=20)) == 2


def test_young_worker_that_grows_past_the_limit_is_replaced_without_backoff(cluster):
    # Default recycle.flap_window (60 s): each worker reaches the limit a few seconds
    # after its start, by serving; its replacement starts small, so no backoff.
    c = cluster("wd_leak:application", name="wd", limits={"max_rss": "60MB"},
                workers={"count": 2, "standby": 2}, recycle={"ready_timeout": "20s",
                                                             "max_concurrent": 2})
    first = c.ready_workers()
    watcher = PidWatcher(c, interval=0.05)
    watcher.start()
    load = c.load("/", threads=2, duration=15, pause=0.1).start()
    load.join()
    watcher.stop()
    assert load.failed == 0, load.summary()
    # Each recycle promoted a warm standby before its offender stopped.
    assert watcher.min_ready >= 2, watcher.min_ready
    done = recycled(c)
    assert c.watchdog_log().count("(warm standby, promoted)") >= len(done), c.watchdog_log()
    # Each first worker replaced, and replacements replaced in turn: no slot held back.
    assert {old for _, old, _, _, _ in done} >= {str(p) for p in first.values()}, done
    assert len(done) >= 3, done
    log = c.watchdog_log()
    assert "is flapping" not in log, log
    st = state(c)
    assert not any(s["flapping"] or s["backoff_until"] for s in st["slots"].values()), st
    assert c.access_log_statuses().keys() <= {200}


def _over_the_ceiling_while_imports_hang(c, serving, hold, watcher=None):
    """Under load, make one of ``serving`` jump over limits.max_rss_hard while a
    new worker's import hangs (``hold``): it is stopped at once, the other one
    serves alone, then imports go on.  Returns the fat pid and the load."""
    load = c.load("/", threads=2, duration=30, pause=0.05).start()
    try:
        body = c.get("/grow?mb=100", timeout=10).text
        fat = int(body.split()[1])
        assert fat in serving.values(), (body, serving)
        wait_for(lambda: fat not in c.pids().values(), 20, "the worker over the ceiling to stop")
        # No replacement was ready: the one other worker serves alone, and keeps serving.
        assert set(c.ready_workers().values()) == set(serving.values()) - {fat}
        assert load.failed == 0, load.summary()
        hold.unlink()
        assert len(c.wait_ready(2, timeout=30)) >= 2
    finally:
        load.stop()
        load.join()
        if watcher is not None:
            watcher.stop()
        if hold.exists():
            hold.unlink()
    assert load.failed == 0, load.summary()
    assert re.search(r"stopping wd_0\d pid %d at once: rss [\d.]+MB > 90MB "
                     r"\(limits.max_rss_hard\)" % fat, c.watchdog_log()), c.watchdog_log()
    return fat, load


def test_hard_ceiling_stops_a_worker_before_its_replacement_is_ready(cluster, tmp_path):
    # Cold standby: the replacement must import the app, and its import hangs.
    hold = tmp_path / "hold-import"
    c = cluster("wd_grow:application", name="wd", app={"environment": {"WD_HOLD_IMPORT": str(hold)}},
                workers={"warm_standby": False},
                limits={"max_rss": "50MB", "max_rss_hard": "90MB"},
                recycle={"check_interval": 0.5, "ready_timeout": "60s"})
    first = c.ready_workers()
    hold.write_text("held")           # from now on a new worker's import waits
    _over_the_ceiling_while_imports_hang(c, first, hold)
    assert c.access_log_statuses().keys() <= {200}


def test_hard_ceiling_with_no_warm_standby_left_stops_at_once_and_the_group_serves(
        cluster, tmp_path):
    # The warm standby takes over in an operator recycle while imports hang, so no
    # standby is left; then a worker jumps over the ceiling: stopped at once anyway.
    hold = tmp_path / "hold-import"
    c = cluster("wd_grow:application", name="wd", app={"environment": {"WD_HOLD_IMPORT": str(hold)}},
                limits={"max_rss": "50MB", "max_rss_hard": "90MB"},
                recycle={"check_interval": 0.5, "ready_timeout": "60s"})
    first, standby = c.ready_workers(), c.warm_workers()
    assert len(first) == 2 and len(standby) == 1
    hold.write_text("held")
    r = c.toolkit("recycle", "-c", c.deploy_path, sorted(first)[0], "--timeout", "30")
    assert r.returncode == 0, r.stdout + r.stderr
    serving = c.ready_workers()
    assert set(serving.values()) == (set(first.values()) - {first[sorted(first)[0]]}) | set(
        standby.values())
    assert c.warm_workers() == {}            # the next standby's import hangs
    watcher = PidWatcher(c, interval=0.05)
    watcher.start()
    _over_the_ceiling_while_imports_hang(c, serving, hold, watcher)
    assert watcher.min_ready >= 1, watcher.min_ready
    c.wait_warm(timeout=30)
