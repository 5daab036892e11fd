"""The shell around :mod:`fcgi_toolkit.recycle`: begin, step and book the end.

:class:`RecycleRunner` is the one way a recycle begins (the coordinator's
``begin`` calls it for the limits, an operator and a reload step alike).  Each
step of :func:`fcgi_toolkit.recycle.advance` is saved in the state file before
its RPC (a restarted listener resumes from there), its effects go through the
coordinator's :class:`~fcgi_toolkit.supervisord.Gateway`, and the end is
booked: counters, backoff, the operator's answer, the reload's progress.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Optional

from fcgi_toolkit import policy, recycle, statefile
from fcgi_toolkit.names import PROMOTE_SIGNAL, format_duration
from fcgi_toolkit.policy import Recycle, Snapshot
from fcgi_toolkit.recycle import Operation, Phase, PromoteProcess, StartProcess
from fcgi_toolkit.supervisord import CommandFailed

log = logging.getLogger("fcgi_toolkit.watchdog")


class RecycleRunner:
    """The recycles of one coordinator (its state, gateway and reloads)."""

    def __init__(self, coordinator: Any):
        self.co = coordinator

    def begin(self, action: Recycle, snap: Snapshot, now: float, origin: str,
              request: Optional[str] = None) -> None:
        """``action`` comes from the policy's capacity guard: it names the
        offender and its replacement slot."""
        co = self.co
        offender = snap.get(action.slot)
        op, effects = recycle.begin(offender, action.slot, action.replacement, action.reason,
                                    action.kind, origin, now, request, action.flapping,
                                    action.warm)
        if action.flapping:
            until = co.state.flap([n for n in (op.offender, op.replacement) if n], now)
            co.state.update_slot(op.offender, flapping=True)
            log.error("%s pid %d is flapping: %s, %s; recycling it, then backing off %s."
                      " Fresh workers break this limit: raise the limit or fix the app.",
                      op.offender, op.old_pid, op.reason,
                      policy.flap_evidence(offender, op.kind, co.limits),
                      format_duration(until - now))
        log.info("recycle begins worker=%s pid=%d reason=%r origin=%s replacement=%s%s",
                 op.offender, op.old_pid, op.reason, origin, op.new_slot,
                 " (warm standby, promoted)" if op.warm else "")
        self.step(None, op, effects, now=now)

    def advance_all(self, snap: Snapshot, now: float) -> None:
        """Move every operation in progress by what the snapshot shows."""
        for op in list(self.co.state.recycle.values()):
            self.step(op, *recycle.advance(op, snap, now, self.co.ready_timeout,
                                           self.co.state.busy()), now=now)

    def step(self, before: Optional[Operation], op: Operation, effects: list,
             now: float) -> None:
        """Save ``op`` (or book its end), then carry out its effects."""
        co = self.co
        if op.final:
            self._conclude(op, now)
        elif op != before:
            co.state.recycle[op.offender] = op
            co.save()         # before the RPC: a restarted listener resumes from here
        for effect in effects:
            try:
                if isinstance(effect, StartProcess):
                    co.gateway.start(effect.slot)
                elif isinstance(effect, PromoteProcess):
                    co.gateway.signal(effect.slot, PROMOTE_SIGNAL)
                else:
                    co.gateway.stop(effect.slot)
            except CommandFailed as exc:
                if exc.shutting_down:
                    return co.stand_by()
                if not op.final:
                    return self.step(op, *recycle.fail(op, "%s: %s" % (effect.slot, exc)),
                                     now=now)
                log.warning("cannot stop failed replacement %s: %s", effect.slot, exc)
            except OSError as exc:
                if not op.final:
                    raise
                log.warning("cannot stop failed replacement %s: %s", effect.slot, exc)

    def _conclude(self, op: Operation, now: float) -> None:
        if op.phase != Phase.DONE:
            # A failure stops its new worker: this pass's snapshot is stale.  A
            # DONE has no effects (the snapshot shows the offender gone), so
            # the pass may refill the slot at once (the next warm standby).
            self.co.ops_changed = True
        self.co.state.recycle.pop(op.offender, None)
        if op.phase == Phase.DONE:
            self._done(op, now)
        else:
            self._failed(op, now)
        self.co.save()

    def _done(self, op: Operation, now: float) -> None:
        state = self.co.state
        state.count(op.offender, op.kind, op.reason, now)
        took = op.took if op.took is not None else now - op.start_issued
        log.info("recycled worker=%s old_pid=%d replacement=%s new_pid=%d reason=%r took=%.2fs"
                 " origin=%s", op.offender, op.old_pid, op.new_slot, op.new_pid, op.reason, took,
                 op.origin)
        if op.origin == "watchdog" and not op.flapping and op.kind in policy.FLAP_KINDS:
            state.flap_level = 0
        if op.request:
            statefile.answer(self.co.runtime_dir, op.request, True, "%s replaced: pid %d -> %s"
                             " pid %d, replacement ready in %.1fs" % (
                                 op.offender, op.old_pid, op.new_slot, op.new_pid, took))
        if op.origin == "reload" and state.reload:
            state.reload = replace(state.reload, replaced=state.reload.replaced + 1)

    def _failed(self, op: Operation, now: float) -> None:
        failure = op.failure
        why = failure.why
        if failure.log_of:
            why += ": " + self.co.gateway.read_error(failure.log_of, failure.description)
        self.co.backoff(op.new_slot, now, "replacement failed: %s" % why)
        if failure.phase == Phase.STARTING:
            log.error("recycle of %s (%s) abandoned; %s pid %d keeps serving", op.offender,
                      op.reason, op.offender, op.old_pid)
        message = "recycle of %s failed: %s" % (op.offender, why)
        if op.request:
            statefile.answer(self.co.runtime_dir, op.request, False, message)
        if op.origin == "reload":
            self.co.reloads.end(False, message)
