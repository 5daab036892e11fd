"""Generation switches for real, under load past capacity: 64 connections on
2 single-thread workers of a slow endpoint, zero failed requests, the new
value in effect afterwards (README "Generations")."""
from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from fcgi_toolkit import render, settings, status, supervisord
from harness import Cluster, free_port, nginx_available, port_open, venv_with_this_env, wait_for
from webservers import WEB_USER, dropping_privileges

pytestmark = pytest.mark.integration

FAST = {"check_interval": 0.5, "ready_timeout": "15s"}
SLOW = "/sleep?s=0.05"       # 2 workers x 1 thread: ~40 requests/s, 64 clients queue


def _phases_seen(c, apply: subprocess.Popen) -> list:
    """The switch phases ``status`` reports (read in process) while ``apply`` runs."""
    seen: list = []
    rpc = supervisord.control_proxy(c.dep)
    while apply.poll() is None:
        phase = (status.gather(settings.load(c.deploy_path), rpc).switch or {}).get("phase")
        if phase and phase not in seen:
            seen.append(phase)
        time.sleep(0.02)
    return seen


def _switch_under_load(c, expect: int = 0, phases=None, args=(), **edits):
    """Edit the file and apply it (with ``args``) while 64 clients keep the 2
    workers past capacity; ``phases``: what status said during the switch, in order."""
    c.edit(**edits)
    load = c.load(SLOW, threads=64, duration=90).start()
    try:
        wait_for(lambda: load.total >= 64, 30, "the load to be served before apply")
        if phases is None:
            r = c.toolkit("apply", "-c", c.deploy_path, *args, timeout=150)
        else:
            apply = subprocess.Popen([sys.executable, "-m", "fcgi_toolkit", "apply", "-c",
                                      c.deploy_path, *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            phases.extend(_phases_seen(c, apply))
            out, err = apply.communicate(timeout=150)
            r = subprocess.CompletedProcess(apply.args, apply.returncode, out, err)
        served = load.total
        wait_for(lambda: load.total >= served + 64, 30, "requests served after apply")
    finally:
        load.stop()
        load.join()
    assert r.returncode == expect, r.stdout + r.stderr
    assert load.failed == 0, load.summary()
    return r


def _groups(c):
    return {i["group"] for i in c.rpc.supervisor.getAllProcessInfo()}


def _serving_pids(c):
    """Pids that answered /sleep (nginx -> the serving group)."""
    return {int(c.get("/sleep?s=0").text.split()[-1]) for _ in range(6)}


def _check_serving(c, number: int):
    c.follow_generation()
    status = c.status_json()
    assert (status["generation"], status["switch"], status["drift"]) == (number, None, [])
    assert status["group"] == c.dep.group and status["ready"] == 2, status
    ready = c.wait_ready(2, timeout=30)
    assert _serving_pids(c) <= set(ready.values())
    assert c.dep.group in _groups(c)
    return ready


def test_socket_python_and_failed_import_switches_under_load(cluster, tmp_path):
    c = cluster("core_app:application", name="gs", recycle=dict(FAST), workers={"threads": 1})
    first_socket = c.dep.socket_path
    assert c.status_json()["generation"] == 1

    # (1) The unix socket path changes: generation 2 binds the new path.
    new_path = os.path.join(c.runtime_dir, "moved.sock")
    r = _switch_under_load(c, workers={"socket": "unix://" + new_path})
    assert "generation 1 -> 2" in r.stdout and "generation 2 (gs_g2" in r.stdout, r.stdout
    _check_serving(c, 2)
    assert stat.S_ISSOCK(os.stat(new_path).st_mode) and not os.path.exists(first_socket)
    assert _groups(c) == {"gs_g2", "gs_watchdog", "gs_nginx"}     # generation 1 removed
    site = open(os.path.join(c.runtime_dir, "nginx-site.conf")).read()
    assert "server unix:%s max_fails=0;" % new_path in site
    assert "[fcgi-program:gs_g2]" in open(c.dep.supervisord_conf).read()

    # (4) A new generation whose app fails to import: nothing switched.
    conf_before = open(c.dep.supervisord_conf).read()
    pids_before = c.pids()
    r = _switch_under_load(c, expect=1, app={"wsgi": "no_such_module:application"},
                           workers={"socket": "unix://" + os.path.join(c.runtime_dir, "x.sock")})
    assert "not applied, generation 2 still serves" in r.stderr, r.stderr
    assert "ModuleNotFoundError" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert _groups(c) == {"gs_g2", "gs_watchdog", "gs_nginx"}
    assert open(c.dep.supervisord_conf).read() == conf_before
    assert c.pids() == pids_before
    status = c.status_json()
    assert status["generation"] == 2 and status["switch"] is None
    assert set(status["drift"]) == {"app.wsgi", "workers.socket"}

    # (3) app.python: another venv; the socket stays configured, so generation 3
    # gets a generation-suffixed path next to it.
    python = venv_with_this_env(str(tmp_path / "venv"))
    _switch_under_load(c, app={"wsgi": "core_app:application", "python": python},
                       workers={"socket": "unix://" + new_path})
    ready = _check_serving(c, 3)
    assert c.dep.socket_path == os.path.join(c.runtime_dir, "moved.g3.sock")
    assert {psutil.Process(pid).cmdline()[0] for pid in ready.values()} == {python}

    # (2) unix -> TCP on loopback.
    port = free_port()
    _switch_under_load(c, workers={"socket": "tcp://127.0.0.1:%d" % port})
    ready = _check_serving(c, 4)
    for pid in ready.values():
        listening = [conn.laddr for conn in psutil.Process(pid).net_connections("tcp")
                     if conn.status == psutil.CONN_LISTEN]
        assert listening and listening[0].port == port, listening
    assert not os.path.exists(os.path.join(c.runtime_dir, "moved.g3.sock"))

    # The same TCP address cannot be bound twice: one line, exit 1, nothing changed.
    c.edit(app={"python": ""})
    r = c.toolkit("apply", "-c", c.deploy_path, timeout=60)
    assert r.returncode == 1 and "change workers.socket too" in r.stderr, r.stdout + r.stderr
    assert c.status_json()["generation"] == 4 and "gs_g5" not in _groups(c)
    statuses = c.access_log_statuses()
    assert statuses[502] == 0 and statuses[504] == 0, statuses


def _system_nginx_conf(root: str, site: str) -> str:
    user = "user %s %s;\n" % (WEB_USER, WEB_USER) if dropping_privileges() else ""
    return ("daemon off;\nworker_processes 1;\npid %(r)s/nginx.pid;\n%(u)s"
            "error_log %(r)s/error.log warn;\nevents { worker_connections 1024; }\n"
            "http {\n    access_log %(r)s/access.log;\n    include %(s)s;\n}\n"
            % {"r": root, "u": user, "s": site})


@contextlib.contextmanager
def system_nginx_cluster(tmp_path, name: str):
    """A started Cluster with nginx.managed = false and a system nginx the test
    started on its rendered site file (reloaded with ``nginx -c CONF -s reload``):
    yields (cluster, the nginx master's Popen)."""
    if not nginx_available():
        pytest.skip("nginx is not on PATH (or in /usr/sbin)")
    nginx = render.find_nginx()
    root = tempfile.mkdtemp(prefix="fct-sysnginx-")
    os.chmod(root, 0o755)
    conf = os.path.join(root, "nginx.conf")
    workers = {"threads": 1}
    if dropping_privileges():
        workers["socket_owner"] = "root:%s" % WEB_USER
    c = Cluster(tmp_path / "c", "core_app:application", name=name, recycle=dict(FAST),
                workers=workers, nginx={"managed": False, "reload": [nginx, "-c", conf, "-s", "reload"]})
    proc = None
    try:
        c.start()
        with open(conf, "w", encoding="utf-8") as f:
            f.write(_system_nginx_conf(root, os.path.join(c.runtime_dir, "nginx-site.conf")))
        if dropping_privileges():
            os.chown(root, psutil.Process().uids().real, -1)
        proc = subprocess.Popen([nginx, "-c", conf], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        wait_for(lambda: port_open(c.port), 20, "the system nginx")
        yield c, proc
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(20)
        c.stop()


def test_system_nginx_follows_a_socket_change_through_nginx_s_reload(tmp_path):
    with system_nginx_cluster(tmp_path, "gy") as (c, proc):
        master_before = proc.pid
        new_path = os.path.join(c.runtime_dir, "sys2.sock")
        phases = []
        r = _switch_under_load(c, phases=phases, workers={"socket": "unix://" + new_path})
        assert "nginx reloaded gracefully" in r.stdout, r.stdout
        assert phases and phases[0] == "starting", phases      # status said a switch is on
        _check_serving(c, 2)
        assert proc.pid == master_before and proc.poll() is None      # reloaded, not restarted
        assert "server unix:%s max_fails=0;" % new_path in open(
            os.path.join(c.runtime_dir, "nginx-site.conf")).read()
