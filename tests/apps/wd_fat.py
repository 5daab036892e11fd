"""Watchdog test app whose fresh workers are already big: ~64 MB allocated at import."""
from __future__ import annotations

import os

BALLAST = b"f" * (64 * 1024 * 1024)


def application(environ, start_response):
    body = b"fat %d\n" % os.getpid()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
