"""The supervisorctl plugin: a recording fake controller, then supervisorctl's own loader."""
from __future__ import annotations

import json
import os
import threading
import time
from types import SimpleNamespace

import pytest
from supervisor.states import ProcessStates
from supervisor.supervisorctl import Controller, LSBInitExitStatuses

from fcgi_toolkit import settings
from fcgi_toolkit.ctlplugin import FcgiControllerPlugin, _LineWriter, make_plugin, submit_request

NOW_INFO = {"now": 0, "start": 0, "pid": 0}


class FakeController:
    """What a plugin sees of supervisorctl: output(), exitstatus, get_supervisor()."""

    def __init__(self, rpc=None):
        self.lines = []
        self.exitstatus = LSBInitExitStatuses.SUCCESS
        self.rpc = rpc

    def output(self, message):
        self.lines.append(message)

    def get_supervisor(self):
        return self.rpc


class RecordingRPC:
    def __init__(self, infos):
        self.infos = infos
        self.calls = []

    def getAllProcessInfo(self):
        self.calls.append("getAllProcessInfo")
        return self.infos


class RecordingSubmit:
    """Stands in for submit_request: records requests, writes progress, returns a result."""

    def __init__(self, result):
        self.calls = []
        self.result = result

    def __call__(self, dep, request, timeout, out):
        self.calls.append((dep.name, request, timeout))
        print("  wiki_01 -> wiki_02: starting", file=out)
        return self.result


@pytest.fixture
def deploy(tmp_path):
    path = tmp_path / "deploy.toml"
    path.write_text('[app]\nname = "wiki"\nwsgi = "app:application"\n'
                    '[workers]\ncount = 2\nstandby = 1\n'
                    '[runtime]\ndir = "%s"\n' % (tmp_path / "rt"))
    return str(path)


def infos():
    return [dict(NOW_INFO, name="wiki_00", group="wiki", state=ProcessStates.STOPPED,
                 statename="STOPPED")]


def plugin_with(deploy, rpc=None, submit=None):
    ctl = FakeController(rpc)
    return ctl, FcgiControllerPlugin(ctl, deploy, submit=submit)


def test_fcgi_status_uses_supervisorctls_connection(deploy):
    rpc = RecordingRPC(infos())
    ctl, plugin = plugin_with(deploy, rpc)
    plugin.do_fcgi("status")
    assert rpc.calls == ["getAllProcessInfo"]
    text = "\n".join(ctl.lines)
    assert text.splitlines()[0].split()[:2] == ["WORKER", "STATE"]
    assert "wiki_00  stopped" in text and "wiki: 0/2 workers ready" in text
    assert ctl.exitstatus == LSBInitExitStatuses.SUCCESS


def test_fcgi_status_json(deploy):
    ctl, plugin = plugin_with(deploy, RecordingRPC(infos()))
    plugin.do_fcgi("status --json")
    obj = json.loads("\n".join(ctl.lines))
    assert obj["group"] == "wiki" and [w["name"] for w in obj["workers"]] == [
        "wiki_00", "wiki_01", "wiki_02"]


def test_fcgi_recycle_and_reload_go_through_the_watchdog(deploy):
    os.makedirs(settings.load(deploy).runtime_dir)
    submit = RecordingSubmit({"ok": True, "message": "wiki_01 replaced: pid 10 -> 11"})
    ctl, plugin = plugin_with(deploy, submit=submit)
    plugin.do_fcgi("recycle wiki_01")
    plugin.do_fcgi("recycle wiki:wiki_02")
    plugin.do_fcgi("reload")
    assert [(name, request) for name, request, _ in submit.calls] == [
        ("wiki", {"op": "recycle", "worker": "wiki_01"}),
        ("wiki", {"op": "recycle", "worker": "wiki:wiki_02"}),
        ("wiki", {"op": "reload"})]
    # A reload waits for every worker's replacement; a recycle for one.
    assert submit.calls[2][2] > submit.calls[0][2] > 30
    assert "  wiki_01 -> wiki_02: starting" in ctl.lines
    assert ctl.lines[-1] == "reload: wiki_01 replaced: pid 10 -> 11"
    assert ctl.exitstatus == LSBInitExitStatuses.SUCCESS


def test_fcgi_failed_request_sets_exit_status(deploy):
    os.makedirs(settings.load(deploy).runtime_dir)
    submit = RecordingSubmit({"ok": False, "message": "wiki_02 did not become ready: ImportError"})
    ctl, plugin = plugin_with(deploy, submit=submit)
    plugin.do_fcgi("reload")
    assert ctl.lines[-1] == "fcgi: reload failed: wiki_02 did not become ready: ImportError"
    assert ctl.exitstatus == LSBInitExitStatuses.GENERIC


def test_fcgi_no_answer_from_the_watchdog(deploy):
    os.makedirs(settings.load(deploy).runtime_dir)
    ctl, plugin = plugin_with(deploy, submit=RecordingSubmit(None))
    plugin.do_fcgi("recycle wiki_00")
    assert "no answer from the watchdog" in ctl.lines[-1] and "wiki_watchdog.log" in ctl.lines[-1]
    assert ctl.exitstatus == LSBInitExitStatuses.GENERIC


def test_fcgi_request_when_not_running(deploy):
    submit = RecordingSubmit({"ok": True, "message": ""})
    ctl, plugin = plugin_with(deploy, submit=submit)
    plugin.do_fcgi("reload")
    assert submit.calls == [] and "is the deployment running?" in ctl.lines[-1]
    assert ctl.exitstatus == LSBInitExitStatuses.NOT_RUNNING


def test_submit_request_uses_the_request_queue(deploy):
    """The real submit path: a request file appears, a stand-in listener answers it."""
    from fcgi_toolkit import statefile
    dep = settings.load(deploy)
    os.makedirs(dep.runtime_dir)
    seen = []

    def listener():
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for request_id, request in statefile.pending(dep.runtime_dir):
                seen.append(request)
                statefile.answer(dep.runtime_dir, request_id, True, "wiki_01 replaced")
                return
            time.sleep(0.02)

    t = threading.Thread(target=listener)
    t.start()
    lines = []
    result = submit_request(dep, {"op": "recycle", "worker": "wiki_01"}, 10,
                            _LineWriter(lines.append))
    t.join(10)
    assert seen == [{"op": "recycle", "worker": "wiki_01"}]
    assert result == {"ok": True, "message": "wiki_01 replaced"}
    assert os.listdir(statefile.requests_dir(dep.runtime_dir)) == []   # nothing left behind


def test_submit_request_withdraws_unanswered_request(deploy):
    from fcgi_toolkit import statefile
    dep = settings.load(deploy)
    os.makedirs(dep.runtime_dir)
    assert submit_request(dep, {"op": "reload"}, 0.3, _LineWriter(lambda line: None)) is None
    assert statefile.pending(dep.runtime_dir) == []


def test_line_writer_hands_whole_lines():
    lines = []
    w = _LineWriter(lines.append)
    print("  a", file=w)
    w.write("b")
    w.write("c\nd\n")
    assert lines == ["  a", "bc", "d"]


@pytest.mark.parametrize("arg", ["", "bogus", "status extra", "recycle", "reload now", "'"])
def test_fcgi_bad_usage(deploy, arg):
    ctl, plugin = plugin_with(deploy, submit=RecordingSubmit(None))
    plugin.do_fcgi(arg)
    assert ctl.exitstatus == LSBInitExitStatuses.INVALID_ARGS
    if arg != "'":
        assert ctl.lines[0] == "Usage:" and any(line.startswith("fcgi recycle NAME")
                                                for line in ctl.lines)


def test_bad_deploy_file_is_reported(tmp_path):
    ctl, plugin = plugin_with(str(tmp_path / "missing.toml"))
    plugin.do_fcgi("status")
    assert ctl.lines == ["fcgi: %s: no such file" % (tmp_path / "missing.toml")]
    assert ctl.exitstatus != LSBInitExitStatuses.SUCCESS


def test_make_plugin_needs_deploy():
    with pytest.raises(ValueError, match="deploy"):
        make_plugin(FakeController())


def test_supervisorctl_loads_the_plugin_from_its_config(deploy, tmp_path):
    """supervisorctl's own option parser and Controller, as `supervisorctl -c` would do."""
    from supervisor.options import ClientOptions
    settings.load(deploy)  # the fixture file is valid
    conf = tmp_path / "supervisord.conf"
    elsewhere = tmp_path / "elsewhere.sock"
    conf.write_text("[supervisorctl]\nserverurl=unix://%s\n\n"
                    "[ctlplugin:fcgi]\nsupervisor.ctl_factory = fcgi_toolkit.ctlplugin:make_plugin\n"
                    "deploy = %s\n" % (elsewhere, deploy))
    options = ClientOptions()
    options.realize(args=["-c", str(conf)])
    out = []
    controller = Controller(options, stdout=SimpleNamespace(write=out.append, flush=lambda: None))
    assert "fcgi" in controller.vocab
    (plugin,) = [p for p in options.plugins if p.name == "fcgi"]
    assert isinstance(plugin, FcgiControllerPlugin) and plugin.deploy == deploy

    # supervisord is not running: a clear line and LSB "not running".
    controller.onecmd("fcgi status")
    text = "".join(out)
    assert "supervisord is not running" in text
    assert "unix://%s" % elsewhere in text       # where supervisorctl connects (-s applies)
    assert controller.exitstatus == LSBInitExitStatuses.NOT_RUNNING

    out.clear()
    controller.onecmd("help fcgi")
    assert "fcgi recycle NAME" in "".join(out)


# -- a host of a multi-host deployment ([ctlplugin:fcgi] host = NAME) ----------

@pytest.fixture
def multi_deploy(tmp_path):
    path = tmp_path / "deploy.toml"
    path.write_text('[app]\nname = "wiki"\nwsgi = "app:application"\n'
                    '[workers]\ncount = 1\nstandby = 1\n'
                    '[nginx]\nweb_servers = ["127.0.0.1"]\n'
                    '[runtime]\ndir = "%s"\n'
                    '[[hosts]]\nname = "web1"\naddress = "127.0.0.2:9000"\n'
                    '[[hosts]]\nname = "web2"\naddress = "127.0.0.3:9000"\ncount = 3\n'
                    % (tmp_path / "rt"))
    return str(path)


def test_plugin_reads_its_hosts_view(multi_deploy, monkeypatch):
    monkeypatch.delenv(settings.HOST_ENV, raising=False)
    rpc = RecordingRPC([dict(NOW_INFO, name="wiki_03", group="wiki", state=ProcessStates.STOPPED,
                             statename="STOPPED")])
    ctl = FakeController(rpc)
    plugin = make_plugin(ctl, deploy=multi_deploy, host="web2")
    assert plugin.host == "web2"
    plugin.do_fcgi("status --json")
    obj = json.loads("\n".join(ctl.lines))
    # web2's view: its count (3) + standby (1) slots, not the front view's.
    assert [w["name"] for w in obj["workers"]] == ["wiki_00", "wiki_01", "wiki_02", "wiki_03"]
    assert obj["count"] == 3 and ctl.exitstatus == LSBInitExitStatuses.SUCCESS

    # recycle/reload go to that host's watchdog (its runtime dir).
    seen = []

    def submit(dep, request, timeout, out):
        seen.append((dep.runtime_dir, request))
        return {"ok": True, "message": "done"}

    ctl = FakeController()
    plugin = FcgiControllerPlugin(ctl, multi_deploy, host="web2", submit=submit)
    os.makedirs(settings.load(multi_deploy, host="web2").runtime_dir)
    plugin.do_fcgi("recycle wiki_01")
    web2_dir = os.path.join(settings.load(multi_deploy, host="").runtime_dir, "web2")
    assert seen == [(web2_dir, {"op": "recycle", "worker": "wiki_01"})]
    assert ctl.exitstatus == LSBInitExitStatuses.SUCCESS


def test_plugin_without_host_follows_the_environment(multi_deploy, monkeypatch):
    loads = []

    def load(path, host=None):
        loads.append((path, host))
        return settings.load(path, host=host)

    monkeypatch.setenv(settings.HOST_ENV, "web1")
    ctl = FakeController(RecordingRPC([]))
    plugin = FcgiControllerPlugin(ctl, multi_deploy, load_deployment=load)
    plugin.do_fcgi("status --json")
    assert loads == [(multi_deploy, None)]
    assert json.loads("\n".join(ctl.lines))["count"] == 1   # web1's view, from FCGI_TOOLKIT_HOST


def test_supervisorctl_loads_the_host_from_the_rendered_conf(multi_deploy, monkeypatch):
    """The host's rendered supervisord.conf, read by supervisorctl's own option parser."""
    from supervisor.options import ClientOptions
    from fcgi_toolkit import render
    monkeypatch.delenv(settings.HOST_ENV, raising=False)
    dep = settings.load(multi_deploy, host="web2")
    host = render.Host(euid=1000, user="alice", nginx_binary="/usr/sbin/nginx", mime_types="")
    conf = os.path.join(dep.runtime_dir, "supervisord.conf")
    os.makedirs(dep.runtime_dir)
    with open(conf, "w") as f:
        f.write(render.render_all(dep, host, dep.runtime_dir)["supervisord.conf"])
    options = ClientOptions()
    options.realize(args=["-c", conf])
    out = []
    controller = Controller(options, stdout=SimpleNamespace(write=out.append, flush=lambda: None))
    (plugin,) = [p for p in options.plugins if p.name == "fcgi"]
    assert plugin.host == "web2" and plugin.deploy == multi_deploy
    controller.onecmd("fcgi status")
    text = "".join(out)
    # Not running: the message names web2's own control socket.
    assert "supervisord is not running" in text and dep.control_socket in text
