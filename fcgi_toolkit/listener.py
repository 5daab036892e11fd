"""The watchdog event listener: ``python -m fcgi_toolkit listener -c deploy.toml``.

Runs as ``[eventlistener:NAME_watchdog]`` (events PROCESS_STATE, TICK_5).
stdout carries only the listener protocol; logs go to stderr.  The loop
writes READY, waits for an event with ``select()`` for at most one check
interval, answers every event with OK at once (the event buffer never
fills), and runs a :class:`~fcgi_toolkit.coordinator.Coordinator` pass on
the timer and shortly after each PROCESS_STATE event.  Between passes it
also wakes every ``coordinator.poll_interval()`` seconds (when not 0) and
runs a pass at once if ``coordinator.urgent()`` says so (a worker published
an RSS over the limit, or an operator request arrived).  SIGTERM/SIGINT only set a flag; the loop exits at
the next wake-up.  When supervisord dies, stdin reaches end of input and the
loop ends; :mod:`fcgi_toolkit.lifeline` also sends SIGTERM.
"""
from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys
import time
from typing import Any, Callable, IO, Optional

from supervisor import childutils

log = logging.getLogger("fcgi_toolkit.watchdog")

EVENT_SETTLE = 0.05      # run a pass this soon after a PROCESS_STATE event


class EventStream:
    """Reads listener-protocol events from supervisord (binary stdin)."""

    def __init__(self, stdin: IO[bytes]):
        self.stdin = stdin
        try:
            self.fd: Optional[int] = stdin.fileno()
        except (AttributeError, OSError, ValueError):
            self.fd = None          # an in-memory stream in tests: always readable

    def wait(self, timeout: float) -> bool:
        """Whether an event can be read now, waiting at most ``timeout`` seconds."""
        if self.fd is None:
            return True
        try:
            readable, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        except InterruptedError:
            return False
        return bool(readable)

    def read(self) -> Optional[tuple[dict, str]]:
        """One event's (headers, payload); None at end of input (supervisord went away)."""
        line = self.stdin.readline()
        if not line:
            return None
        headers = childutils.get_headers(line.decode("utf-8", "replace"))
        length = int(headers.get("len", 0))
        payload = b""
        while len(payload) < length:
            chunk = self.stdin.read(length - len(payload))
            if not chunk:
                return None
            payload += chunk
        return headers, payload.decode("utf-8", "replace")


class Listener:
    """The protocol loop around a coordinator; collaborators are injected."""

    def __init__(self, coordinator: Any, events: EventStream, stdout: IO[str],
                 clock: Callable[[], float] = time.monotonic):
        self.coordinator = coordinator
        self.events = events
        self.stdout = stdout
        self.clock = clock
        self.stopping = False
        self.next_pass = 0.0
        self.next_poll = 0.0

    def handle(self, headers: dict, payload: str) -> None:
        """Acknowledge an event; a PROCESS_STATE change brings the next pass forward."""
        childutils.listener.ok(self.stdout)
        name = headers.get("eventname", "")
        if name.startswith("PROCESS_STATE"):
            self.next_pass = min(self.next_pass, self.clock() + EVENT_SETTLE)

    def step(self) -> bool:
        """Wait for one event, the fast poll or the timer; returns False when the loop must end."""
        poll = self.coordinator.poll_interval()
        wake = min(self.next_pass, self.next_poll) if poll > 0 else self.next_pass
        timeout = wake - self.clock()
        if timeout > 0 and self.events.wait(timeout):
            event = self.events.read()
            if event is None:
                log.info("stdin closed: supervisord went away; exiting")
                return False
            self.handle(*event)
            childutils.listener.ready(self.stdout)
        now = self.clock()
        if poll > 0 and now >= self.next_poll:
            self.next_poll = now + poll
            if now < self.next_pass and self.coordinator.urgent():
                self.next_pass = now
        if self.clock() >= self.next_pass:
            self.coordinator.run_pass()
            self.next_pass = self.clock() + self.coordinator.interval()
        return not self.stopping

    def run(self) -> int:
        childutils.listener.ready(self.stdout)
        while self.step():
            pass
        return 0


# --------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default="deploy.toml",
                        help="deployment file (default: ./deploy.toml)")
    from fcgi_toolkit import settings
    settings.add_start_from(parser)


def _set_stopping(listener: Listener) -> Callable[[int, Any], None]:
    def handler(signum: int, frame: Any) -> None:
        listener.stopping = True
    return handler


def run(args: argparse.Namespace) -> int:
    # Imported here: these pull in psutil; the CLI stays light for other commands.
    from fcgi_toolkit import generations, lifeline, supervisord
    from fcgi_toolkit.coordinator import Coordinator
    from fcgi_toolkit.policy import Limits
    from fcgi_toolkit.sampler import Sampler
    from fcgi_toolkit.scoreboard import Scoreboard

    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A restarted watchdog follows the serving generation.
    dep = generations.load(args.config, source=args.start_from)
    if "SUPERVISOR_SERVER_URL" not in os.environ:
        log.error("SUPERVISOR_SERVER_URL is not set: the listener runs under supervisord only")
        return 2
    rpc = supervisord.listener_proxy(os.environ)
    board = Scoreboard(dep.scoreboard_path, dep.slots)
    sampler = Sampler(dep.group, dep.slot_names(), board, Limits.from_deployment(dep))
    coordinator = Coordinator(dep, rpc, sampler)
    listener = Listener(coordinator, EventStream(sys.stdin.buffer), sys.stdout)
    signal.signal(signal.SIGTERM, _set_stopping(listener))
    signal.signal(signal.SIGINT, _set_stopping(listener))
    # supervisord's death closes our stdin (the loop ends at end of input); the
    # lifeline's SIGTERM also ends it if a pass is under way when it dies.
    lifeline.guard(signal.SIGTERM, dep.supervisord_pidfile)
    log.info("watchdog for %s: %d workers + %d standby, check every %ss",
             dep.name, dep.workers.count, dep.workers.standby, dep.recycle.check_interval)
    return listener.run()
