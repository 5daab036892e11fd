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
from typing import Any, Callable, Optional

from fcgi_toolkit import names, settings, statefile
from fcgi_toolkit.names import request_wait

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


def _progress(state: statefile.State) -> str:
    parts = []
    if state.reload:
        parts.append("reload: %d of %d replaced" % (state.reload.replaced,
                                                    len(state.reload.old_pids)))
    for offender, op in sorted(state.recycle.items()):
        parts.append("%s -> %s: %s" % (offender, op.new_slot, op.phase.value))
    return "; ".join(parts)


def wait_for_result(dep: settings.Deployment, request_id: str, timeout: float,
                    out: Any = sys.stdout, clock: Callable[[], float] = time.monotonic,
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


def submit(dep: settings.Deployment, request: dict, timeout: float,
           out: Any = sys.stdout) -> Optional[dict]:
    """Queue ``request`` for the watchdog (statefile's request files) and wait
    for its result, writing progress to ``out``.  None if no answer came
    within ``timeout``.  The request and its result are removed either way,
    so a request given up on is withdrawn: the watchdog does not act on it
    later.  ``fcgi-toolkit recycle/reload`` and ``fcgi recycle/reload`` (the
    supervisorctl plugin) both submit through here."""
    request_id = statefile.enqueue(dep.runtime_dir, request)
    try:
        return wait_for_result(dep, request_id, timeout, out=out)
    finally:
        statefile.forget(dep.runtime_dir, request_id)


def not_running(dep: settings.Deployment) -> Optional[str]:
    """Why no request can be handed to the watchdog (no runtime dir); None if one can."""
    if os.path.isdir(dep.runtime_dir):
        return None
    return "%s does not exist: is the deployment running?" % dep.runtime_dir


def watchdog_log(dep: settings.Deployment) -> str:
    return os.path.join(dep.log_dir, names.watchdog_program(dep.name) + ".log")


def _submit(dep: settings.Deployment, request: dict, timeout: float, what: str) -> int:
    why = not_running(dep)
    if why:
        print("fcgi-toolkit: %s" % why, file=sys.stderr)
        return 1
    print("%s: asked the watchdog, waiting up to %ds" % (what, timeout), flush=True)
    result = submit(dep, request, timeout)
    if result is None:
        print("fcgi-toolkit: no answer from the watchdog listener within %ds (is supervisord"
              " running? see %s)" % (timeout, watchdog_log(dep)), file=sys.stderr)
        return 1
    stream = sys.stdout if result.get("ok") else sys.stderr
    print("%s: %s" % (what, result.get("message", "")), file=stream)
    return 0 if result.get("ok") else 1


def run_recycle(args: argparse.Namespace) -> int:
    dep = settings.load(args.config)
    timeout = args.timeout if args.timeout is not None else request_wait(dep, "recycle")
    return _submit(dep, {"op": "recycle", "worker": args.worker}, timeout,
                   "recycle %s" % args.worker)


def run_reload(args: argparse.Namespace) -> int:
    dep = settings.load(args.config)
    timeout = args.timeout if args.timeout is not None else request_wait(dep, "reload")
    return _submit(dep, {"op": "reload"}, timeout, "reload")
