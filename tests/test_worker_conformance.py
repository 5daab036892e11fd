"""FastCGI-level conformance of the worker (issue #7), against a real worker
subprocess that inherits its listening socket as fd 0, as under supervisord.

Comparison mode: ``FCGI_TOOLKIT_SERVER=flup`` runs the same cases against bare
flup6 (see tests/flup_compare.py, which prints the table).  There, the cases
for the fixed bugs are expected to fail; every socket operation is bounded, so
they fail by timeout instead of hanging.
"""
import json
import os
import socket
import struct
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fcgiclient as fc  # noqa: E402

FLUP = fc.server_kind() == "flup"


@pytest.fixture
def spawn(tmp_path):
    """spawn(kind="unix"|"tcp", env=..., ready=True, **workers) -> WorkerProcess"""
    spawner = fc.Spawner(tmp_path)
    yield spawner.spawn
    spawner.close()


def close_count(address, key):
    return int(fc.request(address, "/close-counter?id=%s" % key, timeout=5).body)


def wait_close_count(address, key, expected, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = close_count(address, key)
        if count >= expected:
            return count
        time.sleep(0.05)
    return close_count(address, key)


# --------------------------------------------------------------------------
# 1. WSGI
# --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_hello(spawn, kind):
    w = spawn(kind)
    r = fc.request(w.listener.address, "/hello", timeout=5)
    assert r.ended and r.protocol_status == fc.REQUEST_COMPLETE
    assert r.status == 200
    assert r.body == b"Hello, world!\n"
    assert r.header("Content-Type") == "text/plain"


def test_exception_before_headers_is_500_with_plain_body(spawn):
    w = spawn()
    r = fc.request(w.listener.address, "/raise", timeout=5)
    assert r.ended
    assert r.header("Status") == "500 Internal Server Error"
    assert r.header("Content-Type").startswith("text/plain")
    assert r.body == b"Internal Server Error\n"   # no traceback, no locals
    assert w.wait_log("RuntimeError: conformance: boom before headers", 5)
    assert "Traceback (most recent call last)" in w.log()


@pytest.mark.skipif(FLUP, reason="bare flup has no debug setting (its default is debug=True)")
def test_debug_setting_sends_traceback(spawn):
    w = spawn(debug=True)
    r = fc.request(w.listener.address, "/raise", timeout=5)
    assert r.status == 500
    assert b"RuntimeError: conformance: boom before headers" in r.body


def test_exception_after_headers_cuts_response(spawn):
    w = spawn()
    with fc.FastCGIConnection(w.listener.address, timeout=5) as conn:
        r = conn.request("/raise-after-headers")
        # The headers and the first part went out; then no END_REQUEST: the
        # connection is closed so the web server sees the response cut.
        assert r.status == 200
        assert r.body == b"first part\n"
        assert not r.ended and r.eof
    assert w.wait_log("RuntimeError: conformance: boom after headers", 5)
    assert fc.request(w.listener.address, "/hello", timeout=5).status == 200


def test_str_body_is_500_and_logged(spawn):
    w = spawn()
    r = fc.request(w.listener.address, "/str-body", timeout=5)
    assert r.ended and r.status == 500
    assert b"this is a str" not in r.body
    assert w.wait_log("response body must be an iterable of bytes, got str", 5)


def test_non_latin1_header_is_500_and_logged(spawn):
    w = spawn()
    r = fc.request(w.listener.address, "/bad-header", timeout=5)
    assert r.ended and r.status == 500
    assert r.header("X-Bad") is None
    assert w.wait_log("X-Bad value", 5)
    assert "is not latin-1" in w.log()


def test_wsgi_errors_takes_text_and_bytes(spawn):
    w = spawn()
    r = fc.request(w.listener.address, "/errors", timeout=5)
    assert r.ended and r.status == 200 and r.body == b"logged\n"
    assert r.stderr == b""   # to the worker log, not to the web server's error log
    assert w.wait_log("conformance: text on wsgi.errors", 5)
    assert w.wait_log("conformance: bytes on wsgi.errors", 5)


def test_write_callable(spawn):
    w = spawn()
    r = fc.request(w.listener.address, "/write", timeout=5)
    assert r.ended and r.status == 200
    assert r.body == b"written with write()\n"


def test_close_called_exactly_once(spawn):
    w = spawn()
    r = fc.request(w.listener.address, "/stream?n=5&id=normal", timeout=5)
    assert r.ended and r.body == b"".join(b"chunk %d\n" % i for i in range(5))
    assert close_count(w.listener.address, "normal") == 1


def test_close_called_once_when_client_goes_away(spawn):
    w = spawn()
    conn = fc.FastCGIConnection(w.listener.address, timeout=5)
    conn.start("/stream?n=100&delay=0.02&id=gone")
    first = conn.read_record()
    assert first is not None and first.type == fc.STDOUT
    conn.close()
    assert wait_close_count(w.listener.address, "gone", 1) == 1
    time.sleep(0.3)
    assert close_count(w.listener.address, "gone") == 1


def test_abort_request_stops_the_response_and_closes(spawn):
    w = spawn()
    with fc.FastCGIConnection(w.listener.address, timeout=5) as conn:
        conn.start("/stream?n=100&delay=0.05&id=abort")
        first = conn.read_record()
        assert first is not None and first.type == fc.STDOUT
        conn.send_record(fc.ABORT_REQUEST, 1)
        r = conn.read_response(timeout=4)   # the whole stream would take 5 s
        assert r.ended and r.protocol_status == fc.REQUEST_COMPLETE
        chunks = (first.content + r.stdout).count(b"chunk ")
        assert 1 <= chunks < 100
    assert wait_close_count(w.listener.address, "abort", 1) == 1


def test_abort_before_the_app_runs_ends_the_request(spawn):
    w = spawn()
    with fc.FastCGIConnection(w.listener.address, timeout=5) as conn:
        conn.begin(1)
        conn.send_record(fc.ABORT_REQUEST, 1)
        r = conn.read_response(timeout=4)
        assert r.ended and r.stdout == b""


BODY = b"line one\nline two\n\nlast line without newline"


@pytest.mark.parametrize("mode,expected", [
    ("read", [BODY]),
    ("readn", [BODY[i:i + 3] for i in range(0, len(BODY), 3)]),
    ("readline", [b"line one\n", b"line two\n", b"\n", b"last line without newline"]),
    ("readline-hint", [b"line", b" one\n"]),
    ("iter", [b"line one\n", b"line two\n", b"\n", b"last line without newline"]),
    ("past", [BODY, b"", b""]),
])
def test_wsgi_input(spawn, mode, expected):
    import json
    w = spawn()
    # Small STDIN records, so reads cross record boundaries.
    r = fc.request(w.listener.address, "/input?mode=" + mode, method="POST", body=BODY,
                   chunk=5, timeout=5)
    assert r.ended and r.status == 200
    assert [p.encode("latin-1") for p in json.loads(r.body)] == expected


def test_large_request_body(spawn):
    w = spawn()
    body = os.urandom(3 * 1024 * 1024)
    r = fc.request(w.listener.address, "/echo", method="POST", body=body, chunk=8000, timeout=20)
    assert r.ended and r.status == 200 and r.body == body


def test_body_headers_repeated_as_http_variables_are_dropped(spawn):
    """A web server passing every request header as HTTP_* (nginx with the
    distribution's fastcgi_params) repeats Content-Length/Content-Type; CGI
    and PEP 3333 forbid them, and the validated /echo would fail."""
    w = spawn()
    extra = {"HTTP_CONTENT_LENGTH": "5", "HTTP_CONTENT_TYPE": "application/octet-stream"}
    r = fc.request(w.listener.address, "/echo", method="POST", body=b"hello", extra=extra, timeout=10)
    assert r.ended and r.status == 200 and r.body == b"hello"


def test_paths_come_from_request_uri_decoded_once(spawn):
    """docs/flup6-bugs.rst, bug 18: as Apache's plain ProxyPass sends it
    (SCRIPT_NAME the whole path, no PATH_INFO), with an escaped path: flup6
    takes the raw REQUEST_URI as PATH_INFO (not decoded) and keeps that
    SCRIPT_NAME."""
    w = spawn()
    r = fc.request(w.listener.address, "/%65nviron?x=%2F", extra={"SCRIPT_NAME": "/environ"},
                   timeout=5)
    assert r.ended and r.status == 200, r.body[:200]
    env = json.loads(r.body)
    assert (env["SCRIPT_NAME"], env["PATH_INFO"], env["QUERY_STRING"]) == ("", "/environ", "x=%2F")


@pytest.mark.parametrize("method,uri,status", [("HEAD", "/head", 200), ("GET", "/204", 204),
                                                ("GET", "/304", 304)])
def test_no_body(spawn, method, uri, status):
    w = spawn()
    r = fc.request(w.listener.address, uri, method=method, timeout=5)
    assert r.ended and r.status == status
    assert r.stdout.endswith(b"\r\n\r\n") and r.body == b""


def test_head_keeps_headers(spawn):
    w = spawn()
    r = fc.request(w.listener.address, "/head", method="HEAD", timeout=5)
    assert r.header("Content-Length") == str(len(b"body of /head\n"))


def test_response_without_content_length(spawn):
    w = spawn()
    r = fc.request(w.listener.address, "/nolength", timeout=5)
    assert r.ended and r.status == 200
    assert r.header("Content-Length") is None
    assert r.body == b"first;second\n"


def test_many_and_large_headers(spawn):
    w = spawn()
    r = fc.request(w.listener.address, "/headers?n=100&size=16000", timeout=5)
    assert r.ended and r.status == 200
    for i in (0, 50, 99):
        assert r.header("X-Test-%d" % i) == "value-%d" % i
    assert r.header("X-Big") == "b" * 16000


def test_many_and_large_request_params(spawn):
    w = spawn()
    extra = {"HTTP_X_%d" % i: "v%d" % i for i in range(200)}
    extra["HTTP_COOKIE"] = "c" * 20000
    # split=100: name-value pairs span PARAMS records
    with fc.FastCGIConnection(w.listener.address, timeout=5) as conn:
        conn.begin(1)
        conn.send_params(1, fc.cgi_params("/environ", extra=extra), split=100)
        conn.send_stdin(1, b"")
        r = conn.read_response()
    assert r.ended and r.status == 200 and b'"PATH_INFO": "/environ"' in r.body


def test_50mb_body_in_one_write(spawn):
    w = spawn()
    n = 50 * 1000 * 1000
    # Bounded: bare flup6's quadratic slicing takes about a minute here.
    r = fc.request(w.listener.address, "/big?n=%d" % n, timeout=30)
    assert r.ended and r.status == 200
    assert len(r.body) == n and r.body.count(b"x") == n


# --------------------------------------------------------------------------
# 2. FastCGI records
# --------------------------------------------------------------------------

def test_unknown_management_record_answered(spawn):
    w = spawn()
    with fc.FastCGIConnection(w.listener.address, timeout=5) as conn:
        conn.send_record(200, 0, b"whatever")
        rec = conn.read_record()
        assert rec is not None and rec.type == fc.UNKNOWN_TYPE and rec.request_id == 0
        assert rec.content == struct.pack("!B7x", 200)
        # The connection is still usable.
        assert conn.request("/hello").status == 200


def test_get_values_answered(spawn):
    w = spawn(threads=3)
    with fc.FastCGIConnection(w.listener.address, timeout=5) as conn:
        values = conn.get_values(["FCGI_MAX_CONNS", "FCGI_MAX_REQS", "FCGI_MPXS_CONNS", "NOPE"])
        assert values == {"FCGI_MAX_CONNS": "3", "FCGI_MAX_REQS": "3", "FCGI_MPXS_CONNS": "0"}
        assert conn.request("/hello").status == 200


@pytest.mark.parametrize("garbage", [
    fc.record(fc.BEGIN_REQUEST, 1, struct.pack("!HB5x", 1, 0), version=2),   # bad version
    b"\x01\x01\x00",                                                        # truncated header
    fc.record(fc.BEGIN_REQUEST, 1, struct.pack("!HB5x", 1, 0))[:12],         # truncated body
    fc.record(fc.BEGIN_REQUEST, 1, b"\x00\x01"),                             # short BEGIN body
    (fc.record(fc.BEGIN_REQUEST, 1, struct.pack("!HB5x", 1, 0))
     + fc.record(fc.PARAMS, 1, b"\x05\x7fABC") + fc.record(fc.PARAMS, 1)),    # truncated pair
    bytes(range(256)) * 4,                                                  # random bytes
], ids=["version", "short-header", "short-body", "short-begin", "bad-pair", "random"])
def test_malformed_input_closes_only_that_connection(spawn, garbage):
    w = spawn()
    other = fc.FastCGIConnection(w.listener.address, timeout=5)
    with fc.FastCGIConnection(w.listener.address, timeout=5) as bad:
        bad.send(garbage)
        if len(garbage) < 16 or garbage == fc.record(fc.BEGIN_REQUEST, 1, struct.pack("!HB5x", 1, 0))[:12]:
            bad.sock.shutdown(socket.SHUT_WR)   # truncated: the peer goes away mid-record
        assert bad.wait_closed(5)
    with other:
        assert other.request("/hello", keep=True).status == 200
    assert fc.request(w.listener.address, "/hello", timeout=5).status == 200
    assert w.proc.poll() is None


def test_silent_peer_dropped_after_idle_timeout(spawn):
    w = spawn(idle_timeout="1s", threads=2)
    with fc.FastCGIConnection(w.listener.address, timeout=5) as silent:
        # Meanwhile other connections are served.
        assert fc.request(w.listener.address, "/hello", timeout=5).status == 200
        assert silent.wait_closed(8)


def test_peer_stalled_mid_record_dropped(spawn):
    w = spawn(idle_timeout="1s", threads=2)
    with fc.FastCGIConnection(w.listener.address, timeout=5) as stalled:
        stalled.send(fc.record(fc.BEGIN_REQUEST, 1, struct.pack("!HB5x", 1, 0))[:5])
        assert fc.request(w.listener.address, "/hello", timeout=5).status == 200
        assert stalled.wait_closed(8)


def test_silent_peer_does_not_block_shutdown(spawn):
    w = spawn(idle_timeout="60s", graceful_timeout="30s", threads=2)
    with fc.FastCGIConnection(w.listener.address, timeout=5) as silent:
        silent.send(fc.record(fc.BEGIN_REQUEST, 1, struct.pack("!HB5x", 1, 0))[:5])
        # Accepted in order: once this is answered, the silent one is accepted too.
        assert fc.request(w.listener.address, "/hello", timeout=5).status == 200
        w.terminate()
        assert w.wait(10) == 0


# --------------------------------------------------------------------------
# 3. Connections and load
# --------------------------------------------------------------------------

def test_busy_worker_leaves_new_connections_in_the_backlog(spawn, tmp_path):
    w = spawn(threads=1)
    mark = fc.Marker(tmp_path)
    with fc.FastCGIConnection(w.listener.address, timeout=10) as busy:
        busy.start(mark.uri(1.5))
        mark.wait()   # the sleep request is running
        r = fc.request(w.listener.address, "/hello", timeout=10)
        assert not r.reset and r.ended and r.status == 200
        assert busy.read_response().body == b"slept\n"


def test_web_server_addrs_every_tcp_connection(spawn):
    w = spawn("tcp", env={"FCGI_WEB_SERVER_ADDRS": "127.0.0.1, 10.1.2.3"})
    for _ in range(3):
        r = fc.request(w.listener.address, "/hello", timeout=5)
        assert r.ended and r.status == 200


def test_web_server_addrs_refuses_other_tcp_peers(spawn):
    w = spawn("tcp", env={"FCGI_WEB_SERVER_ADDRS": "10.1.2.3"}, ready=False)
    with fc.FastCGIConnection(w.listener.address, timeout=5) as conn:
        try:
            conn.start("/hello")
        except (BrokenPipeError, ConnectionResetError):
            pass
        r = conn.read_response(timeout=5)
        assert not r.ended and r.eof
    assert w.wait_log("not in FCGI_WEB_SERVER_ADDRS", 5) or FLUP


def test_web_server_addrs_not_applied_to_unix_sockets(spawn):
    w = spawn("unix", env={"FCGI_WEB_SERVER_ADDRS": "127.0.0.1"}, ready=False)
    r = fc.request(w.listener.address, "/hello", timeout=5)
    assert r.ended and r.status == 200


def test_idle_keepalive_connection_does_not_hold_draining_worker(spawn):
    w = spawn(idle_timeout="60s", graceful_timeout="30s")
    with fc.FastCGIConnection(w.listener.address, timeout=5) as conn:
        assert conn.request("/hello", keep=True).status == 200
        w.terminate()
        assert conn.wait_closed(5)
        assert w.wait(10) == 0


def test_inflight_request_completes_on_sigterm(spawn, tmp_path):
    w = spawn(graceful_timeout="20s")
    mark = fc.Marker(tmp_path)
    with fc.FastCGIConnection(w.listener.address, timeout=10) as conn:
        conn.start(mark.uri(2))
        mark.wait()
        w.terminate()
        r = conn.read_response()
        assert r.ended and r.status == 200 and r.body == b"slept\n"
    assert w.wait(10) == 0
