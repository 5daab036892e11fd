"""The recycle as a typed state machine: pure, every transition in :func:`advance`.

A recycle replaces one worker (the *offender*) while holding capacity::

    with a standby slot (workers.standby > 0):
        STARTING --(replacement ready)--> STOPPING --(offender gone)--> DONE
    (with workers.warm_standby, STARTING promotes a warm standby, SIGUSR2,
    instead of starting a process: it is ready as soon as it accepts)
    without (workers.standby = 0; another worker must be ready):
        STOPPING_FIRST --(offender stopped)--> RESTARTING --(ready)--> DONE
    and from STARTING / RESTARTING, when the new worker does not come up
    (BACKOFF, FATAL, EXITED, not a process, not ready within
    recycle.ready_timeout), or any RPC of the recycle fails:  --> FAILED

:func:`begin` makes an :class:`Operation`, :func:`advance` moves it by what
one :class:`~fcgi_toolkit.policy.Snapshot` shows, :func:`fail` ends it on an
RPC fault.  Each returns the new operation and the effects the shell must
carry out (:class:`StartProcess`, :class:`PromoteProcess`, :class:`StopProcess`), in order, *after*
it has saved the new operation in the state file: a listener killed at any
point finds the operation in the file and :func:`advance` resumes it
(a lost start or stop is issued again).  Nothing here does I/O.

Whether a new worker is ready is :attr:`SlotSnapshot.ready
<fcgi_toolkit.policy.SlotSnapshot.ready>`, or :func:`ready_early`: its own
scoreboard slot says ready while supervisord still says STARTING (it leaves
STARTING only after ``startsecs``, 1 s; the worker is ready in ~0.3 s).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import AbstractSet, Any, Mapping, Optional, Union

from supervisor.states import ProcessStates

from fcgi_toolkit.names import FAILED_STATES, format_duration
from fcgi_toolkit.policy import SlotSnapshot, Snapshot


class Phase(enum.Enum):
    """Where a recycle is; the value is what the state file stores."""
    STARTING = "starting"              # replacement started; waiting until it is ready
    STOPPING = "stopping"              # replacement ready; offender stopping (graceful)
    STOPPING_FIRST = "stopping_first"  # no standby: offender stopping before its restart
    RESTARTING = "restarting"          # no standby: the offender's slot started again
    DONE = "done"                      # final: the new worker serves, the old one is gone
    FAILED = "failed"                  # final: the old worker keeps serving (if it still runs)


#: Every transition there is: (from, to).  :func:`_to` refuses any other.
TRANSITIONS = frozenset({
    (Phase.STARTING, Phase.STOPPING),
    (Phase.STARTING, Phase.DONE),
    (Phase.STARTING, Phase.FAILED),
    (Phase.STOPPING, Phase.DONE),
    (Phase.STOPPING, Phase.FAILED),
    (Phase.STOPPING_FIRST, Phase.RESTARTING),
    (Phase.STOPPING_FIRST, Phase.FAILED),
    (Phase.RESTARTING, Phase.DONE),
    (Phase.RESTARTING, Phase.FAILED),
})
#: Phases in which a new worker is coming up (a failure stops it again).
STARTING_PHASES = (Phase.STARTING, Phase.RESTARTING)
FINAL_PHASES = (Phase.DONE, Phase.FAILED)


@dataclass(frozen=True)
class Failure:
    """Why a recycle failed; ``log_of`` names the slot whose log tells more
    (supervisord's ``description`` of it if the log says nothing); ``phase``
    is where the recycle was when it failed."""
    why: str
    log_of: Optional[str] = None
    description: str = ""
    phase: Optional[Phase] = None


@dataclass(frozen=True)
class Operation:
    """One recycle in progress (a value; the state file stores :meth:`to_json`)."""
    offender: str
    replacement: Optional[str]       # the standby slot; None: the offender's slot restarts
    phase: Phase
    old_pid: int
    reason: str
    kind: str                        # "rss", "requests", "age", "operator", "reload"...
    origin: str                      # "watchdog", "operator" or "reload"
    began: float
    start_issued: float              # when the last start (or the first stop) was issued
    new_pid: int = 0
    request: Optional[str] = None    # the operator request to answer
    flapping: bool = False
    took: Optional[float] = None     # start to ready, once the new worker is ready
    failure: Optional[Failure] = None
    warm: bool = False               # the replacement is a warm standby, promoted

    @property
    def new_slot(self) -> str:
        """The slot the new worker runs in."""
        return self.replacement or self.offender

    @property
    def final(self) -> bool:
        return self.phase in FINAL_PHASES

    def to_json(self) -> dict:
        return {"offender": self.offender, "replacement": self.replacement,
                "phase": self.phase.value, "old_pid": self.old_pid, "new_pid": self.new_pid,
                "reason": self.reason, "kind": self.kind, "origin": self.origin,
                "request": self.request, "flapping": self.flapping, "began": self.began,
                "start_issued": self.start_issued, "took": self.took, "warm": self.warm}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Operation":
        """Raises ValueError/KeyError/TypeError on a record that is not an operation."""
        phase = Phase(data["phase"])
        if phase in FINAL_PHASES:
            raise ValueError("a final phase is never saved: %r" % phase.value)
        took = data.get("took")
        return cls(offender=str(data["offender"]), replacement=data.get("replacement") or None,
                   phase=phase, old_pid=int(data.get("old_pid") or 0),
                   new_pid=int(data.get("new_pid") or 0), reason=str(data.get("reason", "")),
                   kind=str(data.get("kind", "")), origin=str(data.get("origin", "watchdog")),
                   request=data.get("request") or None, flapping=bool(data.get("flapping")),
                   began=float(data["began"]), start_issued=float(data["start_issued"]),
                   took=None if took is None else float(took), warm=bool(data.get("warm")))


@dataclass(frozen=True)
class Reload:
    """A rolling reload in progress: every worker alive when it began is replaced."""
    origin: str                      # "operator", "watch" or "apply"
    old_pids: Mapping[str, int]      # slot -> pid of the workers to replace
    began: float
    request: Optional[str] = None
    replaced: int = 0

    def to_json(self) -> dict:
        return {"request": self.request, "origin": self.origin, "old_pids": dict(self.old_pids),
                "began": self.began, "replaced": self.replaced}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Reload":
        return cls(origin=str(data.get("origin", "operator")),
                   old_pids={str(k): int(v) for k, v in dict(data["old_pids"]).items()},
                   began=float(data["began"]), request=data.get("request") or None,
                   replaced=int(data.get("replaced") or 0))


@dataclass(frozen=True)
class StartProcess:
    slot: str


@dataclass(frozen=True)
class StopProcess:
    slot: str


@dataclass(frozen=True)
class PromoteProcess:
    """Tell ``slot``'s warm standby to accept (SIGUSR2; idempotent)."""
    slot: str


Effect = Union[StartProcess, StopProcess, PromoteProcess]

#: A promoted standby still waiting after this many seconds is told again
#: (the signal was lost: a listener killed between saving and signalling).
PROMOTE_AGAIN = 0.5
Step = tuple[Operation, list[Effect]]


def _to(op: Operation, phase: Phase, **changes: Any) -> Operation:
    assert (op.phase, phase) in TRANSITIONS, "no transition %s -> %s" % (op.phase.name,
                                                                       phase.name)
    return replace(op, phase=phase, **changes)


# --------------------------------------------------------------------------
# Transitions
# --------------------------------------------------------------------------

def begin(offender: Optional[SlotSnapshot], offender_name: str, replacement: Optional[str],
          reason: str, kind: str, origin: str, now: float, request: Optional[str] = None,
          flapping: bool = False, warm: bool = False) -> Step:
    """A new recycle of ``offender_name`` (its snapshot ``offender``, None if not listed);
    ``warm``: ``replacement`` holds a warm standby, promoted instead of started."""
    op = Operation(offender=offender_name, replacement=replacement,
                   phase=Phase.STARTING if replacement else Phase.STOPPING_FIRST,
                   old_pid=offender.pid if offender else 0, reason=reason, kind=kind,
                   origin=origin, began=now, start_issued=now, request=request,
                   flapping=flapping, warm=bool(replacement) and warm)
    if replacement:
        return op, [PromoteProcess(replacement) if op.warm else StartProcess(replacement)]
    return op, [StopProcess(offender_name)]


def _old_gone(op: Operation, offender: Optional[SlotSnapshot]) -> bool:
    return (offender is None or offender.pid != op.old_pid
            or not (offender.active or offender.state == ProcessStates.STOPPING))


def ready_early(new: SlotSnapshot, snapshot: Snapshot, busy: AbstractSet[str]) -> bool:
    """Whether a replacement supervisord still calls STARTING may count as ready.

    Its own live scoreboard slot must say ready, and another ready worker in
    no recycle at all (``busy``: every offender and replacement) must be
    serving.  supervisord calls an exit within ``startsecs`` a failed start:
    if the replacement dies then, after its offender was told to stop, that
    other worker keeps the fcgi-program's socket open and keeps serving.
    Without one (workers.count = 1) the replacement waits for RUNNING.
    """
    if not (new.state == ProcessStates.STARTING and new.pid and new.accepting):
        return False
    return any(s.ready and s.name not in busy for s in snapshot.slots)


def advance(op: Operation, snapshot: Snapshot, now: float, ready_timeout: float,
            busy: Optional[AbstractSet[str]] = None) -> Step:
    """Move ``op`` by what ``snapshot`` shows at ``now``.

    ``ready_timeout`` is recycle.ready_timeout: how long a new worker has,
    from its start, to be ready.  ``busy`` names every slot in a recycle
    (for :func:`ready_early`; None: a replacement waits for RUNNING).  An
    operation with nothing to do comes back unchanged with no effects.
    """
    assert not op.final, op
    offender = snapshot.get(op.offender)
    if op.phase in STARTING_PHASES:
        new = snapshot.get(op.new_slot)
        early = (busy is not None and new is not None and op.phase == Phase.STARTING
                 and ready_early(new, snapshot, set(busy) | {op.offender, op.new_slot}))
        return _advance_start(op, new, offender, now, ready_timeout, early)
    if op.phase == Phase.STOPPING:
        if _old_gone(op, offender):
            return _to(op, Phase.DONE), []                    # STOPPING -> DONE
        if offender.active:
            return op, [StopProcess(op.offender)]             # the stop was lost: again
        return op, []
    assert op.phase == Phase.STOPPING_FIRST, op
    if _old_gone(op, offender) or offender.startable:
        # STOPPING_FIRST -> RESTARTING
        return _to(op, Phase.RESTARTING, start_issued=now), [StartProcess(op.offender)]
    if offender.active:
        return op, [StopProcess(op.offender)]                 # the stop was lost: again
    return op, []


def _advance_start(op: Operation, new: Optional[SlotSnapshot], offender: Optional[SlotSnapshot],
                   now: float, ready_timeout: float, early: bool = False) -> Step:
    name = op.new_slot
    if new is None:
        # STARTING/RESTARTING -> FAILED
        return fail(op, "%s is not a process of the group" % name)
    if new.ready or early:
        done = dict(new_pid=new.pid, took=now - op.start_issued)
        if op.phase == Phase.RESTARTING or _old_gone(op, offender):
            return _to(op, Phase.DONE, **done), []            # STARTING/RESTARTING -> DONE
        # STARTING -> STOPPING
        return _to(op, Phase.STOPPING, **done), [StopProcess(op.offender)]
    if new.state in FAILED_STATES:
        # STARTING/RESTARTING -> FAILED
        return fail(op, Failure("%s %s" % (name, new.statename), name, new.description))
    if now - op.start_issued > ready_timeout:
        # STARTING/RESTARTING -> FAILED
        return fail(op, Failure("%s not ready within %s (recycle.ready_timeout)" % (
            name, format_duration(ready_timeout)), name, new.description))
    if new.state == ProcessStates.STOPPED and op.warm:
        # STARTING -> FAILED
        return fail(op, Failure("warm standby %s stopped before it took over" % name, name,
                                new.description))
    if new.state == ProcessStates.STOPPED:
        return op, [StartProcess(name)]     # the start was lost (listener killed): again
    if op.warm and new.warm and now - op.start_issued >= PROMOTE_AGAIN:
        return op, [PromoteProcess(name)]   # the signal was lost (listener killed): again
    return op, []


def fail(op: Operation, why: Union[str, Failure]) -> Step:
    """End ``op`` as FAILED (an RPC fault, or a new worker that did not come up).

    A new worker that was coming up is stopped again; the offender, if it
    was not stopped yet, keeps serving.
    """
    failure = why if isinstance(why, Failure) else Failure(why)
    failed = _to(op, Phase.FAILED, failure=replace(failure, phase=op.phase))   # any -> FAILED
    if op.phase in STARTING_PHASES:
        return failed, [StopProcess(op.new_slot)]
    return failed, []


def reload_remaining(reload: Reload, snapshot: Snapshot) -> list[SlotSnapshot]:
    """The workers ``reload`` has still to replace (alive since it began), lowest slot first."""
    return [s for s in sorted(snapshot.slots, key=lambda s: s.index)
            if s.active and s.pid and reload.old_pids.get(s.name) == s.pid]
