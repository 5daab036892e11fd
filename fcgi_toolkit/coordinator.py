"""The one coordinator of the group: a thin orchestrator around pure decisions.

Everything that starts or stops a worker goes through :class:`Coordinator`.
Its triggers are the limits (:func:`fcgi_toolkit.policy.decide`, carried out
by :mod:`fcgi_toolkit.watchdog_actions`), operator requests
(:mod:`fcgi_toolkit.triggers`) and watched files (:mod:`fcgi_toolkit.watched`);
each asks the policy's capacity guard and then calls the one
:meth:`Coordinator.begin`.  A recycle then moves through
:func:`fcgi_toolkit.recycle.advance`, one step per pass, in the shell of
:mod:`fcgi_toolkit.recycle_runner`.  The managed nginx is started after the
first ready worker (:mod:`fcgi_toolkit.nginx_start`).

Nothing here blocks: :meth:`Coordinator.run_pass` samples the group once,
advances every operation by what the snapshot shows and issues non-waiting
RPC calls.  The listener calls it on a timer and after every PROCESS_STATE
event.  An operation is in the state file before the RPC that moves it, so a
listener killed at any point resumes it after a restart.

Between passes the listener calls :meth:`Coordinator.urgent` every
:meth:`Coordinator.poll_interval` seconds (:mod:`fcgi_toolkit.rss_poll`): it
reads the RSS each worker publishes in its scoreboard slot and asks for a
pass at once when one is over the limit, and looks for a new operator request
(:class:`~fcgi_toolkit.triggers.RequestWatch`), served at once as well.

While supervisord shuts down or restarts (``getState``, or a SHUTDOWN_STATE
fault) the coordinator stands by: no recycle begins or moves, nothing is
logged as a failure.
"""
from __future__ import annotations

import logging
import os
import subprocess
import time
import xmlrpc.client
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

from supervisor.states import ProcessStates

from fcgi_toolkit import names, policy, statefile
from fcgi_toolkit.names import format_duration
from fcgi_toolkit.nginx_start import NginxStart
from fcgi_toolkit.policy import Limits, Memory, Recycle, Snapshot
from fcgi_toolkit.recycle_runner import RecycleRunner
from fcgi_toolkit.reloads import RollingReload
from fcgi_toolkit.rss_poll import RssPoll
from fcgi_toolkit.statefile import Life
from fcgi_toolkit.supervisord import CommandFailed, Gateway
from fcgi_toolkit.triggers import REQUEST_POLL, FileWatch, OperatorRequests, RequestWatch
from fcgi_toolkit.watched import WatchedFiles
from fcgi_toolkit.watchdog_actions import ActionRunner

log = logging.getLogger("fcgi_toolkit.watchdog")


@dataclass
class Recall:
    """What the coordinator remembers between passes but never saves."""
    first_breach: dict[int, float] = field(default_factory=dict)   # pid -> first seen over
    dumped: dict[str, tuple] = field(default_factory=dict)         # slot -> (pid, req_id)
    killed: set[int] = field(default_factory=set)                  # pids sent SIGKILL
    alarmed: dict[str, tuple] = field(default_factory=dict)        # slot -> (pid, rss_time)
    held_logged: set[int] = field(default_factory=set)
    ready_seen: set[int] = field(default_factory=set)             # replacement pids polled ready
    promoted: set[int] = field(default_factory=set)               # standby pids told to accept
    warm_seen: set[int] = field(default_factory=set)              # standby pids polled warm
    fatal_seen: set[str] = field(default_factory=set)
    waiting_logged: set[str] = field(default_factory=set)          # request ids
    reload_stalled_since: Optional[float] = None

    def forget_dead(self, alive: set[int]) -> None:
        for pid in [p for p in self.first_breach if p not in alive]:
            del self.first_breach[pid]
        for name in [n for n, (pid, _) in self.alarmed.items() if pid not in alive]:
            del self.alarmed[name]
        self.killed &= alive
        self.held_logged &= alive
        self.ready_seen &= alive
        self.promoted &= alive
        self.warm_seen &= alive


class Coordinator:
    """Owns the state file and every start/stop of the group's slots.

    ``limits`` may be replaced between passes (a re-read deployment file).
    """

    def __init__(self, dep: Any, rpc: Any, sampler: Any, clock: Callable[[], float] = time.time,
                 stat: Callable[[str], os.stat_result] = os.stat,
                 spawn: Callable[..., Any] = subprocess.Popen):
        self.gateway = Gateway(rpc, dep.group)
        self.sampler = sampler
        self.clock = clock
        self.deploy_path = dep.path
        self.source = dep.source        # run's applied.toml: the file as last applied
        # The managed nginx (autostart=false) waits for the first ready worker.
        # An inner supervisord (README "Generations") has no nginx: the front keeps it.
        self.nginx = NginxStart(self, names.nginx_program(dep.name) if (
            dep.nginx.managed and not dep.multi_host and not dep.holder) else "")
        self.limits = Limits.from_deployment(dep)
        self.check_interval = dep.recycle.check_interval
        self.ready_timeout = dep.recycle.ready_timeout
        self.slot_names = dep.slot_names()
        self.runtime_dir = dep.runtime_dir
        self.state_path = dep.state_path
        self.watch = FileWatch(dep.recycle.watch, dep.recycle.debounce, stat)
        self.state = statefile.load_state(self.state_path)
        self.recall = Recall()
        self.actions = ActionRunner(self)
        self.requests = OperatorRequests(self)
        self.request_watch = RequestWatch(self.runtime_dir)
        self.reloads = RollingReload(self)
        self.recycles = RecycleRunner(self)
        self.watched = WatchedFiles(self, spawn)
        self.rss_poll = RssPoll(self)
        self.last_snapshot: Optional[Snapshot] = None
        self.standing_by = False
        self._saved: Optional[dict] = None
        self.ops_changed = False      # an operation failed in this pass (its snapshot is stale)
        for name in self.slot_names:
            life = self.state.slot(name).life
            if life is not None:
                self.sampler.lives[life.key] = (life.max_requests, life.max_age)
        if self.state.recycle:
            log.info("resuming recycle of %s after a listener restart",
                     ", ".join(sorted(self.state.recycle)))
        if self.state.reload:
            log.info("resuming a rolling reload after a listener restart")

    def reread(self) -> str:
        """Take the limits and recycle settings from the deployment file again
        (``fcgi-toolkit apply``); raise ConfigError for a bad file.

        workers.count and workers.standby are taken when they fit the
        running supervisord's slots (the next passes start or stop workers);
        otherwise they stay.  Every worker life draws its per-life limits
        again, so a lowered limit recycles at once."""
        from fcgi_toolkit import generations
        dep = generations.load(self.deploy_path, source=self.source)
        if dep.group != self.gateway.group:
            self.follow(dep)
        old, self.limits = self.limits, Limits.from_deployment(dep)
        if not dep.fits(len(self.slot_names)):
            self.limits = replace(self.limits, count=old.count, standby=old.standby)
        self.sampler.limits = self.limits
        self.sampler.lives.clear()
        for name in self.slot_names:
            self.state.update_slot(name, life=None)
        self.check_interval = dep.recycle.check_interval
        self.ready_timeout = dep.recycle.ready_timeout
        self.watch = FileWatch(dep.recycle.watch, dep.recycle.debounce, self.watch.stat)
        log.info("deployment file re-read: %s", self.limits)
        return "watchdog re-read %s" % dep.path

    def follow(self, dep: Any) -> None:
        """Manage the serving generation's group from now on (a generation
        switch made it serve): its slots and its scoreboard.  The old group
        is the switch's to drain; recycles of its slots are dropped.  Each
        slot's recycle counts move to the new slot of the same index, so the
        operator's view (status, the metrics' counters) goes on."""
        from fcgi_toolkit.scoreboard import Scoreboard
        log.info("generation %d serves (group %s): the watchdog follows it",
                 dep.generation_number, dep.group)
        self.gateway = Gateway(self.gateway.rpc, dep.group)
        self.state.move_slots(self.slot_names, dep.slot_names())
        self.slot_names = dep.slot_names()
        self.sampler.follow(dep.group, self.slot_names, Scoreboard(dep.scoreboard_path, dep.slots))
        self.last_snapshot = None

    # -- for the listener ----------------------------------------------------
    def busy(self) -> bool:
        """Whether a recycle, a reload, a promotion or nginx's start is in progress,
        or a recycle failed in the last pass (its slots are set right next): the
        listener polls faster."""
        return (bool(self.state.recycle) or self.state.reload is not None or self.watch.pending
                or bool(self.recall.promoted) or bool(self.nginx.waiting) or self.ops_changed)

    def interval(self) -> float:
        return min(self.check_interval, 0.25) if self.busy() else self.check_interval

    def poll_interval(self) -> float:
        """Seconds between fast polls (the scoreboard's published RSS, new operator requests)."""
        rss = self.rss_poll.interval()
        return min(rss, REQUEST_POLL) if rss else min(REQUEST_POLL, self.check_interval)

    def urgent(self) -> bool:
        """Whether a full pass is due now: a worker's published RSS (memory reads
        only), or a new operator request (one stat of its directory)."""
        return self.rss_poll.urgent() or self.request_watch.arrived()

    def memory(self) -> Memory:
        """What the policy needs to know of the state and the recall."""
        r = self.recall
        return Memory(busy=self.state.busy(), operations=len(self.state.recycle),
                      backoff_until={n: self.state.slot(n).backoff_until for n in self.slot_names},
                      first_breach=dict(r.first_breach), dumped=dict(r.dumped),
                      killed=frozenset(r.killed), alarmed=dict(r.alarmed))

    def save(self) -> None:
        data = self.state.to_json()
        if data != self._saved:
            statefile.save_state(self.state_path, data)
            self._saved = data

    # -- one pass --------------------------------------------------------------
    def run_pass(self) -> Optional[Snapshot]:
        """Sample once and act.  Returns the snapshot (None if supervisord did not answer)."""
        now = self.clock()
        try:
            snap = self.sampler.sample(self.gateway.processes())
            self.stand_by(self.gateway.shutting_down())
        except (OSError, CommandFailed, xmlrpc.client.ProtocolError) as exc:
            log.warning("cannot reach supervisord: %s", exc)
            return None
        self.last_snapshot = snap
        if self.standing_by:
            return snap
        self.ops_changed = False
        try:
            self.nginx.step(snap, now)
            self._observe(snap, now)
            self.recycles.advance_all(snap, now)
            self.requests.serve(snap, now)
            self.watched.serve(snap, now)
            self.reloads.advance(snap, now)
            ops_before = bool(self.state.recycle)
            for action in policy.decide(snap, now, self.limits, self.memory()):
                self.actions.carry_out(action, snap, now)
            # Reconcile only on a snapshot no operation has made stale in this pass.
            if not ops_before and not self.state.recycle and not self.ops_changed:
                for action in policy.reconcile(snap, now, self.limits, self.memory()):
                    self.actions.carry_out(action, snap, now)
        except (OSError, xmlrpc.client.ProtocolError) as exc:
            log.warning("supervisord stopped answering mid-pass: %s", exc)
        finally:
            self.save()
        return snap

    def stand_by(self, shutting_down: bool = True) -> None:
        """Stop acting while supervisord shuts down (logged once, not as an error)."""
        if shutting_down and not self.standing_by:
            log.info("supervisord is shutting down: the watchdog starts and stops nothing more")
        self.standing_by = shutting_down

    def _observe(self, snap: Snapshot, now: float) -> None:
        """Book-keeping from the snapshot: lives, first breaches, ready and failed slots."""
        alive = set()
        busy = self.state.busy()
        for slot in snap.slots:
            history = self.state.update_slot(slot.name)
            if slot.pid and slot.create_time is not None:
                alive.add(slot.pid)
                if history.life is None or history.life.pid != slot.pid:
                    history = self.state.update_slot(slot.name, flapping=False, life=Life(
                        slot.pid, slot.create_time, slot.max_requests, slot.max_age))
                if slot.record is not None and policy.breaches(slot, self.limits):
                    self.recall.first_breach.setdefault(slot.pid, now)
            if slot.accepting:
                self.recall.promoted.discard(slot.pid)
            if slot.ready and history.fails:
                self.state.update_slot(slot.name, fails=0)
            if slot.state == ProcessStates.FATAL and slot.name not in busy:
                if slot.name not in self.recall.fatal_seen:
                    self.recall.fatal_seen.add(slot.name)
                    self.backoff(slot.name, now, "worker cannot start: %s" % (
                        self.gateway.read_error(slot.name, slot.description)))
            else:
                self.recall.fatal_seen.discard(slot.name)
        self.recall.forget_dead(alive)

    def backoff(self, slot: str, now: float, why: str) -> None:
        history = self.state.backoff(slot, now)
        log.error("%s: %s; slot backs off for %s (failure %d in a row)", slot, why,
                  format_duration(history.backoff_until - now), history.fails)

    # -- recycles ---------------------------------------------------------------
    def begin(self, action: Recycle, snap: Snapshot, now: float, origin: str,
              request: Optional[str] = None) -> None:
        """The one way a recycle begins (the limits, an operator, a reload step)."""
        self.recycles.begin(action, snap, now, origin, request)
