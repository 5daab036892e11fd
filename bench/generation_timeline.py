"""The timeline of one generation switch under load (README "Generations").

``python -m bench.generation_timeline [--clients 64] [--seconds 14]
[--new-supervisord]`` (from the checkout, with nginx on PATH): a deployment
of 2 single-thread workers of a 50 ms endpoint, ``--clients`` HTTP clients
on loopback, and at 4 s an ``apply`` that moves the unix socket (a new
generation), or with ``--new-supervisord`` one that changes nothing and
moves the workers to a new inner supervisord (README "Supervisord
generations").  Prints answered
and failed requests per second, and when the switch began and ended.
Uses the integration tests' harness (tests/harness.py) for the deployment
and the load.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

from harness import Cluster  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=14.0)
    p.add_argument("--at", type=float, default=4.0, help="seconds into the load to apply")
    p.add_argument("--new-supervisord", action="store_true",
                   help="apply --new-supervisord (no change) instead of moving the socket")
    args = p.parse_args(argv)
    base = tempfile.mkdtemp(prefix="fct-gen-bench-")
    c = Cluster(base, "core_app:application", name="gb",
                recycle={"check_interval": 0.5, "ready_timeout": "15s"}, workers={"threads": 1})
    c.start()
    try:
        load = c.load("/sleep?s=0.05", threads=args.clients, duration=args.seconds).start()
        t0 = time.monotonic()
        samples: list[tuple[float, int, int]] = []
        marks: dict[str, float] = {}

        def sample() -> None:
            while time.monotonic() - t0 < args.seconds:
                samples.append((time.monotonic() - t0, load.total, load.failed))
                time.sleep(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        time.sleep(args.at)
        if not args.new_supervisord:
            c.edit(workers={"socket": "unix://" + os.path.join(c.runtime_dir, "moved.sock")})
        marks["apply"] = time.monotonic() - t0
        r = c.toolkit("apply", "-c", c.deploy_path,
                      *(["--new-supervisord"] if args.new_supervisord else []), timeout=120)
        marks["done"] = time.monotonic() - t0
        load.join()
        sampler.join()
        print("apply exit %d (%.1fs .. %.1fs):\n%s" % (r.returncode, marks["apply"], marks["done"],
                                                      r.stdout + r.stderr))
        print("second  answered  failed")
        last_total = last_failed = 0
        for second in range(int(args.seconds)):
            inside = [s for s in samples if s[0] <= second + 1]
            total, failed = (inside[-1][1], inside[-1][2]) if inside else (0, 0)
            note = " <- switch" if marks["apply"] < second + 1 and marks["done"] > second else ""
            print("%6d  %8d  %6d%s" % (second, total - last_total, failed - last_failed, note))
            last_total, last_failed = total, failed
        print("total %d, failed %d (%s)" % (load.total, load.failed, load.summary()))
    finally:
        c.stop()
        subprocess.run(["rm", "-rf", base], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
