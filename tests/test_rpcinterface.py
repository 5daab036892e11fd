"""The supervisord RPC plugin ``fcgi`` (tier 2: recording fakes, no supervisord),
and read through a real supervisord by supervisor's own XML-RPC stack (tier 3
in test_install: the plugin loads from the rendered configuration)."""
from __future__ import annotations

import json
import os
import xmlrpc.client

import pytest
from supervisor.states import ProcessStates
from supervisor.xmlrpc import Faults, RPCError

from fcgi_toolkit import render, rpcinterface, scoreboard, settings, statefile
from harness import toml_dumps


def deployment(tmp_path):
    path = tmp_path / "deploy.toml"
    path.write_text(toml_dumps({"app": {"name": "wiki", "wsgi": "app:application"},
                                "workers": {"count": 1, "standby": 1},
                                "runtime": {"dir": str(tmp_path / "rt")}}))
    dep = settings.load(str(path))
    os.makedirs(dep.runtime_dir)
    scoreboard.create(dep.scoreboard_path, dep.slots)
    return dep


class RecordingProcesses:
    def __init__(self, infos):
        self.infos, self.calls = infos, 0

    def __call__(self):
        self.calls += 1
        return self.infos


def test_status_is_the_status_json_object_as_a_string(tmp_path):
    dep = deployment(tmp_path)
    processes = RecordingProcesses([
        {"name": "wiki_00", "group": "wiki", "state": ProcessStates.STOPPED, "statename": "STOPPED",
         "pid": 0, "start": 0, "now": 0},
        {"name": "other", "group": "other", "state": ProcessStates.RUNNING, "statename": "RUNNING",
         "pid": os.getpid(), "start": 1, "now": 2}])
    api = rpcinterface.FcgiRPCInterface(lambda: dep, processes)
    text = api.status()
    assert isinstance(text, str) and processes.calls == 1
    obj = rpcinterface.decode_status(text)
    assert obj["group"] == "wiki" and [w["name"] for w in obj["workers"]] == ["wiki_00", "wiki_01"]
    # The string goes through XML-RPC unchanged (a dict with nulls would not).
    assert xmlrpc.client.loads(xmlrpc.client.dumps((text,)))[0][0] == text
    assert api.getAPIVersion() == "2"


def test_recycle_and_reload_queue_for_the_watchdog(tmp_path):
    dep = deployment(tmp_path)
    api = rpcinterface.FcgiRPCInterface(lambda: dep, RecordingProcesses([]))
    rid = api.recycle("wiki_00")
    assert api.result(rid) == ""
    assert dict(statefile.pending(dep.runtime_dir))[rid] == {"op": "recycle", "worker": "wiki_00"}
    statefile.answer(dep.runtime_dir, rid, True, "wiki_00 -> wiki_01: done")
    answer = json.loads(api.result(rid))
    assert answer["ok"] is True and answer["message"] == "wiki_00 -> wiki_01: done"
    assert api.reload() != rid
    with pytest.raises(RPCError) as info:
        api.recycle("")
    assert info.value.code == Faults.BAD_ARGUMENTS


def test_bad_deployment_file_is_a_failed_fault(tmp_path):
    def load():
        raise settings.ConfigError("deploy.toml: workers.count = 'x': expected an integer")
    api = rpcinterface.FcgiRPCInterface(load, RecordingProcesses([]))
    with pytest.raises(RPCError) as info:
        api.status()
    assert info.value.code == Faults.FAILED and "workers.count" in info.value.text


def test_every_rendered_configuration_loads_the_plugin(tmp_path):
    dep = deployment(tmp_path)
    host = render.Host(euid=1000, user="alice", nginx_binary="nginx", mime_types="")
    text = render.render_all(dep, host, dep.runtime_dir)["supervisord.conf"]
    assert ("[rpcinterface:fcgi]\nsupervisor.rpcinterface_factory = "
            "fcgi_toolkit.rpcinterface:make_rpcinterface\ndeploy = %s\n" % dep.path) in text
