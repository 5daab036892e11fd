"""The conformance app (tests/apps/conformance.py) plus two routes the nginx
conformance tests need and conformance.py lacks:

/env/ANYTHING             every CGI key nginx sends (PATH_INFO, SCRIPT_NAME,
                          QUERY_STRING, REQUEST_URI, ...) as JSON, for any path
                          below /env/ (conformance's /environ matches one exact
                          path and omits REQUEST_URI)
/bigwrite?n=N&seed=S      N pseudo-random bytes from random.Random(S), sent
                          with ONE call of the write() callable, so the client
                          can check the byte count and a hash (all-"x" bodies
                          cannot show reordered or repeated chunks)
/echo-raw                 POST body back, like conformance's /echo but not
                          wrapped in wsgiref.validate (which refuses the
                          HTTP_CONTENT_LENGTH nginx sends)
/raise-after-headers-cl   like conformance's /raise-after-headers, but the
                          headers announce Content-Length: 100

Everything else goes to conformance.application.
"""
import json
import random
from urllib.parse import parse_qs

from conformance import application as conformance_application

#: CGI keys /env/ reports.
ENV_KEYS = ("REQUEST_METHOD", "PATH_INFO", "SCRIPT_NAME", "QUERY_STRING", "REQUEST_URI",
            "DOCUMENT_URI", "SERVER_NAME", "SERVER_PORT", "SERVER_PROTOCOL", "REMOTE_ADDR",
            "CONTENT_LENGTH", "CONTENT_TYPE", "HTTP_CONTENT_LENGTH", "HTTP_CONTENT_TYPE",
            "wsgi.url_scheme")


def pseudo_random_bytes(n: int, seed: int) -> bytes:
    """The body /bigwrite sends; the tests compute the same bytes."""
    return random.Random(seed).randbytes(n)


def _env(environ, start_response):
    data = json.dumps({k: environ.get(k) for k in ENV_KEYS}).encode("utf-8")
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(data)))])
    return [data]


def _bigwrite(environ, start_response):
    q = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    data = pseudo_random_bytes(int(q.get("n", "1000")), int(q.get("seed", "0")))
    write = start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                      ("Content-Length", str(len(data)))])
    write(data)
    return []


def _raise_after_headers_cl(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "100")])
    yield b"first part\n"
    raise RuntimeError("conformance: boom after headers with Content-Length")


def _echo_raw(environ, start_response):
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(len(body)))])
    return [body]


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/echo-raw":
        return _echo_raw(environ, start_response)
    if path == "/raise-after-headers-cl":
        return _raise_after_headers_cl(environ, start_response)
    if path.startswith("/env/"):
        return _env(environ, start_response)
    if path == "/bigwrite":
        return _bigwrite(environ, start_response)
    return conformance_application(environ, start_response)
