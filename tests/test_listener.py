"""The listener shell and the coordinator with recording fakes (superlance tests/dummy.py style).

A fake supervisord RPC records every call and moves processes along one
step per ``getAllProcessInfo`` (STARTING -> RUNNING + scoreboard ready,
STOPPING -> STOPPED), a fake scoreboard and fake psutil processes stand in
for the workers, the event stream is a BytesIO, the clock is injected.
"""
from __future__ import annotations

import io
import logging
import os
import random
import xmlrpc.client

import pytest
from supervisor.states import ProcessStates as PS, SupervisorStates
from supervisor.xmlrpc import Faults

from fcgi_toolkit import settings, statefile, triggers
from fcgi_toolkit.coordinator import Coordinator
from fcgi_toolkit.listener import EventStream, Listener
from fcgi_toolkit.policy import Limits
from fcgi_toolkit.sampler import Sampler
from fcgi_toolkit.supervisord import worker_error
from fcgi_toolkit.scoreboard import SlotRecord

MB = 1024 * 1024
T0 = 1_700_000_000.0


class Clock:
    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class FakeSupervisor:
    """The ``supervisor`` namespace of the RPC proxy; records calls."""

    def __init__(self, group, names, clock):
        self.group = group
        self.clock = clock
        self.calls: list[tuple] = []
        self.procs = {n: {"name": n, "group": group, "state": PS.STOPPED, "pid": 0,
                          "description": ""} for n in names}
        self.index = {n: i for i, n in enumerate(names)}
        self.created: dict[int, float] = {}
        self.rss: dict[int, int] = {}
        self.board: dict[int, SlotRecord] = {}
        self.fail_start: set[str] = set()
        self.within_startsecs: set[str] = set()     # ready workers supervisord calls STARTING
        self.logs: dict[str, str] = {}      # what a slot writes each time it starts
        self.written: dict[str, str] = {}   # its log so far
        self.next_pid = 1000
        self.default_rss = 20 * MB
        self.supervisor_state = SupervisorStates.RUNNING
        self.warm = False       # workers.warm_standby: a started worker waits for SIGUSR2
        self.baseline = False   # records publish a baseline (the RSS at start)

    def _name(self, spec):
        group, _, name = spec.partition(":")
        assert group == self.group, spec
        if name not in self.procs:
            raise xmlrpc.client.Fault(Faults.BAD_NAME, spec)
        return name

    # -- RPC methods ------------------------------------------------------
    def getAllProcessInfo(self):
        self.calls.append(("getAllProcessInfo",))
        self.step()
        return [dict(p) for p in self.procs.values()]

    def getState(self):
        return {"statecode": self.supervisor_state,
                "statename": {1: "RUNNING", -1: "SHUTDOWN", 0: "RESTARTING"}.get(
                    self.supervisor_state, "?")}

    def startProcess(self, spec, wait=True):
        self.calls.append(("startProcess", spec, wait))
        if spec == self.group + "_nginx":       # the managed nginx, outside the group
            return True
        name = self._name(spec)
        p = self.procs[name]
        if p["state"] in (PS.STARTING, PS.RUNNING, PS.BACKOFF):
            raise xmlrpc.client.Fault(Faults.ALREADY_STARTED, spec)
        self.next_pid += 1
        pid = self.next_pid
        p.update(state=PS.STARTING, pid=pid)
        # logs[name]: what the slot writes when it starts (a failing import's traceback).
        self.written[name] = self.written.get(name, "") + self.logs.get(name, "")
        self.created[pid] = self.clock()
        self.rss[pid] = self.default_rss
        return True

    def stopProcess(self, spec, wait=True):
        self.calls.append(("stopProcess", spec, wait))
        p = self.procs[self._name(spec)]
        if p["state"] not in (PS.STARTING, PS.RUNNING, PS.BACKOFF):
            raise xmlrpc.client.Fault(Faults.NOT_RUNNING, spec)
        if p["state"] == PS.BACKOFF:
            p.update(state=PS.STOPPED, pid=0)
        else:
            p["state"] = PS.STOPPING
            rec = self.board.get(self.index[p["name"]])
            if rec:
                self.board[self.index[p["name"]]] = _replace(rec, draining=True)
        return True

    def signalProcess(self, spec, sig):
        self.calls.append(("signalProcess", spec, sig))
        p = self.procs[self._name(spec)]
        rec = self.board.get(self.index[p["name"]])
        if sig == "USR2" and rec is not None and rec.standby:
            self.board[self.index[p["name"]]] = _replace(rec, ready=True, standby=False)
        if sig == "KILL":
            # autorestart=true: supervisord starts it again.
            self.board.pop(self.index[p["name"]], None)
            p["state"] = PS.STOPPED
            self.startProcess(spec, False)
            self.calls.pop()
        return True

    def readProcessStdoutLog(self, spec, offset, length):
        self.calls.append(("readProcessStdoutLog", spec, offset, length))
        text = self.written.get(self._name(spec), "")
        return text[offset:] if offset >= 0 or -offset < len(text) else text

    def tailProcessStdoutLog(self, spec, offset, length):
        text = self.written.get(self._name(spec), "")    # not in calls: a log size only
        return [text[len(text) - length:] if length else "", len(text), False]

    def readProcessStderrLog(self, spec, offset, length):
        raise xmlrpc.client.Fault(Faults.NO_FILE, spec)

    tailProcessStderrLog = readProcessStderrLog

    # -- the world moving on ----------------------------------------------
    def step(self):
        for name, p in self.procs.items():
            i = self.index[name]
            if p["state"] == PS.STARTING:
                if name in self.within_startsecs:
                    continue
                if name in self.fail_start:
                    p["state"] = PS.BACKOFF
                else:
                    p["state"] = PS.RUNNING
                    self.board[i] = _record(i, p["pid"], self.created[p["pid"]],
                                            ready=not self.warm, standby=self.warm,
                                            baseline=self.rss[p["pid"]] if self.baseline else 0)
            elif p["state"] == PS.STOPPING:
                p.update(state=PS.STOPPED, pid=0)
                self.board.pop(i, None)

    # -- test helpers -----------------------------------------------------
    def running(self):
        return {n: p["pid"] for n, p in self.procs.items() if p["state"] == PS.RUNNING}

    def named_calls(self, method):
        return [c for c in self.calls if c[0] == method]


def _record(index, pid, created, **kw):
    values = dict(slot=index, pid=pid, started=created, requests=0, inflight=0, ready=True,
                  draining=False, req_start=0.0, req_id=0, last_duration=0.0, method="",
                  uri="")
    values.update(kw)
    return SlotRecord(**values)


def _replace(rec, **kw):
    values = dict(rec.__dict__)
    values.update(kw)
    return SlotRecord(**values)


class FakeBoard:
    def __init__(self, sup):
        self.sup = sup

    def read(self, index):
        return self.sup.board.get(index)

    def close(self):
        pass


class FakeProcess:
    def __init__(self, sup, pid):
        if pid not in sup.created:
            import psutil
            raise psutil.NoSuchProcess(pid)
        self.sup, self.pid = sup, pid

    def is_running(self):
        return any(p["pid"] == self.pid for p in self.sup.procs.values())

    def create_time(self):
        return self.sup.created[self.pid]

    def memory_info(self):
        class M:
            rss = self.sup.rss[self.pid]
        return M()


class FakeRPC:
    def __init__(self, sup):
        self.supervisor = sup


def make_dep(tmp_path, **sections):
    data = {"app": {"name": "wiki", "wsgi": "app:application"},
            # Cold standby (a stopped slot started for a replacement) unless a
            # test asks for warm_standby (tests named *warm*).
            "workers": {"count": 2, "standby": 1, "warm_standby": False},
            "recycle": {"check_interval": 1, "ready_timeout": 10, "flap_window": 5},
            "nginx": {"managed": False},
            "runtime": {"dir": str(tmp_path / "run")}}
    for section, table in sections.items():
        data.setdefault(section, {}).update(table)
    os.makedirs(tmp_path / "run", exist_ok=True)
    return settings.parse(data, str(tmp_path / "deploy.toml"))


class World:
    """A deployment, a fake supervisord and a coordinator (re-creatable: a restarted listener)."""

    def __init__(self, tmp_path, **sections):
        self.dep = make_dep(tmp_path, **sections)
        self.clock = Clock()
        self.sup = FakeSupervisor("wiki", self.dep.slot_names(), self.clock)
        self.sup.warm = Limits.from_deployment(self.dep).warm
        self.files: dict = {}
        self.new_coordinator()

    def new_coordinator(self):
        sampler = Sampler("wiki", self.dep.slot_names(), FakeBoard(self.sup),
                          Limits.from_deployment(self.dep), rng=random.Random(1),
                          clock=self.clock, process_factory=lambda pid: FakeProcess(self.sup, pid))
        self.co = Coordinator(self.dep, FakeRPC(self.sup), sampler, clock=self.clock,
                              stat=self.stat)
        return self.co

    def stat(self, path):
        if path not in self.files:
            raise FileNotFoundError(path)
        mtime, size = self.files[path]
        return os.stat_result((0o644, 0, 0, 1, 0, 0, size, mtime, mtime, mtime))

    def passes(self, n=1, every=0.25):
        for _ in range(n):
            self.co.run_pass()
            self.clock.advance(every)

    def state(self):
        return statefile.read_state(self.dep.state_path)

    def started(self):
        """Bring the group up: count workers running and ready."""
        self.passes(3)
        assert len(self.sup.running()) == self.dep.workers.count
        self.sup.calls.clear()


def test_reconcile_at_start_starts_count_slots_lowest_first_without_waiting(tmp_path):
    w = World(tmp_path)
    w.co.run_pass()
    assert w.sup.named_calls("startProcess") == [("startProcess", "wiki:wiki_00", False),
                                                 ("startProcess", "wiki:wiki_01", False)]
    w.passes(3)
    assert set(w.sup.running()) == {"wiki_00", "wiki_01"}
    assert len(w.sup.named_calls("startProcess")) == 2


def test_reconcile_stops_extra_highest_and_never_starts_a_stopping_slot(tmp_path):
    w = World(tmp_path)
    for name in ("wiki_00", "wiki_01", "wiki_02"):
        w.sup.startProcess("wiki:" + name)
    w.sup.step()
    w.sup.calls.clear()
    w.co.run_pass()
    assert w.sup.named_calls("stopProcess") == [("stopProcess", "wiki:wiki_02", False)]
    # wiki_01 crashes while wiki_02 is still STOPPING: wiki_02 must not be restarted.
    w2 = World(tmp_path / "b")
    w2.sup.startProcess("wiki:wiki_00")
    w2.sup.step()
    w2.sup.procs["wiki_02"].update(state=PS.STOPPING, pid=77)
    w2.sup.step = lambda: None        # freeze the world
    w2.sup.calls.clear()
    w2.co.run_pass()
    assert w2.sup.named_calls("startProcess") == [("startProcess", "wiki:wiki_01", False)]


def test_the_managed_nginx_starts_once_after_the_first_ready_worker(tmp_path):
    w = World(tmp_path, nginx={"managed": True})
    nginx = ("startProcess", "wiki_nginx", False)
    w.co.run_pass()                       # starts the workers; none is ready yet
    assert nginx not in w.sup.calls
    w.passes(3)
    assert w.co.last_snapshot.ready_count() >= 1
    assert w.sup.calls.count(nginx) == 1
    first_ready = next(i for i, c in enumerate(w.sup.calls) if c == nginx)
    assert any(c[0] == "startProcess" and c[1].startswith("wiki:")
               for c in w.sup.calls[:first_ready])
    w.passes(3)
    assert w.sup.calls.count(nginx) == 1


def test_rss_recycle_starts_standby_waits_ready_then_stops_offender(tmp_path, caplog):
    caplog.set_level(logging.INFO, "fcgi_toolkit.watchdog")
    w = World(tmp_path, limits={"max_rss": "100MB"})
    w.started()
    old = w.sup.running()
    w.clock.advance(60)                 # old enough not to be flapping
    w.sup.rss[old["wiki_00"]] = 150 * MB
    w.co.run_pass()
    assert w.sup.named_calls("startProcess") == [("startProcess", "wiki:wiki_02", False)]
    assert w.sup.named_calls("stopProcess") == []
    assert w.state()["recycle"]["wiki_00"]["phase"] == "starting"
    w.co.run_pass()                     # wiki_02 RUNNING and ready now
    assert w.sup.named_calls("stopProcess") == [("stopProcess", "wiki:wiki_00", False)]
    w.passes(2)
    st = w.state()
    assert st["recycle"] is None
    assert st["slots"]["wiki_00"]["recycles"] == 1
    assert st["slots"]["wiki_00"]["by_reason"] == {"rss": 1}
    assert st["slots"]["wiki_00"]["last_reason"] == "rss 150MB > 100MB"
    running = w.sup.running()
    assert set(running) == {"wiki_01", "wiki_02"} and running["wiki_01"] == old["wiki_01"]
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("recycled ")]
    assert len(done) == 1
    assert "worker=wiki_00 old_pid=%d replacement=wiki_02" % old["wiki_00"] in done[0]
    assert "reason='rss 150MB > 100MB'" in done[0] and "took=" in done[0]


def test_a_restarted_listener_resumes_a_recycle_without_doubling_it(tmp_path):
    w = World(tmp_path, limits={"max_rss": "100MB"})
    w.started()
    old = w.sup.running()
    w.clock.advance(60)
    w.sup.rss[old["wiki_00"]] = 150 * MB
    w.co.run_pass()                     # replacement started
    w.new_coordinator()                 # kill -9 of the listener; supervisord restarts it
    w.passes(4)
    assert len(w.sup.named_calls("startProcess")) == 1
    assert w.sup.named_calls("stopProcess") == [("stopProcess", "wiki:wiki_00", False)]
    assert set(w.sup.running()) == {"wiki_01", "wiki_02"}
    assert w.state()["slots"]["wiki_00"]["recycles"] == 1


def test_a_restart_lost_before_the_start_rpc_issues_it_again(tmp_path):
    w = World(tmp_path)
    w.started()
    # State saved, then the listener died before startProcess reached supervisord.
    st = w.state()
    st["recycle"] = {"wiki_00": {"offender": "wiki_00", "replacement": "wiki_02",
                                 "phase": "starting", "old_pid": w.sup.running()["wiki_00"],
                                 "new_pid": 0, "reason": "operator request", "kind": "operator",
                                 "origin": "operator", "request": None, "flapping": False,
                                 "began": w.clock(), "start_issued": w.clock()}}
    statefile.save_state(w.dep.state_path, st)
    w.new_coordinator()
    w.passes(4)
    assert w.sup.named_calls("startProcess") == [("startProcess", "wiki:wiki_02", False)]
    assert set(w.sup.running()) == {"wiki_01", "wiki_02"}


def test_failed_replacement_is_stopped_backs_off_and_the_offender_keeps_serving(tmp_path, caplog):
    w = World(tmp_path, limits={"max_rss": "100MB"})
    w.started()
    old = w.sup.running()
    w.clock.advance(60)
    w.sup.rss[old["wiki_00"]] = 150 * MB
    w.sup.fail_start.add("wiki_02")
    w.sup.logs["wiki_02"] = ("2024 wiki_02[9] ERROR cannot import the application app:application:\n"
                             "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                             "ModuleNotFoundError: No module named 'missing'\n")
    w.passes(3)
    assert w.sup.named_calls("stopProcess") == [("stopProcess", "wiki:wiki_02", False)]
    assert w.sup.running() == old
    st = w.state()
    assert st["recycle"] is None and st["slots"]["wiki_02"]["backoff_until"] > w.clock()
    assert any("No module named 'missing'" in r.getMessage() for r in caplog.records)
    # While the standby backs off, nothing else is tried.
    w.passes(3)
    assert len(w.sup.named_calls("startProcess")) == 1


def test_request_timeout_kills_once_and_slow_request_dumps_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, "fcgi_toolkit.watchdog")
    w = World(tmp_path, limits={"request_timeout": "30s", "slow_request": "5s"})
    w.started()
    pids = w.sup.running()
    rec0 = w.sup.board[0]
    w.sup.board[0] = _replace(rec0, inflight=1, req_start=w.clock() - 6, req_id=3,
                              method="GET", uri="/slow")
    w.passes(3)
    assert w.sup.named_calls("signalProcess") == [("signalProcess", "wiki:wiki_00", "USR1")]
    w.sup.board[0] = _replace(w.sup.board[0], req_start=w.clock() - 31)
    w.co.run_pass()
    w.co.run_pass()
    assert w.sup.named_calls("signalProcess")[1:] == [("signalProcess", "wiki:wiki_00", "KILL")]
    assert any("request_timeout GET /slow running 31s" in r.getMessage() for r in caplog.records)
    assert w.sup.running()["wiki_00"] != pids["wiki_00"]      # autorestarted
    assert w.state()["slots"]["wiki_00"]["by_reason"] == {"request_timeout": 1}


def test_operator_recycle_request_is_answered(tmp_path):
    w = World(tmp_path)
    w.started()
    old = w.sup.running()
    rid = statefile.enqueue(w.dep.runtime_dir, {"op": "recycle", "worker": "01"})
    bad = statefile.enqueue(w.dep.runtime_dir, {"op": "recycle", "worker": "wiki_09"})
    w.passes(4)
    res = statefile.result(w.dep.runtime_dir, rid)
    assert res["ok"] is True and "wiki_01 replaced" in res["message"]
    assert w.sup.running()["wiki_00"] == old["wiki_00"] and "wiki_01" not in w.sup.running()
    assert statefile.result(w.dep.runtime_dir, bad)["ok"] is False
    assert statefile.pending(w.dep.runtime_dir) == []


def test_reload_replaces_every_worker_one_at_a_time(tmp_path):
    w = World(tmp_path)
    w.started()
    old = set(w.sup.running().values())
    rid = statefile.enqueue(w.dep.runtime_dir, {"op": "reload"})
    peak = 0
    for _ in range(20):
        w.passes(1)
        active = sum(1 for p in w.sup.procs.values()
                     if p["state"] in (PS.STARTING, PS.RUNNING))
        peak = max(peak, active)
        assert len(w.sup.running()) >= 2 or active >= 2
    res = statefile.result(w.dep.runtime_dir, rid)
    assert res and res["ok"], res
    assert not old & set(w.sup.running().values()) and len(w.sup.running()) == 2
    assert peak <= 3                    # one replacement at a time
    assert w.state()["reload"] is None


def test_reload_stops_when_a_new_worker_fails_and_reports_its_error(tmp_path):
    w = World(tmp_path)
    w.started()
    old = w.sup.running()
    w.sup.fail_start.update({"wiki_00", "wiki_01", "wiki_02"})
    w.sup.logs["wiki_02"] = "Traceback...\nImportError: wd_version cannot load\n"
    rid = statefile.enqueue(w.dep.runtime_dir, {"op": "reload"})
    w.passes(6)
    res = statefile.result(w.dep.runtime_dir, rid)
    assert res["ok"] is False and "ImportError: wd_version cannot load" in res["message"]
    assert w.sup.running() == old
    assert w.state()["reload"] is None


def test_watched_file_changes_debounce_into_one_reload(tmp_path):
    watched = str(tmp_path / "app.py")
    w = World(tmp_path, recycle={"watch": [watched], "debounce": "2s"})
    w.files[watched] = (1, 10)
    w.started()
    old = set(w.sup.running().values())
    for i in range(5):                  # a burst of writes
        w.files[watched] = (2 + i, 10 + i)
        w.passes(1, every=0.5)
    assert w.sup.named_calls("startProcess") == []      # still inside the quiet time
    w.passes(20, every=0.5)
    assert not old & set(w.sup.running().values())
    assert len(w.sup.named_calls("startProcess")) == 2  # one rolling reload of two workers


def test_flapping_worker_backs_off_instead_of_a_restart_storm(tmp_path, caplog):
    w = World(tmp_path, limits={"max_rss": "100MB"}, recycle={"flap_window": "60s"})
    w.sup.default_rss = 150 * MB           # every fresh worker is over the limit
    w.started()
    for _ in range(40):                    # 10 s of passes
        w.passes(1)
    starts = len(w.sup.named_calls("startProcess"))
    assert 1 <= starts <= 4
    st = w.state()
    assert any(s["flapping"] for s in st["slots"].values())
    assert any("flapping" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert len(w.sup.running()) == 2


def test_worker_error_picks_the_exception_line():
    assert worker_error("a\nTraceback\n  File x\nImportError: no\n") == "ImportError: no"
    assert worker_error("just a line\n\n") == "just a line"
    assert worker_error("") == ""


# --------------------------------------------------------------------------
# The listener shell: protocol on BytesIO/StringIO, injected clock
# --------------------------------------------------------------------------

class CountingCoordinator:
    """Counts passes; ``poll`` > 0 turns on the fast poll, ``alarms`` are urgent()'s answers."""

    def __init__(self, poll=0.0, alarms=()):
        self.passes = 0
        self.polls = 0
        self.poll = poll
        self.alarms = list(alarms)

    def run_pass(self):
        self.passes += 1

    def interval(self):
        return 1.0

    def poll_interval(self):
        return self.poll

    def urgent(self):
        self.polls += 1
        return self.alarms.pop(0) if self.alarms else False


def _event(name, payload="processname:wiki_00 groupname:wiki from_state:STARTING"):
    body = payload.encode()
    header = ("ver:3.0 server:supervisor serial:1 pool:wiki_watchdog poolserial:1 "
              "eventname:%s len:%d\n" % (name, len(body))).encode()
    return header + body


def test_listener_acknowledges_events_and_runs_passes_on_time():
    clock = Clock(100.0)
    stdin = io.BytesIO(_event("TICK_5", "when:123") + _event("PROCESS_STATE_RUNNING"))
    stdout = io.StringIO()
    co = CountingCoordinator()
    listener = Listener(co, EventStream(stdin), stdout, clock=clock)
    listener.next_pass = clock() + 1.0
    assert listener.step()                 # TICK_5: answered, no pass yet
    assert co.passes == 0
    assert listener.step()                 # PROCESS_STATE: answered, pass brought forward
    assert co.passes == 0
    clock.advance(0.1)
    assert listener.step() and co.passes == 1
    assert listener.step() is False        # end of input: supervisord went away
    assert stdout.getvalue() == "RESULT 2\nOKREADY\n" * 2
    listener2 = Listener(co, EventStream(io.BytesIO(b"")), io.StringIO(), clock=clock)
    listener2.next_pass = clock() + 0.5
    listener2.events.wait = lambda timeout: clock.advance(timeout)   # a quiet select()
    assert listener2.step() and co.passes == 2
    assert listener2.next_pass == pytest.approx(clock() + 1.0)


def test_listener_payload_read_is_exact(tmp_path):
    payload = "processname:wiki_01 groupname:wiki from_state:RUNNING pid:42"
    stream = EventStream(io.BytesIO(_event("PROCESS_STATE_STOPPING", payload) + b"READY-TRAILER"))
    headers, body = stream.read()
    assert headers["eventname"] == "PROCESS_STATE_STOPPING" and body == payload


class QuietEvents:
    """No event ever arrives: wait() lets the clock run for the whole timeout."""

    def __init__(self, clock):
        self.clock = clock
        self.waits: list[float] = []

    def wait(self, timeout):
        self.waits.append(timeout)
        self.clock.advance(timeout)
        return False

    def read(self):
        raise AssertionError("no event to read")


def test_listener_fast_poll_brings_the_pass_forward_on_an_alarm():
    clock = Clock(100.0)
    co = CountingCoordinator(poll=0.1, alarms=[False, False, True])
    events = QuietEvents(clock)
    listener = Listener(co, events, io.StringIO(), clock=clock)
    listener.next_pass = clock() + 1.0
    for _ in range(3):
        assert listener.step()
    assert co.polls == 3 and co.passes == 1
    assert clock() == pytest.approx(100.2)               # not the 1 s timer
    assert listener.next_pass == pytest.approx(clock() + 1.0)
    assert max(events.waits) <= 0.1 + 1e-9
    # Without alarms it keeps polling and the timer runs the next pass.
    for _ in range(12):                  # 1.2 s in 0.1 s polls
        listener.step()
    assert co.passes == 2 and co.polls >= 12


def test_listener_without_fast_poll_sleeps_until_the_timer():
    clock = Clock(100.0)
    co = CountingCoordinator(poll=0.0, alarms=[True])
    events = QuietEvents(clock)
    listener = Listener(co, events, io.StringIO(), clock=clock)
    listener.next_pass = clock() + 1.0
    assert listener.step()
    assert co.polls == 0 and co.passes == 1 and events.waits == [pytest.approx(1.0)]


def _listen(w):
    """A listener on the world's coordinator, as if a pass had just run."""
    listener = Listener(w.co, QuietEvents(w.clock), io.StringIO(), clock=w.clock)
    listener.next_pass = w.clock() + w.co.interval()
    return listener


def test_published_rss_over_the_limit_recycles_before_the_timer(tmp_path, caplog):
    caplog.set_level(logging.INFO, "fcgi_toolkit.watchdog")
    w = World(tmp_path, limits={"max_rss": "100MB"})
    w.started()
    w.clock.advance(60)                  # old enough not to be flapping
    w.co.run_pass()
    w.sup.calls.clear()
    assert w.co.poll_interval() == pytest.approx(0.1)
    old = w.sup.running()
    listener = _listen(w)
    # Over the limit, but not published: the fast poll sees nothing, the timer decides.
    w.sup.rss[old["wiki_00"]] = 150 * MB
    for _ in range(5):
        listener.step()
    assert w.sup.calls == []
    # The worker publishes it after its next request: the next poll runs a pass at once.
    w.sup.board[0] = _replace(w.sup.board[0], rss=150 * MB, rss_time=w.clock())
    listener.step()
    assert w.sup.named_calls("startProcess") == [("startProcess", "wiki:wiki_02", False)]
    assert w.state()["recycle"]["wiki_00"]["reason"] == "rss 150MB > 100MB"
    assert any("wiki_00 pid %d published rss 150MB > 100MB" % old["wiki_00"] in r.getMessage()
               for r in caplog.records)
    # The recycle completes as usual; the offender in a recycle raises no more alarms.
    for _ in range(20):
        listener.step()
    assert set(w.sup.running()) == {"wiki_01", "wiki_02"}
    assert w.state()["slots"]["wiki_00"]["by_reason"] == {"rss": 1}


def test_one_publication_raises_one_alarm_and_the_newer_sample_decides(tmp_path):
    w = World(tmp_path, limits={"max_rss": "100MB"})
    w.started()
    w.clock.advance(60)
    w.co.run_pass()
    pid = w.sup.running()["wiki_00"]
    # Published over the limit, then the app freed it: psutil's newer sample is 20 MB.
    w.sup.board[0] = _replace(w.sup.board[0], rss=150 * MB, rss_time=w.clock() - 0.05)
    w.sup.calls.clear()
    assert w.co.urgent() is True
    w.co.run_pass()
    assert w.sup.named_calls("startProcess") == []            # no recycle
    assert w.co.urgent() is False                              # same publication: no storm
    # A later publication (still over) alarms again; psutil agrees this time.
    w.clock.advance(1)
    w.sup.rss[pid] = 150 * MB
    w.sup.board[0] = _replace(w.sup.board[0], rss=150 * MB, rss_time=w.clock())
    assert w.co.urgent() is True
    w.co.run_pass()
    assert w.sup.named_calls("startProcess") == [("startProcess", "wiki:wiki_02", False)]


def _ready_within_startsecs(w, name):
    """``name``'s new worker says ready in its slot; supervisord still says STARTING."""
    p = w.sup.procs[name]
    assert p["state"] == PS.STARTING
    w.sup.board[w.sup.index[name]] = _record(w.sup.index[name], p["pid"], w.sup.created[p["pid"]])


def test_replacement_ready_in_its_slot_stops_the_offender_while_still_starting(tmp_path):
    w = World(tmp_path, limits={"max_rss": "100MB"})
    w.started()
    old = w.sup.running()
    w.sup.within_startsecs.add("wiki_02")
    w.sup.rss[old["wiki_00"]] = 150 * MB
    w.co.run_pass()
    assert w.sup.named_calls("startProcess") == [("startProcess", "wiki:wiki_02", False)]
    assert w.co.urgent() is False                  # not ready in its slot yet
    _ready_within_startsecs(w, "wiki_02")
    assert w.co.urgent() is True                   # the fast poll sees it: pass now
    assert w.co.urgent() is False                  # once per replacement
    w.co.run_pass()
    assert w.sup.named_calls("stopProcess") == [("stopProcess", "wiki:wiki_00", False)]
    assert w.sup.procs["wiki_02"]["state"] == PS.STARTING
    assert w.sup.running()["wiki_01"] == old["wiki_01"]   # the other worker holds the socket


def test_a_lone_worker_waits_for_its_replacement_to_leave_starting(tmp_path):
    # workers.count = 1: if the replacement died within startsecs after the offender
    # stopped, no process would hold the socket.
    w = World(tmp_path, limits={"max_rss": "100MB"}, workers={"count": 1, "standby": 1})
    w.started()
    old = w.sup.running()
    w.sup.within_startsecs.add("wiki_01")
    w.sup.rss[old["wiki_00"]] = 150 * MB
    w.co.run_pass()
    _ready_within_startsecs(w, "wiki_01")
    w.co.run_pass()
    assert w.sup.named_calls("stopProcess") == []
    w.sup.within_startsecs.clear()
    w.co.run_pass()                                # RUNNING now
    assert w.sup.named_calls("stopProcess") == [("stopProcess", "wiki:wiki_00", False)]


def test_no_rss_poll_without_max_rss_but_requests_are_still_looked_for(tmp_path):
    w = World(tmp_path)
    w.started()
    w.sup.board[0] = _replace(w.sup.board[0], rss=10_000 * MB, rss_time=w.clock())
    assert w.co.poll_interval() == pytest.approx(triggers.REQUEST_POLL) and w.co.urgent() is False


def test_an_operator_request_is_served_by_a_pass_at_once_not_at_the_timer(tmp_path):
    w = World(tmp_path)
    w.started()
    listener = _listen(w)
    assert listener.next_pass - w.clock() == pytest.approx(w.co.check_interval)
    for _ in range(3):
        listener.step()                  # fast polls: nothing asked, no pass
    assert w.sup.named_calls("startProcess") == []
    victim = sorted(w.sup.running())[0]
    request_id = statefile.enqueue(w.co.runtime_dir, {"op": "recycle", "worker": victim})
    timer = listener.next_pass
    listener.step()                      # the next poll sees the request: a pass now
    assert w.clock() < timer             # before the timed pass would have run
    assert victim in (w.state()["recycle"] or {}), w.state()
    assert w.co.urgent() is False        # one look per change
    statefile.forget(w.co.runtime_dir, request_id)


# --------------------------------------------------------------------------
# supervisord shutting down: the watchdog stands by quietly
# --------------------------------------------------------------------------

def test_at_supervisord_shutdown_no_recycle_begins_and_nothing_is_logged_as_error(tmp_path,
                                                                                  caplog):
    caplog.set_level(logging.INFO, "fcgi_toolkit.watchdog")
    w = World(tmp_path, limits={"max_rss": "100MB"})
    w.started()
    w.clock.advance(60)
    w.sup.rss[w.sup.running()["wiki_00"]] = 150 * MB        # over the limit
    w.sup.supervisor_state = SupervisorStates.SHUTDOWN
    w.passes(4)
    assert w.sup.named_calls("startProcess") == [] and w.sup.named_calls("stopProcess") == []
    assert w.state()["recycle"] is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("shutting down" in r.getMessage() for r in caplog.records) == 1


def test_a_shutdown_fault_mid_recycle_is_not_a_failed_replacement(tmp_path, caplog):
    caplog.set_level(logging.INFO, "fcgi_toolkit.watchdog")
    w = World(tmp_path, limits={"max_rss": "100MB"})
    w.started()
    w.clock.advance(60)
    w.sup.rss[w.sup.running()["wiki_00"]] = 150 * MB

    def refuse(spec, wait=True):
        # getState may still say RUNNING when the shutdown begins between the two calls.
        w.sup.calls.append(("startProcess", spec, wait))
        raise xmlrpc.client.Fault(Faults.SHUTDOWN_STATE, "SHUTDOWN_STATE")

    w.sup.startProcess = refuse
    w.co.run_pass()
    w.sup.supervisor_state = SupervisorStates.SHUTDOWN
    w.passes(3)
    assert w.sup.named_calls("startProcess") == [("startProcess", "wiki:wiki_02", False)]
    assert w.sup.named_calls("stopProcess") == []
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == [] and not any("replacement failed" in r.getMessage()
                                    for r in caplog.records)
    st = w.state()
    assert st["slots"]["wiki_02"]["backoff_until"] == 0.0 and st["slots"]["wiki_02"]["fails"] == 0
    # The recycle stays in the state file: a listener started by the next supervisord resumes it.
    assert st["recycle"]["wiki_00"]["phase"] == "starting"


def test_without_a_ready_worker_nginx_starts_after_ready_timeout_with_a_warning(tmp_path,
                                                                                caplog):
    w = World(tmp_path, nginx={"managed": True})
    w.sup.fail_start.update(w.dep.slot_names())
    nginx = ("startProcess", "wiki_nginx", False)
    w.passes(30)                          # 7.5 s < recycle.ready_timeout (10 s)
    assert nginx not in w.sup.calls
    w.passes(20)
    assert w.sup.calls.count(nginx) == 1
    assert "no worker ready after" in caplog.text


def test_nginx_is_due_after_a_ready_worker_or_after_ready_timeout_without_one():
    from fcgi_toolkit.nginx_start import nginx_due
    assert not nginx_due(0, 4.9, 5.0)
    assert nginx_due(1, 0.0, 5.0)
    assert nginx_due(0, 5.0, 5.0)
