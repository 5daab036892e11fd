"""The WSGI apps every contender serves (importable as ``bench.apps:NAME``).

- ``hello``: a fixed 14-byte body; measures the server, not the app.
- ``cpu``: renders a jinja2 table, about 1 ms of CPU per request.
- ``leak``: like hello, but keeps ``LEAK_BYTES`` more memory on every request.
- ``leak_rate``: like hello, but grows ``LEAK_RATE`` bytes per second of
  serving, whatever the request rate: each request keeps the rate times the
  time since the previous one (at most 0.1 s of it, so idle time adds nothing).
- ``slow``: hello after ``BENCH_SLOW_SECONDS`` (default 0.02) of sleep: the
  throughput is then the number of single-thread workers over that time, so
  it shows how many workers serve (the worker-count scenario).
- ``grow``: serves hello; ``GET /grow`` adds ``GROW_BYTES`` at once and answers
  with the pid and the time, so the detection scenario knows which worker
  crossed its limit and when.

When ``BENCH_MARK_DIR`` is set, importing this module writes
``$BENCH_MARK_DIR/ready-<pid>`` with the import time: a contender-neutral
sign that a (re)started worker has loaded the app.
"""
from __future__ import annotations

import os
import time

LEAK_BYTES = int(os.environ.get("BENCH_LEAK_BYTES", 32 * 1024))
LEAK_RATE = int(os.environ.get("BENCH_LEAK_RATE", 5 * 1024 * 1024))
GROW_BYTES = int(os.environ.get("BENCH_GROW_BYTES", 96 * 1024 * 1024))
SLOW_SECONDS = float(os.environ.get("BENCH_SLOW_SECONDS", 0.02))

_HELLO = b"Hello, world!\n"
_kept: list = []


def _mark_ready() -> None:
    mark_dir = os.environ.get("BENCH_MARK_DIR")
    if not mark_dir:
        return
    tmp = os.path.join(mark_dir, ".ready-%d.tmp" % os.getpid())
    with open(tmp, "w") as f:
        f.write("%.6f\n" % time.time())
    os.replace(tmp, os.path.join(mark_dir, "ready-%d" % os.getpid()))


def _respond(start_response, body: bytes, ctype: str = "text/plain") -> list:
    start_response("200 OK", [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]


def hello(environ, start_response):
    return _respond(start_response, _HELLO)


_TEMPLATE = None


def _template():
    global _TEMPLATE
    if _TEMPLATE is None:
        import jinja2
        env = jinja2.Environment(autoescape=True)
        _TEMPLATE = env.from_string(
            "<table>{% for row in rows %}<tr>"
            "{% for cell in row %}<td class=\"{{ loop.cycle('a', 'b') }}\">{{ cell }}</td>{% endfor %}"
            "</tr>{% endfor %}</table>")
    return _TEMPLATE


_ROWS = [["<cell %d.%d>" % (r, c) for c in range(8)] for r in range(34)]


def cpu(environ, start_response):
    body = _template().render(rows=_ROWS).encode()
    return _respond(start_response, body, "text/html")


def leak(environ, start_response):
    # Bytes written, not calloc'd: every page is resident.
    _kept.append(b"x" * LEAK_BYTES)
    return _respond(start_response, _HELLO)


_last = [0.0]


def leak_rate(environ, start_response):
    now = time.monotonic()
    gap = min(0.1, now - _last[0]) if _last[0] else 0.0
    _last[0] = now
    if gap > 0:
        _kept.append(b"x" * int(LEAK_RATE * gap))
    return _respond(start_response, _HELLO)


def slow(environ, start_response):
    time.sleep(SLOW_SECONDS)
    return _respond(start_response, _HELLO)


def grow(environ, start_response):
    if environ.get("PATH_INFO") == "/grow":
        _kept.append(b"x" * GROW_BYTES)
        body = ("%d %.6f\n" % (os.getpid(), time.time())).encode()
        return _respond(start_response, body)
    return _respond(start_response, _HELLO)


def pid(environ, start_response):
    return _respond(start_response, ("%d\n" % os.getpid()).encode())


_mark_ready()
