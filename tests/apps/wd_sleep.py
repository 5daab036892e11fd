"""Watchdog test app: ``/sleep?s=S`` sleeps S seconds in ``sleepy_handler``; ``/`` answers at once.

Answers "PATH PID" so a test can tell which worker served it.
"""
from __future__ import annotations

import os
import time
from urllib.parse import parse_qs


def sleepy_handler(seconds: float) -> None:
    """The function a stack dump must name."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/sleep":
        seconds = float(parse_qs(environ.get("QUERY_STRING", "")).get("s", ["1"])[0])
        sleepy_handler(seconds)
    body = ("%s %d\n" % (path, os.getpid())).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
