"""core_app plus ``/gate?f=FILE``: sends "first\\n", waits (at most 20 s)
until FILE exists, then sends "second\\n".  A client that reads "first"
before it creates FILE proves the web server streams the response instead
of buffering it whole."""
import os
import time
from urllib.parse import parse_qs

from core_app import application as core


def application(environ, start_response):
    if environ.get("PATH_INFO") != "/gate":
        return core(environ, start_response)
    gate = parse_qs(environ.get("QUERY_STRING", "")).get("f", [""])[0]
    start_response("200 OK", [("Content-Type", "text/plain")])

    def parts():
        yield b"first\n"
        deadline = time.monotonic() + 20
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.02)
        yield b"second\n"
    return parts()
