"""Generations: the pure decisions (which keys, names, sockets, the start
verdict, nginx's reload sign) and the switch's step sequence against a
recording fake supervisord, success and failure paths."""
from __future__ import annotations

import io
import os
import xmlrpc.client

import pytest
from supervisor.states import ProcessStates
from supervisor.xmlrpc import Faults

from fcgi_toolkit import applying, generations, nginxctl, render, settings, statefile, switch, switch_plan
from fcgi_toolkit.generations import Generation, SocketCollision
from fcgi_toolkit.settings import Applied
from harness import toml_dumps
from test_apply import _dep, _world_with_file

HOST = render.Host(euid=1000, user="alice", nginx_binary="/usr/sbin/nginx", mime_types="")
RUNNING, STOPPED, BACKOFF = ProcessStates.RUNNING, ProcessStates.STOPPED, ProcessStates.BACKOFF


# -- which keys ----------------------------------------------------------------

def test_the_fcgi_program_keys_take_a_generation_control_a_new_supervisord_the_rest_refuse():
    fcgi_program = {"workers.socket", "workers.socket_mode", "workers.socket_owner", "app.python",
                    "app.directory", "workers.user", "workers.graceful_timeout",
                    "workers.max_slots", "nginx.web_servers"}
    assert {k for k, way in settings.APPLIED_BY.items() if way is Applied.GENERATION} == fcgi_program
    assert {k for k, way in settings.APPLIED_BY.items() if way is Applied.SUPERVISORD} == {
        "control.inet_port", "control.username", "control.password"}
    assert {k for k, way in settings.APPLIED_BY.items() if way is Applied.RESTART} == {
        "app.name", "nginx.managed", "nginx.binary", "runtime.dir", "runtime.log_dir",
        "runtime.templates", "metrics.listen", "control.system_supervisord", "web.server",
        "hosts"}
    p = applying.plan(["app.python", "limits.max_rss", "workers.count"], fits=False)
    assert p.generation == ("app.python", "workers.count") and p.watchdog == ("limits.max_rss",)


# -- names and sockets -----------------------------------------------------------

def test_generation_names_keep_generation_1_as_today():
    assert generations.group_name("wiki", 1) == "wiki"
    assert generations.group_name("wiki", 12) == "wiki_g12"
    assert generations.scoreboard_path("/r", 1) == "/r/scoreboard"
    assert generations.scoreboard_path("/r", 3) == "/r/scoreboard-g3"


def test_effective_socket_suffixes_a_unix_path_in_use_and_refuses_the_same_tcp_address():
    serving = "unix:///run/wiki.sock"
    assert generations.effective_socket("unix:///run/new.sock", serving, 2) == "unix:///run/new.sock"
    assert generations.effective_socket(serving, serving, 2) == "unix:///run/wiki.g2.sock"
    # Generation 3 of an unchanged socket is back on the configured path (2 holds the suffix).
    assert generations.effective_socket(serving, "unix:///run/wiki.g2.sock", 3) == serving
    assert generations.suffixed_socket("unix:///run/wiki.g2.sock", 4) == "unix:///run/wiki.g4.sock"
    assert generations.suffixed_socket("unix:///run/sock", 2) == "unix:///run/sock.g2.sock"
    assert generations.effective_socket("tcp://127.0.0.1:9001", serving, 2) == "tcp://127.0.0.1:9001"
    with pytest.raises(SocketCollision, match="change workers.socket too"):
        generations.effective_socket("tcp://127.0.0.1:9001", "tcp://127.0.0.1:9001", 2)


def test_successor_and_the_deployment_view_follow_the_generation(tmp_path):
    dep = _dep(tmp_path, workers={"count": 3, "max_slots": 8})
    one = generations.first(dep)
    assert one == Generation(1, "wiki", dep.workers.socket, dep.scoreboard_path, 8)
    two = generations.successor(dep, one)
    assert (two.number, two.group, two.slots) == (2, "wiki_g2", 8)
    assert two.socket_url.endswith("/wiki.g2.sock")
    view = generations.attach(dep, two)
    assert (view.group, view.generation_number, view.socket_url) == ("wiki_g2", 2, two.socket_url)
    assert view.slot_names()[0] == "wiki_g2_00" and len(view.slot_names()) == 8
    assert view.scoreboard_path.endswith("scoreboard-g2") and view.socket_path.endswith(".g2.sock")
    conf = render.render_all(view, HOST, dep.runtime_dir)["supervisord.conf"]
    assert "[fcgi-program:wiki_g2]" in conf and "--slot %(process_num)d --generation 2\n" in conf
    assert "socket=%s\n" % two.socket_url in conf and "[fcgi-program:wiki]" not in conf
    site = render.render_all(view, HOST, dep.runtime_dir)["nginx-site.conf"]
    assert "server unix:%s max_fails=0;" % view.socket_path in site
    plain = render.render_all(dep, HOST, dep.runtime_dir)["supervisord.conf"]
    assert "[fcgi-program:wiki]" in plain and "--generation" not in plain


def test_the_state_file_is_the_one_home_of_the_serving_generation(tmp_path):
    dep = _dep(tmp_path)
    os.makedirs(dep.runtime_dir)
    assert generations.serving(dep).group == "wiki"          # absent: generation 1 from the file
    two = generations.successor(dep, generations.first(dep))
    generations.write(dep.runtime_dir, two)
    assert generations.read(dep.runtime_dir) == two
    assert generations.load(dep.path).group == "wiki_g2"
    # A worker learns its generation from its command line.
    assert generations.for_worker(dep, 2).scoreboard_path == two.scoreboard_path
    assert generations.for_worker(dep, 3).group == "wiki_g3"
    statefile.write_json_atomic(generations.state_path(dep.runtime_dir), {"number": "x"})
    assert generations.read(dep.runtime_dir) is None and generations.current(dep).number == 1
    generations.reset(dep)
    assert generations.read(dep.runtime_dir).number == 1


# -- the start verdict and the reload sign --------------------------------------------

def test_check_start_needs_every_slot_running_and_ready_and_fails_a_quick_exit():
    infos = {"a": {"state": RUNNING, "pid": 10}, "b": {"state": ProcessStates.STARTING, "pid": 11}}
    assert switch_plan.check_start(["a", "b"], infos, {"a": 10, "b": 11}, 1, 15) == switch_plan.Verdict()
    infos["b"] = {"state": RUNNING, "pid": 11}
    assert switch_plan.check_start(["a", "b"], infos, {"a": 10}, 1, 15) == switch_plan.Verdict()
    assert switch_plan.check_start(["a", "b"], infos, {"a": 10, "b": 11}, 1, 15).ready
    assert not switch_plan.check_start(["a", "b"], infos, {"a": 10, "b": 99}, 1, 15).ready  # other life
    infos["b"] = {"state": BACKOFF, "pid": 0}
    assert switch_plan.check_start(["a", "b"], infos, {"a": 10}, 1, 15).failed == "b did not start (BACKOFF)"
    infos["b"] = {"state": ProcessStates.STARTING, "pid": 12}
    assert "not ready within" in switch_plan.check_start(["a", "b"], infos, {"a": 10}, 15, 15).failed
    assert switch_plan.all_stopped(["a", "c"], {"a": {"state": STOPPED}})
    assert not switch_plan.all_stopped(["a"], {"a": {"state": ProcessStates.STOPPING}})
    assert switch_plan.added_group([[["wiki_g2"], [], ["wiki"]]], "wiki_g2") == ""
    assert "did not add wiki_g2" in switch_plan.added_group([[[], ["wiki"], []]], "wiki_g2")


def test_nginx_reload_sign_new_workers_and_old_ones_shutting_down():
    before = {100: {101: "nginx: worker process"}, 200: {201: "nginx: worker process"}}
    assert nginxctl.reloaded(before, before) == []
    still = {100: {101: "nginx: worker process", 102: "nginx: worker process"}}
    assert nginxctl.reloaded(before, still) == []                       # old one not told yet
    took = {100: {101: "nginx: worker process is shutting down", 102: "nginx: worker process"},
            200: {201: "nginx: worker process"}}
    assert nginxctl.reloaded(before, took) == [100]
    assert not nginxctl.old_gone({100: before[100]}, took)
    assert nginxctl.old_gone({100: before[100]}, {100: {102: "nginx: worker process"}})


def test_system_nginx_reload_command_is_configurable(tmp_path):
    assert nginxctl.reload_command(_dep(tmp_path), "/usr/sbin/nginx") == [
        "/usr/sbin/nginx", "-s", "reload"]
    dep = _dep(tmp_path, nginx={"managed": False, "reload": ["sudo", "systemctl", "reload", "nginx"]})
    assert nginxctl.reload_command(dep, "/usr/sbin/nginx") == ["sudo", "systemctl", "reload", "nginx"]
    with pytest.raises(settings.ConfigError, match="nginx.reload"):
        _dep(tmp_path, nginx={"reload": "nginx -s reload"})


# -- the switch against a recording fake supervisord ---------------------------------

class FakeSupervisor:
    """The ``supervisor`` namespace: groups of slots; records every call."""

    def __init__(self, groups, fail_group=""):
        self.groups = {g: dict(slots) for g, slots in groups.items()}
        self.config_groups = set(self.groups)
        self.fail_group = fail_group
        self.calls = []
        self.next_pid = 1000
        self.logs = {}          # namespec -> its log's text
        self.fail_output = "Traceback...\nModuleNotFoundError: No module named 'nope'\n"

    def _slot(self, namespec):
        group, _, name = namespec.partition(":")
        if group not in self.groups or name not in self.groups[group]:
            raise xmlrpc.client.Fault(Faults.BAD_NAME, namespec)
        return self.groups[group], name

    def getAllProcessInfo(self):
        return [{"group": g, "name": n, "state": st, "pid": pid, "description": ""}
                for g, slots in self.groups.items() for n, (st, pid) in slots.items()]

    def reloadConfig(self):
        self.calls.append(("reloadConfig",))
        return [[[g for g in self.conf_groups() if g not in self.groups], [], []]]

    def conf_groups(self):
        with open(self.conf_path, encoding="utf-8") as f:
            return [line[len("[fcgi-program:"):-2] for line in f if line.startswith("[fcgi-program:")]

    def addProcessGroup(self, group):
        self.calls.append(("addProcessGroup", group))
        self.groups[group] = {"%s_%02d" % (group, i): (STOPPED, 0) for i in range(3)}
        return True

    def startProcess(self, namespec, wait):
        self.calls.append(("startProcess", namespec))
        slots, name = self._slot(namespec)
        if namespec.startswith(self.fail_group + ":") and self.fail_group:
            slots[name] = (BACKOFF, 0)
            self.logs[namespec] = self.logs.get(namespec, "") + self.fail_output
        else:
            self.next_pid += 1
            slots[name] = (RUNNING, self.next_pid)
        return True

    def stopProcess(self, namespec, wait):
        self.calls.append(("stopProcess", namespec))
        slots, name = self._slot(namespec)
        if slots[name][0] == STOPPED:
            raise xmlrpc.client.Fault(Faults.NOT_RUNNING, namespec)
        slots[name] = (STOPPED, 0)
        return True

    def removeProcessGroup(self, group):
        self.calls.append(("removeProcessGroup", group))
        if any(st != STOPPED for st, _ in self.groups[group].values()):
            raise xmlrpc.client.Fault(Faults.STILL_RUNNING, group)
        del self.groups[group]
        return True

    def signalProcess(self, namespec, signame):
        self.calls.append(("signalProcess", namespec, signame))
        self._slot(namespec)
        return True

    def readProcessStdoutLog(self, namespec, offset, length):
        text = self.logs.get(namespec, "")
        return text[offset:] if offset >= 0 else text[offset:] if -offset < len(text) else text

    def tailProcessStdoutLog(self, namespec, offset, length):
        text = self.logs.get(namespec, "")
        return [text[len(text) - length:] if length else "", len(text), False]

    def readProcessStderrLog(self, namespec, offset, length):
        raise xmlrpc.client.Fault(Faults.NO_FILE, namespec)     # redirect_stderr

    tailProcessStderrLog = readProcessStderrLog


def _switch_world(tmp_path, fail=False):
    dep = _dep(tmp_path, workers={"count": 2, "standby": 1})
    render.render(dep, host=HOST)
    old = generations.serving(dep)
    new_file = _dep(tmp_path, workers={"count": 2, "standby": 1, "socket_mode": "0600"})
    old, new = switch.prepare(new_file)
    sup = FakeSupervisor({"wiki": {"wiki_00": (RUNNING, 1), "wiki_01": (RUNNING, 2),
                                   "wiki_02": (STOPPED, 0)}},
                         fail_group=new.group if fail else "")
    sup.conf_path = dep.supervisord_conf
    events = []

    def ready(view):
        return {n: pid for n, (st, pid) in sup.groups.get(view.group, {}).items() if st == RUNNING}

    def reload_nginx(view):
        events.append(("nginx", view.socket_url))
        return {}

    def notify(view, out):
        events.append(("watchdog", generations.read(view.runtime_dir).group))
        return None

    clock = iter(range(0, 10_000)).__next__
    sw = switch.Switcher(old, new, sup, io.StringIO(), host=HOST, ready=ready,
                         reload_nginx=reload_nginx, nginx_done=lambda view, before: None,
                         notify=notify, clock=lambda: float(clock()), sleep=lambda s: None)
    return dep, old, new, sup, events, sw


def test_switch_steps_new_group_ready_then_nginx_then_watchdog_then_old_one_at_a_time(tmp_path):
    dep, old, new, sup, events, sw = _switch_world(tmp_path)
    message = sw.run()
    assert message.startswith("generation 2 (wiki_g2,")
    assert sup.calls == [
        ("reloadConfig",), ("addProcessGroup", "wiki_g2"),
        ("startProcess", "wiki_g2:wiki_g2_00"), ("startProcess", "wiki_g2:wiki_g2_01"),
        ("stopProcess", "wiki:wiki_00"), ("stopProcess", "wiki:wiki_01"),
        ("removeProcessGroup", "wiki")]
    # nginx moved to the new socket before the watchdog was told, which saw the new state.
    assert events == [("nginx", new.socket_url), ("watchdog", "wiki_g2")]
    assert set(sup.groups) == {"wiki_g2"}
    assert generations.read(dep.runtime_dir) == new.generation
    assert generations.read_switch(dep.runtime_dir) is None
    assert "[fcgi-program:wiki_g2]" in open(dep.supervisord_conf).read()
    assert "socket_mode=0600" in open(dep.supervisord_conf).read()
    site = open(os.path.join(dep.runtime_dir, "nginx-site.conf")).read()
    assert new.socket_path in site
    assert os.path.exists(new.scoreboard_path) and not os.path.exists(old.scoreboard_path)


def test_a_second_try_of_a_failed_generation_reports_its_own_error(tmp_path):
    """The generation number of a failed switch is tried again with the same
    slot names, so the same log files: only what the new start wrote counts."""
    dep, old, new, sup, events, sw = _switch_world(tmp_path, fail=True)
    with pytest.raises(switch.SwitchFailed, match="ModuleNotFoundError"):
        sw.run()

    def again():
        _, new_again = switch.prepare(_dep(tmp_path, workers={"count": 2, "standby": 1,
                                                              "socket_mode": "0600"}))
        assert new_again.group == new.group
        return switch.Switcher(old, new_again, sup, io.StringIO(), host=HOST, ready=sw.ready,
                               reload_nginx=sw.reload_nginx, nginx_done=sw.nginx_done,
                               notify=sw.notify, clock=sw.clock, sleep=sw.sleep).run()
    sup.fail_output = "Traceback...\nOSError: [Errno 98] Address already in use\n"
    with pytest.raises(switch.SwitchFailed) as info:
        again()
    assert "Address already in use" in str(info.value) and "nope" not in str(info.value)
    sup.fail_output = ""
    with pytest.raises(switch.SwitchFailed) as info:
        again()
    assert str(info.value).endswith("no output in its log"), str(info.value)


def test_new_workers_that_wait_as_warm_standbys_are_told_to_accept(tmp_path):
    """workers.warm_standby: a started worker waits until SIGUSR2; the switch
    sends it to each started slot's standby, again while it still waits, and
    counts the slot only once it is ready."""
    dep, old, new, sup, events, sw = _switch_world(tmp_path)
    waiting = {}          # slot -> how many looks it stays a standby after its signal

    def ready(view):
        running = {n: pid for n, (st, pid) in sup.groups.get(view.group, {}).items() if st == RUNNING}
        return {n: pid for n, pid in running.items() if view.group != new.group or waiting.get(n) == 0}

    def standby(view):
        out = {}
        for n, pid in ((n, pid) for n, (st, pid) in sup.groups.get(view.group, {}).items()
                       if st == RUNNING):
            signalled = sum(1 for c in sup.calls if c[:2] == ("signalProcess", "%s:%s" % (view.group, n)))
            if signalled < 2:       # the first signal is lost (sent before its handler)
                out[n] = pid
            else:
                waiting[n] = 0
        return out

    sw.ready, sw.standby = ready, standby
    sw.run()
    signals = [c for c in sup.calls if c[0] == "signalProcess"]
    assert signals == [("signalProcess", "wiki_g2:wiki_g2_00", "USR2"),
                       ("signalProcess", "wiki_g2:wiki_g2_01", "USR2")] * 2
    assert set(sup.groups) == {"wiki_g2"}


def test_a_new_generation_that_does_not_start_is_rolled_back_and_the_old_one_untouched(tmp_path):
    dep, old, new, sup, events, sw = _switch_world(tmp_path, fail=True)
    conf = open(dep.supervisord_conf).read()
    site = open(os.path.join(dep.runtime_dir, "nginx-site.conf")).read()
    with pytest.raises(switch.SwitchFailed, match="wiki_g2_00 did not start .*ModuleNotFoundError"):
        sw.run()
    assert sup.calls == [
        ("reloadConfig",), ("addProcessGroup", "wiki_g2"),
        ("startProcess", "wiki_g2:wiki_g2_00"), ("startProcess", "wiki_g2:wiki_g2_01"),
        ("stopProcess", "wiki_g2:wiki_g2_00"), ("stopProcess", "wiki_g2:wiki_g2_01"),
        ("removeProcessGroup", "wiki_g2"), ("reloadConfig",)]
    assert events == []                                  # nginx and the watchdog never told
    assert sup.groups["wiki"] == {"wiki_00": (RUNNING, 1), "wiki_01": (RUNNING, 2),
                                  "wiki_02": (STOPPED, 0)}
    assert open(dep.supervisord_conf).read() == conf
    assert open(os.path.join(dep.runtime_dir, "nginx-site.conf")).read() == site
    assert generations.current(dep).number == 1 and generations.read_switch(dep.runtime_dir) is None
    assert not os.path.exists(new.scoreboard_path)


def test_a_refused_nginx_reload_rolls_back_the_new_generation(tmp_path):
    dep, old, new, sup, events, sw = _switch_world(tmp_path)

    def refuse(view):
        raise nginxctl.ReloadFailed("nginx -s reload exited 1: bad config")

    sw.reload_nginx = refuse
    with pytest.raises(switch.SwitchFailed, match="nginx: nginx -s reload exited 1"):
        sw.run()
    assert sup.calls[-2:] == [("removeProcessGroup", "wiki_g2"), ("reloadConfig",)]
    assert old.socket_path in open(os.path.join(dep.runtime_dir, "nginx-site.conf")).read()
    assert set(sup.groups) == {"wiki"} and generations.current(dep).number == 1


def test_apply_refuses_a_second_switch_while_one_is_under_way(tmp_path):
    dep = _dep(tmp_path)
    os.makedirs(dep.runtime_dir)
    generations.write_switch(dep.runtime_dir, 1, 2, switch.Phase.DRAINING.value)
    with pytest.raises(settings.ConfigError, match=r"a generation switch \(1 -> 2, draining\)"):
        switch.prepare(_dep(tmp_path, workers={"socket_mode": "0600"}))


def test_the_watchdog_follows_the_serving_generation_on_its_reread(tmp_path):
    w, data = _world_with_file(tmp_path)
    w.started()
    (tmp_path / "deploy.toml").write_text(toml_dumps(data))
    dep = settings.load(str(tmp_path / "deploy.toml"))
    generations.write(dep.runtime_dir, generations.successor(dep, generations.first(dep)))
    w.co.state.update_slot("wiki_01", recycles=3, last_reason="requests 9 >= 9",
                           by_reason={"requests": 3})
    rid = statefile.enqueue(w.dep.runtime_dir, {"op": "apply", "rolling": False})
    w.passes(1)
    res = statefile.result(w.dep.runtime_dir, rid)
    assert res and res["ok"], res
    assert w.co.gateway.group == "wiki_g2" and w.co.sampler.group == "wiki_g2"
    assert w.co.slot_names == ["wiki_g2_%02d" % i for i in range(4)]   # 2 + 1 standby + spare
    assert w.co.sampler.scoreboard.path.endswith("scoreboard-g2")
    # The recycle history moved with the slot index: status and the counters go on.
    moved = w.co.state.slot("wiki_g2_01")
    assert (moved.recycles, moved.last_reason, dict(moved.by_reason)) == (
        3, "requests 9 >= 9", {"requests": 3})
    assert "wiki_01" not in w.co.state.slots


def test_an_old_worker_that_does_not_stop_leaves_the_new_generation_serving(tmp_path):
    dep, old, new, sup, events, sw = _switch_world(tmp_path)
    stop = sup.stopProcess

    def stuck(namespec, wait):
        if namespec == "wiki:wiki_01":
            sup.calls.append(("stopProcess", namespec))
            sup.groups["wiki"]["wiki_01"] = (ProcessStates.STOPPING, 2)
            return True
        return stop(namespec, wait)

    sup.stopProcess = stuck
    with pytest.raises(switch.DrainFailed, match="wiki_01 did not stop"):
        sw.run()
    assert ("removeProcessGroup", "wiki") not in sup.calls
    assert generations.current(dep) == new.generation             # the new one serves
    assert generations.read_switch(dep.runtime_dir) is None


def test_status_and_metrics_say_which_generation_serves_and_that_a_switch_is_under_way(tmp_path):
    from fcgi_toolkit import metrics, status
    from test_metrics import NOW, RecordingRPC, info, scrape
    dep = _dep(tmp_path, workers={"count": 2, "standby": 1})
    os.makedirs(dep.runtime_dir)
    two = generations.successor(dep, generations.first(dep))
    generations.write(dep.runtime_dir, two)
    generations.write_switch(dep.runtime_dir, 1, 2, switch.Phase.DRAINING.value, NOW - 2)
    procs = [info("wiki_00", RUNNING, 0), info("wiki_g2_00", STOPPED, group="wiki_g2"),
             info("wiki_g2_01", STOPPED, group="wiki_g2"), info("wiki_g2_02", STOPPED, group="wiki_g2")]
    group = status.gather(dep, RecordingRPC(procs), now=NOW)
    assert (group.group, group.generation) == ("wiki_g2", 2)
    assert [w.name for w in group.workers] == ["wiki_g2_00", "wiki_g2_01", "wiki_g2_02"]
    assert status.summary_line(group).endswith(
        "; generation 2; generation switch in progress (1 -> 2: draining)")
    obj = status.to_json(group)
    assert obj["generation"] == 2 and obj["switch"] == {
        "old": 1, "new": 2, "phase": "draining", "since": NOW - 2, "supervisord": 0}
    m = scrape(metrics.GroupCollector(dep, lambda: RecordingRPC(procs), clock=lambda: NOW))
    assert m[("fcgi_generation", ())] == 2 and m[("fcgi_generation_switch", ())] == 1
    generations.end_switch(dep.runtime_dir)
    assert status.gather(dep, RecordingRPC(procs), now=NOW).switch is None


# -- supervisord generations: the pure plan, the control port, the rendered files ------

Step, Undo = switch_plan.Step, switch_plan.Undo


def test_the_plan_of_each_kind_of_switch_and_what_undoes_a_failed_one():
    group = switch_plan.plan(0, 0)
    assert group == (Step.START_WORKERS, Step.SWITCH_NGINX, Step.RECORD, Step.FOLLOW, Step.DRAIN)
    assert switch_plan.plan(3, 3) == group            # a group generation inside an inner one
    front_to_inner = switch_plan.plan(0, 2)
    assert front_to_inner == (Step.START_SUPERVISORD, Step.START_WORKERS, Step.SWITCH_NGINX,
                              Step.RECORD, Step.STOP_OLD_WATCHDOG, Step.START_NEW_WATCHDOG,
                              Step.DRAIN)
    inner_to_inner = switch_plan.plan(2, 3)
    assert inner_to_inner[:-1] == front_to_inner[:-1]
    assert inner_to_inner[-1] is Step.STOP_OLD_SUPERVISORD   # it drains its own workers
    with pytest.raises(ValueError):
        switch_plan.plan(3, 2)
    # Before the new generation serves, a failure is undone; after, it is not.
    assert switch_plan.undo(group, Step.START_WORKERS) == (Undo.STOP_NEW_WORKERS, Undo.RESTORE_CONF)
    assert switch_plan.undo(group, Step.SWITCH_NGINX) == (
        Undo.RESTORE_NGINX, Undo.STOP_NEW_WORKERS, Undo.RESTORE_CONF)
    for failed in (Step.START_SUPERVISORD, Step.START_WORKERS):
        assert switch_plan.undo(inner_to_inner, failed) == (
            Undo.STOP_NEW_SUPERVISORD, Undo.RESTORE_CONF)
    assert switch_plan.undo(front_to_inner, Step.SWITCH_NGINX)[0] is Undo.RESTORE_NGINX
    for served in (Step.RECORD, Step.START_NEW_WATCHDOG, Step.DRAIN, Step.STOP_OLD_SUPERVISORD):
        with pytest.raises(ValueError, match="serves already"):
            switch_plan.undo(inner_to_inner, served)


def test_check_supervisord_needs_its_program_running_and_its_socket_answering():
    up = {"name": "wiki_s2", "state": RUNNING}
    assert switch_plan.check_supervisord(up, {"statename": "RUNNING"}, 1, 15).ready
    assert switch_plan.check_supervisord(up, None, 1, 15) == switch_plan.Verdict()
    assert switch_plan.check_supervisord({"name": "wiki_s2", "state": ProcessStates.STARTING},
                                         {"statename": "RUNNING"}, 1, 15) == switch_plan.Verdict()
    assert switch_plan.check_supervisord({"name": "wiki_s2", "state": BACKOFF}, None, 1, 15
                                         ).failed == "wiki_s2 did not start (BACKOFF)"
    assert "not up within" in switch_plan.check_supervisord(up, None, 15, 15).failed


def test_a_new_supervisord_cannot_bind_a_control_port_a_running_one_holds(tmp_path):
    control = {"inet_port": "9001", "username": "ops", "password": "pw"}
    dep = _dep(tmp_path, control=control)
    one = generations.first(dep)
    assert (one.supervisord, one.front_port, one.control_port) == (0, "127.0.0.1:9001", "127.0.0.1:9001")
    with pytest.raises(generations.ControlPortCollision,
                       match="change control.inet_port, or remove it, apply, and add it again"):
        generations.successor(dep, one, new_supervisord=True)     # the upgrade case, port kept
    moved = _dep(tmp_path, control=dict(control, inet_port="127.0.0.1:9002"))
    two = generations.successor(moved, one, new_supervisord=True)
    assert (two.number, two.supervisord, two.control_port, two.front_port) == (
        2, 2, "127.0.0.1:9002", "127.0.0.1:9001")
    # The front holds 9001 until it stops: an inner one cannot take it back.
    with pytest.raises(generations.ControlPortCollision, match="the front supervisord"):
        generations.successor(dep, two, new_supervisord=True)
    # A group generation stays in the serving supervisord, with its port.
    three = generations.successor(moved, two)
    assert (three.supervisord, three.control_port) == (2, "127.0.0.1:9002")
    assert generations.from_json(generations.to_json(three)) == three
    plain = generations.successor(_dep(tmp_path), generations.first(_dep(tmp_path)), True)
    assert (plain.supervisord, plain.control_port) == (2, "")
    with pytest.raises(settings.ConfigError, match="change control.inet_port"):
        os.makedirs(dep.runtime_dir, exist_ok=True)
        switch.prepare(dep, new_supervisord=True)


def test_an_inner_supervisord_holds_the_workers_and_the_front_keeps_nginx(tmp_path):
    dep = _dep(tmp_path, control={"inet_port": "127.0.0.1:9002", "username": "ops",
                                  "password": "pw"})
    gen = generations.successor(dep, generations.first(_dep(tmp_path)), new_supervisord=True)
    view = generations.attach(dep, gen)
    assert view.control_socket == os.path.join(dep.runtime_dir, "supervisor-g2.sock")
    assert view.supervisord_pidfile.endswith("/supervisord-g2.pid")
    assert view.front_control_socket == dep.control_socket     # the file's own view: the front
    files = render.render_all(view, HOST, dep.runtime_dir)
    assert set(files) == {"supervisord.conf", "supervisord-g2.conf", "nginx.conf", "nginx-site.conf"}
    front, inner = files["supervisord.conf"], files["supervisord-g2.conf"]
    assert "[program:wiki_s2]" in front and "[program:wiki_nginx]" in front
    assert ("lifeline --pidfile %s --signal TERM -- %s -m supervisor.supervisord -n -c %s\n"
            % (dep.front_pidfile, dep.python, view.supervisord_conf)) in front
    assert "--pidfile %s --signal QUIT" % dep.front_pidfile in front
    assert "[fcgi-program:" not in front and "[eventlistener:" not in front
    assert "[inet_http_server]" not in front
    assert "file=%s\n" % dep.control_socket in front
    assert "stopwaitsecs=%d\n" % render.stop_waits(view)["supervisord"] in front
    assert "[fcgi-program:wiki_g2]" in inner and "[eventlistener:wiki_watchdog]" in inner
    assert "[program:wiki_nginx]" not in inner and "[program:wiki_s2]" not in inner
    assert "[inet_http_server]\nport=127.0.0.1:9002\nusername=ops\npassword=pw\n" in inner
    assert "file=%s\n" % view.control_socket in inner
    assert "serverurl=unix://%s\n" % view.control_socket in inner
    assert "pidfile=%s\n" % view.supervisord_pidfile in inner
    assert "logfile=%s/supervisord-g2.log\n" % dep.log_dir in inner
    assert "identifier=wiki_s2\n" in inner
    watchdog = inner[inner.index("[eventlistener:wiki_watchdog]"):]
    assert "autostart=false\n" in watchdog.split("\n\n")[0]     # apply starts it
    render.write_rendered(view, files, dep.runtime_dir)
    assert os.stat(view.supervisord_conf).st_mode & 0o777 == 0o600   # it holds the password


class FakeHolder(FakeSupervisor):
    """A supervisord that may hold inner supervisords as programs ([program:x_sN])."""

    def conf_groups(self):
        with open(self.conf_path, encoding="utf-8") as f:
            return [line.strip()[1:-1].split(":", 1)[1] for line in f
                    if line.startswith(("[fcgi-program:", "[program:"))
                    and "_nginx]" not in line]

    def addProcessGroup(self, group):
        if "_s" not in group:
            return super().addProcessGroup(group)
        self.calls.append(("addProcessGroup", group))
        self.groups[group] = {group: (STOPPED, 0)}
        return True

    def getProcessInfo(self, name):
        slots, slot = self._slot("%s:%s" % (name, name) if ":" not in name else name)
        return {"name": slot, "state": slots[slot][0], "pid": slots[slot][1]}

    def getState(self):
        return {"statename": "RUNNING"}

    def startProcess(self, namespec, wait):
        if ":" not in namespec:
            namespec = "%s:%s" % (namespec, namespec)
        return super().startProcess(namespec, wait)

    def stopProcess(self, namespec, wait):
        if ":" not in namespec:
            namespec = "%s:%s" % (namespec, namespec)
        return super().stopProcess(namespec, wait)


def _supervisord_world(tmp_path, old_holder=0, fail_inner=False, fail_workers=False):
    """The front (with the old generation, or with inner supervisord ``old_holder``
    holding it) and the supervisords a switch to a new inner one talks to."""
    dep = _dep(tmp_path, workers={"count": 2, "standby": 1})
    os.makedirs(dep.runtime_dir, exist_ok=True)
    if old_holder:
        gen = generations.successor(dep, generations.first(dep), new_supervisord=True)
        generations.write(dep.runtime_dir, gen)
    serving = generations.serving(dep)
    render.render(serving, host=HOST)
    old, new = switch.prepare(dep, new_supervisord=True)
    slots = {n: (RUNNING, i + 1) if i < 2 else (STOPPED, 0)
             for i, n in enumerate(old.slot_names())}
    old_sup = FakeHolder({old.group: slots, "wiki_watchdog": {"wiki_watchdog": (RUNNING, 9)}})
    if old_holder:
        front = FakeHolder({old.supervisord_program: {old.supervisord_program: (RUNNING, 50)}})
    else:
        front = old_sup
    front.conf_path = dep.supervisord_conf
    new_sup = FakeHolder({new.group: {n: (STOPPED, 0) for n in new.slot_names()},
                          "wiki_watchdog": {"wiki_watchdog": (STOPPED, 0)}},
                         fail_group=new.group if fail_workers else "")
    if fail_inner:
        front.fail_group = new.supervisord_program
    holders = {old.holder: old_sup, new.holder: new_sup}
    events = []

    def ready(view):
        return {n: pid for n, (st, pid) in holders[view.holder].groups.get(view.group, {}).items()
                if st == RUNNING}

    def reload_nginx(view):
        events.append(("nginx", view.socket_url))
        return {}

    sw = switch.Switcher(old, new, front, io.StringIO(), host=HOST, ready=ready,
                         reload_nginx=reload_nginx, nginx_done=lambda view, before: None,
                         notify=lambda view, out: events.append("notified"),
                         connect=lambda view: holders[view.holder],
                         clock=lambda: float(next(_TICKS)), sleep=lambda s: None)
    return dep, old, new, front, old_sup, new_sup, events, sw


_TICKS = iter(range(0, 10**9))


def test_front_to_inner_starts_the_inner_one_moves_nginx_then_retires_the_front_workers(tmp_path):
    dep, old, new, front, old_sup, new_sup, events, sw = _supervisord_world(tmp_path)
    statefile.save_state(dep.state_path, statefile.State())
    state = statefile.load_state(dep.state_path)
    state.update_slot("wiki_01", recycles=4, last_reason="requests 9 >= 9")
    statefile.save_state(dep.state_path, state)
    message = sw.run()
    assert "serves" in message and "in wiki_s2" in message, message
    assert front is old_sup and front.calls == [
        ("reloadConfig",), ("addProcessGroup", "wiki_s2"), ("startProcess", "wiki_s2:wiki_s2"),
        ("stopProcess", "wiki_watchdog:wiki_watchdog"), ("removeProcessGroup", "wiki_watchdog"),
        ("stopProcess", "wiki:wiki_00"), ("stopProcess", "wiki:wiki_01"),
        ("removeProcessGroup", "wiki")]
    assert new_sup.calls == [
        ("startProcess", "wiki_g2:wiki_g2_00"), ("startProcess", "wiki_g2:wiki_g2_01"),
        ("startProcess", "wiki_watchdog:wiki_watchdog")]
    assert events == [("nginx", new.socket_url)]                 # no re-read: a new watchdog
    assert set(front.groups) == {"wiki_s2"}
    assert generations.read(dep.runtime_dir) == new.generation and new.holder == 2
    assert generations.read_switch(dep.runtime_dir) is None
    conf = open(dep.supervisord_conf).read()
    assert "[program:wiki_s2]" in conf and "[fcgi-program:" not in conf
    assert "[fcgi-program:wiki_g2]" in open(new.supervisord_conf).read()
    moved = statefile.load_state(dep.state_path).slot("wiki_g2_01")     # history by index
    assert (moved.recycles, moved.last_reason) == (4, "requests 9 >= 9")


def test_inner_to_inner_stops_the_old_inner_supervisord_which_drains_its_workers(tmp_path):
    dep, old, new, front, old_sup, new_sup, events, sw = _supervisord_world(tmp_path, old_holder=2)
    assert (old.holder, new.holder, new.generation_number) == (2, 3, 3)
    sw.run()
    assert front.calls == [
        ("reloadConfig",), ("addProcessGroup", "wiki_s3"), ("startProcess", "wiki_s3:wiki_s3"),
        ("stopProcess", "wiki_s2:wiki_s2"), ("removeProcessGroup", "wiki_s2")]
    assert old_sup.calls == [("stopProcess", "wiki_watchdog:wiki_watchdog")]   # before the new one
    assert new_sup.calls[-1] == ("startProcess", "wiki_watchdog:wiki_watchdog")
    assert set(front.groups) == {"wiki_s3"}
    assert not os.path.exists(old.supervisord_conf) and os.path.exists(new.supervisord_conf)


@pytest.mark.parametrize("failing", ["inner", "workers"])
def test_a_new_supervisord_that_does_not_come_up_is_stopped_and_removed(tmp_path, failing):
    dep, old, new, front, old_sup, new_sup, events, sw = _supervisord_world(
        tmp_path, old_holder=2, fail_inner=failing == "inner", fail_workers=failing == "workers")
    conf = open(dep.supervisord_conf).read()
    with pytest.raises(switch.SwitchFailed, match="generation 3: wiki_s3|wiki_g3_00 did not start"):
        sw.run()
    assert front.calls[-3:] == [("stopProcess", "wiki_s3:wiki_s3"), ("removeProcessGroup", "wiki_s3"),
                                ("reloadConfig",)]
    assert set(front.groups) == {"wiki_s2"} and old_sup.calls == [] and events == []
    assert open(dep.supervisord_conf).read() == conf
    assert not os.path.exists(new.supervisord_conf)
    assert generations.current(dep) == old.generation and generations.read_switch(dep.runtime_dir) is None
