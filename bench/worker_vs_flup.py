"""Side-by-side throughput: ``fcgi-toolkit worker`` vs bare flup6's WSGIServer.

Same app (tests/apps/conformance.py /hello), same unix socket, one run:
each server in turn serves FastCGI requests from N client threads for D
seconds (one connection per request, as nginx does without keepalive).
Prints requests/second for both and the ratio; asserts nothing.

    python bench/worker_vs_flup.py [--seconds 3] [--clients 4] [--threads 4] [--uri /hello]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)
import fcgiclient as fc  # noqa: E402


def drive(address, uri: str, seconds: float, clients: int) -> tuple:
    stop = time.monotonic() + seconds
    counts, errors = [0] * clients, [0] * clients

    def loop(i: int) -> None:
        while time.monotonic() < stop:
            try:
                r = fc.request(address, uri, timeout=10)
                if r.ended and r.status == 200:
                    counts[i] += 1
                else:
                    errors[i] += 1
            except OSError:
                errors[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    return sum(counts) / elapsed, sum(errors)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--threads", type=int, default=4, help="worker thread pool size")
    parser.add_argument("--uri", default="/hello")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        listener = fc.Listener(tmp)
        deploy = fc.write_deploy(tmp, threads=args.threads)
        try:
            for kind in ("ours", "flup"):
                worker = fc.WorkerProcess(deploy, listener, kind=kind)
                try:
                    worker.wait_ready()
                    drive(listener.address, args.uri, 0.5, args.clients)   # warm-up
                    results[kind] = drive(listener.address, args.uri, args.seconds, args.clients)
                finally:
                    worker.stop()
        finally:
            listener.close()
    for kind, label in (("ours", "fcgi-toolkit worker"), ("flup", "bare flup6")):
        rate, errors = results[kind]
        print("%-20s %8.0f req/s  (%d errors)" % (label, rate, errors))
    if results["flup"][0]:
        print("ratio ours/flup6: %.2f" % (results["ours"][0] / results["flup"][0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
