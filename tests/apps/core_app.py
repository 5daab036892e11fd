"""Test app for the core end-to-end tests (tests/test_e2e_core.py).

Routes (PATH_INFO):
  /            "hello from PID" (text)
  /pid         the worker's pid
  /echo        POST body back byte-exact (reads CONTENT_LENGTH bytes)
  /stream?n=N  N chunks of 1000 bytes "chunk-I:..." yielded one by one
  /raise       raises before start_response (500 expected)
  /sleep?s=S   sleeps S seconds then answers "slept PID"
  /environ     JSON of the CGI/WSGI string variables
  /osenv?k=A&k=B  JSON of the worker process's environment variables A, B (null if unset)
"""
from __future__ import annotations

import json
import os
import time
from urllib.parse import parse_qs


def _q(environ, key, default):
    return parse_qs(environ.get("QUERY_STRING", "")).get(key, [default])[0]


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path in ("", "/"):
        body = b"hello from %d\n" % os.getpid()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    if path == "/pid":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
    if path == "/echo":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        stream = environ["wsgi.input"]
        chunks, left = [], length
        while left > 0:
            data = stream.read(min(left, 65536))
            if not data:
                break
            chunks.append(data)
            left -= len(data)
        body = b"".join(chunks)
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    if path == "/stream":
        n = int(_q(environ, "n", "10"))
        start_response("200 OK", [("Content-Type", "text/plain")])

        def chunks():
            for i in range(n):
                yield (("chunk-%d:" % i).ljust(999, "x") + "\n").encode()
        return chunks()
    if path == "/raise":
        raise RuntimeError("core_app: deliberate failure")
    if path == "/sleep":
        seconds = float(_q(environ, "s", "1"))
        time.sleep(seconds)
        body = b"slept %d\n" % os.getpid()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    if path == "/environ" or path.startswith("/environ/"):
        data = {k: v for k, v in environ.items() if isinstance(v, str)}
        body = json.dumps(data, sort_keys=True).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    if path == "/osenv":
        keys = parse_qs(environ.get("QUERY_STRING", "")).get("k", [])
        body = json.dumps({k: os.environ.get(k) for k in keys}, sort_keys=True).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    body = b"not found\n"
    start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
