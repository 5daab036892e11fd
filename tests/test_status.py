"""status: pure state derivation and formatting, then gather() with a recording fake RPC."""
from __future__ import annotations

import errno
import dataclasses
import json
import os
import socket
import xmlrpc.client
from types import SimpleNamespace

import pytest
from supervisor.states import ProcessStates

from fcgi_toolkit import scoreboard, settings, status
from fcgi_toolkit.scoreboard import SlotRecord, SlotWriter
from fcgi_toolkit.policy import SlotSnapshot
from fcgi_toolkit.names import format_duration, format_size
from fcgi_toolkit.status import (GroupStatus, Inflight, WorkerView, derive_state, format_table,
                                 group_status, to_json, worker_view)

NOW = 1_800_000_000.0
MB = 1024 * 1024


def record(slot=0, pid=100, started=NOW - 60, requests=5, inflight=0, ready=True,
           draining=False, req_start=0.0, method="", uri="", standby=False):
    return SlotRecord(slot=slot, pid=pid, started=started, requests=requests, inflight=inflight,
                      ready=ready, draining=draining, req_start=req_start, req_id=requests + 1,
                      last_duration=0.01, method=method, uri=uri, standby=standby)


def info(name, state, pid=0, start=0, group="wiki"):
    return {"name": name, "group": group, "state": state,
            "statename": {0: "STOPPED", 10: "STARTING", 20: "RUNNING", 30: "BACKOFF",
                          40: "STOPPING", 100: "EXITED", 200: "FATAL"}.get(state, "UNKNOWN"),
            "pid": pid, "start": start, "now": int(NOW)}


# -- derive_state: every branch, plain values --------------------------------

@pytest.mark.parametrize("sup,rec,slot_state,short,expected", [
    (ProcessStates.RUNNING, record(), {}, False, "ready"),
    (ProcessStates.RUNNING, record(inflight=1, req_start=NOW - 2), {}, False, "busy"),
    (ProcessStates.RUNNING, record(ready=False), {}, False, "starting"),
    (ProcessStates.RUNNING, None, {}, False, "starting"),
    (ProcessStates.RUNNING, record(draining=True, inflight=1), {}, False, "draining"),
    (ProcessStates.RUNNING, record(), {"flapping": True}, False, "flapping"),
    (ProcessStates.STARTING, None, {}, False, "starting"),
    (ProcessStates.STARTING, record(ready=False), {}, False, "starting"),
    # Within startsecs a worker may accept already: it is ready, as the watchdog counts it.
    (ProcessStates.STARTING, record(), {}, False, "ready"),
    (ProcessStates.STARTING, record(inflight=1, req_start=NOW - 1), {}, False, "busy"),
    (ProcessStates.RUNNING, record(ready=False, standby=True), {}, False, "warm"),
    (ProcessStates.STARTING, record(ready=False, standby=True), {}, False, "warm"),
    (ProcessStates.RUNNING, record(ready=False, standby=True, draining=True), {}, False,
     "draining"),
    (ProcessStates.STOPPING, record(), {}, False, "draining"),
    (ProcessStates.BACKOFF, None, {}, False, "backoff"),
    (ProcessStates.FATAL, None, {}, False, "fatal"),
    (ProcessStates.EXITED, None, {}, False, "exited"),
    (ProcessStates.STOPPED, None, {}, False, "standby"),
    (ProcessStates.STOPPED, None, {}, True, "stopped"),
    (ProcessStates.STOPPED, None, {"flapping": True, "backoff_until": NOW + 30}, False, "flapping"),
    (ProcessStates.STOPPED, None, {"backoff_until": NOW + 30}, False, "backoff"),
    (ProcessStates.STOPPED, None, {"backoff_until": NOW - 30}, False, "standby"),
    (ProcessStates.UNKNOWN, None, {}, False, "unknown"),
])
def test_derive_state(sup, rec, slot_state, short, expected):
    assert derive_state(sup, rec, slot_state, short, NOW) == expected
    assert expected in status.STATES


def snap(name, state, pid=0, created=None, rss=0, rec=None):
    index = int(name.rsplit("_", 1)[1])
    return SlotSnapshot(name=name, index=index, state=state, pid=pid, create_time=created,
                        rss=rss, record=rec, age=NOW - created if created else 0.0)


def test_worker_view_from_a_live_snapshot():
    rec = record(pid=100, started=NOW - 60, requests=7, inflight=1, req_start=NOW - 3,
                 method="GET", uri="/slow?s=5")
    v = worker_view("wiki_00", snap("wiki_00", ProcessStates.RUNNING, 100, NOW - 60, 30 * MB, rec),
                    {}, False, NOW)
    assert v.state == "busy" and v.serving and v.supervisor_state == "RUNNING"
    assert v.pid == 100 and v.requests == 7 and v.rss_bytes == 30 * MB
    assert v.inflight == Inflight("GET", "/slow?s=5", 3.0)
    assert v.age_seconds == 60.0


def test_worker_view_without_a_live_record():
    # The sampler found the process but no live scoreboard record (pid reused, or
    # the worker has not written its slot yet).
    v = worker_view("wiki_00", snap("wiki_00", ProcessStates.RUNNING, 100, NOW - 5, 10 * MB),
                    {}, False, NOW)
    assert v.state == "starting" and not v.serving
    assert v.requests is None and v.inflight is None
    assert v.age_seconds == 5.0 and v.rss_bytes == 10 * MB
    # The process could not be probed (gone, or not ours): nothing but the pid.
    v = worker_view("wiki_00", snap("wiki_00", ProcessStates.RUNNING, 100), {}, False, NOW)
    assert v.pid == 100 and v.rss_bytes is None and v.age_seconds is None and not v.serving
    # Not listed by supervisord at all.
    v = worker_view("wiki_00", None, {}, False, NOW)
    assert v.state == "unknown" and v.pid is None and v.supervisor_state == "UNKNOWN"


def test_worker_view_stopped_slot_carries_state_file_record():
    slot_state = {"recycles": 3, "last_reason": "rss 301MB > 256MB", "last_time": NOW - 300,
                  "by_reason": {"rss": 2, "requests": 1}, "flapping": False, "backoff_until": 0}
    v = worker_view("wiki_02", snap("wiki_02", ProcessStates.STOPPED), slot_state, False, NOW)
    assert v.state == "standby" and v.pid is None and v.age_seconds is None
    assert v.recycles == 3 and v.last_reason == "rss 301MB > 256MB"
    assert v.last_recycle_time == NOW - 300
    assert v.by_reason == {"rss": 2, "requests": 1}


def test_worker_view_tolerates_junk_in_state_file():
    # A fresh slot record (statefile.new_slot_state) and outright junk.
    fresh = {"recycles": 0, "last_reason": "", "last_time": 0.0, "by_reason": {},
             "flapping": False, "backoff_until": 0.0, "fails": 0, "life": None}
    junk = {"recycles": "many", "last_time": None, "backoff_until": "soon", "by_reason": [1]}
    for slot_state in (fresh, junk):
        v = worker_view("wiki_00", snap("wiki_00", ProcessStates.STOPPED), slot_state, False, NOW)
        assert (v.recycles, v.last_reason, v.last_recycle_time, v.state, v.by_reason) == (
            0, None, None, "standby", {})


def _group(snaps, state=None, count=2, standby=1):
    return group_status("wiki", count, standby, ["wiki_00", "wiki_01", "wiki_02"], snaps,
                        state or {}, NOW)


def test_group_status_counts_and_standby_vs_stopped():
    s0 = snap("wiki_00", ProcessStates.RUNNING, 100, NOW - 60, 20 * MB, record(0, 100, NOW - 60))
    s1 = snap("wiki_01", ProcessStates.RUNNING, 101, NOW - 30, 25 * MB,
              record(1, 101, NOW - 30, inflight=1, req_start=NOW - 1, method="POST", uri="/x"))
    s2 = snap("wiki_02", ProcessStates.STOPPED)
    g = _group([s0, s1, s2], {"slots": {"wiki_01": {"recycles": 2, "last_reason": "requests 50 >= 50",
                                                    "last_time": NOW - 31}}})
    assert [w.state for w in g.workers] == ["ready", "busy", "standby"]
    assert g.ready == 2 and g.recycles == 2

    # One worker down: the stopped slot is a hole, not a standby.
    g = _group([s0, snap("wiki_01", ProcessStates.EXITED), s2])
    assert [w.state for w in g.workers] == ["ready", "exited", "stopped"]
    assert g.ready == 1


def test_group_status_slot_unknown_to_supervisord():
    g = _group([])
    assert [w.state for w in g.workers] == ["unknown"] * 3 and g.ready == 0


# -- formatting --------------------------------------------------------------

@pytest.mark.parametrize("value,text", [
    (None, "-"), (0, "0KB"), (512 * 1024, "512KB"), (301 * MB, "301MB"),
    (int(2.5 * 1024 * MB), "2.5GB")])
def test_format_size(value, text):
    assert format_size(value) == text


@pytest.mark.parametrize("value,text", [
    (None, "-"), (2.14, "2s"), (45, "45s"), (180, "3m"), (185, "3m05s"), (6 * 3600, "6h"),
    (6 * 3600 + 125, "6h02m"), (2 * 86400 + 4 * 3600 + 59, "2d04h"), (2 * 86400, "2d")])
def test_format_duration(value, text):
    assert format_duration(value) == text


def _view(name, state, **kw):
    base = dict(name=name, state=state, supervisor_state="RUNNING", pid=None, rss_bytes=None,
                requests=None, age_seconds=None, inflight=None, recycles=0, last_reason=None,
                last_recycle_time=None, serving=False, by_reason={})
    base.update(kw)
    return WorkerView(**base)


def _sample_status():
    return GroupStatus(group="wiki", count=2, standby=1, generated_at=NOW, workers=(
        _view("wiki_00", "busy", pid=4242, rss_bytes=31 * MB, requests=17, age_seconds=73.5,
              inflight=Inflight("GET", "/slow?s=5", 2.1), recycles=1,
              last_reason="requests 1043 >= 1021", last_recycle_time=NOW - 120, serving=True),
        _view("wiki_01", "ready", pid=4243, rss_bytes=30 * MB, requests=3, age_seconds=7300,
              serving=True),
        _view("wiki_02", "standby", supervisor_state="STOPPED")))


def test_format_table():
    text = format_table(_sample_status())
    lines = text.splitlines()
    assert lines[0].split() == ["WORKER", "STATE", "PID", "RSS", "REQS", "AGE", "RECYCLES",
                                "LAST", "REASON", "IN", "FLIGHT"]
    assert lines[1].split() == ["wiki_00", "busy", "4242", "31MB", "17", "1m13s", "1",
                                "requests", "1043", ">=", "1021", "GET", "/slow?s=5", "(2s)"]
    assert lines[2].split() == ["wiki_01", "ready", "4243", "30MB", "3", "2h01m", "0", "-", "-"]
    assert lines[3].split() == ["wiki_02", "standby", "-", "-", "-", "-", "0", "-", "-"]
    # Columns line up: every row's STATE starts where the header's does.
    col = lines[0].index("STATE")
    assert all(line[col - 2:col] == "  " and line[col] != " " for line in lines[1:4])
    assert lines[4] == ("wiki: 2/2 workers ready, 1 standby, 1 recycle "
                        "(last 2m ago: wiki_00 requests 1043 >= 1021)")


def test_summary_mentions_work_in_progress():
    s = _sample_status()
    with_reload = GroupStatus(**{**s.__dict__, "reload": {"started": NOW}})
    # statefile.py: "recycle" is {OFFENDER: {"replacement": ..., "phase": ...}}
    with_recycle = GroupStatus(**{**s.__dict__, "recycle": {
        "wiki_01": {"offender": "wiki_01", "replacement": "wiki_02", "phase": "starting"}}})
    assert format_table(with_reload).rstrip().endswith("; reload in progress")
    assert format_table(with_recycle).rstrip().endswith(
        "; recycle in progress (wiki_01 -> wiki_02)")


def test_summary_and_json_name_the_keys_that_drifted():
    drifted = GroupStatus(**{**_sample_status().__dict__,
                             "drift": ("workers.threads", "limits.max_requests")})
    assert format_table(drifted).rstrip().endswith(
        "; the file differs from the running deployment (fcgi-toolkit apply): "
        "workers.threads, limits.max_requests")
    assert to_json(drifted)["drift"] == ["workers.threads", "limits.max_requests"]
    in_sync = GroupStatus(**{**_sample_status().__dict__, "drift": ()})
    assert "differs" not in format_table(in_sync) and to_json(in_sync)["drift"] == []


def test_to_json_is_the_documented_object():
    obj = json.loads(json.dumps(to_json(_sample_status())))
    assert set(obj) == {"group", "count", "standby", "ready", "recycles", "workers",
                        "generated_at", "drift", "generation", "switch", "supervisord"}
    assert obj["drift"] is None      # no applied snapshot: unknown
    assert (obj["generation"], obj["switch"]) == (1, None)
    assert (obj["group"], obj["count"], obj["standby"], obj["ready"]) == ("wiki", 2, 1, 2)
    w0, _, w2 = obj["workers"]
    assert set(w0) == {"name", "state", "supervisor_state", "pid", "rss_bytes", "requests",
                       "age_seconds", "inflight", "recycles", "last_reason",
                       "last_recycle_time"}
    assert w0["inflight"] == {"method": "GET", "uri": "/slow?s=5", "seconds": 2.1}
    assert w0["rss_bytes"] == 31 * MB and w0["last_recycle_time"] == NOW - 120
    assert w2["pid"] is None and w2["inflight"] is None and w2["state"] == "standby"


# -- gather(): recording fake RPC, real scoreboard file, injected probe ------

class RecordingRPC:
    """The ``supervisor`` namespace; records calls (superlance dummy style)."""

    def __init__(self, infos=None, error=None):
        self.infos = infos or []
        self.error = error
        self.calls = []

    def getAllProcessInfo(self):
        self.calls.append("getAllProcessInfo")
        if self.error:
            raise self.error
        return self.infos


class FakeProcesses:
    """Stands in for psutil.Process: {pid: (create_time, rss)}; records the pids asked for."""

    def __init__(self, table):
        self.table = table
        self.asked = []

    def __call__(self, pid):
        import psutil
        self.asked.append(pid)
        if pid not in self.table:
            raise psutil.NoSuchProcess(pid)
        created, rss = self.table[pid]
        return SimpleNamespace(is_running=lambda: True, create_time=lambda: created,
                               memory_info=lambda: SimpleNamespace(rss=rss))


@pytest.fixture
def dep(tmp_path):
    path = tmp_path / "deploy.toml"
    return settings.parse({"app": {"name": "wiki", "wsgi": "app:application"},
                           "workers": {"count": 2, "standby": 1},
                           "runtime": {"dir": str(tmp_path / "rt")}}, str(path))


def test_gather_joins_rpc_scoreboard_state_file_and_probe(dep):
    os.makedirs(dep.runtime_dir)
    scoreboard.create(dep.scoreboard_path, dep.slots)
    clock = [NOW - 4]
    w0 = SlotWriter(dep.scoreboard_path, 0, dep.slots, pid=100, started=NOW - 60,
                    clock=lambda: clock[0])
    w0.set_ready()
    w0.end(w0.begin("GET", "/a"))
    w0.begin("GET", "/slow?s=5")
    w1 = SlotWriter(dep.scoreboard_path, 1, dep.slots, pid=101, started=NOW - 30)
    w1.set_ready()
    w1.set_draining()
    with open(dep.state_path, "w") as f:
        json.dump({"version": 1, "slots": {"wiki_00": {
            "recycles": 3, "last_reason": "rss 301MB > 256MB", "last_time": NOW - 10,
            "by_reason": {"rss": 2, "requests": 1}, "flapping": False, "backoff_until": 0}},
            "recycle": None, "reload": None}, f)
    rpc = RecordingRPC([info("wiki_00", ProcessStates.RUNNING, 100, NOW - 60),
                        info("wiki_01", ProcessStates.STOPPING, 101, NOW - 30),
                        info("wiki_02", ProcessStates.STARTING, 102, NOW - 1),
                        info("other", ProcessStates.RUNNING, 555, NOW - 1, group="other")])
    procs = FakeProcesses({100: (NOW - 60, 40 * MB), 101: (NOW - 30, 50 * MB),
                           102: (NOW - 1, 5 * MB)})
    g = status.gather(dep, rpc, now=NOW, process_factory=procs)
    assert rpc.calls == ["getAllProcessInfo"]
    assert sorted(procs.asked) == [100, 101, 102]     # only the group's processes
    w = {v.name: v for v in g.workers}
    assert w["wiki_00"].state == "busy" and w["wiki_00"].requests == 1
    assert w["wiki_00"].inflight == Inflight("GET", "/slow?s=5", 4.0)
    assert w["wiki_00"].recycles == 3 and w["wiki_00"].rss_bytes == 40 * MB
    assert w["wiki_01"].state == "draining" and not w["wiki_01"].serving
    assert w["wiki_02"].state == "starting" and w["wiki_02"].requests is None
    assert g.ready == 1
    w0.close()
    w1.close()


def test_gather_without_scoreboard_or_state_file(dep):
    rpc = RecordingRPC([info("wiki_00", ProcessStates.STOPPED)])
    g = status.gather(dep, rpc, now=NOW, process_factory=FakeProcesses({}))
    assert [v.state for v in g.workers] == ["stopped", "unknown", "unknown"]


def test_gather_ignores_a_record_left_by_a_dead_worker(dep):
    """pid reused: same pid, another start time: the old slot record is not shown."""
    os.makedirs(dep.runtime_dir)
    old = SlotWriter(dep.scoreboard_path, 0, dep.slots, pid=100, started=NOW - 600)
    old.set_ready()
    old.begin("GET", "/old")
    rpc = RecordingRPC([info("wiki_00", ProcessStates.RUNNING, 100, NOW - 2)])
    g = status.gather(dep, rpc, now=NOW, process_factory=FakeProcesses({100: (NOW - 2, MB)}))
    w0 = g.workers[0]
    assert w0.state == "starting" and w0.inflight is None and w0.requests is None
    assert w0.age_seconds == 2 and w0.rss_bytes == MB
    old.close()


@pytest.mark.parametrize("err", [errno.ENOENT, errno.ECONNREFUSED])
def test_gather_reports_supervisord_not_running(dep, err):
    rpc = RecordingRPC(error=OSError(err, os.strerror(err)))
    with pytest.raises(status.SupervisorUnavailable, match="supervisord is not running"):
        status.gather(dep, rpc, now=NOW)


def test_status_command_exits_1_when_supervisord_is_not_running(tmp_path, capsys):
    from fcgi_toolkit import cli
    deploy = tmp_path / "deploy.toml"
    deploy.write_text('[app]\nname = "wiki"\nwsgi = "app:application"\n'
                      '[runtime]\ndir = "%s"\n' % (tmp_path / "rt"))
    assert cli.main(["status", "-c", str(deploy)]) == 1
    err = capsys.readouterr().err
    assert "supervisord is not running" in err and "supervisor.sock" in err

    # A stale socket file with nobody listening: refused, same message.
    os.makedirs(tmp_path / "rt")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "rt" / "supervisor.sock"))
    stale.close()
    assert cli.main(["status", "-c", str(deploy), "--json"]) == 1
    assert "supervisord is not running" in capsys.readouterr().err


# -- several hosts: status on the web server (issue #6) ----------------------

from fcgi_toolkit.status import (format_hosts_table, gather_hosts, host_status,  # noqa: E402
                                 hosts_to_json, remote_worker_view, unreachable_reason)
import threading  # noqa: E402
import xmlrpc.client  # noqa: E402

HOST_INFO_NOW = int(NOW)


def remote_info(name, state, pid=0, age=0, group="wiki"):
    return dict(info(name, state, pid, HOST_INFO_NOW - age if age else 0, group),
                now=HOST_INFO_NOW)


@pytest.mark.parametrize("state,short,expected", [
    (ProcessStates.RUNNING, False, "running"),
    (ProcessStates.STARTING, False, "starting"),
    (ProcessStates.STOPPING, False, "draining"),
    (ProcessStates.STOPPED, False, "standby"),
    (ProcessStates.STOPPED, True, "stopped"),
    (ProcessStates.BACKOFF, False, "backoff"),
    (ProcessStates.EXITED, False, "exited"),
    (ProcessStates.FATAL, False, "fatal"),
])
def test_remote_worker_view_is_supervisords_view_only(state, short, expected):
    v = remote_worker_view("wiki_00", remote_info("wiki_00", state, 4242, age=65), short)
    assert v.state == expected and expected in status.STATES
    up = state in (ProcessStates.RUNNING, ProcessStates.STARTING, ProcessStates.STOPPING)
    assert v.pid == (4242 if up else None)
    assert v.age_seconds == (65.0 if up else None)
    # What lives in the host's scoreboard and state file is unknown here.
    assert (v.rss_bytes, v.requests, v.inflight, v.recycles, v.last_reason) == (None,) * 5
    assert not v.serving


def test_remote_worker_view_slot_not_listed():
    v = remote_worker_view("wiki_03", None, False)
    assert v.state == "unknown" and v.pid is None and v.supervisor_state == "UNKNOWN"


def _spec(name="web1", address="127.0.0.2:9000", count=2, backup=False):
    return settings.HostSpec(name=name, address=address, count=count, backup=backup,
                             max_fails=1, fail_timeout=10.0)


def test_host_status_from_process_infos():
    infos = [remote_info("wiki_00", ProcessStates.RUNNING, 100, age=30),
             remote_info("wiki_01", ProcessStates.EXITED),
             remote_info("wiki_02", ProcessStates.STOPPED),
             remote_info("wiki_watchdog", ProcessStates.RUNNING, 99, age=40, group="wiki_watchdog")]
    h = host_status("wiki", _spec(count=2), 1, "http://127.0.0.2:9001", infos)
    assert h.up and h.error is None and h.running == 1
    assert [(w.name, w.state) for w in h.workers] == [
        ("wiki_00", "running"), ("wiki_01", "exited"), ("wiki_02", "stopped")]   # a hole: 1 < 2


class FakeHostRPC:
    """One host's ``supervisor`` namespace: records calls; may fail."""

    def __init__(self, identity, infos=(), error=None):
        self.identity, self.infos, self.error = identity, list(infos), error
        self.calls = []

    def getIdentification(self):
        self.calls.append("getIdentification")
        if self.error:
            raise self.error
        return self.identity

    def getAllProcessInfo(self):
        self.calls.append("getAllProcessInfo")
        return self.infos


class NoFcgi:
    """The fcgi namespace of a supervisord without our rpcinterface."""

    def status(self):
        from supervisor.xmlrpc import Faults
        raise xmlrpc.client.Fault(Faults.UNKNOWN_METHOD, "UNKNOWN_METHOD")


class FakeFcgi:
    """The fcgi namespace (fcgi_toolkit.rpcinterface): answers a status object."""

    def __init__(self, obj):
        self.obj = obj

    def status(self):
        return json.dumps(self.obj)


class FakeServer:
    """A ServerProxy stand-in: a context manager with a ``supervisor`` attribute."""

    def __init__(self, rpc, fcgi=None):
        self.supervisor = rpc
        self.fcgi = fcgi or NoFcgi()
        self.closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.closed = True


def multi_dep(tmp_path, control=True, hosts=None, inet_port="9001"):
    raw = {"app": {"name": "wiki", "wsgi": "app:application"},
           "workers": {"count": 1, "standby": 1},
           "nginx": {"web_servers": ["127.0.0.1"]},
           "runtime": {"dir": str(tmp_path / "rt")},
           "hosts": hosts or [{"name": "web1", "address": "127.0.0.2:9000", "count": 2},
                              {"name": "web2", "address": "127.0.0.3:9000"},
                              {"name": "spare", "address": "127.0.0.4:9000", "backup": True}]}
    if control:
        raw["control"] = {"inet_port": inet_port, "username": "ops", "password": "s3cret"}
    return settings.parse(raw, str(tmp_path / "deploy.toml"))


def test_gather_hosts_one_host_down(tmp_path):
    dep = multi_dep(tmp_path)
    rpcs = {
        "http://127.0.0.2:9001": FakeHostRPC("wiki_web1", [
            remote_info("wiki_00", ProcessStates.RUNNING, 100, age=30),
            remote_info("wiki_01", ProcessStates.RUNNING, 101, age=20),
            remote_info("wiki_02", ProcessStates.STOPPED)]),
        "http://127.0.0.3:9001": FakeHostRPC("wiki_web2", error=ConnectionRefusedError(
            errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))),
        "http://127.0.0.4:9001": FakeHostRPC("wiki_spare", [
            remote_info("wiki_00", ProcessStates.RUNNING, 300, age=5),
            remote_info("wiki_01", ProcessStates.STOPPED)]),
    }
    servers = []

    def connect(url):
        servers.append(FakeServer(rpcs[url]))
        return servers[-1]

    d = gather_hosts(dep, connect=connect, now=NOW)
    assert [h.name for h in d.hosts] == ["web1", "web2", "spare"]   # the file's order
    assert d.down == ["web2"]
    web1, web2, spare = d.hosts
    assert rpcs["http://127.0.0.2:9001"].calls == ["getIdentification", "getAllProcessInfo"]
    assert all(s.closed for s in servers) and len(servers) == 3
    assert [w.state for w in web1.workers] == ["running", "running", "standby"]
    assert web1.count == 2 and web1.running == 2 and web1.control_url == "http://127.0.0.2:9001"
    assert not web2.up and web2.workers == () and "connection refused" in web2.error
    assert "http://127.0.0.3:9001" in web2.error
    assert spare.backup and [w.pid for w in spare.workers] == [300, None]

    text = format_hosts_table(d)
    lines = text.splitlines()
    assert lines[0].split() == ["HOST", "WORKER", "STATE", "PID", "AGE", "NOTE"]
    assert lines[1].split() == ["web1", "wiki_00", "running", "100", "30s"]
    assert lines[3].split() == ["web1", "wiki_02", "standby", "-", "-"]
    assert lines[4].split()[:5] == ["web2", "-", "down", "-", "-"] and "connection refused" in lines[4]
    assert lines[5].split() == ["spare", "wiki_00", "running", "300", "5s", "backup", "host"]
    assert lines[7] == "wiki: 3 hosts, 2 up, 1 down (web2); 3/4 workers running"
    assert lines[8] == status.REMOTE_NOTE and "FCGI_TOOLKIT_HOST=NAME" in lines[8]

    # A rollout under way on this web server (apply): one more line, and in the JSON.
    under_way = dataclasses.replace(d, rollout={"host": "web2", "phase": "restarting",
                                                "done": ["web1"], "since": NOW - 12})
    lines = format_hosts_table(under_way).splitlines()
    assert lines[8] == "rollout under way: host web2 restarting for 12s; done: web1"
    assert hosts_to_json(under_way)["rollout"]["phase"] == "restarting"

    obj = json.loads(json.dumps(hosts_to_json(d)))
    assert set(obj) == {"group", "generated_at", "up", "down", "rollout", "hosts"}
    assert (obj["group"], obj["up"], obj["down"], obj["rollout"]) == ("wiki", 2, ["web2"], None)
    h1, h2, h3 = obj["hosts"]
    assert set(h1) == {"name", "address", "control_url", "backup", "up", "error", "count",
                       "standby", "running", "workers"}
    assert (h1["name"], h1["address"], h1["up"], h1["error"], h1["running"]) == (
        "web1", "127.0.0.2:9000", True, None, 2)
    w0 = h1["workers"][0]
    # Same worker keys as single-host status; what only the host knows is null.
    assert set(w0) == {"name", "state", "supervisor_state", "pid", "rss_bytes", "requests",
                       "age_seconds", "inflight", "recycles", "last_reason",
                       "last_recycle_time"}
    assert (w0["state"], w0["pid"], w0["age_seconds"], w0["rss_bytes"], w0["recycles"]) == (
        "running", 100, 30.0, None, None)
    assert (h2["up"], h2["workers"], h2["running"]) == (False, [], 0) and "refused" in h2["error"]
    assert h3["backup"] is True


def test_gather_hosts_wrong_supervisord_is_down(tmp_path):
    """A control port answered by another supervisord (another deployment or
    host) is not taken for this host."""
    dep = multi_dep(tmp_path, hosts=[{"name": "web1", "address": "127.0.0.2:9000"}])
    rpc = FakeHostRPC("blog_web1", [remote_info("wiki_00", ProcessStates.RUNNING, 100, age=3)])
    d = gather_hosts(dep, connect=lambda url: FakeServer(rpc), now=NOW)
    assert d.down == ["web1"] and "'blog_web1', not 'wiki_web1'" in d.hosts[0].error
    assert rpc.calls == ["getIdentification"]


def test_gather_hosts_needs_control_port(tmp_path):
    dep = multi_dep(tmp_path, control=False)
    with pytest.raises(settings.ConfigError) as exc:
        gather_hosts(dep, connect=lambda url: pytest.fail("no host may be asked"))
    message = str(exc.value)
    assert "\n" not in message and "control.inet_port = ''" in message
    assert "FCGI_TOOLKIT_HOST=NAME" in message


@pytest.mark.parametrize("exc,text", [
    (xmlrpc.client.ProtocolError("h/RPC2", 401, "Unauthorized", {}), "refused the credentials"),
    (xmlrpc.client.ProtocolError("h/RPC2", 404, "Not Found", {}), "answered HTTP 404 Not Found"),
    (xmlrpc.client.Fault(1, "UNKNOWN_METHOD"), "refused: UNKNOWN_METHOD"),
    (TimeoutError("timed out"), "no answer from http://h:1 within 2.5s"),
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "connection refused at http://h:1"),
    (OSError(errno.EHOSTUNREACH, "x"), os.strerror(errno.EHOSTUNREACH)),
    (ConnectionResetError(), "did not answer XML-RPC"),
])
def test_unreachable_reason(exc, text):
    reason = unreachable_reason("http://h:1", exc, 2.5)
    assert text in reason and "\n" not in reason


def test_gather_hosts_real_transport_timeout_refused_and_credentials(tmp_path):
    """The real XML-RPC transport against loopback stand-ins: a port that
    accepts and never answers (bounded by the timeout), a closed port, and
    an HTTP server that rejects the credentials (which were sent)."""
    import http.server
    silent = socket.socket()
    silent.bind(("127.0.0.2", 0))
    silent.listen(4)
    port = silent.getsockname()[1]
    seen_auth = []

    class Reject(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen_auth.append(self.headers.get("Authorization"))
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    try:
        rejecting = http.server.HTTPServer(("127.0.0.4", port), Reject)
    except OSError:
        silent.close()
        pytest.skip("port %d not free on 127.0.0.4" % port)
    t = threading.Thread(target=rejecting.serve_forever, daemon=True)
    t.start()
    try:
        worker_port = 9000 if port != 9000 else 9002
        dep = multi_dep(tmp_path, inet_port=str(port), hosts=[
            {"name": h, "address": "%s:%d" % (ip, worker_port)}
            for h, ip in (("web1", "127.0.0.2"), ("web2", "127.0.0.3"), ("spare", "127.0.0.4"))])
        d = gather_hosts(dep, timeout=1.0, now=NOW)
    finally:
        rejecting.shutdown()
        rejecting.server_close()
        silent.close()
    reasons = {h.name: h.error for h in d.hosts}
    assert d.down == ["web1", "web2", "spare"]
    assert reasons["web1"] == "no answer from http://127.0.0.2:%d within 1s" % port
    assert reasons["web2"].startswith("connection refused at http://127.0.0.3:%d" % port)
    assert "refused the credentials" in reasons["spare"]
    import base64
    assert seen_auth == ["Basic " + base64.b64encode(b"ops:s3cret").decode()]


def test_status_command_multi_host(tmp_path, capsys, monkeypatch):
    """The command on the web server: exit 1 with a host down; 2 without control port."""
    from fcgi_toolkit import cli
    monkeypatch.delenv(settings.HOST_ENV, raising=False)
    deploy = tmp_path / "deploy.toml"
    base = ('[app]\nname = "wiki"\nwsgi = "app:application"\n'
            '[nginx]\nweb_servers = ["127.0.0.1"]\n[runtime]\ndir = "%s"\n' % (tmp_path / "rt"))
    hosts = '[[hosts]]\nname = "web1"\naddress = "127.0.0.2:9000"\n'
    deploy.write_text(base + hosts)
    assert cli.main(["status", "-c", str(deploy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "control.inet_port = ''" in err

    # Nothing listens on the control port: the host is down, exit 1, still a table.
    closed = socket.socket()
    closed.bind(("127.0.0.2", 0))
    port = closed.getsockname()[1]
    closed.close()
    deploy.write_text(base + '[control]\ninet_port = "%d"\nusername = "ops"\npassword = "pw"\n'
                      % port + hosts)
    assert cli.main(["status", "-c", str(deploy), "--timeout", "2"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[1].split()[:3] == ["web1", "-", "down"]
    assert "wiki: 1 host, 0 up, 1 down (web1); 0/2 workers running" in out
    assert "host web1 is down: connection refused at http://127.0.0.2:%d" % port in err
    assert cli.main(["status", "-c", str(deploy), "--json", "--timeout", "2"]) == 1
    obj = json.loads(capsys.readouterr().out)
    assert obj["down"] == ["web1"] and obj["hosts"][0]["up"] is False

    # On a host (FCGI_TOOLKIT_HOST) status is the local, single-host one.
    monkeypatch.setenv(settings.HOST_ENV, "web1")
    assert cli.main(["status", "-c", str(deploy)]) == 1
    err = capsys.readouterr().err
    assert "supervisord is not running" in err
    assert os.path.join("rt", "web1", "supervisor.sock") in err


def test_gather_hosts_full_view_through_the_fcgi_plugin(tmp_path):
    """A host whose supervisord serves fcgi.status() (fcgi_toolkit.rpcinterface)
    shows RSS, requests, the in-flight request and recycles; one without it
    keeps supervisord's view, and the table says so."""
    dep = multi_dep(tmp_path, hosts=[{"name": "web1", "address": "127.0.0.2:9000", "count": 1},
                                     {"name": "web2", "address": "127.0.0.3:9000", "count": 1}])
    host_obj = {"group": "wiki", "count": 1, "standby": 1, "ready": 0, "recycles": 3, "generated_at": NOW,
                "workers": [
                    {"name": "wiki_00", "state": "busy", "supervisor_state": "RUNNING", "pid": 100,
                     "rss_bytes": 5 << 30, "requests": 17, "age_seconds": 30.0,
                     "inflight": {"method": "GET", "uri": "/slow?s=5", "seconds": 2.1},
                     "recycles": 3, "last_reason": "requests 1043 >= 1021", "last_recycle_time": NOW - 5},
                    {"name": "wiki_01", "state": "standby", "supervisor_state": "STOPPED", "pid": None,
                     "rss_bytes": None, "requests": None, "age_seconds": None, "inflight": None,
                     "recycles": 0, "last_reason": None, "last_recycle_time": None}]}
    web1 = FakeHostRPC("wiki_web1", [remote_info("wiki_00", ProcessStates.RUNNING, 100, age=30)])
    web2 = FakeHostRPC("wiki_web2", [remote_info("wiki_00", ProcessStates.RUNNING, 200, age=9)])
    servers = {"http://127.0.0.2:9001": FakeServer(web1, FakeFcgi(host_obj)),
               "http://127.0.0.3:9001": FakeServer(web2)}
    d = gather_hosts(dep, connect=servers.__getitem__, now=NOW)
    h1, h2 = d.hosts
    assert h1.full and not h2.full
    w = h1.workers[0]
    assert (w.state, w.rss_bytes, w.requests, w.recycles) == ("busy", 5 << 30, 17, 3)
    assert w.inflight == status.Inflight("GET", "/slow?s=5", 2.1)
    assert h2.workers[0].rss_bytes is None and h2.workers[0].state == "running"

    lines = format_hosts_table(d).splitlines()
    assert lines[0].split() == ["HOST", "WORKER", "STATE", "PID", "RSS", "REQS", "AGE", "RECYCLES", "NOTE"]
    assert lines[1].split() == ["web1", "wiki_00", "busy", "100", "5GB", "17", "30s", "3",
                                "GET", "/slow?s=5", "(2s)"]
    assert lines[3].split()[:8] == ["web2", "wiki_00", "running", "200", "-", "-", "9s", "-"]
    assert lines[-1] == status.REMOTE_NOTE   # web2 has no plugin
    obj = hosts_to_json(d)
    assert obj["hosts"][0]["workers"][0]["rss_bytes"] == 5 << 30
    assert obj["hosts"][0]["workers"][0]["inflight"]["uri"] == "/slow?s=5"
    # Every host with the plugin: no note.
    servers["http://127.0.0.3:9001"] = FakeServer(web2, FakeFcgi(dict(host_obj, workers=host_obj["workers"][:1])))
    text = format_hosts_table(gather_hosts(dep, connect=servers.__getitem__, now=NOW))
    assert status.REMOTE_NOTE not in text
