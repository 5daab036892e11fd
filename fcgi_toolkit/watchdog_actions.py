"""Carry out the policy's actions: one small handler per action type.

:func:`fcgi_toolkit.policy.decide` and :func:`~fcgi_toolkit.policy.reconcile`
return values; :class:`ActionRunner` turns each into RPC calls through the
coordinator's gateway (a :class:`~fcgi_toolkit.policy.Recycle` into the
coordinator's one ``begin``).  A fault is logged against the action; a start
that fails backs its slot off; a SHUTDOWN_STATE fault makes the coordinator
stand by instead.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from fcgi_toolkit import policy
from fcgi_toolkit.names import PROMOTE_SIGNAL
from fcgi_toolkit.policy import (DumpStacks, HardStop, Hold, Kill, Promote, Recycle, Snapshot,
                                 Start, Stop)
from fcgi_toolkit.supervisord import CommandFailed

log = logging.getLogger("fcgi_toolkit.watchdog")


class ActionRunner:
    """The handlers of the policy's actions for one coordinator."""

    def __init__(self, coordinator: Any):
        self.co = coordinator
        self._handlers: dict[type, Callable[[Any, Snapshot, float], None]] = {
            Recycle: self._recycle, HardStop: self._hard_stop, Kill: self._kill,
            DumpStacks: self._dump, Hold: self._hold, Start: self._start, Stop: self._stop,
            Promote: self._promote}

    def carry_out(self, action: Any, snap: Snapshot, now: float) -> None:
        if self.co.standing_by:
            return
        try:
            self._handlers[type(action)](action, snap, now)
        except CommandFailed as exc:
            if exc.shutting_down:
                return self.co.stand_by()
            log.error("%s on %s failed: %s", type(action).__name__, action.slot, exc)
            if isinstance(action, Start):
                self.co.backoff(action.slot, now, "cannot start: %s" % exc)

    def _recycle(self, action: Recycle, snap: Snapshot, now: float) -> None:
        self.co.begin(action, snap, now, "watchdog")

    def _hard_stop(self, action: HardStop, snap: Snapshot, now: float) -> None:
        log.warning("stopping %s pid %d at once: %s; another ready worker keeps serving",
                    action.slot, action.pid, action.reason)
        if action.slot not in self.co.state.busy():     # a recycle in progress counts itself
            self.co.state.count(action.slot, "rss_hard", action.reason, now)
        self.co.gateway.stop(action.slot)

    def _kill(self, action: Kill, snap: Snapshot, now: float) -> None:
        log.warning("killing %s pid %d: %s", action.slot, action.pid, action.reason)
        self.co.recall.killed.add(action.pid)
        self.co.state.count(action.slot, "request_timeout", action.reason, now)
        self.co.gateway.signal(action.slot, "KILL")

    def _dump(self, action: DumpStacks, snap: Snapshot, now: float) -> None:
        log.warning("%s pid %d: %s; dumping its stacks into its log", action.slot, action.pid,
                    action.reason)
        self.co.recall.dumped[action.slot] = (action.pid, action.req_id)
        self.co.gateway.signal(action.slot, "USR1")

    def _hold(self, action: Hold, snap: Snapshot, now: float) -> None:
        self.co.state.update_slot(action.slot, flapping=True)
        if action.pid in self.co.recall.held_logged:
            return
        self.co.recall.held_logged.add(action.pid)
        log.error("%s pid %d is flapping: %s, %s; it keeps serving until its slot's backoff"
                  " ends in %.1fs (no restart storm). Fresh workers break this limit: raise the"
                  " limit or fix the app.", action.slot, action.pid, action.reason,
                  policy.flap_evidence(snap.get(action.slot), action.kind, self.co.limits),
                  max(0.0, action.backoff_until - now))

    def _start(self, action: Start, snap: Snapshot, now: float) -> None:
        log.info("starting %s: %s", action.slot, action.reason)
        self.co.gateway.start(action.slot)

    def _promote(self, action: Promote, snap: Snapshot, now: float) -> None:
        log.info("promoting the warm standby %s pid %d: %s", action.slot, action.pid,
                 action.reason)
        self.co.recall.promoted.add(action.pid)     # the next passes come sooner
        self.co.gateway.signal(action.slot, PROMOTE_SIGNAL)

    def _stop(self, action: Stop, snap: Snapshot, now: float) -> None:
        log.info("stopping %s: %s", action.slot, action.reason)
        self.co.gateway.stop(action.slot)
