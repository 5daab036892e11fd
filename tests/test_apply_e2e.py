"""``fcgi-toolkit apply`` and SIGHUP to ``run`` for real, under load past capacity:
64 connections on 2 single-thread workers of a slow endpoint, zero failed requests."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from harness import Cluster, toml_dumps, wait_for

pytestmark = pytest.mark.integration

FAST = {"check_interval": 0.5, "ready_timeout": "15s"}
SLOW = "/sleep?s=0.05"       # 2 workers x 1 thread: ~40 requests/s, 64 clients queue


def _edit(c, **sections):
    for section, table in sections.items():
        c.config.setdefault(section, {}).update(table)
    with open(c.deploy_path, "w", encoding="utf-8") as f:
        f.write(toml_dumps(c.config))


def _drift(c):
    r = c.toolkit("status", "-c", c.deploy_path, "--json", timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def _threads_of_ready_workers(c):
    """Each ready worker's thread count, from its own log line of this life."""
    out = {}
    for slot, pid in c.ready_workers().items():
        lines = [ln for ln in c.worker_log(slot).splitlines() if "serving " in ln]
        out[slot] = lines[-1].rsplit("with ", 1)[-1] if lines else ""
    return out


def test_apply_under_load_limits_threads_and_nginx_with_zero_failures(cluster):
    c = cluster("core_app:application", name="ap", recycle=dict(FAST),
                workers={"threads": 1})
    assert _drift(c)["drift"] == []
    # nginx was started only once a worker accepted: no 502 at a fresh start.
    log = c.supervisord_log()
    assert log.index("spawned: 'ap_nginx'") > log.index("success: ap_0"), log
    nginx_pid = c.rpc.supervisor.getProcessInfo("ap_nginx")["pid"]
    _edit(c, limits={"max_requests": 40}, workers={"threads": 2},
          nginx={"read_timeout": "45s"}, recycle={"flap_window": "1s"})
    before = _drift(c)
    assert set(before["drift"]) == {"limits.max_requests", "workers.threads",
                                    "nginx.read_timeout", "recycle.flap_window"}
    r = c.toolkit("status", "-c", c.deploy_path, timeout=30)
    assert "differs from the running deployment" in r.stdout
    load = c.load(SLOW, threads=64, duration=60).start()
    try:
        wait_for(lambda: load.total >= 64, 20, "the load to be served before apply")
        r = c.toolkit("apply", "-c", c.deploy_path, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        # The new limit is in effect: the watchdog recycles by it under this load.
        wait_for(lambda: "reason='requests " in c.watchdog_log(), 30,
                 "a recycle by the new max_requests")
    finally:
        load.stop()
        load.join()
    assert load.failed == 0, load.summary()
    assert "nginx reloaded gracefully" in r.stdout and "reloaded 2 workers" in r.stdout
    after = _drift(c)
    assert after["drift"] == []
    c.wait_ready(2, timeout=30)
    assert set(_threads_of_ready_workers(c).values()) == {"2 thread(s)"}
    site = open(os.path.join(c.runtime_dir, "nginx-site.conf")).read()
    assert "fastcgi_read_timeout 45s;" in site
    assert c.rpc.supervisor.getProcessInfo("ap_nginx")["pid"] == nginx_pid   # HUP: same nginx
    statuses = c.access_log_statuses()
    assert statuses[502] == 0 and statuses[504] == 0, statuses

    # A key that needs a new supervisord is reported by name, not skipped.
    _edit(c, workers={"socket_mode": "0600"})
    r = c.toolkit("apply", "-c", c.deploy_path, timeout=60)
    assert r.returncode == 1 and "workers.socket_mode" in r.stderr, r.stdout + r.stderr
    assert _drift(c)["drift"] == ["workers.socket_mode"]


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
        _edit(c, workers={"threads": 3})
        assert _drift(c)["drift"] == ["workers.threads"]
        load = c.load(SLOW, threads=64, duration=60).start()
        try:
            wait_for(lambda: load.total >= 64, 20, "the load to be served before the HUP")
            c.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: _drift(c)["drift"] == [], 90, "the HUP's apply")
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
        _edit(c, workers={"count": 3})
        assert _drift(c)["drift"] == ["workers.count"]
        r = c.toolkit("apply", "-c", c.deploy_path, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        c.wait_ready(3, timeout=30)
        _edit(c, workers={"count": 2})
        r = c.toolkit("apply", "-c", c.deploy_path, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: len(_active(c)) == 3 and len(c.ready_workers()) == 2, 30,
                 "count back to 2 (and the warm standby)")
        _edit(c, workers={"standby": 2})
        r = c.toolkit("apply", "-c", c.deploy_path, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: [w["state"] for w in _drift(c)["workers"]].count("warm") == 2, 20,
                 "two warm standbys")
    finally:
        load.stop()
        load.join()
    assert load.failed == 0, load.summary()
    after = _drift(c)
    assert after["drift"] == [] and (after["count"], after["standby"]) == (2, 2)
    assert len(c.ready_workers()) == 2 and len(after["workers"]) == 4   # slot 04 spare: hidden
    assert "Creating socket" not in c.supervisord_log().split("spawned: 'cnt_01'", 1)[1]
    statuses = c.access_log_statuses()
    assert statuses[502] == 0 and statuses[504] == 0, statuses
    # Beyond workers.max_slots a count change needs a new supervisord: reported.
    _edit(c, workers={"count": 4})
    r = c.toolkit("apply", "-c", c.deploy_path, timeout=60)
    assert r.returncode == 1 and "workers.count" in r.stderr, r.stdout + r.stderr
    # Nothing changed: two serving and two warm standbys.
    assert len(_active(c)) == 4 and len(c.ready_workers()) == 2
