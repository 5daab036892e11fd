"""Tiers 1-2: a host's new supervisord (fcgi_toolkit.respawn), its RPC
(fcgi.applied, fcgi.respawn) against recording fakes, and what a rolled-back
host renders (its supervised commands read previous.toml)."""
from __future__ import annotations

import json
import os

import pytest
from supervisor.xmlrpc import Faults, RPCError

from fcgi_toolkit import applying, render, respawn, rpcinterface, settings
from fcgi_toolkit.settings import ConfigError

HOSTS = """
[[hosts]]
name = "web1"
address = "127.0.0.2:9000"

[[hosts]]
name = "web2"
address = "127.0.0.3:9000"
"""


def write(tmp_path, release="1", wsgi="wikiapp:application") -> str:
    path = tmp_path / "deploy.toml"
    path.write_text('[app]\nname = "wiki"\nwsgi = "%s"\ndirectory = "app"\n'
                    'environment = { RELEASE = "%s" }\n[nginx]\nweb_servers = ["127.0.0.1"]\n'
                    '[runtime]\ndir = "%s"\n%s' % (wsgi, release, tmp_path / "rt", HOSTS))
    return str(path)


def started(tmp_path, **kw) -> settings.Deployment:
    """A host as ``run`` leaves it: its runtime dir, applied.toml, the snapshot."""
    path = write(tmp_path, **kw)
    dep, data = respawn.load_for_start(path, "")
    os.makedirs(dep.runtime_dir, exist_ok=True)
    respawn.record_start(dep, data)
    applying.save(dep, applying.values(dep))
    return dep


@pytest.fixture(autouse=True)
def host_web1(monkeypatch):
    monkeypatch.setenv(settings.HOST_ENV, "web1")


def test_run_records_the_bytes_it_started_from(tmp_path):
    dep = started(tmp_path)
    assert dep.host.name == "web1" and dep.source == ""
    with open(os.path.join(dep.runtime_dir, respawn.APPLIED), "rb") as f:
        assert f.read() == open(dep.path, "rb").read()


def test_a_request_keeps_the_running_file_and_take_finds_it_once(tmp_path):
    dep = started(tmp_path)
    write(tmp_path, release="2")
    respawn.request(dep, previous=False)
    kept = os.path.join(dep.runtime_dir, respawn.PREVIOUS)
    assert b'RELEASE = "1"' in open(kept, "rb").read()
    assert respawn.take(dep) == ""           # "": start from the file
    assert respawn.take(dep) is None         # taken: a later exit of supervisord is a stop
    respawn.request(dep, previous=True)
    assert respawn.take(dep) == kept
    respawn.request(dep, previous=True)
    respawn.discard(dep)                     # the operator stopped the host meanwhile
    assert respawn.take(dep) is None


def test_nothing_to_start_again_is_one_line(tmp_path):
    path = write(tmp_path)
    dep = settings.load(path)
    os.makedirs(dep.runtime_dir)
    with pytest.raises(ValueError, match="applied.toml: missing: this supervisord was not started"):
        respawn.request(dep, previous=False)
    with pytest.raises(ValueError, match="previous.toml: no previous deployment"):
        respawn.request(dep, previous=True)
    assert not os.path.exists(os.path.join(dep.runtime_dir, respawn.REQUEST))


def test_a_rollback_reads_the_previous_bytes_as_the_file_and_its_commands_do_too(tmp_path):
    dep = started(tmp_path)
    write(tmp_path, release="2", wsgi="broken:application")
    respawn.request(dep, previous=False)
    kept = respawn.take(dep) or os.path.join(dep.runtime_dir, respawn.PREVIOUS)
    back, data = respawn.load_for_start(dep.path, kept)
    # Relative paths resolve against the deployment file's directory, as before.
    assert back.app.directory == str(tmp_path / "app") and back.path == dep.path
    assert back.app.environment == {"RELEASE": "1"} and back.source == kept
    conf = render.render_all(back, render.Host.probe(back), back.runtime_dir)["supervisord.conf"]
    for command in ("worker", "listener"):
        assert "-m fcgi_toolkit %s -c %s --start-from %s" % (command, dep.path, kept) in conf
    # What the file says now is not what a rolled-back host runs.
    assert settings.load(dep.path).app.wsgi == "broken:application"
    assert settings.load(dep.path, source=kept).app.wsgi == "wikiapp:application"
    assert "--start-from" not in render.render_all(dep, render.Host.probe(dep),
                                                   dep.runtime_dir)["supervisord.conf"]


def test_bad_bytes_name_the_file_they_came_from(tmp_path):
    path = write(tmp_path)
    bad = tmp_path / "previous.toml"
    bad.write_text("[app\n")
    with pytest.raises(ConfigError, match="^%s: not valid TOML" % bad):
        respawn.load_for_start(path, str(bad))
    with pytest.raises(ConfigError, match="no such file"):
        respawn.load_for_start(str(tmp_path / "missing.toml"), "")


class Shutdown:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


def api_for(dep, supervised=True):
    shutdown = Shutdown()
    api = rpcinterface.FcgiRPCInterface(lambda: settings.load(dep.path), lambda: [],
                                        shutdown=shutdown, supervised=lambda: supervised)
    return api, shutdown


def test_applied_says_what_runs_and_whether_run_starts_it_again(tmp_path):
    dep = started(tmp_path)
    api, _ = api_for(dep)
    info = json.loads(api.applied())
    assert info["digest"] == respawn.digest(dep.path) and info["respawn"] is True
    assert info["values"]["app.environment"] == {"RELEASE": "1"}
    assert json.loads(api_for(dep, supervised=False)[0].applied())["respawn"] is False


def test_respawn_checks_the_file_then_shuts_supervisord_down(tmp_path):
    dep = started(tmp_path)
    write(tmp_path, release="2")
    api, shutdown = api_for(dep)
    with pytest.raises(RPCError) as info:
        api.respawn("0" * 64, False)
    assert info.value.code == Faults.FAILED and "is not the web server's file" in info.value.text
    assert shutdown.calls == 0 and respawn.take(dep) is None
    assert api.respawn(respawn.digest(dep.path), False) is True
    assert shutdown.calls == 1 and respawn.take(dep) == ""


@pytest.mark.parametrize("case", ["not run", "bad file", "single host"])
def test_respawn_refuses_and_changes_nothing(tmp_path, monkeypatch, case):
    dep = started(tmp_path)
    supervised = True
    if case == "not run":
        supervised = False
    elif case == "bad file":
        with open(dep.path, "a") as f:
            f.write('[workers]\ncount = "many"\n')
    else:
        monkeypatch.delenv(settings.HOST_ENV)
        path = tmp_path / "single.toml"
        path.write_text('[app]\nname = "wiki"\nwsgi = "wikiapp:application"\n')
        dep = settings.load(str(path))
    api, shutdown = api_for(dep, supervised)
    with pytest.raises(RPCError) as info:
        api.respawn(respawn.digest(dep.path), False)
    assert info.value.code == Faults.FAILED and "\n" not in info.value.text
    assert {"not run": "was not started by fcgi-toolkit run", "bad file": "workers.count",
            "single host": "a new supervisord is for a host"}[case] in info.value.text
    assert shutdown.calls == 0
    assert not os.path.exists(os.path.join(dep.runtime_dir, respawn.REQUEST))


def test_apply_pins_the_bytes_it_applies_and_can_take_them_back(tmp_path):
    path = write(tmp_path)
    dep = settings.load(path)
    os.makedirs(dep.runtime_dir)
    assert respawn.pin(dep, b"new") is None          # not started by run: nothing read there
    assert not os.path.exists(respawn.applied_path(dep))
    dep = started(tmp_path)
    old = open(respawn.applied_path(dep), "rb").read()
    assert respawn.pin(dep, b"new bytes") == old
    assert open(respawn.applied_path(dep), "rb").read() == b"new bytes"
    respawn.unpin(dep, old)
    assert open(respawn.applied_path(dep), "rb").read() == old
    assert respawn.pinned(dep).source == respawn.applied_path(dep)
