"""Watchdog test app: grows on demand; its import can be held back.

Routes: ``/grow?mb=N`` keeps N MB more (written, so resident); anything else
answers "grow PID N" with the MB kept so far.  While the file named by the
environment variable ``WD_HOLD_IMPORT`` exists, a new worker's import waits
(at most 60 s): the test decides when a replacement may become ready.
"""
from __future__ import annotations

import os
import time

_hold = os.environ.get("WD_HOLD_IMPORT", "")
_deadline = time.monotonic() + 60
while _hold and os.path.exists(_hold) and time.monotonic() < _deadline:
    time.sleep(0.05)

_KEPT: list[bytes] = []
MB = 1024 * 1024


def application(environ, start_response):
    if environ.get("PATH_INFO") == "/grow":
        query = environ.get("QUERY_STRING", "")
        mb = int(query[3:]) if query.startswith("mb=") and query[3:].isdigit() else 0
        _KEPT.append(b"g" * (mb * MB))
    body = b"grow %d %d\n" % (os.getpid(), sum(len(k) for k in _KEPT) // MB)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
