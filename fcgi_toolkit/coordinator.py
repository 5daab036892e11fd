"""The one coordinator of the group: reconcile, recycle, kill, reload, watch.

Everything that starts or stops a worker goes through :class:`Coordinator`,
so the watchdog's decisions, operator requests (``fcgi-toolkit recycle`` /
``reload``) and watched-file reloads share one concurrency guard.

Nothing here blocks: :meth:`Coordinator.run_pass` samples the group once,
advances every operation in progress by what the snapshot shows, and
issues non-waiting RPC calls (``startProcess(name, False)``...).  The
listener calls it on a timer and after every PROCESS_STATE event.  Every
operation in progress is in the state file before the RPC that starts it,
so a listener killed at any point resumes it after a restart.

A recycle (standby > 0): start a startable standby slot, wait until it is
RUNNING and its scoreboard says ready (``recycle.ready_timeout``), then stop
the offender gracefully and wait until it is STOPPED.  Without standby:
stop the offender first, then start the same slot again.  A replacement
that fails (BACKOFF, FATAL, exits, or not ready in time) is stopped, its
error line is read from its log, its slot backs off, and the offender keeps
serving.

Between passes the listener calls :meth:`Coordinator.urgent` every
:data:`RSS_POLL` seconds (only with ``limits.max_rss``): it reads the RSS
each worker publishes in its scoreboard slot (memory reads, no system call
per worker) and asks for a pass at once when one is over the limit, so a
leak is caught within a fraction of a second rather than at the next
``recycle.check_interval``.
"""
from __future__ import annotations

import logging
import os
import re
import time
import xmlrpc.client
from typing import Any, Callable, Optional

from supervisor.options import split_namespec
from supervisor.states import ProcessStates
from supervisor.xmlrpc import Faults

from fcgi_toolkit import policy, statefile
from fcgi_toolkit.policy import (DumpStacks, Hold, Kill, Limits, Memory, Recycle, Snapshot,
                                 Start, Stop, format_duration)

log = logging.getLogger("fcgi_toolkit.watchdog")

FAILED_STATES = (ProcessStates.BACKOFF, ProcessStates.FATAL, ProcessStates.EXITED)
LOG_TAIL = 16384
_FAULT_NAMES = {code: name for name, code in vars(Faults).items() if not name.startswith("_")}
#: Seconds between two fast polls of the workers' published RSS.
RSS_POLL = 0.1
_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*")


class CommandFailed(Exception):
    """An RPC call answered with a fault."""

    def __init__(self, method: str, fault: xmlrpc.client.Fault):
        self.code = fault.faultCode
        self.fault = _FAULT_NAMES.get(fault.faultCode, str(fault.faultCode))
        super().__init__("%s: %s %s" % (method, self.fault, fault.faultString))


def worker_error(text: str) -> str:
    """The line of a worker's log that best says why it failed."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if _ERROR_LINE.match(line.strip()):
            return line.strip()
    return lines[-1].strip() if lines else ""


class Coordinator:
    """Owns the state file and every start/stop of the group's slots."""

    def __init__(self, dep: Any, rpc: Any, sampler: Any, clock: Callable[[], float] = time.time,
                 stat: Callable[[str], os.stat_result] = os.stat):
        self.dep = dep
        self.rpc = rpc
        self.sampler = sampler
        self.clock = clock
        self.stat = stat
        self.limits = Limits.from_deployment(dep)
        self.check_interval = dep.recycle.check_interval
        self.ready_timeout = dep.recycle.ready_timeout
        self.debounce = dep.recycle.debounce
        self.watch_paths = list(dep.recycle.watch)
        self.group = dep.name
        self.slot_names = dep.slot_names()
        self.runtime_dir = dep.runtime_dir
        self.state_path = dep.state_path
        self.state = statefile.load_state(self.state_path)
        self._saved = None
        self._ops_changed = False
        self.first_breach: dict[int, float] = {}
        self.dumped: dict[str, tuple] = {}
        self.killed: set[int] = set()
        self._held_logged: set[int] = set()
        self.alarmed: dict[str, tuple] = {}
        self.last_snapshot: Optional[Snapshot] = None
        self._fatal_seen: set[str] = set()
        self._waiting_logged: set[str] = set()
        self._watch_sig: Optional[dict] = None
        self._watch_changed: Optional[float] = None
        self._reload_stalled_since: Optional[float] = None
        for name in self.slot_names:
            life = statefile.slot_state(self.state, name).get("life")
            if isinstance(life, dict) and life.get("pid"):
                self.sampler.lives[(int(life["pid"]), round(float(life["created"]), 2))] = (
                    int(life["max_requests"]), float(life["max_age"]))
        if self.ops:
            log.info("resuming recycle of %s after a listener restart", ", ".join(sorted(self.ops)))
        if self.state.get("reload"):
            log.info("resuming a rolling reload after a listener restart")

    # ------------------------------------------------------------------
    # Small helpers
    # ------------------------------------------------------------------
    @property
    def ops(self) -> dict:
        if not self.state.get("recycle"):
            self.state["recycle"] = {}
        return self.state["recycle"]

    def busy(self) -> bool:
        """Whether a recycle or a reload is in progress (the listener polls faster)."""
        return bool(self.state.get("recycle")) or bool(self.state.get("reload")) or (
            self._watch_changed is not None)

    def interval(self) -> float:
        return min(self.check_interval, 0.25) if self.busy() else self.check_interval

    def poll_interval(self) -> float:
        """Seconds between fast polls of the scoreboard (0: no fast poll)."""
        if not self.limits.max_rss or self.sampler.scoreboard is None:
            return 0.0
        return min(RSS_POLL, self.check_interval)

    def urgent(self) -> bool:
        """Whether a worker's published RSS asks for a full pass now (memory reads only)."""
        last = self.last_snapshot
        board = self.sampler.scoreboard
        if last is None or board is None or not self.limits.max_rss:
            return False
        records = {slot.name: board.read(slot.index) for slot in last.slots if slot.pid}
        alarms = policy.rss_alarms(last, records, self.limits, self.memory())
        for alarm in alarms:
            self.alarmed[alarm.slot] = (alarm.pid, alarm.rss_time)
            log.info("%s pid %d published rss %s > %s: checking now", alarm.slot, alarm.pid,
                     policy.format_size(alarm.rss), policy.format_size(self.limits.max_rss))
        return bool(alarms)

    def memory(self) -> Memory:
        busy = set()
        for offender, op in self.ops.items():
            busy.add(offender)
            if op.get("replacement"):
                busy.add(op["replacement"])
        backoff = {name: float(statefile.slot_state(self.state, name)["backoff_until"])
                   for name in self.slot_names}
        return Memory(busy=frozenset(busy), operations=len(self.ops), backoff_until=backoff,
                      first_breach=dict(self.first_breach), dumped=dict(self.dumped),
                      killed=frozenset(self.killed), alarmed=dict(self.alarmed))

    def _call(self, method: str, *args: Any, ok_faults: tuple = ()) -> Any:
        try:
            return getattr(self.rpc.supervisor, method)(*args)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode in ok_faults:
                return None
            raise CommandFailed(method, fault) from None

    def namespec(self, slot: str) -> str:
        return "%s:%s" % (self.group, slot)

    def _start(self, slot: str) -> None:
        self._call("startProcess", self.namespec(slot), False, ok_faults=(Faults.ALREADY_STARTED,))

    def _stop(self, slot: str) -> None:
        self._call("stopProcess", self.namespec(slot), False, ok_faults=(Faults.NOT_RUNNING,))

    def read_error(self, slot: str, description: str = "") -> str:
        """The worker's last error line from its log (stderr is redirected to stdout)."""
        text = ""
        for method in ("readProcessStdoutLog", "readProcessStderrLog"):
            try:
                text = self._call(method, self.namespec(slot), -LOG_TAIL, 0) or ""
            except (CommandFailed, OSError):
                text = ""
            if worker_error(text):
                break
        line = worker_error(text)
        return line or description or "no output in its log"

    def _backoff(self, slot: str, now: float, why: str) -> float:
        record = statefile.slot_state(self.state, slot)
        record["fails"] = int(record.get("fails", 0)) + 1
        delay = policy.backoff_delay(record["fails"])
        record["backoff_until"] = now + delay
        log.error("%s: %s; slot backs off for %s (failure %d in a row)",
                  slot, why, format_duration(delay), record["fails"])
        return delay

    def _count(self, slot: str, kind: str, reason: str, now: float) -> None:
        record = statefile.slot_state(self.state, slot)
        record["recycles"] = int(record.get("recycles", 0)) + 1
        record["last_reason"] = reason
        record["last_time"] = now
        by_reason = record.setdefault("by_reason", {})
        by_reason[kind] = int(by_reason.get(kind, 0)) + 1

    def save(self) -> None:
        if not self.state.get("recycle"):
            self.state["recycle"] = None
        text = repr(self.state)
        if text != self._saved:
            statefile.save_state(self.state_path, self.state)
            self._saved = text

    # ------------------------------------------------------------------
    # One pass
    # ------------------------------------------------------------------
    def run_pass(self) -> Optional[Snapshot]:
        """Sample once and act.  Returns the snapshot (None if supervisord did not answer)."""
        now = self.clock()
        try:
            snap = self.sampler.sample(self._call("getAllProcessInfo"))
        except (OSError, CommandFailed, xmlrpc.client.ProtocolError) as exc:
            log.warning("cannot reach supervisord: %s", exc)
            return None
        self.last_snapshot = snap
        self._ops_changed = False
        try:
            self._observe(snap, now)
            self._advance_operations(snap, now)
            self._serve_requests(snap, now)
            self._check_watch(snap, now)
            self._advance_reload(snap, now)
            ops_before = dict(self.ops)
            for action in policy.decide(snap, now, self.limits, self.memory()):
                self._carry_out(action, snap, now)
            # Reconcile only on a snapshot no operation has made stale in this pass.
            if not ops_before and not self.ops and not self._ops_changed:
                for action in policy.reconcile(snap, now, self.limits, self.memory()):
                    self._carry_out(action, snap, now)
        except (OSError, xmlrpc.client.ProtocolError) as exc:
            log.warning("supervisord stopped answering mid-pass: %s", exc)
        finally:
            self.save()
        return snap

    def _observe(self, snap: Snapshot, now: float) -> None:
        """Book-keeping from the snapshot: lives, first breaches, ready and failed slots."""
        alive = set()
        in_ops = set(self.memory().busy)
        for slot in snap.slots:
            record = statefile.slot_state(self.state, slot.name)
            if slot.pid and slot.create_time is not None:
                alive.add(slot.pid)
                life = record.get("life") or {}
                if life.get("pid") != slot.pid:
                    record["life"] = {"pid": slot.pid, "created": slot.create_time,
                                      "max_requests": slot.max_requests, "max_age": slot.max_age}
                    record["flapping"] = False
                if slot.record is not None and policy.breaches(slot, self.limits):
                    self.first_breach.setdefault(slot.pid, now)
            if slot.ready and record.get("fails"):
                record["fails"] = 0
            if slot.state == ProcessStates.FATAL and slot.name not in in_ops:
                if slot.name not in self._fatal_seen:
                    self._fatal_seen.add(slot.name)
                    self._backoff(slot.name, now, "worker cannot start: %s" % self.read_error(
                        slot.name, slot.description))
            else:
                self._fatal_seen.discard(slot.name)
        for pid in [p for p in self.first_breach if p not in alive]:
            del self.first_breach[pid]
        for name in [n for n, (pid, _) in self.alarmed.items() if pid not in alive]:
            del self.alarmed[name]
        self.killed &= alive
        self._held_logged &= alive

    # ------------------------------------------------------------------
    # Recycle operations
    # ------------------------------------------------------------------
    def free_standby(self, snap: Snapshot, now: float) -> Optional[str]:
        mem = self.memory()
        for slot in sorted(snap.slots, key=lambda s: s.index):
            if (slot.startable and slot.name not in mem.busy
                    and mem.backoff_until.get(slot.name, 0.0) <= now):
                return slot.name
        return None

    def can_recycle(self, snap: Snapshot, now: float, offender: str) -> Optional[str]:
        """None if a recycle of ``offender`` may begin now, else why not."""
        if len(self.ops) >= self.limits.max_concurrent:
            return "%d recycle(s) already in progress (recycle.max_concurrent = %d)" % (
                len(self.ops), self.limits.max_concurrent)
        if self.limits.standby > 0:
            if self.free_standby(snap, now) is None:
                return "no standby slot is free (all running or backing off)"
        else:
            others = sum(1 for s in snap.slots if s.ready and s.name != offender
                         and s.name not in self.memory().busy)
            if others < 1:
                return "no other worker is ready (workers.standby = 0 stops before it starts)"
        return None

    def begin_recycle(self, snap: Snapshot, now: float, offender: str, reason: str, kind: str,
                      origin: str, request: Optional[str] = None, flapping: bool = False) -> None:
        slot = snap.get(offender)
        op = {"offender": offender, "old_pid": slot.pid if slot else 0, "new_pid": 0,
              "reason": reason, "kind": kind, "origin": origin, "request": request,
              "flapping": flapping, "began": now, "start_issued": now}
        if self.limits.standby > 0:
            op["replacement"] = self.free_standby(snap, now)
            op["phase"] = "starting"
        else:
            op["replacement"] = None
            op["phase"] = "stopping_first"
        if flapping:
            level = int(self.state.get("flap_level", 0)) + 1
            self.state["flap_level"] = level
            until = now + policy.backoff_delay(level)
            for name in filter(None, (offender, op["replacement"])):
                statefile.slot_state(self.state, name)["backoff_until"] = until
            statefile.slot_state(self.state, offender)["flapping"] = True
            log.error("%s pid %d is flapping: %s only %s after it started (recycle.flap_window"
                      " = %s); recycling it, then backing off %s. Fresh workers break this"
                      " limit: raise the limit or fix the app.", offender, op["old_pid"], reason,
                      format_duration(slot.age if slot else 0), format_duration(
                          self.limits.flap_window), format_duration(until - now))
        self.ops[offender] = op
        self.save()         # before the RPC: a restarted listener resumes from here
        log.info("recycle begins worker=%s pid=%d reason=%r origin=%s replacement=%s",
                 offender, op["old_pid"], reason, origin, op["replacement"] or offender)
        try:
            if op["phase"] == "starting":
                self._start(op["replacement"])
            else:
                self._stop(offender)
        except CommandFailed as exc:
            self._fail(op, now, "%s: %s" % (op["replacement"] or offender, exc))

    def _advance_operations(self, snap: Snapshot, now: float) -> None:
        for offender, op in list(self.ops.items()):
            try:
                self._advance(op, snap, now)
            except CommandFailed as exc:
                self._fail(op, now, str(exc))

    def _advance(self, op: dict, snap: Snapshot, now: float) -> None:
        offender = snap.get(op["offender"])
        old_gone = (offender is None or offender.pid != op["old_pid"]
                    or not (offender.active or offender.state == ProcessStates.STOPPING))
        phase = op["phase"]
        if phase in ("starting", "restarting"):
            name = op["replacement"] if phase == "starting" else op["offender"]
            new = snap.get(name)
            if new is None:
                self._fail(op, now, "%s is not a process of the group" % name)
            elif new.ready:
                op["new_pid"] = new.pid
                op["took"] = now - op["start_issued"]
                if phase == "restarting" or old_gone:
                    self._finish(op, now)
                else:
                    op["phase"] = "stopping"
                    self.save()
                    self._stop(op["offender"])
            elif new.state in FAILED_STATES:
                self._fail(op, now, "%s %s: %s" % (name, new.statename, self.read_error(
                    name, new.description)))
            elif now - op["start_issued"] > self.ready_timeout:
                self._fail(op, now, "%s not ready within %s (recycle.ready_timeout): %s" % (
                    name, format_duration(self.ready_timeout), self.read_error(
                        name, new.description)))
            elif new.state == ProcessStates.STOPPED:
                # The start was lost (listener killed before the RPC): issue it again.
                self._start(name)
        elif phase == "stopping":
            if old_gone:
                self._finish(op, now)
            elif offender.active:
                self._stop(op["offender"])       # the stop was lost: issue it again
        elif phase == "stopping_first":
            if old_gone or offender.startable:
                op["phase"] = "restarting"
                op["start_issued"] = now
                self.save()
                self._start(op["offender"])
            elif offender.active:
                self._stop(op["offender"])
        else:
            self._fail(op, now, "unknown phase %r" % phase)

    def _finish(self, op: dict, now: float) -> None:
        self._ops_changed = True
        offender = op["offender"]
        self.ops.pop(offender, None)
        self._count(offender, op["kind"], op["reason"], now)
        took = op.get("took", now - op["start_issued"])
        log.info("recycled worker=%s old_pid=%d replacement=%s new_pid=%d reason=%r took=%.2fs"
                 " origin=%s", offender, op["old_pid"], op.get("replacement") or offender,
                 op["new_pid"], op["reason"], took, op["origin"])
        if op["origin"] == "watchdog" and not op["flapping"] and op["kind"] in policy.FLAP_KINDS:
            self.state["flap_level"] = 0
        if op.get("request"):
            statefile.answer(self.runtime_dir, op["request"], True, "%s replaced: pid %d -> %s"
                             " pid %d, replacement ready in %.1fs" % (
                                 offender, op["old_pid"], op.get("replacement") or offender,
                                 op["new_pid"], took))
        if op["origin"] == "reload" and self.state.get("reload"):
            self.state["reload"]["replaced"] = int(self.state["reload"].get("replaced", 0)) + 1
        self.save()

    def _fail(self, op: dict, now: float, why: str) -> None:
        self._ops_changed = True
        offender = op["offender"]
        self.ops.pop(offender, None)
        failed = op.get("replacement") or offender
        if op["phase"] in ("starting", "restarting"):
            try:
                self._stop(failed)
            except (CommandFailed, OSError) as exc:
                log.warning("cannot stop failed replacement %s: %s", failed, exc)
        self._backoff(failed, now, "replacement failed: %s" % why)
        if op["phase"] == "starting":
            log.error("recycle of %s (%s) abandoned; %s pid %d keeps serving", offender,
                      op["reason"], offender, op["old_pid"])
        message = "recycle of %s failed: %s" % (offender, why)
        if op.get("request"):
            statefile.answer(self.runtime_dir, op["request"], False, message)
        if op["origin"] == "reload":
            self._abort_reload(message)
        self.save()

    # ------------------------------------------------------------------
    # Watchdog actions and reconcile
    # ------------------------------------------------------------------
    def _carry_out(self, action: Any, snap: Snapshot, now: float) -> None:
        try:
            if isinstance(action, Recycle):
                self.begin_recycle(snap, now, action.slot, action.reason, action.kind,
                                   "watchdog", flapping=action.flapping)
            elif isinstance(action, Kill):
                log.warning("killing %s pid %d: %s", action.slot, action.pid, action.reason)
                self.killed.add(action.pid)
                self._count(action.slot, "request_timeout", action.reason, now)
                self._call("signalProcess", self.namespec(action.slot), "KILL",
                           ok_faults=(Faults.NOT_RUNNING,))
            elif isinstance(action, DumpStacks):
                log.warning("%s pid %d: %s; dumping its stacks into its log", action.slot,
                            action.pid, action.reason)
                self.dumped[action.slot] = (action.pid, action.req_id)
                self._call("signalProcess", self.namespec(action.slot), "USR1",
                           ok_faults=(Faults.NOT_RUNNING,))
            elif isinstance(action, Hold):
                statefile.slot_state(self.state, action.slot)["flapping"] = True
                if action.pid not in self._held_logged:
                    self._held_logged.add(action.pid)
                    log.error("%s pid %d is flapping: %s soon after it started; it keeps serving"
                              " until its slot's backoff ends in %.1fs (no restart storm). Fresh"
                              " workers break this limit: raise the limit or fix the app.",
                              action.slot, action.pid, action.reason,
                              max(0.0, action.backoff_until - now))
            elif isinstance(action, Start):
                log.info("starting %s: %s", action.slot, action.reason)
                self._start(action.slot)
            elif isinstance(action, Stop):
                log.info("stopping %s: %s", action.slot, action.reason)
                self._stop(action.slot)
        except CommandFailed as exc:
            log.error("%s on %s failed: %s", type(action).__name__, action.slot, exc)
            if isinstance(action, Start):
                self._backoff(action.slot, now, "cannot start: %s" % exc)

    # ------------------------------------------------------------------
    # Operator requests
    # ------------------------------------------------------------------
    def _taken_requests(self) -> set:
        taken = {op.get("request") for op in self.ops.values()}
        if self.state.get("reload"):
            taken.add(self.state["reload"].get("request"))
        return taken

    def slot_name(self, worker: str) -> Optional[str]:
        """A slot name from "wiki_01", "wiki:wiki_01", "01" or "1"; None if unknown."""
        group, name = split_namespec(str(worker))
        if group != name and group != self.group:
            return None
        if name in self.slot_names:
            return name
        if name.isdigit() and int(name) < len(self.slot_names):
            return self.slot_names[int(name)]
        return None

    def _serve_requests(self, snap: Snapshot, now: float) -> None:
        taken = self._taken_requests()
        for request_id, request in statefile.pending(self.runtime_dir):
            if request_id in taken:
                continue
            op = request.get("op") if request else None
            if op == "recycle":
                self._request_recycle(snap, now, request_id, request.get("worker", ""))
            elif op == "reload":
                if self.state.get("reload"):
                    statefile.answer(self.runtime_dir, request_id, False,
                                     "a rolling reload is already in progress")
                else:
                    self.begin_reload(snap, now, "operator", request_id)
            else:
                statefile.answer(self.runtime_dir, request_id, False,
                                 "unknown request %r" % (request,))

    def _request_recycle(self, snap: Snapshot, now: float, request_id: str, worker: str) -> None:
        name = self.slot_name(worker)
        slot = snap.get(name) if name else None
        if slot is None:
            statefile.answer(self.runtime_dir, request_id, False, "unknown worker %r (slots: %s)"
                             % (worker, ", ".join(self.slot_names)))
            return
        if name in self.memory().busy:
            statefile.answer(self.runtime_dir, request_id, False,
                             "%s is already being replaced" % name)
            return
        if slot.state != ProcessStates.RUNNING:
            statefile.answer(self.runtime_dir, request_id, False, "%s is not running (%s)" % (
                name, slot.statename))
            return
        why_not = self.can_recycle(snap, now, name)
        if why_not:
            if request_id not in self._waiting_logged:
                self._waiting_logged.add(request_id)
                log.info("operator recycle of %s waits: %s", name, why_not)
            return
        self.begin_recycle(snap, now, name, "operator request", "operator", "operator",
                           request=request_id)

    # ------------------------------------------------------------------
    # Rolling reload and watched files
    # ------------------------------------------------------------------
    def begin_reload(self, snap: Snapshot, now: float, origin: str,
                     request: Optional[str] = None) -> None:
        if self.limits.standby == 0 and self.limits.count < 2:
            message = ("a rolling reload needs workers.standby >= 1 or workers.count >= 2"
                       " to keep serving")
            log.error("reload refused: %s", message)
            if request:
                statefile.answer(self.runtime_dir, request, False, message)
            return
        old = {s.name: s.pid for s in snap.slots if s.active and s.pid}
        self.state["reload"] = {"request": request, "origin": origin, "old_pids": old,
                                "began": now, "replaced": 0}
        # New code may cure what made slots back off or flap: give every slot a fresh start.
        self.state["flap_level"] = 0
        for name in self.slot_names:
            record = statefile.slot_state(self.state, name)
            record["backoff_until"] = 0.0
            record["fails"] = 0
        self._reload_stalled_since = None
        log.info("rolling reload begins (%s): %d workers to replace", origin, len(old))
        self.save()
        self._advance_reload(snap, now)

    def _advance_reload(self, snap: Snapshot, now: float) -> None:
        reload = self.state.get("reload")
        if not reload:
            return
        if any(op["origin"] == "reload" for op in self.ops.values()):
            return
        old = reload["old_pids"]
        remaining = [s for s in sorted(snap.slots, key=lambda s: s.index)
                     if s.name in old and s.pid == old[s.name] and s.active]
        if not remaining:
            message = "reloaded %d workers in %.1fs" % (reload.get("replaced", 0),
                                                       now - reload["began"])
            log.info("rolling reload done: %s", message)
            self.state["reload"] = None
            if reload.get("request"):
                statefile.answer(self.runtime_dir, reload["request"], True, message)
            self.save()
            return
        target = next((s for s in remaining if s.name not in self.memory().busy), None)
        why_not = (self.can_recycle(snap, now, target.name) if target
                   else "every old worker is being replaced")
        if why_not:
            if self._reload_stalled_since is None:
                self._reload_stalled_since = now
            elif now - self._reload_stalled_since > self.ready_timeout:
                self._abort_reload("reload stopped: no progress for %s: %s" % (
                    format_duration(now - self._reload_stalled_since), why_not))
            return
        self._reload_stalled_since = None
        self.begin_recycle(snap, now, target.name, "reload", "reload", "reload")

    def _abort_reload(self, message: str) -> None:
        reload = self.state.get("reload")
        if not reload:
            return
        self.state["reload"] = None
        log.error("rolling reload stopped; the remaining old workers keep serving: %s", message)
        if reload.get("request"):
            statefile.answer(self.runtime_dir, reload["request"], False, message)
        self.save()

    def _signature(self) -> dict:
        sig = {}
        for path in self.watch_paths:
            try:
                st = self.stat(path)
                sig[path] = (st.st_mtime_ns, st.st_size)
            except OSError:
                sig[path] = None
        return sig

    def _check_watch(self, snap: Snapshot, now: float) -> None:
        if not self.watch_paths:
            return
        sig = self._signature()
        if self._watch_sig is None:
            self._watch_sig = sig
            return
        if sig != self._watch_sig:
            changed = [p for p in sig if sig[p] != self._watch_sig.get(p)]
            if self._watch_changed is None:
                log.info("watched file changed: %s; reloading after %s of quiet",
                         ", ".join(changed), format_duration(self.debounce))
            self._watch_sig = sig
            self._watch_changed = now
        if (self._watch_changed is not None and now - self._watch_changed >= self.debounce
                and not self.state.get("reload")):
            self._watch_changed = None
            self.begin_reload(snap, now, "watch")
