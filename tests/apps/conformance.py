"""WSGI conformance app for the worker tests (issue #7).

Routes (query strings as noted).  Routes that follow PEP 3333 are wrapped in
``wsgiref.validate``; the ones that break it on purpose (/str-body,
/bad-header) are not, so that the server's own checks are what is tested.

/hello                 200 "Hello, world!\\n"
/echo                  POST body back (read(CONTENT_LENGTH))
/input?mode=M          how wsgi.input reads: read, readn (read(3) chunks),
                       readline, iter, past (read past the end); JSON back
/stream?n=N&delay=D&id=K   N chunks "chunk i\\n", D seconds apart; close() counted under K
/close-counter?id=K    how often close() was called for K
/raise                 exception before start_response
/raise-after-headers   exception after the first chunk went out
/str-body              yields a str
/bad-header            a header value that is not latin-1
/errors                writes str and bytes to wsgi.errors
/write                 uses the write() callable
/big?n=N               one N-byte chunk (single write)
/head                  body for GET; the server drops it for HEAD
/204, /304             no body allowed
/nolength              two chunks, no Content-Length
/headers?n=N&size=S    N extra headers X-Test-i, and one X-Big of S bytes
/sleep?s=S[&mark=F]    creates file F (if given), sleeps S seconds, then 200 "slept"
/pid                   the worker's pid
/environ               selected environ keys, os.environ[CONFORMANCE_ENV], cwd as JSON
"""
import json
import os
import sys
import threading
import time
from urllib.parse import parse_qs
from wsgiref.validate import validator

_close_counts: dict = {}
_lock = threading.Lock()


def _qs(environ):
    return {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def _text(start_response, body, status="200 OK", extra=()):
    data = body.encode("utf-8") if isinstance(body, str) else body
    start_response(status, [("Content-Type", "text/plain"),
                            ("Content-Length", str(len(data)))] + list(extra))
    return [data]


class CountingStream:
    """An iterable whose close() calls are counted."""

    def __init__(self, key, n, delay):
        self.key, self.n, self.delay = key, n, delay

    def __iter__(self):
        for i in range(self.n):
            if i and self.delay:
                time.sleep(self.delay)
            yield b"chunk %d\n" % i

    def close(self):
        with _lock:
            _close_counts[self.key] = _close_counts.get(self.key, 0) + 1


def hello(environ, start_response):
    return _text(start_response, "Hello, world!\n")


def echo(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length)
    return _text(start_response, body)


def input_modes(environ, start_response):
    mode = _qs(environ).get("mode", "read")
    stream = environ["wsgi.input"]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    parts = []
    if mode == "read":
        parts.append(stream.read(length))
    elif mode == "readn":
        while True:
            chunk = stream.read(3)
            if not chunk:
                break
            parts.append(chunk)
    elif mode == "readline":
        while True:
            line = stream.readline()
            if not line:
                break
            parts.append(line)
    elif mode == "readline-hint":
        parts.append(stream.readline(4))
        parts.append(stream.readline())
    elif mode == "iter":
        parts.extend(stream)
    elif mode == "past":
        parts.append(stream.read(length))
        parts.append(stream.read(10))
        parts.append(stream.readline())
    out = json.dumps([p.decode("latin-1") for p in parts])
    return _text(start_response, out, extra=[("Content-Type-Detail", "application/json")])


def stream(environ, start_response):
    q = _qs(environ)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return CountingStream(q.get("id", "default"), int(q.get("n", "10")), float(q.get("delay", "0")))


def close_counter(environ, start_response):
    key = _qs(environ).get("id", "default")
    with _lock:
        count = _close_counts.get(key, 0)
    return _text(start_response, str(count))


def raise_(environ, start_response):
    raise RuntimeError("conformance: boom before headers")


def raise_after_headers(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"first part\n"
    raise RuntimeError("conformance: boom after headers")


def str_body(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return ["this is a str, not bytes\n"]


def bad_header(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Bad", "snow \u2603 man")])
    return [b"never sent\n"]


def errors(environ, start_response):
    err = environ["wsgi.errors"]
    err.write("conformance: text on wsgi.errors\n")
    err.flush()
    if hasattr(err, "buffer"):
        pass
    try:
        err.write(b"conformance: bytes on wsgi.errors\n")
    except TypeError:
        # A strictly text stream (PEP 3333): the server's stream takes both.
        err.write("conformance: bytes refused\n")
    return _text(start_response, "logged\n")


def write_callable(environ, start_response):
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"written ")
    write(b"with write()\n")
    return []


def big(environ, start_response):
    n = int(_qs(environ).get("n", "1000"))
    data = b"x" * n
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(n))])
    return [data]


def head(environ, start_response):
    return _text(start_response, "body of /head\n")


def no_content(environ, start_response):
    start_response("204 No Content", [])
    return []


def not_modified(environ, start_response):
    start_response("304 Not Modified", [("ETag", '"abc"')])
    return []


def nolength(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"first;", b"second\n"]


def headers(environ, start_response):
    q = _qs(environ)
    n, size = int(q.get("n", "100")), int(q.get("size", "0"))
    hdrs = [("Content-Type", "text/plain")]
    hdrs += [("X-Test-%d" % i, "value-%d" % i) for i in range(n)]
    if size:
        hdrs.append(("X-Big", "b" * size))
    return _text(start_response, "headers\n", extra=hdrs[1:])


def sleep(environ, start_response):
    qs = _qs(environ)
    if qs.get("mark"):
        # The test's observable "the request is running in the app".
        open(qs["mark"], "w").close()
    time.sleep(float(qs.get("s", "1")))
    return _text(start_response, "slept\n")


def pid(environ, start_response):
    return _text(start_response, str(os.getpid()))


def environ_keys(environ, start_response):
    keys = ("REQUEST_METHOD", "PATH_INFO", "SCRIPT_NAME", "QUERY_STRING", "SERVER_NAME",
            "SERVER_PORT", "SERVER_PROTOCOL", "wsgi.url_scheme", "wsgi.multithread",
            "wsgi.multiprocess", "wsgi.run_once", "CONFORMANCE_ENV")
    out = {k: environ.get(k) for k in keys}
    out["os.environ[CONFORMANCE_ENV]"] = os.environ.get("CONFORMANCE_ENV")
    out["cwd"] = os.getcwd()
    return _text(start_response, json.dumps(out))


# Route -> (app, wrap in wsgiref.validate?)
ROUTES = {
    "/hello": (hello, True),
    "/echo": (echo, True),
    "/input": (input_modes, False),   # validate forbids read() without size and readline(hint)
    "/stream": (stream, False),       # validate's iterator wrapper would call close() itself
    "/close-counter": (close_counter, True),
    "/raise": (raise_, True),
    "/raise-after-headers": (raise_after_headers, True),
    "/str-body": (str_body, False),
    "/bad-header": (bad_header, False),
    "/errors": (errors, False),       # writes bytes to wsgi.errors on purpose
    "/write": (write_callable, True),
    "/big": (big, True),
    "/head": (head, True),
    "/204": (no_content, True),
    "/304": (not_modified, True),
    "/nolength": (nolength, True),
    "/headers": (headers, True),
    "/sleep": (sleep, True),
    "/pid": (pid, True),
    "/environ": (environ_keys, True),
}
_DISPATCH = {path: (validator(app) if wrap else app) for path, (app, wrap) in ROUTES.items()}


def application(environ, start_response):
    app = _DISPATCH.get(environ.get("PATH_INFO", ""))
    if app is None:
        return _text(start_response, "not found\n", "404 Not Found")
    return app(environ, start_response)


if __name__ == "__main__":  # pragma: no cover
    print("import me as conformance:application", file=sys.stderr)
