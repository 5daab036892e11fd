"""Supervisord generations for real, under load past capacity (64
connections on 2 single-thread workers of a slow endpoint): the workers
move to a new inner supervisord, a program of the front (the one started
first, which keeps nginx), with zero failed requests (README "Generations")."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import xmlrpc.client

import psutil
import pytest

from fcgi_toolkit import leftovers, supervisord
from harness import free_port, wait_for
from test_generations_e2e import FAST, _serving_pids, _switch_under_load, system_nginx_cluster
from test_orphans_e2e import alive, runs  # noqa: F401 (runs: a fixture)

pytestmark = pytest.mark.integration


def _front(c):
    return supervisord.proxy("unix://" + c.dep.front_control_socket).supervisor


def _groups(rpc):
    return {i["group"] for i in rpc.getAllProcessInfo()}


def _held_by_a_new_supervisord(c, number: int, before: dict) -> dict:
    """The serving workers are new, ready, children of inner supervisord ``number``."""
    c.follow_generation()
    assert c.dep.holder == number and c.dep.group == "%s_g%d" % (c.name, number)
    ready = c.wait_ready(2, timeout=30)
    assert _serving_pids(c) <= set(ready.values())
    assert not set(ready.values()) & set(before.values())
    inner = _front(c).getProcessInfo("%s_s%d" % (c.name, number))
    assert inner["statename"] == "RUNNING"
    assert {psutil.Process(pid).ppid() for pid in ready.values()} == {inner["pid"]}
    assert c.rpc.supervisor.getPID() == inner["pid"]      # the inner one's own control socket
    status = c.status_json()
    assert (status["generation"], status["switch"], status["drift"]) == (number, None, [])
    assert status["supervisord"]["program"] == "%s_s%d" % (c.name, number), status
    assert status["supervisord"]["conf"] == c.dep.supervisord_conf
    return ready


def test_new_supervisord_with_no_change_twice_then_stop_leaves_nothing(cluster):
    c = cluster("core_app:application", name="sv", recycle=dict(FAST), workers={"threads": 1})
    front_pid = c.proc.pid
    nginx_pid = c.rpc.supervisor.getProcessInfo("sv_nginx")["pid"]

    # (b) The upgrade case: nothing changed, the workers move to an inner supervisord.
    before = c.pids()
    r = _switch_under_load(c, args=("--new-supervisord",))
    assert "generation 1 -> 2 in a new supervisord (sv_s2)" in r.stdout, r.stdout
    ready = _held_by_a_new_supervisord(c, 2, before)
    assert _groups(_front(c)) == {"sv_nginx", "sv_s2"}      # front: nginx and the inner one
    assert _groups(c.rpc.supervisor) == {"sv_g2", "sv_watchdog"}
    assert c.rpc.supervisor.getProcessInfo("sv_watchdog")["statename"] == "RUNNING"
    assert _front(c).getProcessInfo("sv_nginx")["pid"] == nginx_pid     # nginx never restarted
    assert _front(c).getPID() == front_pid
    assert "[program:sv_s2]" in open(c.dep.front_conf).read()
    assert "[fcgi-program:sv_g2]" in open(c.dep.supervisord_conf).read()
    for conf in (c.dep.front_conf, c.dep.supervisord_conf):     # either supervisorctl
        table = subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", conf,
                                "fcgi", "status"], stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=60).stdout
        assert "generation 2 in supervisord sv_s2" in table, table
        assert all(slot in table for slot in ready), table

    # Inner -> inner: again, no change.
    r = _switch_under_load(c, args=("--new-supervisord",))
    assert "generation 2 -> 3 in a new supervisord (sv_s3)" in r.stdout, r.stdout
    _held_by_a_new_supervisord(c, 3, ready)
    assert _groups(_front(c)) == {"sv_nginx", "sv_s3"}
    assert not os.path.exists(os.path.join(c.runtime_dir, "supervisord-g2.conf"))
    assert _front(c).getProcessInfo("sv_nginx")["pid"] == nginx_pid

    # A group generation inside the inner supervisord (the socket moved): it stays there.
    inner_pid = c.rpc.supervisor.getPID()
    moved = os.path.join(c.runtime_dir, "moved.sock")
    before = c.pids()
    r = _switch_under_load(c, workers={"socket": "unix://" + moved})
    assert "generation 3 -> 4 (workers.socket)" in r.stdout, r.stdout
    c.follow_generation()
    assert (c.dep.holder, c.dep.group, c.dep.socket_path) == (3, "sv_g4", moved)
    ready = c.wait_ready(2, timeout=30)
    assert not set(ready.values()) & set(before.values())
    assert {psutil.Process(pid).ppid() for pid in ready.values()} == {inner_pid}
    assert _groups(c.rpc.supervisor) == {"sv_g4", "sv_watchdog"}
    assert _groups(_front(c)) == {"sv_nginx", "sv_s3"}

    # The inner watchdog takes operator requests, through its own supervisord.
    r = c.toolkit("recycle", "-c", c.deploy_path, "sv_g4_00", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert c.wait_ready(2, timeout=30).get("sv_g4_00") != ready["sv_g4_00"]
    assert c.status_json()["recycles"] == 1
    statuses = c.access_log_statuses()
    assert statuses[502] == 0 and statuses[504] == 0, statuses

    # (d) stop: the front stops nginx and the inner supervisord, which drains its workers.
    everyone = psutil.Process(front_pid).children(recursive=True)
    assert len(everyone) >= 6          # nginx (+ its worker), inner, watchdog, 2 workers + standby
    reaper = threading.Thread(target=c.proc.wait)     # the front is our child: reap it
    reaper.start()
    r = c.toolkit("stop", "-c", c.deploy_path, timeout=150)
    reaper.join(30)
    assert r.returncode == 0 and "sv stopped" in r.stdout, r.stdout + r.stderr
    gone, alive = psutil.wait_procs(everyone, timeout=30)
    assert not alive, alive
    assert not [n for n in os.listdir(c.runtime_dir) if n.startswith(("supervisor-g", "supervisord-g"))]


def test_control_port_added_with_a_system_nginx_and_a_failed_import_switches_nothing(tmp_path):
    with system_nginx_cluster(tmp_path, "sy") as (c, proc):
        # (a) A [control] TCP control port added (with credentials): a new supervisord binds it.
        port = free_port()
        before = c.pids()
        r = _switch_under_load(c, control={"inet_port": "127.0.0.1:%d" % port,
                                           "username": "ops", "password": "s3cret"})
        assert "generation 1 -> 2 in a new supervisord (sy_s2)" in r.stdout, r.stdout
        assert "nginx reloaded gracefully" in r.stdout, r.stdout
        ready = _held_by_a_new_supervisord(c, 2, before)
        ctl = subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-s",
                              "http://127.0.0.1:%d" % port, "-u", "ops", "-p", "s3cret", "status"],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        for slot in ready:
            assert any(line.startswith("sy_g2:%s " % slot) and "RUNNING" in line
                       for line in ctl.stdout.splitlines()), ctl.stdout + ctl.stderr
        with pytest.raises(xmlrpc.client.ProtocolError):       # never without credentials
            supervisord.proxy("http://127.0.0.1:%d" % port, timeout=10).supervisor.getPID()
        assert os.stat(c.dep.supervisord_conf).st_mode & 0o077 == 0     # it holds the password
        assert proc.poll() is None

        # The same port for yet another supervisord: two cannot bind it.
        r = c.toolkit("apply", "-c", c.deploy_path, "--new-supervisord", timeout=60)
        assert r.returncode == 1 and "change control.inet_port, or remove it" in r.stderr, r.stderr
        assert _groups(_front(c)) == {"sy_s2"}

        # (c) A new supervisord generation whose app fails to import: nothing switched.
        conf_before = open(c.dep.front_conf).read()
        pids_before = c.pids()
        r = _switch_under_load(c, expect=1, app={"wsgi": "no_such_module:application"},
                               control={"inet_port": "127.0.0.1:%d" % free_port()})
        assert "not applied, generation 2 still serves" in r.stderr, r.stderr
        assert "ModuleNotFoundError" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert _groups(_front(c)) == {"sy_s2"}                  # no inner program left
        assert open(c.dep.front_conf).read() == conf_before
        assert not os.path.exists(os.path.join(c.runtime_dir, "supervisord-g3.conf"))
        assert c.pids() == pids_before
        status = c.status_json()
        assert status["generation"] == 2 and status["switch"] is None
        assert set(status["drift"]) == {"app.wsgi", "control.inet_port"}


def test_a_killed_front_takes_its_inner_supervisord_along_and_run_starts_again(cluster, runs):
    c = cluster("core_app:application", name="sk", recycle=dict(FAST), workers={"threads": 1})
    r = c.toolkit("apply", "-c", c.deploy_path, "--new-supervisord", timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    c.follow_generation()
    c.wait_ready(2, timeout=30)
    before = psutil.Process(c.proc.pid).children(recursive=True)
    sig = leftovers.Signature.of(c.dep)
    assert [leftovers.classify(p.cmdline(), sig) for p in before].count(leftovers.Kind.SUPERVISORD) == 1
    os.kill(c.proc.pid, signal.SIGKILL)
    c.proc.wait(10)
    # The inner supervisord's lifeline: TERM, it drains its workers and exits.
    wait_for(lambda: not alive(before), 60, "every process of the killed front to end")
    run = runs(c)
    run.wait_serving()
    assert "inner supervisord files (supervisord-g2.conf)" in run.output(), run.output()
    assert c.status_json()["generation"] == 1
    assert not [n for n in os.listdir(c.runtime_dir) if n.startswith(("supervisor-g", "supervisord-g"))]
    assert run.stop() == 0, run.output()
