"""``fcgi-toolkit apply`` and SIGHUP to ``run`` for real, under load past capacity:
64 connections on 2 single-thread workers of a slow endpoint, zero failed requests."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from harness import Cluster, free_port, wait_for

pytestmark = pytest.mark.integration

FAST = {"check_interval": 0.5, "ready_timeout": "15s"}
SLOW = "/sleep?s=0.05"       # 2 workers x 1 thread: ~40 requests/s, 64 clients queue


def _threads_of_ready_workers(c):
    """Each ready worker's thread count, from its own log line of this life."""
    out = {}
    for slot, pid in c.ready_workers().items():
        lines = [ln for ln in c.worker_log(slot).splitlines() if "serving " in ln]
        out[slot] = lines[-1].rsplit("with ", 1)[-1] if lines else ""
    return out


def _under_load_until_recycled_by_requests(c, change):
    """``change()`` under 64 connections past capacity, then until the watchdog
    recycles by the new limits.max_requests (it is in effect); zero failed
    requests.  Returns what ``change`` returned."""
    load = c.load(SLOW, threads=64, duration=60).start()
    try:
        wait_for(lambda: load.total >= 64, 20, "the load to be served before the change")
        result = change()
        wait_for(lambda: "reason='requests " in c.watchdog_log(), 30,
                 "a recycle by the new max_requests")
    finally:
        load.stop()
        load.join()
    assert load.failed == 0, load.summary()
    return result


def test_apply_under_load_limits_threads_and_nginx_with_zero_failures(cluster):
    c = cluster("core_app:application", name="ap", recycle=dict(FAST),
                workers={"threads": 1})
    assert c.status_json()["drift"] == []
    # nginx was started only once a worker accepted: no 502 at a fresh start.
    log = c.supervisord_log()
    assert log.index("spawned: 'ap_nginx'") > log.index("success: ap_0"), log
    nginx_pid = c.rpc.supervisor.getProcessInfo("ap_nginx")["pid"]
    c.edit(limits={"max_requests": 40}, workers={"threads": 2},
          nginx={"read_timeout": "45s"}, recycle={"flap_window": "1s"})
    before = c.status_json()
    assert set(before["drift"]) == {"limits.max_requests", "workers.threads",
                                    "nginx.read_timeout", "recycle.flap_window"}
    r = c.toolkit("status", "-c", c.deploy_path, timeout=30)
    assert "differs from the running deployment" in r.stdout
    r = _under_load_until_recycled_by_requests(
        c, lambda: c.toolkit("apply", "-c", c.deploy_path, timeout=120))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nginx reloaded gracefully" in r.stdout and "reloaded 2 workers" in r.stdout
    after = c.status_json()
    assert after["drift"] == []
    c.wait_ready(2, timeout=30)
    assert set(_threads_of_ready_workers(c).values()) == {"2 thread(s)"}
    site = open(os.path.join(c.runtime_dir, "nginx-site.conf")).read()
    assert "fastcgi_read_timeout 45s;" in site
    assert c.rpc.supervisor.getProcessInfo("ap_nginx")["pid"] == nginx_pid   # HUP: same nginx
    statuses = c.access_log_statuses()
    assert statuses[502] == 0 and statuses[504] == 0, statuses

    # A key only `run` sets up is reported by name, not skipped.
    c.edit(metrics={"listen": "127.0.0.1:%d" % free_port()})
    r = c.toolkit("apply", "-c", c.deploy_path, timeout=60)
    assert r.returncode == 1 and "stop and run again: metrics.listen" in r.stderr, r.stdout + r.stderr
    assert c.status_json()["drift"] == ["metrics.listen"]


def test_watched_deployment_file_is_applied_when_it_changes_zero_failures(cluster):
    c = cluster("core_app:application", name="wa", recycle=dict(FAST), workers={"threads": 1})
    # The watch itself is a watchdog key: applied in place by an explicit apply.
    c.edit(recycle={"watch": [c.deploy_path], "debounce": 0.5})
    r = c.toolkit("apply", "-c", c.deploy_path, timeout=60)
    assert r.returncode == 0 and c.status_json()["drift"] == [], r.stdout + r.stderr
    def edit():
        c.edit(limits={"max_requests": 40})      # no apply: the watchdog sees the edit
        wait_for(lambda: c.status_json()["drift"] == [], 60, "the watched file's apply")

    _under_load_until_recycled_by_requests(c, edit)
    assert "deployment file %s changed: applying it" % c.deploy_path in c.watchdog_log()
    # A bad edit of the watched file changes nothing: the running values stay.
    c.edit(limits={"max_requests": -3})
    wait_for(lambda: "limits.max_requests = -3" in c.watchdog_log(), 30,
             "the watched file's failed apply to name the key and value")
    assert c.ready_workers() and _running_max_requests(c) == 40


def test_an_edit_reaches_a_restarted_worker_only_through_apply(cluster):
    """The processes read the file as last applied (<runtime.dir>/applied.toml):
    a worker that restarts on its own after an edit still runs what was applied."""
    c = cluster("core_app:application", name="pin", recycle=dict(FAST),
                workers={"count": 2, "standby": 0}, app={"environment": {"RELEASE": "1"}})

    def releases() -> set:
        return {json.loads(c.get("/osenv?k=RELEASE").text)["RELEASE"] for _ in range(10)}
    assert releases() == {"1"}
    c.edit(app={"environment": {"RELEASE": "2"}})
    before = c.wait_ready(2)
    for pid in before.values():
        os.kill(pid, signal.SIGKILL)             # supervisord starts them again (autorestart)
    wait_for(lambda: len(set(c.ready_workers().values()) - set(before.values())) == 2, 60,
             "both workers back")
    assert releases() == {"1"}
    assert c.status_json()["drift"] == ["app.environment"]
    r = c.toolkit("apply", "-c", c.deploy_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: releases() == {"2"}, 60, "the applied environment")
    with open(os.path.join(c.runtime_dir, "applied.toml"), encoding="utf-8") as f:
        assert f.read() == open(c.deploy_path, encoding="utf-8").read()


def _running_max_requests(c):
    with open(os.path.join(c.runtime_dir, "applied.json"), encoding="utf-8") as f:
        return json.load(f)["limits.max_requests"]


def test_sighup_to_run_applies_the_edit_with_zero_failures_and_term_still_stops(tmp_path):
    c = Cluster(tmp_path / "run0", "core_app:application", name="hup", recycle=dict(FAST),
                workers={"threads": 1})
    c.proc = subprocess.Popen([sys.executable, "-m", "fcgi_toolkit", "run", "-c", c.deploy_path],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=open(os.path.join(str(tmp_path), "run.err"), "wb"),
                              start_new_session=True)
    try:
        wait_for(c._rpc_up, 30, "supervisord started by run")
        c.wait_ready(2, timeout=60)
        c.edit(workers={"threads": 3})
        assert c.status_json()["drift"] == ["workers.threads"]
        load = c.load(SLOW, threads=64, duration=60).start()
        try:
            wait_for(lambda: load.total >= 64, 20, "the load to be served before the HUP")
            c.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: c.status_json()["drift"] == [], 90, "the HUP's apply")
        finally:
            load.stop()
            load.join()
        assert load.failed == 0, load.summary()
        assert c.proc.poll() is None                       # HUP did not end the deployment
        c.wait_ready(2, timeout=30)
        assert set(_threads_of_ready_workers(c).values()) == {"3 thread(s)"}
        c.proc.send_signal(signal.SIGTERM)
        assert c.proc.wait(60) == 0
    finally:
        c.stop()


def _active(c):
    return [n for n, i in c.process_info().items() if i["statename"] in ("STARTING", "RUNNING")]


def test_count_2_3_2_and_standby_1_2_without_a_group_restart_zero_failures(cluster):
    c = cluster("core_app:application", name="cnt", recycle=dict(FAST),
                workers={"threads": 1, "max_slots": 5})
    # Two serving and the warm standby run; slots 03 and 04 are spare.
    assert len(c.process_info()) == 5 and len(_active(c)) == 3
    assert len(c.ready_workers()) == 2 and len(c.warm_workers()) == 1
    load = c.load(SLOW, threads=64, duration=90).start()
    try:
        wait_for(lambda: load.total >= 64, 20, "the load to be served before apply")
        c.edit(workers={"count": 3})
        assert c.status_json()["drift"] == ["workers.count"]
        r = c.toolkit("apply", "-c", c.deploy_path, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        c.wait_ready(3, timeout=30)
        c.edit(workers={"count": 2})
        r = c.toolkit("apply", "-c", c.deploy_path, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: len(_active(c)) == 3 and len(c.ready_workers()) == 2, 30,
                 "count back to 2 (and the warm standby)")
        c.edit(workers={"standby": 2})
        r = c.toolkit("apply", "-c", c.deploy_path, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: [w["state"] for w in c.status_json()["workers"]].count("warm") == 2, 20,
                 "two warm standbys")
    finally:
        load.stop()
        load.join()
    assert load.failed == 0, load.summary()
    after = c.status_json()
    assert after["drift"] == [] and (after["count"], after["standby"]) == (2, 2)
    assert len(c.ready_workers()) == 2 and len(after["workers"]) == 4   # slot 04 spare: hidden
    assert "Creating socket" not in c.supervisord_log().split("spawned: 'cnt_01'", 1)[1]
    statuses = c.access_log_statuses()
    assert statuses[502] == 0 and statuses[504] == 0, statuses
    # Beyond workers.max_slots a count change takes a new generation
    # (4 + 2 standbys + a spare slot each: 8 slots).
    c.edit(workers={"count": 4})
    r = c.toolkit("apply", "-c", c.deploy_path, timeout=120)
    assert r.returncode == 0 and "generation 1 -> 2" in r.stdout, r.stdout + r.stderr
    c.follow_generation()
    assert c.dep.group == "cnt_g2" and len(c.process_info()) == 8
    wait_for(lambda: len(c.ready_workers()) == 4, 30, "four serving workers of generation 2")
