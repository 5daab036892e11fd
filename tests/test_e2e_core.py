"""Tier 3: issue #2 end to end — real supervisord, workers, watchdog, nginx, HTTP on loopback."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conftest import requires_nginx
from harness import free_port, http_request, wait_for

pytestmark = [pytest.mark.integration, requires_nginx]


def nginx_worker_uids(c) -> list[int]:
    """Real uids of the managed nginx's worker processes (children of its master)."""
    import psutil
    infos = c.rpc.supervisor.getProcessInfo("core_nginx")
    return [p.uids().real for p in psutil.Process(infos["pid"]).children()]


def test_http_through_nginx(cluster, tmp_path, request):
    # Outside pytest's tmp dir (mode 0700): nginx's unprivileged workers serve it.
    static = tempfile.mkdtemp(prefix="fct-static-")
    request.addfinalizer(lambda: shutil.rmtree(static, ignore_errors=True))
    os.chmod(static, 0o755)
    with open(os.path.join(static, "hello.txt"), "w") as f:
        f.write("static hello\n")
    c = cluster(nginx={"static": {"/static/": static}})

    # Safe defaults: started by root or not, nginx's workers never run as root.
    uids = nginx_worker_uids(c)
    assert uids and 0 not in uids, uids

    r = c.get("/")
    assert r.status == 200 and r.body.startswith(b"hello from ")

    payload = os.urandom(5 * 1024 * 1024)
    r = c.post("/echo", payload, headers={"Content-Type": "application/octet-stream"}, timeout=60)
    assert r.status == 200
    assert len(r.body) == len(payload) and r.body == payload

    r = c.get("/stream?n=3000", timeout=60)
    assert r.status == 200
    expected = b"".join((("chunk-%d:" % i).ljust(999, "x") + "\n").encode() for i in range(3000))
    assert r.body == expected

    r = c.get("/static/hello.txt")
    assert r.status == 200 and r.body == b"static hello\n"
    assert r.headers["content-type"].startswith("text/plain")

    before = c.pids()
    r = c.get("/raise")
    assert r.status == 500
    assert b"deliberate failure" not in r.body, "no traceback to clients unless workers.debug"
    # The worker that failed keeps serving: same pids, every request answered.
    statuses = [c.get("/").status for _ in range(10)]
    assert statuses == [200] * 10
    assert c.pids() == before
    logs = "".join(c.worker_log(slot) for slot in before)
    assert "core_app: deliberate failure" in logs and "Traceback" in logs

    # The CGI variables nginx sends for an app mounted at "/".
    env = json.loads(c.get("/environ?x=1").body)
    assert env["SCRIPT_NAME"] == "" and env["PATH_INFO"] == "/environ"
    assert env["QUERY_STRING"] == "x=1" and env["REQUEST_METHOD"] == "GET"
    assert env["REQUEST_URI"] == "/environ?x=1" and env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["REMOTE_ADDR"] == "127.0.0.1" and env["SERVER_PORT"] == str(c.port)
    assert c.access_log_statuses()[500] == 1


def test_app_mounted_under_a_prefix(cluster):
    c = cluster(nginx={"location": "/wiki/"})
    env = json.loads(c.get("/wiki/environ?a=1").body)
    assert env["SCRIPT_NAME"] == "/wiki"
    assert env["PATH_INFO"] == "/environ"
    assert env["QUERY_STRING"] == "a=1"
    assert env["REQUEST_URI"] == "/wiki/environ?a=1"
    env = json.loads(c.get("/wiki/environ/deeper/path").body)
    assert env["SCRIPT_NAME"] == "/wiki" and env["PATH_INFO"] == "/environ/deeper/path"
    r = c.get("/wiki")
    assert r.status == 301 and r.headers["location"].endswith("/wiki/")
    # Outside the mount point nginx answers itself; the app never sees it.
    r = c.get("/other")
    assert r.status == 404 and b"nginx" in r.body


def test_supervisorctl_status_and_restart_replaces_one_worker(cluster):
    c = cluster()
    # nginx starts once a worker accepts, so it may still be STARTING (startsecs).
    status = wait_for(lambda: (lambda s: s if s.count("RUNNING") >= 4 else None)(c.ctl("status")),
                      10, "two workers, the watchdog and nginx RUNNING")
    assert "core:core_00" in status and "core:core_01" in status
    # Two workers serve; the third slot is the warm standby (running, accepting nothing).
    before = c.ready_workers()
    [(spare, spare_pid)] = c.warm_workers().items()
    assert len(before) == 2 and {"core_00", "core_01", "core_02"} == set(before) | {spare}
    # The standby is RUNNING once its startsecs have passed.
    wait_for(lambda: set(c.pids()) == set(before) | {spare}, 10, "three RUNNING slots")
    victim, other = sorted(before)

    out = c.ctl("restart", "core:" + victim)
    assert "%s: started" % victim in out, out
    # The warm standby took over at once; the restarted slot is the next standby.
    after = wait_for(lambda: (lambda r: r if set(r) == {other, spare} else None)(
        c.ready_workers()), 20, "%s and the promoted %s serving" % (other, spare))
    assert after[other] == before[other], "the other worker was left alone"
    assert after[spare] == spare_pid, "the standby serves, not restarted"
    new_standby = c.wait_warm()
    assert new_standby[victim] != before[victim], "%s was replaced" % victim
    assert c.get("/").status == 200

    r = c.toolkit("run", "-c", c.deploy_path)
    assert r.returncode == 1 and "already running" in r.stderr
    assert c.ready_workers() == after and c.warm_workers() == new_standby


def _slot_serving(c, uri):
    for rec in c.scoreboard():
        if rec is not None and rec.inflight and rec.uri == uri:
            return rec
    return None


def test_stopping_a_worker_finishes_its_request_and_others_serve(cluster):
    c = cluster()
    result = {}

    def slow():
        result["response"] = c.get("/sleep?s=2", timeout=30)

    t = threading.Thread(target=slow)
    t.start()
    rec = wait_for(lambda: _slot_serving(c, "/sleep?s=2"), 10, "the slow request in the scoreboard")
    slot = "core_%02d" % rec.slot
    assert c.pids()[slot] == rec.pid

    load = c.load("/pid", threads=2, duration=None, count=400, timeout=30).start()
    c.rpc.supervisor.stopProcess("core:" + slot, False)  # TERM: drain
    served_during_stop = []
    while t.is_alive():
        r = c.get("/pid", timeout=30)
        assert r.status == 200
        served_during_stop.append(int(r.body))
        time.sleep(0.05)
    t.join(30)
    load.stop()
    load.join()

    response = result["response"]
    assert response.status == 200 and response.body == b"slept %d\n" % rec.pid
    assert served_during_stop and rec.pid not in served_during_stop
    assert load.failed == 0, load.summary()
    wait_for(lambda: c.process_info()[slot]["statename"] == "STOPPED" or slot not in c.pids(),
             30, "%s to stop" % slot)
    assert c.process_info()[slot]["exitstatus"] == 0, "drained worker exits 0"
    # The watchdog keeps workers.count serving.
    c.wait_ready()


def test_scoreboard_shows_requests_and_inflight(cluster):
    c = cluster()
    for _ in range(12):
        assert c.get("/").status == 200
    every = [r for r in c.scoreboard() if r is not None]
    records = [r for r in every if not r.standby]
    assert len(records) == 2
    assert sum(r.requests for r in records) == 12
    assert all(r.ready and not r.draining and r.inflight == 0 for r in records)
    # The warm standby's slot: the app imported, not accepting, nothing served.
    [warm] = [r for r in every if r.standby]
    assert not warm.ready and warm.requests == 0

    t = threading.Thread(target=lambda: c.get("/sleep?s=2", timeout=30))
    t.start()
    rec = wait_for(lambda: _slot_serving(c, "/sleep?s=2"), 10, "the in-flight request")
    assert rec.method == "GET" and rec.inflight == 1 and rec.req_start > 0
    assert rec.pid == c.pids()["core_%02d" % rec.slot]
    t.join(30)
    rec_after = c.scoreboard()[rec.slot]
    assert rec_after.inflight == 0 and rec_after.requests == rec.requests + 1


def test_app_that_cannot_import_is_reported_in_the_worker_log(cluster):
    c = cluster("core_broken:application", wait_ready=False)

    def logged():
        text = "".join(c.worker_log(s) for s in c.dep.slot_names())
        return text if "core_missing_dependency_xyz" in text else None

    text = wait_for(logged, 30, "the import error in a worker log")
    assert "Traceback" in text and "ModuleNotFoundError" in text


def test_demo_runs_and_stops_cleanly_on_sigint():
    directory = tempfile.mkdtemp(prefix="fct-demo-")
    os.chmod(directory, 0o755)   # mkdtemp's 0700 would keep nginx's unprivileged workers out
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fcgi_toolkit", "demo", "--port", str(port),
                             "--dir", directory],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    socket_path = os.path.join(directory, "run", "demo.sock")
    try:
        def page():
            if proc.poll() is not None:
                raise AssertionError("demo exited: %s" % proc.stdout.read().decode())
            try:
                r = http_request("127.0.0.1", port, "GET", "/", timeout=5)
            except OSError:
                return None
            return r if r.status == 200 else None

        r = wait_for(page, 60, "the demo page")
        assert b"fcgi-toolkit demo" in r.body
        assert http_request("127.0.0.1", port, "GET", "/echo?hi=1").body == b"hi=1"
        assert os.path.exists(socket_path)
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == 0, output
        assert "open:    http://127.0.0.1:%d/" % port in output
        assert not os.path.exists(socket_path), "socket file removed"
        assert not os.path.exists(os.path.join(directory, "run", "supervisord.pid"))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        shutil.rmtree(directory, ignore_errors=True)
