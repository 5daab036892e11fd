"""metrics: loopback-only address, the collector with a recording fake RPC, the command."""
from __future__ import annotations

import errno
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from supervisor.states import ProcessStates

from fcgi_toolkit import cli, metrics, scoreboard, settings, status
from fcgi_toolkit.scoreboard import SlotWriter

NOW = 1_800_000_000.0
MB = 1024 * 1024


@pytest.mark.parametrize("value,expected", [
    ("127.0.0.1:9100", ("127.0.0.1", 9100)),
    ("127.0.0.2:9100", ("127.0.0.2", 9100)),
    ("9100", ("127.0.0.1", 9100)),
    ("localhost:9100", ("127.0.0.1", 9100)),
    ("[::1]:9100", ("::1", 9100)),
])
def test_loopback_address_accepts(value, expected):
    assert metrics.loopback_address(value) == expected


@pytest.mark.parametrize("value,reason", [
    ("0.0.0.0:9100", "non-loopback"),
    ("192.168.1.5:9100", "non-loopback"),
    ("[::]:9100", "non-loopback"),
    ("metrics.example.com:9100", "not a host name"),
    ("127.0.0.1:0", "port out of range"),
    ("", "metrics are off"),
])
def test_loopback_address_refuses(value, reason):
    with pytest.raises(ValueError, match=reason):
        metrics.loopback_address(value)


class RecordingRPC:
    def __init__(self, infos=None, error=None):
        self.infos, self.error, self.calls = infos or [], error, []

    def getAllProcessInfo(self):
        self.calls.append("getAllProcessInfo")
        if self.error:
            raise self.error
        return self.infos


def info(name, state, pid=0, group="wiki"):
    return {"name": name, "group": group, "state": state, "statename": "", "pid": pid,
            "start": int(NOW - 60) if pid else 0, "now": int(NOW)}


@pytest.fixture
def dep(tmp_path):
    return settings.parse({"app": {"name": "wiki", "wsgi": "app:application"},
                           "workers": {"count": 2, "standby": 1},
                           "runtime": {"dir": str(tmp_path / "rt")},
                           "metrics": {"listen": "127.0.0.1:9100"}},
                          str(tmp_path / "deploy.toml"))


def scrape(collector) -> dict:
    """{(name, labels tuple): value} of one scrape through the text format."""
    text = generate_latest(metrics.make_registry(collector)).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_collector_reads_everything_at_scrape_time(dep):
    os.makedirs(dep.runtime_dir)
    scoreboard.create(dep.scoreboard_path, dep.slots)
    clock = [NOW - 3]
    w0 = SlotWriter(dep.scoreboard_path, 0, dep.slots, pid=100, started=NOW - 60,
                    clock=lambda: clock[0])
    w0.set_ready()
    for _ in range(4):
        w0.end(w0.begin("GET", "/"))
    slow = w0.begin("GET", "/slow?s=5")
    w1 = SlotWriter(dep.scoreboard_path, 1, dep.slots, pid=101, started=NOW - 30)
    w1.set_ready()
    with open(dep.state_path, "w") as f:
        json.dump({"version": 1, "slots": {
            "wiki_00": {"recycles": 3, "by_reason": {"rss": 2, "requests": 1}},
            "wiki_02": {"recycles": 1}}, "recycle": None, "reload": None}, f)
    rpcs = []

    def rpc_factory():
        rpcs.append(RecordingRPC([info("wiki_00", ProcessStates.RUNNING, 100),
                                  info("wiki_01", ProcessStates.RUNNING, 101),
                                  info("wiki_02", ProcessStates.STOPPED)]))
        return rpcs[-1]

    procs = {100: SimpleNamespace(is_running=lambda: True, create_time=lambda: NOW - 60,
                                  memory_info=lambda: SimpleNamespace(rss=40 * MB)),
             101: SimpleNamespace(is_running=lambda: True, create_time=lambda: NOW - 30,
                                  memory_info=lambda: SimpleNamespace(rss=30 * MB))}
    collector = metrics.GroupCollector(
        dep, rpc_factory, gather=functools.partial(status.gather, process_factory=procs.__getitem__),
        clock=lambda: NOW)
    assert rpcs == []                       # registering does not scrape
    m = scrape(collector)
    assert [r.calls for r in rpcs] == [["getAllProcessInfo"]]
    w = lambda name: (("worker", name),)    # noqa: E731
    assert m[("fcgi_up", ())] == 1
    assert m[("fcgi_workers_count", ())] == 2
    assert m[("fcgi_workers_ready", ())] == 2
    assert m[("fcgi_worker_ready", w("wiki_00"))] == 1
    assert m[("fcgi_worker_ready", w("wiki_02"))] == 0
    assert m[("fcgi_worker_rss_bytes", w("wiki_00"))] == 40 * MB
    assert ("fcgi_worker_rss_bytes", w("wiki_02")) not in m
    assert m[("fcgi_worker_requests_total", w("wiki_00"))] == 4
    assert m[("fcgi_worker_requests_total", w("wiki_01"))] == 0
    assert m[("fcgi_worker_age_seconds", w("wiki_01"))] == 30
    assert m[("fcgi_worker_inflight_seconds", w("wiki_00"))] == 3
    assert m[("fcgi_worker_inflight_seconds", w("wiki_01"))] == 0
    assert m[("fcgi_worker_state", (("state", "busy"), ("worker", "wiki_00")))] == 1
    assert m[("fcgi_worker_state", (("state", "ready"), ("worker", "wiki_00")))] == 0
    assert m[("fcgi_worker_state", (("state", "standby"), ("worker", "wiki_02")))] == 1
    assert m[("fcgi_recycles_total", (("reason", "rss"), ("worker", "wiki_00")))] == 2
    assert m[("fcgi_recycles_total", (("reason", "requests"), ("worker", "wiki_00")))] == 1
    assert m[("fcgi_recycles_total", (("reason", "unknown"), ("worker", "wiki_02")))] == 1

    # The next scrape sees the change: nothing is cached between scrapes.
    w0.end(slow)
    m = scrape(collector)
    assert len(rpcs) == 2
    assert m[("fcgi_worker_requests_total", w("wiki_00"))] == 5
    assert m[("fcgi_worker_inflight_seconds", w("wiki_00"))] == 0
    w0.close()
    w1.close()


def test_collector_without_supervisord(dep):
    collector = metrics.GroupCollector(
        dep, lambda: RecordingRPC(error=ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")),
        clock=lambda: NOW)
    m = scrape(collector)
    assert m == {("fcgi_up", ()): 0, ("fcgi_workers_count", ()): 2}


def _deploy_file(tmp_path, listen):
    path = tmp_path / "deploy.toml"
    path.write_text('[app]\nname = "wiki"\nwsgi = "app:application"\n'
                    '[runtime]\ndir = "%s"\n[metrics]\nlisten = "%s"\n'
                    % (tmp_path / "rt", listen))
    return str(path)


def test_metrics_command_refuses_non_loopback(tmp_path, capsys):
    path = _deploy_file(tmp_path, "0.0.0.0:9100")
    assert cli.main(["metrics", "-c", path]) == 2
    err = capsys.readouterr().err
    assert "metrics.listen = '0.0.0.0:9100'" in err and "non-loopback" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_command_serves_and_stops_on_sigterm(tmp_path):
    port = _free_port()
    path = _deploy_file(tmp_path, "127.0.0.1:%d" % port)
    proc = subprocess.Popen([sys.executable, "-m", "fcgi_toolkit", "metrics", "-c", path],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        body = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port,
                                            timeout=5) as r:
                    body = r.read().decode()
                break
            except OSError:
                time.sleep(0.1)
        assert body is not None, "metrics did not answer"
        # No supervisord behind it: it still answers, and says so.
        assert "fcgi_up 0.0" in body and "fcgi_workers_count 2.0" in body
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0
        assert b"serving metrics of wiki" in out and b"metrics stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
