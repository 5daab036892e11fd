"""Tier 1: a multi-host rollout's pure decisions (fcgi_toolkit.rollout_plan)."""
from __future__ import annotations

import pytest

from fcgi_toolkit import applying, rollout_plan, settings
from fcgi_toolkit.rollout_plan import Way
from fcgi_toolkit.settings import HostSpec

HOSTS = [{"name": "web1", "address": "127.0.0.2:9000"},
         {"name": "web2", "address": "127.0.0.3:9000", "count": 3},
         {"name": "web3", "address": "127.0.0.4:9000"}]


def front(tmp_path, hosts=None, **sections) -> settings.Deployment:
    raw = {"app": {"name": "wiki", "wsgi": "wikiapp:application"},
           "nginx": {"web_servers": ["127.0.0.1"]},
           "hosts": [dict(h) for h in (hosts or HOSTS)]}
    for section, table in sections.items():
        raw.setdefault(section, {}).update(table)
    return settings.parse(raw, str(tmp_path / "deploy.toml"), "")


def views(dep) -> dict:
    return {name: applying.values(dep.for_host(name)) for name in dep.host_names()}


def spec(name, address, count=1) -> HostSpec:
    return HostSpec(name, address, count, False, 1, 10.0)


@pytest.mark.parametrize("key, expected", [
    ("app.name", Way.FIXED), ("runtime.dir", Way.FIXED), ("runtime.log_dir", Way.FIXED),
    ("control.system_supervisord", Way.FIXED),
    ("nginx.read_timeout", Way.NGINX), ("nginx.managed", Way.NGINX), ("web.server", Way.NGINX),
    ("app.environment", Way.HOST), ("app.wsgi", Way.HOST), ("workers.socket", Way.HOST),
    ("workers.count", Way.HOST), ("limits.max_requests", Way.HOST), ("control.inet_port", Way.HOST),
])
def test_each_key_has_one_way_into_a_multi_host_deployment(key, expected):
    assert rollout_plan.way(key) is expected


def test_a_host_restarts_only_when_a_key_of_its_own_view_changed(tmp_path):
    running = views(front(tmp_path))
    changed = [dict(h) for h in HOSTS]
    changed[1]["count"] = 4                     # web2's workers.count
    todo = rollout_plan.plan(running, views(front(tmp_path, changed)), ["web1", "web2", "web3"])
    assert todo.names == ["web2"] and todo.hosts[0].keys == ("workers.count",)
    assert todo.nginx == () and todo.fixed == ()


def test_a_change_every_host_shares_restarts_them_in_the_files_order(tmp_path):
    running = views(front(tmp_path))
    wanted = views(front(tmp_path, app={"environment": {"RELEASE": "2"}},
                         nginx={"read_timeout": "90s"}))
    todo = rollout_plan.plan(running, wanted, ["web3", "web1", "web2"])
    assert todo.names == ["web3", "web1", "web2"]
    assert all(h.keys == ("app.environment",) for h in todo.hosts)
    # nginx's own keys come once, however many hosts share them.
    assert todo.nginx == ("nginx.read_timeout",)


def test_nginx_only_keys_restart_no_host(tmp_path):
    running = views(front(tmp_path))
    hosts = [dict(h) for h in HOSTS]
    hosts[2]["backup"] = True                   # the [[hosts]] entry only nginx reads
    todo = rollout_plan.plan(running, views(front(tmp_path, hosts, nginx={"read_timeout": "90s"})),
                             ["web1", "web2", "web3"])
    assert todo.hosts == () and todo.nginx == ("nginx.read_timeout",)


def test_new_supervisord_restarts_every_host_with_no_change(tmp_path):
    running = views(front(tmp_path))
    todo = rollout_plan.plan(running, running, ["web1", "web2", "web3"], everyone=True)
    assert todo.names == ["web1", "web2", "web3"] and all(h.keys == () for h in todo.hosts)
    assert rollout_plan.plan(running, running, ["web1", "web2", "web3"]).hosts == ()


def test_keys_no_rollout_moves_are_named_with_their_host(tmp_path):
    running = views(front(tmp_path))
    wanted = views(front(tmp_path, runtime={"dir": str(tmp_path / "elsewhere")},
                         app={"environment": {"RELEASE": "2"}}))
    todo = rollout_plan.plan(running, wanted, ["web1", "web2", "web3"])
    # runtime.log_dir follows runtime.dir; the host's restart waits with them.
    assert todo.fixed == tuple((h, k) for h in ("web1", "web2", "web3")
                               for k in ("runtime.dir", "runtime.log_dir"))


def test_running_spec_reads_the_hosts_entry_of_a_snapshot(tmp_path):
    values = applying.values(front(tmp_path).for_host("web2"))
    assert rollout_plan.running_spec("web2", values) == spec("web2", "127.0.0.3:9000", 3)
    assert rollout_plan.running_spec("web9", values) is None
    assert rollout_plan.running_spec("web1", {}) is None


def test_upstream_keeps_hosts_not_restarted_yet_where_they_run():
    wanted = [spec("web1", "127.0.0.2:9100", 2), spec("web2", "127.0.0.3:9100", 2),
              spec("web3", "127.0.0.4:9100")]
    running = {"web1": spec("web1", "127.0.0.2:9000"), "web2": spec("web2", "127.0.0.3:9000")}
    servers = rollout_plan.upstream(wanted, running, done=["web1"])
    assert [(s.name, s.address, s.count) for s in servers] == [
        ("web1", "127.0.0.2:9100", 2),          # restarted: the file's
        ("web2", "127.0.0.3:9000", 1),          # not yet: as it runs
        ("web3", "127.0.0.4:9100", 1)]          # new in the file: nothing runs it yet


def test_the_last_host_in_rotation_never_goes_out():
    assert rollout_plan.alone([spec("web1", "127.0.0.2:9000")], "web1")
    assert not rollout_plan.alone([spec("web1", "127.0.0.2:9000"), spec("web2", "127.0.0.3:9000")],
                                  "web1")


def worker(name, state, pid, supervisor_state="RUNNING") -> dict:
    return {"name": name, "state": state, "pid": pid, "supervisor_state": supervisor_state}


def test_a_host_is_back_with_enough_new_ready_workers():
    old = [101, 102]
    status = {"workers": [worker("w_00", "ready", 101), worker("w_01", "busy", 201)]}
    # The old pid does not count: one new worker of two.
    verdict = rollout_plan.check_host(status, 2, old, elapsed=1.0, timeout=30)
    assert not verdict.ready and not verdict.failed
    status["workers"][0] = worker("w_00", "ready", 202)
    assert rollout_plan.check_host(status, 2, old, elapsed=1.0, timeout=30).ready
    starting = {"workers": [worker("w_00", "starting", 203), worker("w_01", "ready", 201)]}
    assert not rollout_plan.check_host(starting, 2, old, 1.0, 30).ready


def test_a_worker_that_did_not_start_fails_the_host_at_once():
    status = {"workers": [worker("w_00", "ready", 201), worker("w_01", "down", 0, "BACKOFF")]}
    verdict = rollout_plan.check_host(status, 1, [], elapsed=0.5, timeout=30)
    assert verdict.failed == "w_01 did not start (BACKOFF)"


def test_a_host_that_does_not_answer_in_time_fails():
    assert not rollout_plan.check_host(None, 1, [], elapsed=29.9, timeout=30).failed
    verdict = rollout_plan.check_host(None, 2, [], elapsed=30.0, timeout=30)
    assert verdict.failed == "not back with 2 ready workers within 30s"
