"""Operator views against a real supervisord, real workers, a real nginx.

A slow request is held open through nginx; while it runs, ``fcgi-toolkit
status``, ``status --json``, ``supervisorctl fcgi status`` and the metrics
endpoint must all show it on the worker serving it.
"""
from __future__ import annotations

import json
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import free_port, wait_for

pytestmark = pytest.mark.integration

SLOW = "/sleep?s=8"


def status_json(c) -> dict:
    r = c.toolkit("status", "-c", c.deploy_path, "--json", timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def scrape(port: int) -> dict:
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def try_scrape(port: int):
    try:
        return scrape(port)
    except OSError:
        return None


def test_slow_request_is_visible_everywhere(cluster):
    metrics_port = free_port()
    c = cluster("core_app:application", workers={"count": 2, "standby": 1},
                metrics={"listen": "127.0.0.1:%d" % metrics_port})
    result = {}

    def slow():
        result["response"] = c.get(SLOW, timeout=40)

    t = threading.Thread(target=slow, daemon=True)
    t.start()
    try:
        # status --json: one worker busy with exactly that request.
        def busy_worker():
            obj = status_json(c)
            busy = [w for w in obj["workers"] if w["inflight"] and w["inflight"]["uri"] == SLOW]
            return (obj, busy[0]) if busy else None

        obj, w = wait_for(busy_worker, 15, "status --json to show the slow request")
        assert w["state"] == "busy" and w["inflight"]["method"] == "GET"
        assert w["inflight"]["seconds"] >= 0 and w["pid"] == c.pids()[w["name"]]
        assert w["rss_bytes"] > 1024 * 1024 and w["age_seconds"] > 0
        assert obj["group"] == c.name and obj["count"] == 2 and obj["standby"] == 1
        assert obj["ready"] == 2
        states = sorted(x["state"] for x in obj["workers"])
        assert states == ["busy", "ready", "warm"], obj       # the warm standby accepts nothing

        # The human table names it too.
        r = c.toolkit("status", "-c", c.deploy_path, timeout=30)
        assert r.returncode == 0, r.stderr
        row = [line for line in r.stdout.splitlines() if line.startswith(w["name"] + " ")]
        assert row and " busy " in row[0] and ("GET %s (" % SLOW) in row[0], r.stdout
        assert "%s: 2/2 workers ready, 1 standby" % c.name in r.stdout

        # supervisorctl's plugin, through supervisorctl's own connection.
        out = c.ctl("fcgi", "status")
        assert ("GET %s (" % SLOW) in out and w["name"] in out, out

        # The metrics program (started by supervisord) reports it at scrape time.
        m = wait_for(lambda: try_scrape(metrics_port), 20, "the metrics endpoint")
        label = (("worker", w["name"]),)
        assert m[("fcgi_up", ())] == 1
        assert m[("fcgi_workers_ready", ())] == 2 and m[("fcgi_workers_count", ())] == 2
        assert m[("fcgi_worker_inflight_seconds", label)] > 0
        assert m[("fcgi_worker_state", (("state", "busy"), ("worker", w["name"])))] == 1
        assert m[("fcgi_worker_rss_bytes", label)] == pytest.approx(w["rss_bytes"], rel=0.5)
    finally:
        t.join(45)
    assert result["response"].status == 200

    # Afterwards the request is counted and nothing is in flight.
    obj = status_json(c)
    served = {x["name"]: x for x in obj["workers"]}[w["name"]]
    assert served["inflight"] is None and served["requests"] >= 1
    assert served["state"] == "ready"


def test_status_after_supervisord_stopped(cluster):
    c = cluster("core_app:application", workers={"count": 1, "standby": 1})
    assert status_json(c)["ready"] == 1
    c.stop()
    r = c.toolkit("status", "-c", c.deploy_path, timeout=30)
    assert r.returncode == 1
    assert "supervisord is not running" in r.stderr and r.stdout == ""


def test_fcgi_recycle_through_supervisorctl(cluster):
    """``supervisorctl fcgi recycle`` hands the request to the watchdog (H3's control)."""
    c = cluster("core_app:application", workers={"count": 2, "standby": 1},
                recycle={"check_interval": 0.5})
    before = c.ready_workers()
    victim = sorted(before)[0]
    out = c.ctl("fcgi", "recycle", victim, timeout=90)
    after = c.wait_ready()
    assert victim not in after or after[victim] != before[victim], out
    survivors = [n for n in before if n != victim]
    assert all(after.get(n) == before[n] for n in survivors), (before, after, out)
    obj = status_json(c)
    assert {x["name"]: x for x in obj["workers"]}[victim]["recycles"] >= 1, obj
