"""The managed nginx (``autostart=false``) starts after the first ready worker.

Before a worker accepts, nginx would answer 502.  :func:`nginx_due` is the
pure decision; :class:`NginxStart` is its shell, asked once per watchdog
pass until it has started nginx (or was never needed: an unmanaged nginx, a
multi-host file).  After ``recycle.ready_timeout`` without a ready worker
(workers that write no scoreboard, a broken app) nginx starts anyway: it
must not stay down silently.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from fcgi_toolkit.names import format_duration
from fcgi_toolkit.policy import Snapshot
from fcgi_toolkit.supervisord import CommandFailed

log = logging.getLogger("fcgi_toolkit.watchdog")


def nginx_due(ready: int, waited: float, ready_timeout: float) -> bool:
    """Whether to start nginx now: a worker accepts, or none did for ready_timeout."""
    return ready > 0 or waited >= ready_timeout


class NginxStart:
    """Starts ``program`` ("" for none) once, through the coordinator's gateway."""

    def __init__(self, coordinator: Any, program: str):
        self.co = coordinator
        self.waiting = program
        self.since: Optional[float] = None

    def step(self, snap: Snapshot, now: float) -> None:
        if not self.waiting:
            return
        if self.since is None:
            self.since = now
        ready, waited = snap.ready_count(), now - self.since
        if not nginx_due(ready, waited, self.co.ready_timeout):
            return
        if not ready:
            log.warning("no worker ready after %s: starting %s anyway",
                        format_duration(waited), self.waiting)
        try:
            self.co.gateway.start_program(self.waiting)
        except CommandFailed as exc:
            if exc.shutting_down:
                return self.co.stand_by()
            log.error("cannot start %s: %s", self.waiting, exc)
        else:
            log.info("%s started: a worker accepts", self.waiting)
        self.waiting = ""
