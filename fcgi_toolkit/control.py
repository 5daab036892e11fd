"""``fcgi-toolkit recycle WORKER`` and ``fcgi-toolkit reload``.

Both hand a request to the watchdog listener, the group's one coordinator
(so an operator's recycle and the watchdog's share one concurrency guard),
and wait, bounded, for its answer.  While waiting they print the progress
they can see in the state file.  Exit status: 0 done, 1 failed or no
answer, 2 bad deployment file.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional

from fcgi_toolkit import settings, statefile

POLL = 0.2


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default="deploy.toml",
                        help="deployment file (default: ./deploy.toml)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for the result (default: from the deployment)")


def add_arguments_recycle(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument("worker", help='slot to replace: "wiki_01", "wiki:wiki_01" or "01"')


def add_arguments_reload(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)


def _progress(state: dict) -> str:
    parts = []
    reload = state.get("reload")
    if reload:
        parts.append("reload: %d of %d replaced" % (reload.get("replaced", 0),
                                                    len(reload.get("old_pids", {}))))
    for offender, op in sorted((state.get("recycle") or {}).items()):
        parts.append("%s -> %s: %s" % (offender, op.get("replacement") or offender,
                                       op.get("phase")))
    return "; ".join(parts)


def wait_for_result(dep: settings.Deployment, request_id: str, timeout: float,
                    out=sys.stdout, clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep) -> Optional[dict]:
    """Poll for the listener's answer, printing progress; None on timeout."""
    deadline = clock() + timeout
    shown = ""
    while clock() < deadline:
        result = statefile.result(dep.runtime_dir, request_id)
        if result is not None:
            return result
        progress = _progress(statefile.load_state(dep.state_path))
        if progress and progress != shown:
            print("  %s" % progress, file=out, flush=True)
            shown = progress
        sleep(POLL)
    return statefile.result(dep.runtime_dir, request_id)


def _submit(dep: settings.Deployment, request: dict, timeout: float, what: str) -> int:
    if not os.path.isdir(dep.runtime_dir):
        print("fcgi-toolkit: %s does not exist: is the deployment running?" % dep.runtime_dir,
              file=sys.stderr)
        return 1
    request_id = statefile.enqueue(dep.runtime_dir, request)
    print("%s: asked the watchdog (request %s), waiting up to %ds" % (what, request_id, timeout),
          flush=True)
    try:
        result = wait_for_result(dep, request_id, timeout)
    finally:
        if statefile.result(dep.runtime_dir, request_id) is None:
            # Give up: withdraw the request so that the listener does not act on it later.
            statefile.forget(dep.runtime_dir, request_id)
    if result is None:
        print("fcgi-toolkit: no answer from the watchdog listener within %ds (is supervisord"
              " running? see %s)" % (timeout, os.path.join(dep.log_dir, dep.name + "_watchdog.log")),
              file=sys.stderr)
        return 1
    statefile.forget(dep.runtime_dir, request_id)
    stream = sys.stdout if result.get("ok") else sys.stderr
    print("%s: %s" % (what, result.get("message", "")), file=stream)
    return 0 if result.get("ok") else 1


def _one_recycle_time(dep: settings.Deployment) -> float:
    return (dep.recycle.ready_timeout + dep.workers.graceful_timeout + 5
            + 2 * dep.recycle.check_interval)


def run_recycle(args: argparse.Namespace) -> int:
    dep = settings.load(args.config)
    timeout = args.timeout if args.timeout is not None else _one_recycle_time(dep) + 30
    return _submit(dep, {"op": "recycle", "worker": args.worker}, timeout,
                   "recycle %s" % args.worker)


def run_reload(args: argparse.Namespace) -> int:
    dep = settings.load(args.config)
    timeout = (args.timeout if args.timeout is not None
               else _one_recycle_time(dep) * dep.workers.count + 30)
    return _submit(dep, {"op": "reload"}, timeout, "reload")
