"""The rolling reload: replace every worker, one recycle at a time, capacity held.

Begun by an operator request or a watched file (:mod:`fcgi_toolkit.triggers`).
Each step asks the policy's capacity guard (:func:`fcgi_toolkit.policy.admit`)
for the next old worker and hands the recycle to the coordinator's one
``begin``; the reload ends when no worker alive at its start is left, or
stops when a replacement fails or no step was possible for
recycle.ready_timeout.  Its progress is the state file's "reload" record.
With warm standbys, an old standby is stopped first (the watchdog starts it
again with the new code), so that no recycle promotes old code.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Optional

from fcgi_toolkit import policy, recycle, statefile
from fcgi_toolkit.names import FAILED_STATES, format_duration
from fcgi_toolkit.policy import Snapshot, Wait

log = logging.getLogger("fcgi_toolkit.watchdog")


class RollingReload:
    """The reload steps of one coordinator (its state, recall and ``begin``)."""

    def __init__(self, coordinator: Any):
        self.co = coordinator
        self.standby_stops: dict[str, int] = {}   # old warm standbys told to stop: slot -> pid

    def begin(self, snap: Snapshot, now: float, origin: str,
              request: Optional[str] = None) -> None:
        refusal = policy.reload_refusal(self.co.limits)
        if refusal:
            log.error("reload refused: %s", refusal)
            if request:
                statefile.answer(self.co.runtime_dir, request, False, refusal)
            return
        old = {s.name: s.pid for s in snap.slots if s.active and s.pid}
        self.co.state.reload = recycle.Reload(origin, old, now, request)
        self.co.state.fresh_start()        # new code may cure what made slots back off or flap
        self.standby_stops.clear()
        self.co.recall.reload_stalled_since = None
        log.info("rolling reload begins (%s): %d workers to replace", origin, len(old))
        self.co.save()
        self.advance(snap, now)

    def advance(self, snap: Snapshot, now: float) -> None:
        reload = self.co.state.reload
        if reload is None or any(op.origin == "reload" for op in self.co.state.recycle.values()):
            return
        if any(s.pid == self.standby_stops.get(s.name) for s in snap.slots if s.warm):
            return                  # a snapshot from before the standby's stop: wait for it
        failed = next((s for s in snap.slots if s.name in self.standby_stops
                       and s.state in FAILED_STATES), None)
        if failed is not None:      # the new code's first worker: as a failed replacement
            return self.end(False, "reload stopped: the new standby %s %s: %s" % (
                failed.name, failed.statename,
                self.co.gateway.read_error(failed.name, failed.description)))
        remaining = recycle.reload_remaining(reload, snap)
        if not remaining:
            return self.end(True, "reloaded %d workers in %.1fs" % (
                reload.replaced, now - reload.began))
        busy = self.co.state.busy()
        old_standby = next((s for s in remaining if s.warm and s.name not in busy), None)
        if old_standby is not None:
            # First: a warm standby of the old code would take over with it.  It
            # serves nothing, so it is only stopped; the watchdog starts it again.
            self.co.actions.carry_out(policy.Stop(old_standby.name, "reload: an old warm"
                                                  " standby"), snap, now)
            self.standby_stops[old_standby.name] = old_standby.pid
            # Not counted in "reloaded N workers": those are the serving ones.
            self.co.state.reload = replace(reload, old_pids={
                n: pid for n, pid in reload.old_pids.items() if n != old_standby.name})
            return
        target = next((s for s in remaining if s.name not in busy), None)
        decision = (policy.admit(snap, now, self.co.limits, self.co.memory(), target.name,
                                 "reload", "reload")
                    if target else Wait("", "every old worker is being replaced"))
        if isinstance(decision, Wait):
            since = self.co.recall.reload_stalled_since
            if since is None:
                self.co.recall.reload_stalled_since = now
            elif now - since > self.co.ready_timeout:
                self.end(False, "reload stopped: no progress for %s: %s" % (
                    format_duration(now - since), decision.why))
            return
        self.co.recall.reload_stalled_since = None
        self.co.begin(decision, snap, now, "reload")

    def end(self, ok: bool, message: str) -> None:
        reload = self.co.state.reload
        if reload is None:
            return
        self.co.state.reload = None
        if ok:
            log.info("rolling reload done: %s", message)
        else:
            log.error("rolling reload stopped; the remaining old workers keep serving: %s",
                      message)
        if reload.request:
            statefile.answer(self.co.runtime_dir, reload.request, ok, message)
        self.co.save()
