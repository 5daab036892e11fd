"""The "bare flup6" contender's worker: ``python -m bench.flup_worker MODULE:CALLABLE``.

What a user of plain supervisord writes: flup6's ``WSGIServer`` on the
FastCGI socket inherited on fd 0 from ``[fcgi-program:x]``, with no
scoreboard, no drain logic and no watchdog.
"""
from __future__ import annotations

import argparse
import importlib
import sys


def load(ref: str):
    """Import ``module:callable``."""
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench.flup_worker")
    parser.add_argument("app", help="module:callable")
    args = parser.parse_args(argv)
    app = load(args.app)
    # flup6's threaded WSGIServer with its default, unbounded thread pool:
    # what users run.  A bounded pool (maxThreads) makes flup close
    # connections it accepted once the pool is full (allowQueuing=False), and
    # flup6 1.1.1's single-threaded fcgi_single server does not run on
    # Python 3 (it calls dict.has_key), so there is no one-request-at-a-time
    # bare flup to compare with.
    from flup.server.fcgi import WSGIServer
    # bindAddress=None: serve the listening socket on fd 0 (FCGI_LISTENSOCK_FILENO).
    server = WSGIServer(app, debug=False)
    return 0 if server.run() is not False else 1


if __name__ == "__main__":
    sys.exit(main())
