"""The worker's fast request path (issue #5): inline serving with one thread,
responses sent in as few sends as possible, no linger when the web server has
sent everything.  Behaviour, not speed: every case asserts what the peer sees
or which socket calls were made, never a duration.

Tier 2 cases run one Connection in-process over a socketpair whose server end
records its calls; tier 3 cases run ``fcgi-toolkit worker`` with
``threads = 1`` (the inline mode, the default) through drain and deadline.
"""
import functools
import os
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fcgiclient as fc  # noqa: E402
import pytest  # noqa: E402

from fcgi_toolkit import flupfix, settings  # noqa: E402
from fcgi_toolkit.flupfix.connection import Connection  # noqa: E402
from fcgi_toolkit.scoreboard import Scoreboard  # noqa: E402

BEGIN = struct.pack("!HB5x", fc.RESPONDER, 0)


class RecordingSocket:
    """The server's end of a socketpair; records the calls that reach the kernel."""

    def __init__(self, sock):
        self._sock = sock
        self.calls = []

    def fileno(self):
        return self._sock.fileno()

    def __getattr__(self, name):
        attr = getattr(self._sock, name)
        if name in ("send", "sendmsg", "shutdown", "close", "recv"):
            def call(*args, **kw):
                self.calls.append(name)
                return attr(*args, **kw)
            return call
        return attr

    def sends(self):
        return [c for c in self.calls if c in ("send", "sendmsg")]


def serve_one(app, client_actions, threads=1, server=None):
    """One Connection of a real WSGIServer (or ``server``) over a socketpair, in a thread."""
    server = server or flupfix.WSGIServer(app, threads=threads, idle_timeout=5)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    recorder = RecordingSocket(ours)
    conn = Connection(recorder, "", server)
    server._connections.add(conn)
    thread = threading.Thread(target=conn.run)
    client = fc.FastCGIConnection.__new__(fc.FastCGIConnection)
    client.sock, client.timeout, client._buf = theirs, 5.0, bytearray()
    theirs.settimeout(5)
    try:
        result = client_actions(client, thread)
    finally:
        theirs.close()
        thread.join(10)
    assert not thread.is_alive()
    return result, recorder


def hello_list(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello ", b"world\n"]


def full_request(client, thread, uri="/"):
    """Everything nginx sends for a GET, before the worker reads anything."""
    client.send(fc.record(fc.BEGIN_REQUEST, 1, BEGIN)
                + fc.record(fc.PARAMS, 1, fc.encode_pairs(fc.cgi_params(uri)))
                + fc.record(fc.PARAMS, 1) + fc.record(fc.STDIN, 1))
    thread.start()
    return client.read_response()


def test_list_body_goes_out_in_one_send_and_closes_without_linger():
    r, sock = serve_one(hello_list, full_request)
    assert r.ended and r.status == 200 and r.body == b"hello world\n"
    # STDOUT (head and body), the end of STDOUT and END_REQUEST: one send.
    assert sock.sends() == ["send"]
    # The request was read to its end: plain close, no shutdown-and-wait.
    assert "shutdown" not in sock.calls and sock.calls[-1] == "close"


def test_iterator_parts_are_sent_before_the_next_is_asked_for():
    seen = {}

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])

        def parts():
            for i in range(3):
                yield b"part %d\n" % i
                # The part just yielded must already be at the peer.
                seen[i] = bytes(client_box["c"].read_record().content)
        return parts()

    client_box = {}

    def actions(client, thread):
        client_box["c"] = client
        client.send(fc.record(fc.BEGIN_REQUEST, 1, BEGIN)
                    + fc.record(fc.PARAMS, 1, fc.encode_pairs(fc.cgi_params("/")))
                    + fc.record(fc.PARAMS, 1) + fc.record(fc.STDIN, 1))
        thread.start()
        thread.join(10)
        return client.read_response()

    r, sock = serve_one(app, actions)
    assert seen[0].startswith(b"Status: 200 OK\r\n") and seen[0].endswith(b"part 0\n")
    assert seen[1] == b"part 1\n" and seen[2] == b"part 2\n"
    assert r.ended and r.stdout == b""


def test_write_callable_output_is_sent_before_the_app_goes_on():
    seen = {}
    client_box = {}

    def app(environ, start_response):
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"early\n")
        seen["early"] = bytes(client_box["c"].read_record().content)
        return [b"late\n"]

    def actions(client, thread):
        client_box["c"] = client
        client.send(fc.record(fc.BEGIN_REQUEST, 1, BEGIN)
                    + fc.record(fc.PARAMS, 1, fc.encode_pairs(fc.cgi_params("/")))
                    + fc.record(fc.PARAMS, 1) + fc.record(fc.STDIN, 1))
        thread.start()
        thread.join(10)   # the app reads from the client itself meanwhile
        return client.read_response()

    r, sock = serve_one(app, actions)
    assert seen["early"].endswith(b"early\n")
    assert r.ended and r.stdout == b"late\n"


def test_unread_body_still_arriving_makes_the_close_linger():
    def app(environ, start_response):   # answers without reading its body
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"no thanks\n"]

    def actions(client, thread):
        client.send(fc.record(fc.BEGIN_REQUEST, 1, BEGIN)
                    + fc.record(fc.PARAMS, 1, fc.encode_pairs(fc.cgi_params("/", method="POST",
                                                                           body=b"x" * 20)))
                    + fc.record(fc.PARAMS, 1) + fc.record(fc.STDIN, 1, b"x" * 10))
        thread.start()
        r = client.read_response()
        client.send(fc.record(fc.STDIN, 1, b"x" * 10) + fc.record(fc.STDIN, 1))
        client.sock.shutdown(socket.SHUT_WR)
        return r

    r, sock = serve_one(app, actions)
    assert r.ended and r.body == b"no thanks\n"
    assert "shutdown" in sock.calls   # our FIN first, then read until the peer's


def test_large_body_is_gathered_not_joined():
    big = os.urandom(3 * 65536 + 123)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [big]

    def actions(client, thread):
        return full_request(client, thread)

    r, sock = serve_one(app, actions)
    assert r.ended and r.body == big
    assert "sendmsg" in sock.sends()


@pytest.mark.parametrize("drain_first", [True, False], ids=["drain-before-wait", "drain-while-waiting"])
def test_a_fresh_connection_is_served_when_the_drain_begins_before_its_request(drain_first):
    """A web server connects, then writes its request: a drain that begins in
    between must not close the connection (Apache would answer 503, "Broken
    pipe: Failed Writing Request"); only an idle connection between requests
    is closed at once."""
    server = flupfix.WSGIServer(hello_list, threads=1, idle_timeout=5, graceful_timeout=5)

    def actions(client, thread):
        if drain_first:
            server._begin_drain()
            thread.start()
        else:
            thread.start()
            server._begin_drain()
        r = client.request("/")
        # Now it served a request: idle between requests while draining, it is closed.
        return r, client.wait_closed(5)

    (r, closed), _ = serve_one(hello_list, actions, server=server)
    assert r.ended and r.status == 200 and r.body == b"hello world\n"
    assert closed


def test_inline_server_serves_in_the_calling_thread_and_drains():
    served_by = []

    def app(environ, start_response):
        served_by.append(threading.get_ident())
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    server = flupfix.WSGIServer(app, threads=1, idle_timeout=5, graceful_timeout=5)
    result = {}

    def run():
        result["ident"] = threading.get_ident()
        result["rc"] = server.serve(listener)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        for _ in range(3):
            r = fc.request(listener.getsockname(), "/", timeout=10)
            assert r.ended and r.body == b"ok"
        with fc.FastCGIConnection(listener.getsockname(), timeout=10) as kept:
            assert kept.request("/", keep=True).body == b"ok"
            server.request_stop()
            server.wake()
            assert kept.wait_closed(5)   # the idle kept connection is closed by the drain
    finally:
        server.request_stop()
        server.wake()
        thread.join(10)
        listener.close()
    assert result.get("rc") == 0
    assert served_by == [result["ident"]] * 4


def test_inline_deadline_calls_on_deadline_naming_the_request():
    release = threading.Event()
    entered = threading.Event()

    def app(environ, start_response):
        entered.set()
        release.wait(20)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"late"]

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    server = flupfix.WSGIServer(app, threads=1, idle_timeout=5, graceful_timeout=0.5)
    fired = threading.Event()
    cut = {}

    def on_deadline():
        cut["current"] = [c.current[:2] for c in server.connections() if c.current]
        fired.set()
        release.set()   # in the worker this exits the process

    thread = threading.Thread(target=lambda: server.serve(listener, on_deadline=on_deadline))
    thread.start()
    conn = fc.FastCGIConnection(listener.getsockname(), timeout=10)
    try:
        conn.start("/stuck")
        assert entered.wait(10)
        server.request_stop()
        server.wake()
        assert fired.wait(10)
    finally:
        release.set()
        server.request_stop()
        server.wake()
        conn.close()
        thread.join(10)
        listener.close()
    assert cut["current"] == [("GET", "/stuck")]


# --------------------------------------------------------------------------
# Tier 3: the worker process with threads = 1
# --------------------------------------------------------------------------

def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


@pytest.fixture
def spawn(tmp_path):
    """Workers serving with one thread: the inline path."""
    spawner = fc.Spawner(tmp_path)
    yield functools.partial(spawner.spawn, server="ours", threads=1)
    spawner.close()


def test_inline_worker_idle_keepalive_does_not_hold_the_drain(spawn):
    w = spawn(idle_timeout="60s", graceful_timeout="30s")
    with fc.FastCGIConnection(w.listener.address, timeout=5) as conn:
        assert conn.request("/hello", keep=True).status == 200
        w.terminate()
        assert conn.wait_closed(5)
        assert w.wait(10) == 0
    assert "drained" in w.log()


def test_inline_worker_drain_deadline_exits_1_and_clears_its_slot(spawn):
    w = spawn(graceful_timeout="1s")
    dep = settings.load(w.deploy)
    board = Scoreboard(dep.scoreboard_path, dep.slots)
    try:
        with fc.FastCGIConnection(w.listener.address, timeout=15) as conn:
            conn.start("/sleep?s=8")
            assert wait_for(lambda: board.read(0) and board.read(0).inflight == 1)
            w.terminate()
            assert w.wait(10) == 1
            r = conn.read_response(timeout=5)
            assert not r.ended and r.eof
        assert "graceful timeout 1.0s passed: cutting 1 request(s): GET /sleep?s=8" in w.log()
        assert board.read(0) is None
    finally:
        board.close()


def test_inline_worker_many_requests_in_a_row(spawn):
    w = spawn()
    for i in range(50):
        r = fc.request(w.listener.address, "/hello", timeout=5)
        assert r.ended and r.status == 200, i
