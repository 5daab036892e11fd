"""Tier 1 and 2 tests of fcgi_toolkit.flupfix: pure helpers with plain values,
and one in-process connection over a socketpair (no subprocess)."""
import os
import socket
import struct
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fcgiclient as fc  # noqa: E402

from flup.server import fcgi_base  # noqa: E402

from fcgi_toolkit import flupfix  # noqa: E402
from fcgi_toolkit.flupfix.connection import Connection  # noqa: E402
from fcgi_toolkit.flupfix.gateway import (  # noqa: E402
    check_response_start, error_page, request_paths, response_head, sanitize_environ,
    status_has_body,
)
from fcgi_toolkit.flupfix.records import (  # noqa: E402
    ProtocolError, decode_pairs, encode_pair, encode_record,
)
from fcgi_toolkit.flupfix.server import (  # noqa: E402
    client_allowed, describe_inflight, parse_web_server_addrs,
)


def test_pairs_round_trip_short_and_long():
    data = encode_pair(b"A", b"1") + encode_pair(b"B" * 200, b"v" * 70000)
    assert decode_pairs(data) == [(b"A", b"1"), (b"B" * 200, b"v" * 70000)]


@pytest.mark.parametrize("data", [b"\x05", b"\x05\x7fABC", b"\x80\x00", b"\x01\x80\x00\x00\x01"])
def test_truncated_pairs_are_protocol_errors(data):
    with pytest.raises(ProtocolError):
        decode_pairs(data)


def test_encode_record_pads_to_8():
    rec = encode_record(6, 1, memoryview(b"abc"))
    assert len(rec) == 8 + 3 + 5
    assert struct.unpack("!BBHHBx", rec[:8]) == (1, 6, 1, 3, 5)


def test_web_server_addrs_is_reusable_set():
    allowed = parse_web_server_addrs(" 127.0.0.1 , ::1,")
    assert allowed == frozenset({"127.0.0.1", "::1"})
    for _ in range(3):   # flup's map iterator admitted only the first check
        assert client_allowed(socket.AF_INET, ("127.0.0.1", 5000), allowed)
    assert not client_allowed(socket.AF_INET, ("10.0.0.1", 5000), allowed)
    assert client_allowed(socket.AF_INET6, ("::1", 5000, 0, 0), allowed)
    assert client_allowed(socket.AF_INET6, ("::ffff:127.0.0.1", 5000, 0, 0), allowed)
    assert client_allowed(socket.AF_UNIX, "", allowed)        # not applied to unix sockets
    assert client_allowed(socket.AF_INET, ("10.0.0.1", 1), None)
    assert parse_web_server_addrs(None) is None


@pytest.mark.parametrize("status,headers,error", [
    (b"200 OK", [], TypeError),
    ("OK", [], ValueError),
    ("200 OK\r\nX: y", [], ValueError),
    ("200 OK", (("A", "b"),), TypeError),
    ("200 OK", [("A", b"b")], TypeError),
    ("200 OK", [("A b", "c")], ValueError),
    ("200 OK", [("Status", "500")], ValueError),
    ("200 OK", [("A", "x\r\nSet-Cookie: evil")], ValueError),
    ("200 OK", [("A", "snow \u2603")], ValueError),
])
def test_start_response_checks(status, headers, error):
    with pytest.raises(error):
        check_response_start(status, headers)


def test_start_response_accepts_latin1():
    check_response_start("200 OK", [("X-Name", "caf\xe9")])
    assert response_head("200 OK", [("X-Name", "caf\xe9")]) == \
        b"Status: 200 OK\r\nX-Name: caf\xe9\r\n\r\n"


def test_error_page_has_status_and_no_traceback_unless_debug():
    page = error_page(False, "Traceback: secret")
    assert page.startswith(b"Status: 500 Internal Server Error\r\n")
    assert b"secret" not in page
    assert b"Traceback: secret" in error_page(True, "Traceback: secret")
    head, _, body = page.partition(b"\r\n\r\n")
    assert b"Content-Length: %d" % len(body) in head


def test_status_has_body():
    assert status_has_body("GET", "200 OK")
    assert not status_has_body("HEAD", "200 OK")
    assert not status_has_body("GET", "204 No Content")
    assert not status_has_body("GET", "304 Not Modified")
    assert not status_has_body("GET", "101 Switching")


def test_describe_inflight_oldest_first():
    text = describe_inflight([("POST", "/b", 95.0), ("GET", "/a", 90.0)], now=100.0)
    assert text == "GET /a (10.0s), POST /b (5.0s)"
    assert describe_inflight([], 1.0) == "none"


def test_sanitize_environ_derives_path_info():
    env = {"REQUEST_URI": "/app/a%20b?x=1", "SCRIPT_NAME": "/app"}
    sanitize_environ(env, "/app")
    assert env["SCRIPT_NAME"] == "/app" and env["PATH_INFO"] == "/a b" and env["QUERY_STRING"] == "x=1"
    assert env["REQUEST_METHOD"] == "GET" and env["SERVER_PROTOCOL"] == "HTTP/1.0"
    env = {"REQUEST_URI": "/x?y", "DOCUMENT_URI": "/x", "QUERY_STRING": "y", "PATH_INFO": "/given"}
    sanitize_environ(env)
    assert env["PATH_INFO"] == "/given"   # web_server mode: a PATH_INFO sent is kept


@pytest.mark.parametrize("uri, mount, expected", [
    ("/", "", ("", "/")),
    ("/anything/%E2%82%AC/%2F/x", "", ("", "/anything/\xe2\x82\xac///x")),   # decoded once, latin-1
    ("/a//b/../c?q=%2F", "", ("", "/a//b/../c")),         # slashes and dot segments kept
    ("/%2541", "", ("", "/%41")),                          # decoded once, not twice
    ("/wiki/a%20b?x", "/wiki", ("/wiki", "/a b")),
    ("/wiki", "/wiki", ("/wiki", "")),
    ("/wiki/", "/wiki", ("/wiki", "/")),
    ("/wikipedia/x", "/wiki", None),                      # not under the mount
    ("/other", "/wiki", None),
    ("http://example.com/wiki/x?y", "/wiki", ("/wiki", "/x")),   # absolute form
    ("http://example.com", "", ("", "/")),
    ("*", "", None),
])
def test_request_paths(uri, mount, expected):
    assert request_paths(uri, mount) == expected


def test_sanitize_environ_from_request_uri_ignores_the_web_servers_paths():
    # nginx's $uri (decoded, slashes merged) and Apache's plain ProxyPass
    # (SCRIPT_NAME = the whole path, no PATH_INFO) both give way.
    nginx = {"REQUEST_URI": "/anything/%E2%82%AC/%2F/x", "PATH_INFO": "/anything/\xe2\x82\xac/x",
             "SCRIPT_NAME": ""}
    sanitize_environ(nginx, "", from_uri=True)
    assert nginx["PATH_INFO"] == "/anything/\xe2\x82\xac///x" and nginx["SCRIPT_NAME"] == ""
    apache = {"REQUEST_URI": "/version?x=1", "SCRIPT_NAME": "/version"}
    sanitize_environ(apache, "", from_uri=False)   # no PATH_INFO sent: derived in either mode
    assert (apache["SCRIPT_NAME"], apache["PATH_INFO"], apache["QUERY_STRING"]) == ("", "/version", "x=1")
    mounted = {"REQUEST_URI": "/wiki/page", "SCRIPT_NAME": "/wiki/page"}
    sanitize_environ(mounted, "/wiki", from_uri=True)
    assert (mounted["SCRIPT_NAME"], mounted["PATH_INFO"]) == ("/wiki", "/page")
    # Outside the mount: what the web server said (here nothing but DOCUMENT_URI).
    outside = {"REQUEST_URI": "/elsewhere", "DOCUMENT_URI": "/elsewhere"}
    sanitize_environ(outside, "/wiki", from_uri=True)
    assert (outside["SCRIPT_NAME"], outside["PATH_INFO"]) == ("", "/elsewhere")


def test_error_stream_takes_text_and_bytes():
    import io
    out = io.StringIO()
    stream = flupfix.ErrorStream(out)
    stream.write("text\n")
    stream.write(b"bytes \xe2\x98\x83\n")
    stream.writelines(["a", b"b\n"])
    stream.flush()
    assert out.getvalue() == "text\nbytes \u2603\nab\n"


# --------------------------------------------------------------------------
# Tier 2: one connection in-process over a socketpair
# --------------------------------------------------------------------------

class RecordingObserver:
    def __init__(self):
        self.calls = []

    def begin(self, method, uri):
        self.calls.append(("begin", method, uri))
        return len(self.calls)

    def end(self, token):
        self.calls.append(("end", token))


def _serve_one(app, client_actions, monkeypatch, observer=None):
    """Run one Connection of a real WSGIServer over a socketpair."""
    def no_debug(*args):
        raise AssertionError("a debug string was formatted on the record path")
    monkeypatch.setattr(fcgi_base, "_debug", no_debug)   # docs/flup6-bugs.rst, bug 10
    server = flupfix.WSGIServer(app, threads=1, idle_timeout=5, observer=observer)
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    conn = Connection(ours, "", server)
    server._connections.add(conn)
    thread = threading.Thread(target=conn.run)
    thread.start()
    client = fc.FastCGIConnection.__new__(fc.FastCGIConnection)
    client.sock, client.timeout, client._buf = theirs, 5.0, bytearray()
    theirs.settimeout(5)
    try:
        return client_actions(client)
    finally:
        theirs.close()
        thread.join(10)
        assert not thread.is_alive()


def test_in_process_request_and_observer(monkeypatch):
    def app(environ, start_response):
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"got ", body]

    observer = RecordingObserver()
    r = _serve_one(app, lambda c: c.request("/x?y=1", method="POST", body=b"abc" * 1000,
                                             chunk=7), monkeypatch, observer)
    assert r.ended and r.status == 200 and r.body == b"got " + b"abc" * 1000
    assert observer.calls == [("begin", "POST", "/x?y=1"), ("end", 1)]


def test_in_process_cant_mpx_and_unknown_role(monkeypatch):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    def actions(c):
        c.begin(1, keep=True)
        c.begin(2, keep=True)          # a second request on one connection
        rec = c.read_record()
        assert rec.type == fc.END_REQUEST and rec.request_id == 2
        assert struct.unpack("!LB3x", rec.content)[1] == fc.CANT_MPX_CONN
        c.send_params(1, fc.cgi_params("/"))
        c.send_stdin(1, b"")
        assert c.read_response(1).body == b"ok"
        c.begin(3, keep=True, role=fc.FILTER)
        rec = c.read_record()
        assert rec.request_id == 3
        assert struct.unpack("!LB3x", rec.content)[1] == fc.UNKNOWN_ROLE
        return True

    assert _serve_one(app, actions, monkeypatch)


def test_flup_fcgi_single_cannot_be_constructed():
    """docs/flup6-bugs.rst, bug 5: why the worker uses the threaded server
    only.  Fails (and tells us) once flup6 fixes it."""
    from flup.server import fcgi_single
    with pytest.raises(AttributeError, match="has_key"):
        fcgi_single.WSGIServer(lambda environ, start_response: [])


def test_in_process_pairs_spanning_params_records(monkeypatch):
    """docs/flup6-bugs.rst, bug 4: PARAMS is decoded once, at its end, so a
    pair cut by a record boundary arrives whole."""
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["HTTP_COOKIE"].encode("latin-1")]

    cookie = "c=" + "v" * 3000

    def actions(c):
        c.begin(1)
        c.send_params(1, fc.cgi_params("/", extra={"HTTP_COOKIE": cookie}), split=7)
        c.send_stdin(1, b"")
        return c.read_response(1)

    r = _serve_one(app, actions, monkeypatch)
    assert r.status == 200 and r.body == cookie.encode()
