"""The bench entry point: ``python -m bench.run`` (``tox -e bench`` runs it).

    python -m bench.run                       # every scenario, ~20 minutes on 2 cores
    python -m bench.run --scenario leak       # one scenario alone
    python -m bench.run --smoke               # seconds: CI's check that the suite runs

Writes results.json, results.md and PNG plots to ``--out`` (default
bench/results/).  A contender that is not installed (uWSGI, gunicorn, memmon) or not
built yet is reported as skipped, never silently left out.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import signal
import sys
import time
import traceback

from bench import plot, report, wrk
from bench.scenario import Context
from bench.stack import Session

log = logging.getLogger("bench")

SCENARIOS = ("throughput", "recycle", "reload", "scale", "leak", "watchdog", "detection", "memlimit")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--scenario", action="append", choices=SCENARIOS,
                   help="run only this scenario (repeatable); default: all")
    p.add_argument("--smoke", action="store_true",
                   help="seconds per scenario, fewer variants: checks the suite runs")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of load per measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds in the throughput scenario")
    p.add_argument("--workers", type=int, default=2, help="workers per contender")
    p.add_argument("--connections", type=int, default=8, help="wrk connections")
    p.add_argument("--contenders", default="ours,flup,uwsgi,gunicorn",
                   help="comma-separated subset of ours,flup,uwsgi,gunicorn")
    p.add_argument("--out", default=DEFAULT_OUT, help="results directory")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs) after the run")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    if not wrk.available():
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    # SIGTERM (tox, CI timeouts) unwinds like Ctrl-C, so every stack is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    names = args.scenario or list(SCENARIOS)
    if args.smoke:
        args.duration, args.rounds = 1.0, 1
    doc = {"command": "python -m bench.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
           "smoke": args.smoke, "environment": report.environment(), "scenarios": []}
    no_plots = plot.available()
    started = time.monotonic()
    with Session(keep=args.keep) as session:
        ctx = Context(session=session, smoke=args.smoke, duration=args.duration, rounds=args.rounds,
                      workers=args.workers, connections=args.connections,
                      kinds=tuple(k.strip() for k in args.contenders.split(",") if k.strip()))
        log.info("work directory %s", session.root)
        for name in names:
            mod = importlib.import_module("bench.scenario_" + name)
            t = time.monotonic()
            log.info("== %s", mod.TITLE)
            try:
                res = mod.run(ctx).as_dict()
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                log.exception("scenario %s failed", name)
                res = {"name": name, "title": mod.TITLE, "baseline": mod.BASELINE,
                       "columns": [list(c) for c in mod.COLUMNS], "rows": [], "skipped": {},
                       "notes": [], "series": {}, "error": "%s: %s" % (type(exc).__name__, exc),
                       "traceback": traceback.format_exc()}
            res["seconds"] = round(time.monotonic() - t, 1)
            if no_plots:
                res["notes"].append("no plot: %s" % no_plots)
            else:
                os.makedirs(args.out, exist_ok=True)
                res["plots"] = plot.draw(res, args.out)
            doc["scenarios"].append(res)
            report.write(args.out, doc)       # after each scenario: a partial run still reports
    doc["seconds"] = round(time.monotonic() - started, 1)
    json_path, md_path = report.write(args.out, doc)
    print(open(md_path).read())
    log.info("wrote %s and %s in %.0f s", json_path, md_path, doc["seconds"])
    return 1 if any(s.get("error") for s in doc["scenarios"]) else 0


if __name__ == "__main__":
    sys.exit(main())
