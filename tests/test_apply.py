"""``fcgi-toolkit apply``: the diff, the one table of how keys take effect, the
watchdog's re-read (recording fakes), and the command's refusals."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from fcgi_toolkit import applying, generations, render, settings, statefile
from fcgi_toolkit.settings import Applied
from harness import toml_dumps
from test_listener import World


def _dep(tmp_path, **sections):
    data = {"app": {"name": "wiki", "wsgi": "app:application"},
            "runtime": {"dir": str(tmp_path / "run")}}
    for section, table in sections.items():
        data.setdefault(section, {}).update(table)
    path = tmp_path / "deploy.toml"
    path.write_text(toml_dumps(data))
    return settings.load(str(path))


# -- pure ----------------------------------------------------------------------

def test_every_key_has_exactly_one_documented_way_to_take_effect():
    keys = {s.key for s in settings.REGISTRY} | {"hosts"}
    assert set(settings.APPLIED_BY) == keys
    assert settings.applied_by("hosts[0].count") is Applied.RESTART
    table = settings.settings_table()
    for way in Applied:
        assert way.value in table


def test_diff_names_changed_keys_in_registry_order(tmp_path):
    old = applying.values(_dep(tmp_path))
    new = applying.values(_dep(tmp_path, limits={"max_requests": 30}, workers={"threads": 4},
                               nginx={"read_timeout": "5s"}))
    assert applying.diff(old, old) == []
    assert applying.diff(old, new) == ["workers.threads", "limits.max_requests",
                                       "nginx.read_timeout"]
    json.dumps(new)                       # the snapshot is plain JSON


def test_plan_groups_keys_by_how_they_take_effect():
    p = applying.plan(["workers.threads", "limits.max_requests", "nginx.read_timeout",
                       "workers.socket", "workers.count", "recycle.check_interval"])
    assert p.watchdog == ("limits.max_requests", "recycle.check_interval")
    assert p.rolling == ("workers.threads",)
    assert p.nginx == ("nginx.read_timeout",)
    assert p.generation == ("workers.socket",) and p.count == ("workers.count",)
    assert not p.restart and not p.supervisord and "workers.socket" in p.applicable
    assert p.needs_watchdog and not applying.plan(["nginx.listen"]).needs_watchdog
    beyond = applying.plan(["workers.count", "workers.standby"], fits=False)
    assert beyond.generation == ("workers.count", "workers.standby") and not beyond.count
    assert applying.plan(["metrics.listen"]).restart == ("metrics.listen",)
    control = applying.plan(["control.inet_port", "control.username", "limits.max_rss"])
    assert control.supervisord == ("control.inet_port", "control.username")
    assert "control.inet_port" in control.applicable and control.watchdog == ("limits.max_rss",)


def test_spare_slots_fit_a_larger_count_and_only_count_plus_standby_are_used(tmp_path):
    dep = _dep(tmp_path, workers={"count": 2, "standby": 1, "max_slots": 5})
    assert (dep.slots, dep.used_slots) == (5, 3) and len(dep.slot_names()) == 5
    assert _dep(tmp_path, workers={"count": 3, "standby": 1}).fits(5)
    assert not _dep(tmp_path, workers={"count": 4, "standby": 2}).fits(5)
    assert applying.running_slots(dep, applying.values(dep)) == 5      # no group recorded yet
    # The group's recorded slots count, not the snapshot's formula: two
    # standbys applied in place since leave the running group's 5 slots.
    os.makedirs(dep.runtime_dir)
    generations.write(dep.runtime_dir, generations.first(dep))
    grown = applying.values(dep)
    grown["workers.standby"] = 2
    assert settings.slot_total(2, 2, 5) == 6
    assert applying.running_slots(dep, grown) == 5


def test_after_keeps_unapplied_keys_so_their_drift_stays_visible():
    running = {"a": 1, "b": 2}
    wanted = {"a": 10, "b": 20}
    assert applying.after(running, wanted, ("a",)) == {"a": 10, "b": 2}
    assert applying.diff(applying.after(running, wanted, ("a",)), wanted) == ["b"]


# -- the command's I/O shell, without a running deployment ------------------------

def test_a_key_needing_stop_and_run_again_is_reported_not_applied(tmp_path):
    dep = _dep(tmp_path)
    os.makedirs(dep.runtime_dir)
    applying.save(dep, applying.values(dep))
    before = applying.load(dep)
    dep = _dep(tmp_path, workers={"socket": "tcp://127.0.0.1:9999", "count": 5},
               metrics={"listen": "127.0.0.1:9998"})
    assert applying.drift(dep) == ["workers.count", "workers.socket", "metrics.listen"]
    out, err = io.StringIO(), io.StringIO()
    assert applying.apply(dep, out, err) == 1
    assert "not applied, stop and run again: metrics.listen" in err.getvalue()
    # 5 + 2 > 6 slots and the socket: a generation, which waits for the restart key.
    assert ("a new generation waits for the keys that need stop and run again: "
            "workers.count, workers.socket") in err.getvalue()
    assert applying.load(dep) == before   # still drifting: status keeps saying so


def test_what_applies_becomes_what_the_processes_read_and_nothing_else_does(tmp_path):
    """Started by run, the processes read applied.toml: apply makes it the
    file's bytes when a key applies, and leaves it when none does."""
    from fcgi_toolkit import respawn
    dep = _dep(tmp_path)
    render.render(dep)
    applying.save(dep, applying.values(dep))
    respawn.record_start(dep, b"# the bytes run started from\n")
    dep = _dep(tmp_path, metrics={"listen": "127.0.0.1:9998"})        # stop and run again
    assert applying.apply(dep, io.StringIO(), io.StringIO()) == 1
    assert open(respawn.applied_path(dep), "rb").read() == b"# the bytes run started from\n"

    class RPC:
        def signalProcess(self, name, sig):
            pass
    dep = _dep(tmp_path, nginx={"read_timeout": "7s"})                # nginx: applies
    assert applying.apply(dep, io.StringIO(), io.StringIO(), rpc=RPC()) == 0
    assert open(respawn.applied_path(dep), "rb").read() == open(dep.path, "rb").read()


def test_nginx_keys_rerender_nginx_files_and_hup_the_managed_nginx(tmp_path):
    dep = _dep(tmp_path)
    render.render(dep)
    applying.save(dep, applying.values(dep))
    supervisord_conf = open(dep.supervisord_conf).read()
    dep = _dep(tmp_path, nginx={"read_timeout": "7s"})

    class RPC:
        calls = []

        def signalProcess(self, name, sig):
            self.calls.append((name, sig))

    out, err = io.StringIO(), io.StringIO()
    assert applying.apply(dep, out, err, rpc=RPC()) == 0, err.getvalue()
    assert RPC.calls == [("wiki_nginx", "HUP")]
    site = open(os.path.join(dep.runtime_dir, "nginx-site.conf")).read()
    assert "fastcgi_read_timeout 7s;" in site
    assert open(dep.supervisord_conf).read() == supervisord_conf
    assert applying.drift(dep) == []


def test_a_bad_file_given_to_apply_changes_nothing_and_exits_2(tmp_path):
    dep = _dep(tmp_path)
    os.makedirs(dep.runtime_dir)
    applying.save(dep, applying.values(dep))
    before = open(applying.snapshot_path(dep)).read()
    (tmp_path / "deploy.toml").write_text(
        (tmp_path / "deploy.toml").read_text() + '\n[limits]\nmax_requests = -3\n')
    r = subprocess.run([sys.executable, "-m", "fcgi_toolkit", "apply", "-c",
                        str(tmp_path / "deploy.toml")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "limits.max_requests = -3" in lines[0], r.stderr
    assert str(tmp_path / "deploy.toml") in lines[0]
    assert open(applying.snapshot_path(dep)).read() == before
    assert os.listdir(dep.runtime_dir) == ["applied.json"]


# -- the watchdog's side (recording fakes) ---------------------------------------

def _world_with_file(tmp_path, **sections):
    w = World(tmp_path, **sections)
    data = {"app": {"name": "wiki", "wsgi": "app:application"},
            "workers": {"count": 2, "standby": 1, "warm_standby": w.dep.workers.warm_standby},
            "recycle": {"check_interval": 1, "ready_timeout": 10, "flap_window": 5},
            "runtime": {"dir": str(tmp_path / "run")}}
    return w, data


def test_apply_request_swaps_the_coordinators_and_the_samplers_limits(tmp_path):
    w, data = _world_with_file(tmp_path)
    w.started()
    pids = dict(w.sup.running())
    data["limits"] = {"max_requests": 7}
    data["recycle"]["max_concurrent"] = 2
    data["workers"]["count"] = 4            # 4 + 1 > 4 slots (a generation): the watchdog keeps 2
    (tmp_path / "deploy.toml").write_text(toml_dumps(data))
    rid = statefile.enqueue(w.dep.runtime_dir, {"op": "apply", "rolling": False})
    w.passes(1)
    res = statefile.result(w.dep.runtime_dir, rid)
    assert res and res["ok"], res
    assert w.co.limits.max_requests == 7 and w.co.limits.max_concurrent == 2
    assert w.co.sampler.limits is w.co.limits
    assert w.co.limits.count == 2
    # Every live worker drew its per-life limit again: the new limit is in effect now.
    w.passes(1)
    snap = w.co.last_snapshot
    assert all(s.max_requests == 7 for s in snap.slots if s.pid in pids.values())
    assert len(w.sup.running()) == 2


def test_apply_request_with_rolling_replaces_every_worker(tmp_path):
    w, data = _world_with_file(tmp_path)
    w.started()
    old = set(w.sup.running().values())
    data["workers"]["threads"] = 4
    (tmp_path / "deploy.toml").write_text(toml_dumps(data))
    rid = statefile.enqueue(w.dep.runtime_dir, {"op": "apply", "rolling": True})
    for _ in range(20):
        w.passes(1)
    res = statefile.result(w.dep.runtime_dir, rid)
    assert res and res["ok"] and "reloaded 2 workers" in res["message"], res
    assert not old & set(w.sup.running().values()) and len(w.sup.running()) == 2


def test_apply_request_with_a_bad_file_is_refused_and_keeps_the_limits(tmp_path):
    w, data = _world_with_file(tmp_path)
    w.started()
    before = w.co.limits
    (tmp_path / "deploy.toml").write_text("[app]\nname = 'Bad Name'\n")
    rid = statefile.enqueue(w.dep.runtime_dir, {"op": "apply"})
    w.passes(1)
    res = statefile.result(w.dep.runtime_dir, rid)
    assert res and not res["ok"] and "app.name" in res["message"], res
    assert w.co.limits == before


def test_a_watched_deployment_file_is_applied_once_debounced_other_files_reload(tmp_path,
                                                                               caplog):
    caplog.set_level("INFO", logger="fcgi_toolkit.watchdog")
    w = World(tmp_path, recycle={"watch": ["deploy.toml", "version.txt"], "debounce": 1})
    spawned = []

    class Child:
        def __init__(self, argv, **kwargs):
            spawned.append(argv)
            assert kwargs["stdout"] is not None     # never the listener's protocol stdout

        def poll(self):
            return 0

    w.co.watched.spawn = Child
    deploy, version = str(tmp_path / "deploy.toml"), str(tmp_path / "version.txt")
    w.files = {deploy: (1, 10), version: (1, 1)}
    w.started()
    for size in (11, 12, 13):               # three edits inside one debounce window
        w.files[deploy] = (1, size)
        w.passes(1, every=0.3)
    assert spawned == []
    w.passes(6, every=0.3)
    assert spawned == [applying.apply_command(deploy)]
    assert w.state()["reload"] is None      # the apply decides whether workers are replaced
    assert "rolling reload begins" not in caplog.text
    w.files[version] = (1, 2)
    w.passes(6, every=0.3)
    assert len(spawned) == 1 and "rolling reload begins (watch)" in caplog.text


def test_count_and_standby_change_within_the_spare_slots_without_a_group_restart(tmp_path):
    w, data = _world_with_file(tmp_path, workers={"max_slots": 5})
    data["workers"]["max_slots"] = 5
    w.started()
    assert sorted(w.sup.running()) == ["wiki_00", "wiki_01"]
    # A recycle's replacement starts in the one standby slot, never a spare one.
    rid = statefile.enqueue(w.dep.runtime_dir, {"op": "recycle", "worker": "wiki_00"})
    w.passes(6)
    assert statefile.result(w.dep.runtime_dir, rid)["ok"]
    assert sorted(w.sup.running()) == ["wiki_01", "wiki_02"]
    data["workers"]["count"] = 3
    (tmp_path / "deploy.toml").write_text(toml_dumps(data))
    rid = statefile.enqueue(w.dep.runtime_dir, {"op": "apply"})
    w.passes(4)
    assert statefile.result(w.dep.runtime_dir, rid)["ok"]
    assert len(w.sup.running()) == 3 and w.co.limits.count == 3
    assert not {"wiki_04"} & set(w.sup.running())
    assert not any(c[0] == "stopProcess" and c[1] in ("wiki:wiki_01", "wiki:wiki_02")
                   for c in w.sup.calls)
    data["workers"]["count"] = 2
    (tmp_path / "deploy.toml").write_text(toml_dumps(data))
    statefile.enqueue(w.dep.runtime_dir, {"op": "apply"})
    w.passes(4)
    assert len(w.sup.running()) == 2
