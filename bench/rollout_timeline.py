"""A multi-host rollout under load, against restarting the hosts one by one
(README "Applying a change to every host").

``python -m bench.rollout_timeline [--clients 48] [--posters 16]`` (from the
checkout, with nginx on PATH): three hosts on 127.0.0.2-4 (each
``fcgi-toolkit run``, one single-thread worker of a 50 ms endpoint), one
nginx on 127.0.0.1, ``--clients`` GET clients and ``--posters`` POST
clients past capacity.  In the same run, on the same hosts:

* ``restart``: the baseline an operator has without ``apply`` on the web
  server: each host in turn stopped (``run`` gets SIGTERM: its supervisord
  drains the workers) and started again, the next once its worker is ready;
* ``apply``: one change (app.environment) applied on the web server: each
  host out of nginx's rotation, restarted, back.

Prints, per variant, answered and failed requests by method, the time the
change took, and answered/failed per second.  nginx retries a GET that
met a closed socket on the next host, not a POST it already sent.  Uses
the rollout integration test's cluster (tests/test_rollout_e2e.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

from harness import LoadGenerator  # noqa: E402
from test_rollout_e2e import SLOW, Cluster  # noqa: E402


def restart_each(c: Cluster) -> str:
    for host in c.hosts.values():
        host.stop()
        host.start()
        host.wait_ready()
    return "restarted %s" % ", ".join(c.hosts)


def apply_change(c: Cluster) -> str:
    c.environment = {"RELEASE": str(int(c.environment["RELEASE"]) + 1)}
    c.write()
    r = c.apply()
    if r.returncode != 0:
        raise RuntimeError("apply failed: %s%s" % (r.stdout, r.stderr))
    return r.stdout.strip().splitlines()[-1]


def measure(c: Cluster, name: str, change, clients: int, posters: int, settle: float) -> dict:
    gets = LoadGenerator("127.0.0.1", c.port, SLOW, threads=clients, duration=300, timeout=60)
    posts = LoadGenerator("127.0.0.1", c.port, SLOW, threads=posters, duration=300, timeout=60,
                          method="POST", body=b"x" * 512)
    samples: list = []
    t0 = time.monotonic()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.monotonic() - t0, gets.total + posts.total,
                            gets.failed + posts.failed))
            time.sleep(0.5)

    with gets, posts:
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        time.sleep(settle)
        began = time.monotonic() - t0
        what = change(c)
        ended = time.monotonic() - t0
        time.sleep(settle)
        done.set()
        sampler.join()
    return {"name": name, "what": what, "began": began, "ended": ended,
            "get": (gets.total, gets.failed, dict(gets.statuses)),
            "post": (posts.total, posts.failed, dict(posts.statuses)), "samples": samples}


def report(res: dict) -> None:
    print("== %s: %s (%.1f s, from %.1f s to %.1f s)" % (
        res["name"], res["what"], res["ended"] - res["began"], res["began"], res["ended"]))
    for method in ("get", "post"):
        total, failed, statuses = res[method]
        print("   %-4s %6d requests, %5d failed  statuses %s" % (method.upper(), total, failed,
                                                               statuses))
    print("   second  answered  failed")
    last_t, last_n, last_f = 0.0, 0, 0
    for t, n, f in res["samples"]:
        if t - last_t >= 1.0 or t == res["samples"][-1][0]:
            print("   %6.1f  %8d  %6d" % (t, n - last_n, f - last_f))
            last_t, last_n, last_f = t, n, f


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=48, help="GET clients (default: %(default)s)")
    p.add_argument("--posters", type=int, default=16, help="POST clients (default: %(default)s)")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds of load before and after the change (default: %(default)s)")
    args = p.parse_args(argv)
    c = Cluster(tempfile.mkdtemp(prefix="fct-ro-bench-"))
    c.start()
    try:
        results = [measure(c, "restart", restart_each, args.clients, args.posters, args.settle),
                   measure(c, "apply", apply_change, args.clients, args.posters, args.settle)]
    finally:
        c.stop()
    for res in results:
        report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
