"""Watchdog test app: keeps about 1 MB per request forever (a leak).

Routes: ``/`` answers "leak PID N" where N is the MB kept so far.
"""
from __future__ import annotations

import os

_KEPT: list[bytes] = []
CHUNK = 1024 * 1024


def application(environ, start_response):
    # b"x" * n writes every page, so the resident size really grows.
    _KEPT.append(b"x" * CHUNK)
    body = b"leak %d %d\n" % (os.getpid(), len(_KEPT))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
