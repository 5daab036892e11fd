"""The worker as a process: drain on SIGTERM, hard deadline, scoreboard,
SIGUSR1 stack dumps, exit statuses, cgi-fcgi interop, TCP_NODELAY.

These are properties of ``fcgi-toolkit worker`` itself (bare flup6 has no
scoreboard or drain), so they do not take part in the comparison mode.
"""
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fcgiclient as fc  # noqa: E402

from fcgi_toolkit import settings  # noqa: E402
from fcgi_toolkit.scoreboard import Scoreboard  # noqa: E402


@pytest.fixture
def spawn(tmp_path):
    spawner = fc.Spawner(tmp_path)
    yield functools.partial(spawner.spawn, server="ours")
    spawner.close()


def board_for(w):
    dep = settings.load(w.deploy)
    return Scoreboard(dep.scoreboard_path, dep.slots)


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


def test_drain_finishes_inflight_and_backlog_goes_to_another_worker(spawn):
    a = spawn(threads=1, graceful_timeout="20s")
    listener = a.listener
    with fc.FastCGIConnection(listener.address, timeout=15) as inflight:
        inflight.start("/sleep?s=2")
        board = board_for(a)
        assert wait_for(lambda: (board.read(0) or None) and board.read(0).inflight == 1)
        a.terminate()
        # The drain's log line (it stays, unlike the scoreboard's short-lived
        # draining flag) says it began while the request was in flight.
        assert a.wait_log("draining: 1 connection(s) open, 1 request(s) in flight", 30), a.log()
        # A new connection while A drains: it waits in the shared backlog...
        with fc.FastCGIConnection(listener.address, timeout=15) as late:
            late.start("/pid")
            # ...and the next worker on the same socket serves it.
            b = spawn(listener=listener, slot=1, threads=1)
            r = late.read_response()
            assert not r.reset and r.ended and r.status == 200
            assert int(r.body) == b.pid
        r = inflight.read_response()
        assert r.ended and r.status == 200 and r.body == b"slept\n"
    assert a.wait(10) == 0
    assert "drained" in a.log()
    assert board.read(0) is None   # slot cleared on exit
    board.close()


def test_scoreboard_says_draining_while_a_request_is_held(spawn):
    w = spawn(threads=1, graceful_timeout="20s")
    board = board_for(w)
    body = b"held-body!"
    with fc.FastCGIConnection(w.listener.address, timeout=15) as conn:
        # Half the body: the app's read waits for the rest, so the request
        # stays in flight until the test sends it.
        conn.begin(1)
        conn.send_params(1, fc.cgi_params("/echo", "POST", body))
        conn.send(fc.record(fc.STDIN, 1, body[:4]))
        assert wait_for(lambda: (board.read(0) or None) and board.read(0).inflight == 1)
        w.terminate()
        rec = wait_for(lambda: (board.read(0) or None) and board.read(0).draining
                       and board.read(0))
        assert rec and rec.inflight == 1 and rec.uri == "/echo", w.log()
        conn.send_stdin(1, body[4:])
        r = conn.read_response()
        assert r.ended and r.status == 200 and r.body == body
    assert w.wait(10) == 0
    assert board.read(0) is None
    board.close()


def test_keepalive_connection_mid_request_closes_after_it(spawn, tmp_path):
    w = spawn(idle_timeout="60s")
    mark = fc.Marker(tmp_path)
    with fc.FastCGIConnection(w.listener.address, timeout=10) as conn:
        conn.start(mark.uri(1), keep=True)
        mark.wait()
        w.terminate()
        r = conn.read_response()
        assert r.ended and r.status == 200
        assert conn.wait_closed(5)
    assert w.wait(10) == 0


def test_drain_deadline_exits_1_naming_the_cut_request(spawn, tmp_path):
    w = spawn(graceful_timeout="1s")
    mark = fc.Marker(tmp_path)
    with fc.FastCGIConnection(w.listener.address, timeout=15) as conn:
        conn.start(mark.uri(8))
        mark.wait()
        w.terminate()
        assert w.wait(10) == 1
        r = conn.read_response(timeout=5)
        assert not r.ended and r.eof
    log = w.log()
    assert "graceful timeout 1.0s passed: cutting 1 request(s): GET /sleep?s=8" in log


def test_scoreboard_shows_requests_and_inflight(spawn):
    w = spawn()
    board = board_for(w)
    rec = board.read(0)
    assert rec.pid == w.pid and rec.ready and not rec.draining and rec.inflight == 0
    assert rec.requests == 0
    for _ in range(3):
        assert fc.request(w.listener.address, "/hello", timeout=5).status == 200
    assert board.read(0).requests == 3
    with fc.FastCGIConnection(w.listener.address, timeout=10) as conn:
        conn.start("/sleep?s=1")
        rec = wait_for(lambda: board.read(0).inflight == 1 and board.read(0))
        assert rec.method == "GET" and rec.uri == "/sleep?s=1" and rec.req_start > 0
        assert conn.read_response().status == 200
    rec = board.read(0)
    assert rec.inflight == 0 and rec.requests == 4 and rec.last_duration > 0
    w.terminate()
    assert w.wait(10) == 0
    assert board.read(0) is None
    board.close()


def test_sigusr1_dumps_every_thread_stack(spawn, tmp_path):
    w = spawn(threads=2)
    mark = fc.Marker(tmp_path)
    with fc.FastCGIConnection(w.listener.address, timeout=10) as conn:
        conn.start(mark.uri(1.5))
        mark.wait()
        w.signal(signal.SIGUSR1)
        assert w.wait_log("most recent call first", 5)
        assert conn.read_response().status == 200
    log = w.log()
    assert "in sleep" in log               # the request thread's frame
    assert w.proc.poll() is None           # still serving


def test_import_failure_exits_3_with_traceback(spawn, tmp_path):
    listener = fc.Listener(tmp_path)
    deploy = fc.write_deploy(tmp_path, wsgi="no_such_module_h1:application")
    w = fc.WorkerProcess(deploy, listener, kind="ours")
    try:
        assert w.wait(15) == 3
        log = w.log()
        assert "cannot import the application no_such_module_h1:application" in log
        assert "ModuleNotFoundError" in log
    finally:
        w.stop()
        listener.close()


def test_no_listening_socket_exits_2(tmp_path):
    deploy = fc.write_deploy(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "fcgi_toolkit", "worker", "-c", deploy,
                           "--slot", "0"], stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=20)
    assert proc.returncode == 2
    assert b"no listening socket on fd 0" in proc.stderr


def test_app_environment_and_directory(spawn, tmp_path):
    w = spawn(environment={"CONFORMANCE_ENV": "from-deploy"})
    import json
    r = fc.request(w.listener.address, "/environ", timeout=5)
    out = json.loads(r.body)
    assert out["os.environ[CONFORMANCE_ENV]"] == "from-deploy"
    assert out["CONFORMANCE_ENV"] is None          # os.environ, not the WSGI environ
    assert out["cwd"] == fc.APPS
    assert out["wsgi.multithread"] is True and out["wsgi.multiprocess"] is True
    assert out["wsgi.run_once"] is False and out["wsgi.url_scheme"] == "http"


@pytest.mark.skipif(shutil.which("cgi-fcgi") is None, reason="cgi-fcgi (libfcgi-bin) not installed")
@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_cgi_fcgi_client(spawn, kind):
    w = spawn(kind)
    address = w.listener.address
    target = address if isinstance(address, str) else "%s:%d" % address
    body = b"posted by cgi-fcgi\n"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "REQUEST_METHOD": "POST",
           "REQUEST_URI": "/echo", "SCRIPT_NAME": "", "PATH_INFO": "/echo",
           "QUERY_STRING": "", "SERVER_NAME": "localhost", "SERVER_PORT": "80",
           "SERVER_PROTOCOL": "HTTP/1.1", "CONTENT_LENGTH": str(len(body)),
           "CONTENT_TYPE": "text/plain"}
    proc = subprocess.run(["cgi-fcgi", "-bind", "-connect", target], input=body, env=env,
                          capture_output=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    head, _, out = proc.stdout.partition(b"\r\n\r\n")
    assert b"Status: 200 OK" in head
    assert out == body


def test_tcp_nodelay_on_accepted_connections():
    """In-process: the server's accepted TCP socket has TCP_NODELAY set."""
    from fcgi_toolkit.flupfix import WSGIServer
    entered, release = threading.Event(), threading.Event()

    def app(environ, start_response):
        entered.set()
        release.wait(10)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    server = WSGIServer(app, threads=1, idle_timeout=5, graceful_timeout=5)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", server.serve(listener)))
    thread.start()
    conn = fc.FastCGIConnection(listener.getsockname(), timeout=10)
    try:
        conn.start("/")
        assert entered.wait(10)
        (accepted,) = server.connections()
        assert accepted._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        release.set()
        assert conn.read_response().body == b"ok"
    finally:
        release.set()
        conn.close()
        server.request_stop()
        server.wake()
        thread.join(10)
        listener.close()
    assert result.get("rc") == 0


def test_sigterm_during_app_import_drains_and_exits_0(tmp_path):
    listener = fc.Listener(tmp_path)
    deploy = fc.write_deploy(tmp_path, wsgi="w_slowimport:application")
    w = fc.WorkerProcess(deploy, listener, kind="ours")
    try:
        assert w.wait_log("w_slowimport: importing", 10)   # inside the 1.5 s import
        w.terminate()
        assert w.wait(15) == 0
        assert "drained" in w.log()
        dep = settings.load(deploy)
        board = Scoreboard(dep.scoreboard_path, dep.slots)
        assert board.read(0) is None
        board.close()
    finally:
        w.stop()
        listener.close()


def test_warm_standby_accepts_nothing_until_sigusr2_then_serves(spawn):
    serving = spawn(threads=1)
    standby = spawn(listener=serving.listener, slot=1, threads=1, ready=False, warm_standby=True)
    board = board_for(standby)
    rec = wait_for(lambda: (r := board.read(1)) is not None and r.pid == standby.pid
                   and r.standby and r)
    assert rec and not rec.ready, standby.log()
    # Every request goes to the serving worker while the other one waits.
    for _ in range(5):
        r = fc.request(serving.listener.address, "/pid", timeout=10)
        assert r.status == 200 and int(r.body) == serving.pid
    standby.signal(signal.SIGUSR2)
    rec = wait_for(lambda: (r := board.read(1)) is not None and r.ready and r)
    assert rec and not rec.standby, standby.log()
    serving.terminate()
    assert serving.wait(10) == 0
    r = fc.request(standby.listener.address, "/pid", timeout=10)
    assert r.status == 200 and int(r.body) == standby.pid
    assert "warm standby" in standby.log()
    board.close()


def test_warm_standby_told_to_stop_exits_0_at_once(spawn):
    standby = spawn(threads=2, ready=False, warm_standby=True)
    board = board_for(standby)
    assert wait_for(lambda: (r := board.read(0)) is not None and r.standby)
    standby.terminate()
    assert standby.wait(10) == 0
    assert board.read(0) is None
    board.close()
