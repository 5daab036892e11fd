"""The built-in demo WSGI app (``fcgi_toolkit.demo:application``).

Routes:

``/``            a page showing the worker's pid, slot and request count
``/echo``        the request body back (POST), or the query string (GET)
``/slow?s=2``    sleeps s seconds (at most 120), then answers
``/leak?mb=1``   keeps mb MB (at most 64) for the rest of the worker's life,
                 so the watchdog's max_rss recycles it
``/error``       raises: a 500 page, and the traceback in the worker's log
``/stream?n=5``  n chunks, one per iteration of the response
``/env``         the WSGI environ (strings only)
"""
from __future__ import annotations

import html
import os
import threading
import time
from typing import Callable, Iterable
from urllib.parse import parse_qs

_lock = threading.Lock()
_requests = 0
_leaked: list[bytes] = []
_started = time.time()


def _number(query: dict, key: str, default: float, top: float) -> float:
    try:
        value = float(query.get(key, [default])[0])
    except ValueError:
        value = default
    return max(0.0, min(value, top))


def _page() -> bytes:
    slot = os.environ.get("FCGI_TOOLKIT_SLOT", "?")
    body = """<!doctype html>
<html><head><meta charset="utf-8"><title>fcgi-toolkit demo</title></head>
<body>
<h1>fcgi-toolkit demo</h1>
<p>Served by worker pid <b>{pid}</b>, slot <b>{slot}</b>: request <b>{n}</b> of this worker,
which has been up for {age:.0f} s and keeps {leak} MB leaked.</p>
<ul>
<li><a href="echo?hello=world">echo</a>: the query string or POST body back</li>
<li><a href="slow?s=2">slow?s=2</a>: a 2-second request</li>
<li><a href="leak?mb=8">leak?mb=8</a>: keep 8 MB; past limits.max_rss the watchdog replaces this worker</li>
<li><a href="error">error</a>: an exception (500, traceback in the worker log)</li>
<li><a href="stream?n=5">stream?n=5</a>: a streamed response</li>
<li><a href="env">env</a>: the WSGI environ</li>
</ul>
<p>Reload to see other workers answer.</p>
</body></html>
""".format(pid=os.getpid(), slot=html.escape(slot), n=_requests, age=time.time() - _started,
           leak=len(_leaked))
    return body.encode("utf-8")


def application(environ: dict, start_response: Callable) -> Iterable[bytes]:
    global _requests
    with _lock:
        _requests += 1
    path = environ.get("PATH_INFO", "") or "/"
    query = parse_qs(environ.get("QUERY_STRING", ""))
    text = [("Content-Type", "text/plain; charset=utf-8")]

    if path == "/":
        body = _page()
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    if path == "/echo":
        if environ.get("REQUEST_METHOD") == "POST":
            try:
                length = int(environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                length = 0
            body = environ["wsgi.input"].read(length) if length else b""
        else:
            body = environ.get("QUERY_STRING", "").encode("latin-1")
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    if path == "/slow":
        seconds = _number(query, "s", 1.0, 120.0)
        time.sleep(seconds)
        start_response("200 OK", text)
        return [b"slept %.3f s in pid %d\n" % (seconds, os.getpid())]
    if path == "/leak":
        mb = int(_number(query, "mb", 1, 64))
        with _lock:
            _leaked.extend(b"x" * (1 << 20) for _ in range(mb))
        start_response("200 OK", text)
        return [b"pid %d keeps %d MB\n" % (os.getpid(), len(_leaked))]
    if path == "/error":
        raise RuntimeError("demo error requested at /error")
    if path == "/stream":
        n = int(_number(query, "n", 5, 1000))
        start_response("200 OK", text)
        return (b"chunk %d\n" % i for i in range(n))
    if path == "/env":
        lines = ["%s = %s" % (k, v) for k, v in sorted(environ.items()) if isinstance(v, str)]
        start_response("200 OK", text)
        return [("\n".join(lines) + "\n").encode("utf-8", "replace")]
    start_response("404 Not Found", text)
    return [b"not found\n"]
