"""The benchmark suite cannot rot: its parsers are tested with plain values,
and a short smoke run (``python -m bench.run --smoke``) runs for real.

Timings are printed, never asserted: this machine is shared and noisy.
Outcomes are asserted: the suite writes its table, JSON and verdicts, and
our reload drops no request.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import nginx, report, wrk  # noqa: E402
from bench.scenario import add_ratios, ratio  # noqa: E402
from bench.scenario_reload import dip  # noqa: E402

WRK_OUTPUT = """\
Running 5s test @ http://127.0.0.1:8080/
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.23ms  456.00us  12.00ms   90.00%
    Req/Sec     3.00k   200.00     3.50k    70.00%
  Latency Distribution
     50%  812.00us
     75%    1.30ms
     90%    1.50ms
     99%    2.10s
  30012 requests in 5.00s, 4.00MB read
  Socket errors: connect 1, read 2, write 3, timeout 4
  Non-2xx or 3xx responses: 12
Requests/sec:   6002.40
Transfer/sec:    800.00KB
"""


# -- tier 1: pure ------------------------------------------------------------

def test_parse_wrk_output():
    r = wrk.parse(WRK_OUTPUT)
    assert r.requests == 30012
    assert r.duration == 5.0
    assert r.rps == 6002.40
    assert r.p50 == pytest.approx(812e-6)
    assert r.p90 == pytest.approx(1.5e-3)
    assert r.p99 == pytest.approx(2.1)
    assert (r.connect_errors, r.read_errors, r.write_errors, r.timeouts) == (1, 2, 3, 4)
    assert r.non_2xx == 12
    assert r.failed == 22
    assert r.as_dict()["failed"] == 22


def test_parse_clean_wrk_output_has_no_failures():
    text = "\n".join(line for line in WRK_OUTPUT.splitlines()
                     if not line.lstrip().startswith(("Socket errors", "Non-2xx")))
    assert wrk.parse(text).failed == 0


def test_parse_refuses_output_without_latency_distribution():
    text = "\n".join(line for line in WRK_OUTPUT.splitlines() if "%  " not in line)
    with pytest.raises(wrk.WrkError):
        wrk.parse(text)


def test_wrk_targets_only_loopback():
    assert "http://127.0.0.1:1/" in wrk.command("http://127.0.0.1:1/", 2)
    with pytest.raises(ValueError):
        wrk.command("http://10.0.0.1:80/", 2)
    with pytest.raises(ValueError):
        wrk.command("http://example.com/", 2)


def test_nginx_config_points_at_the_contender_socket(tmp_path):
    text = nginx.render(str(tmp_path), 8123, "/tmp/x/app.sock", keepalive=8, access_log=True)
    assert "listen 127.0.0.1:8123;" in text
    assert "server unix:/tmp/x/app.sock;" in text
    assert "keepalive 8;" in text and "fastcgi_keep_conn on;" in text
    assert "access.log bench" in text
    plain = nginx.render(str(tmp_path), 8123, "/tmp/x/app.sock")
    assert "keepalive 8" not in plain and "access_log off;" in plain


def test_timeline_bins_statuses(tmp_path):
    log = tmp_path / "access.log"
    log.write_text("100.1 200 0.001\n100.9 502 0.001\n101.5 200 0.001\n103.2 200 0.0\nbad line\n")
    bins = nginx.timeline(str(log), 100.0, 103.0)
    assert bins == [{"t": 0.0, "ok": 1, "failed": 1}, {"t": 1.0, "ok": 1, "failed": 0},
                    {"t": 2.0, "ok": 0, "failed": 0}]


def test_ratios_are_against_the_named_baseline():
    rows = [{"contender": "a", "rps": 50.0}, {"contender": "base", "rps": 100.0},
            {"contender": "c", "rps": None}]
    add_ratios(rows, "base", "rps")
    assert [r["ratio"] for r in rows] == [0.5, 1.0, None]
    assert ratio(1.0, 0) is None


def test_dip_is_worst_second_during_reload_over_normal():
    timeline = [{"t": float(t), "ok": 100, "failed": 0} for t in range(10)]
    timeline[6]["ok"] = 40
    marks = [{"start": 1005.5, "end": 1007.0}]
    assert dip(timeline, 1000.0, marks) == 0.4
    assert dip(timeline, 1000.0, []) is None


def test_verdicts_and_markdown():
    def res(name, rows):
        return {"name": name, "title": name, "baseline": "b", "rows": rows, "skipped": {"x": "why"},
                "notes": ["n"], "series": {}, "seconds": 1.0,
                "columns": [["contender", "contender", "s"], ["failed", "failed", "d"]]}
    doc = {"command": "python -m bench.run", "smoke": False,
           "environment": {k: "v" for k in ("date", "machine", "python", "fcgi-toolkit", "flup6",
                                             "supervisor", "superlance", "uwsgi", "gunicorn", "nginx",
                                             "wrk")},
           "scenarios": [res("recycle", [{"contender": "ours x", "failed": 0}]),
                         res("reload", [{"contender": "ours y", "failed": 2}]),
                         res("leak", [{"contender": "ours z", "failed": 0}]),
                         res("throughput", [{"contender": "ours", "ratio": 0.99, "failed": 0}])]}
    v = report.verdicts(doc["scenarios"])
    assert v[report.GOALS[0]] == "NOT met (2 failed)"
    assert v[report.GOALS[1]].startswith("met")
    assert v[report.GOALS[2]] == "not measured"
    doc["goals"] = v
    md = report.markdown(doc)
    assert "| ours y | 2 |" in md and "skipped x: why" in md


# -- tier 3: the suite runs for real -----------------------------------------

needs_tools = pytest.mark.skipif(
    not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")) or not shutil.which("wrk"),
    reason="nginx or wrk is not installed")


@pytest.mark.integration
@needs_tools
def test_smoke_run_writes_table_json_and_drops_nothing_on_reload(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench.run", "--smoke", "--scenario", "throughput",
           "--scenario", "reload", "--contenders", "ours,flup", "--out", str(out)]
    t = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=240)
    took = time.monotonic() - t
    print("bench smoke took %.1f s" % took)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-4000:]
    doc = json.loads((out / "results.json").read_text())
    assert (out / "results.md").exists()
    by = {s["name"]: s for s in doc["scenarios"]}
    assert set(by) == {"throughput", "reload"}
    tp = {r["contender"]: r for r in by["throughput"]["rows"]}
    assert set(tp) >= {"flup", "ours"}, by["throughput"]["skipped"]
    assert tp["flup"]["ratio"] == 1.0
    for row in tp.values():
        assert row["rps"] > 0 and row["failed"] == 0, row
    print("smoke ratio ours/flup (hello, 1 s, not a result): %.3f" % tp["ours"]["ratio"])
    reload = {r["contender"]: r for r in by["reload"]["rows"]}
    assert "ours reload" in reload, by["reload"]["skipped"]
    ours = reload["ours reload"]
    assert ours["replaced"] == "yes", ours
    assert ours["failed"] == 0, ours
    assert ours["requests"] > 0


def test_limit_to_ready_pairs_each_offender_with_the_next_new_ready_worker():
    from bench.scenario_memlimit import limit_to_ready
    mb = 1024 * 1024
    samples = [(0.0, ({1: 50 * mb, 2: 50 * mb}, [1, 2])),
               (1.0, ({1: 81 * mb, 2: 60 * mb}, [1, 2])),        # 1 over
               (1.2, ({1: 85 * mb, 2: 82 * mb, 3: 20 * mb}, [1, 2])),   # 2 over; 3 starting
               (1.4, ({1: 86 * mb, 2: 83 * mb, 3: 21 * mb}, [1, 2, 3])),  # 3 ready
               (2.0, ({2: 90 * mb, 3: 22 * mb, 4: 20 * mb}, [2, 3, 4]))]  # 4 ready
    assert limit_to_ready(samples, 80 * mb) == pytest.approx([0.4, 0.8])
    assert limit_to_ready([], 80 * mb) == []


# -- the worker-count scenario's pure parts ----------------------------------

def test_scale_in_effect_needs_the_count_all_ready_and_none_from_before():
    from bench.scenario_scale import in_effect
    assert in_effect([3, 4, 5], [3, 4, 5], 3, before=[1, 2])
    assert not in_effect([1, 4, 5], [1, 4, 5], 3, before=[1, 2])        # an old one still serves
    assert not in_effect([3, 4, 5], [3, 4], 3, before=[])               # one not ready yet
    assert not in_effect([1, 2, 3], [1, 2], 2, before=[])               # a stopping one still live
    assert in_effect([1, 2, 3], [1, 2, 3], 3, before=[])                # ours: the old ones stay


def test_scale_summary_levels_dip_and_time_to_effect():
    from bench.scenario_scale import Change, summarize
    # 0.5 s bins from t=1000: 50 per bin (100/s) before, a 10 bin during
    # the change at 1005.0 (in effect 1006.0), 75 per bin after; back down
    # at 1010.0 (in effect 1010.5) to 50 per bin with no gap.
    bins = []
    for i in range(30):
        t = 1000.0 + i * 0.5
        ok = 50 if t < 1005.0 else 10 if t < 1006.0 else 75 if t < 1010.5 else 50
        bins.append({"t": i * 0.5, "ok": ok, "failed": 0})
    changes = [Change(2, 3, 1005.0, 1006.0), Change(3, 2, 1010.0, 1010.5)]
    up, down = summarize(bins, 1000.0, 1015.0, changes)
    assert (up["before"], up["after"], up["dip"], up["seconds"]) == (100.0, 150.0, 0.2, 1.0)
    # Down: the worst bin is the new, lower level itself: no dip beyond it.
    assert (down["before"], down["after"], down["dip"], down["seconds"]) == (150.0, 100.0, 1.0, 0.5)
    assert up["in_effect"] and down["in_effect"]
    never = summarize(bins, 1000.0, 1015.0, [Change(2, 3, 1005.0, None)])[0]
    assert never["seconds"] is None and never["after"] is None and not never["in_effect"]
    assert summarize(bins, 1000.0, 1015.0, [Change(2, 3, 1005.0, 1006.0, trigger_ok=False)])[0][
        "in_effect"] is False


def test_nginx_proxies_http_for_gunicorn(tmp_path):
    text = nginx.render(str(tmp_path), 8123, "/tmp/x/app.sock", protocol="http")
    assert "proxy_pass http://app;" in text and "server unix:/tmp/x/app.sock;" in text
    assert "fastcgi" not in text.split("location /", 1)[1]


def test_uwsgi_ini_and_command_line_carry_the_same_options(tmp_path):
    from bench.contenders import Spec, Uwsgi
    spec = Spec(app="bench.apps:slow", workers=2, extra={"ini": True, "lazy_apps": False})
    u = Uwsgi(str(tmp_path), spec)
    ini = u.render_ini()
    assert ini.startswith("[uwsgi]\n") and "processes = 2\n" in ini and "master = true\n" in ini
    assert "touch-reload = %s\n" % u.touch_path in ini and "lazy-apps" not in ini
    flags = Uwsgi(str(tmp_path), Spec(app="bench.apps:slow")).options()
    assert ("lazy-apps", None) in flags and not any(k == "touch-reload" for k, _ in flags)


def test_gunicorn_config_is_python_with_the_worker_count(tmp_path):
    from bench.contenders import Gunicorn, Spec
    g = Gunicorn(str(tmp_path), Spec(app="bench.apps:slow", workers=3))
    conf: dict = {}
    exec(g.render(), conf)
    assert conf["workers"] == 3 and conf["wsgi_app"] == "bench.apps:slow"
    assert conf["bind"] == ["unix:" + g.socket_path] and conf["control_socket_disable"] is True
