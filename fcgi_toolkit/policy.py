"""Watchdog decisions: pure functions from a snapshot and the clock to actions.

Nothing here samples, signals or sleeps.  :mod:`fcgi_toolkit.sampler` builds
the :class:`Snapshot`, :mod:`fcgi_toolkit.coordinator` carries out the
actions.  All sizes are integer bytes, all times epoch seconds or seconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional, Union

from supervisor.states import ProcessStates

from fcgi_toolkit.names import (CAPACITY_STATES, STARTABLE_STATES, format_duration, format_size,
                                state_name)
from fcgi_toolkit.scoreboard import SlotRecord, is_live

#: Limits whose breach can mark a worker as flapping.  A request count
#: reached quickly only means load, so it never counts as flapping.  For
#: "rss" the worker's baseline decides (:func:`flapping`), for "age" its age.
FLAP_KINDS = ("rss", "age")

BACKOFF_BASE = 2.0
BACKOFF_MAX = 600.0


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """The settings the policy needs, copied out of a Deployment."""
    count: int
    standby: int
    max_rss: int = 0
    max_rss_hard: int = 0
    max_requests: int = 0
    max_requests_jitter: int = 0
    max_age: float = 0.0
    request_timeout: float = 0.0
    slow_request: float = 0.0
    max_concurrent: int = 1
    flap_window: float = 60.0
    warm: bool = False           # workers.warm_standby (with standby > 0): standbys run

    @property
    def running_slots(self) -> int:
        """Processes the group runs: count (+ standby when the standbys are warm)."""
        return self.count + self.standby if self.warm else self.count

    def usable(self, slot: "SlotSnapshot") -> bool:
        """Whether a worker may start in ``slot``: the first count + standby
        slots; the rest (workers.max_slots) are spare for a larger count."""
        return slot.index < self.count + self.standby

    @classmethod
    def from_deployment(cls, dep: Any) -> "Limits":
        return cls(count=dep.workers.count, standby=dep.workers.standby,
                   max_rss=dep.limits.max_rss, max_rss_hard=dep.limits.max_rss_hard,
                   max_requests=dep.limits.max_requests,
                   max_requests_jitter=dep.limits.max_requests_jitter,
                   max_age=dep.limits.max_age, request_timeout=dep.limits.request_timeout,
                   slow_request=dep.limits.slow_request,
                   max_concurrent=dep.recycle.max_concurrent,
                   flap_window=dep.recycle.flap_window,
                   warm=dep.workers.warm_standby and dep.workers.standby > 0)


@dataclass(frozen=True)
class SlotSnapshot:
    """One slot as the watchdog saw it at one moment.

    ``record`` is the scoreboard record, present only when it was written by
    this very process (pid and create time match).  ``max_requests`` and
    ``max_age`` are the limits drawn for this worker life (jitter included;
    0 means off).  ``rss`` is the watchdog's own sample (psutil), taken at
    ``rss_time`` (0: no sample); the worker may have published a newer value
    in its record, see :attr:`latest_rss`.
    """
    name: str
    index: int
    state: int
    pid: int = 0
    create_time: Optional[float] = None
    rss: int = 0
    record: Optional[SlotRecord] = None
    age: float = 0.0
    max_requests: int = 0
    max_age: float = 0.0
    description: str = ""
    rss_time: float = 0.0

    @property
    def latest_rss(self) -> int:
        """The newer of the watchdog's sample and the value the worker published."""
        if self.record is not None and self.record.rss_time > self.rss_time:
            return self.record.rss
        return self.rss

    @property
    def statename(self) -> str:
        return state_name(self.state)

    @property
    def active(self) -> bool:
        return self.state in CAPACITY_STATES

    @property
    def startable(self) -> bool:
        return self.state in STARTABLE_STATES

    @property
    def ready(self) -> bool:
        """RUNNING, and its own scoreboard slot says it accepts requests."""
        return self.state == ProcessStates.RUNNING and self.accepting

    @property
    def accepting(self) -> bool:
        """Its own scoreboard slot says it accepts requests (not draining), while
        supervisord says RUNNING or still STARTING (within ``startsecs``)."""
        return (self.state in (ProcessStates.RUNNING, ProcessStates.STARTING)
                and self.record is not None and self.record.ready and not self.record.draining)

    @property
    def warm(self) -> bool:
        """A warm standby: the app is imported, it accepts nothing until promoted."""
        return (self.state in (ProcessStates.RUNNING, ProcessStates.STARTING)
                and self.record is not None and self.record.standby
                and not self.record.draining)

    @property
    def requests(self) -> int:
        return self.record.requests if self.record else 0

    @property
    def inflight(self) -> int:
        return self.record.inflight if self.record else 0

    def request_age(self, now: float) -> float:
        return self.record.request_age(now) if self.record else 0.0


@dataclass(frozen=True)
class Snapshot:
    time: float
    slots: tuple[SlotSnapshot, ...]

    def get(self, name: str) -> Optional[SlotSnapshot]:
        for slot in self.slots:
            if slot.name == name:
                return slot
        return None

    def ready_count(self) -> int:
        return sum(1 for s in self.slots if s.ready)

    def accepting_count(self) -> int:
        return sum(1 for s in self.slots if s.accepting)

    def active_count(self) -> int:
        return sum(1 for s in self.slots if s.active)


@dataclass(frozen=True)
class Memory:
    """What the coordinator remembers between passes, as the policy needs it."""
    busy: frozenset = frozenset()            # slots in a recycle (offenders and replacements)
    operations: int = 0                      # recycles in progress (the concurrency guard)
    backoff_until: Mapping[str, float] = field(default_factory=dict)
    first_breach: Mapping[int, float] = field(default_factory=dict)   # pid -> when first over a limit
    dumped: Mapping[str, tuple] = field(default_factory=dict)        # slot -> (pid, req_id) dumped
    killed: frozenset = frozenset()          # pids already sent SIGKILL
    alarmed: Mapping[str, tuple] = field(default_factory=dict)       # slot -> (pid, rss_time)


# --------------------------------------------------------------------------
# Actions
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Recycle:
    """Replace ``slot``'s worker gracefully (capacity held).

    ``replacement`` is the standby slot the new worker starts in (lowest
    free one first); None when workers.standby = 0: ``slot`` is stopped,
    then started again.
    """
    slot: str
    pid: int
    reason: str
    kind: str
    severity: float
    flapping: bool = False
    replacement: Optional[str] = None
    warm: bool = False               # the replacement is a warm standby: promote it


@dataclass(frozen=True)
class Wait:
    """A recycle of ``slot`` may not begin now: ``why`` (the capacity guard)."""
    slot: str
    why: str


@dataclass(frozen=True)
class Hold:
    """``slot`` broke a limit early in its life and its slot is in backoff: leave it serving."""
    slot: str
    pid: int
    reason: str
    kind: str
    backoff_until: float


@dataclass(frozen=True)
class HardStop:
    """Stop ``slot``'s worker now (graceful signal), replacement ready or not:
    its RSS is over limits.max_rss_hard.  Another ready worker keeps serving."""
    slot: str
    pid: int
    reason: str


@dataclass(frozen=True)
class Kill:
    """SIGKILL ``slot``'s worker: a request ran past request_timeout."""
    slot: str
    pid: int
    reason: str


@dataclass(frozen=True)
class DumpStacks:
    """SIGUSR1 ``slot``'s worker once for request ``req_id``."""
    slot: str
    pid: int
    req_id: int
    reason: str


@dataclass(frozen=True)
class Start:
    slot: str
    reason: str


@dataclass(frozen=True)
class Promote:
    """Tell ``slot``'s warm standby to start accepting (SIGUSR2)."""
    slot: str
    pid: int
    reason: str


@dataclass(frozen=True)
class Stop:
    slot: str
    reason: str


Action = Union[Recycle, Hold, HardStop, Kill, DumpStacks, Start, Stop, Promote]


@dataclass(frozen=True)
class RssAlarm:
    """``slot``'s worker published an RSS over max_rss: run a full pass now."""
    slot: str
    pid: int
    rss: int
    rss_time: float


# --------------------------------------------------------------------------
# Backoff
# --------------------------------------------------------------------------

def backoff_delay(level: int) -> float:
    """Exponential backoff: 2 s, 4 s, 8 s ... capped at 10 minutes."""
    if level <= 0:
        return 0.0
    return min(BACKOFF_MAX, BACKOFF_BASE * 2 ** min(level - 1, 30))


# --------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------

def breaches(slot: SlotSnapshot, limits: Limits) -> list[tuple[float, str, str]]:
    """Recycle limits ``slot`` is over: (severity, kind, reason), worst first.

    Severity is how far over the limit the worker is (1.0 = at the limit).
    """
    out = []
    rss = slot.latest_rss
    if limits.max_rss and rss > limits.max_rss:
        out.append((rss / limits.max_rss, "rss",
                    "rss %s > %s" % (format_size(rss), format_size(limits.max_rss))))
    if slot.max_requests and slot.record is not None and slot.requests >= slot.max_requests:
        out.append((slot.requests / slot.max_requests, "requests",
                    "requests %d >= %d" % (slot.requests, slot.max_requests)))
    if slot.max_age and slot.age >= slot.max_age:
        out.append((slot.age / slot.max_age, "age",
                    "age %s >= %s" % (format_duration(slot.age), format_duration(slot.max_age))))
    out.sort(key=lambda b: -b[0])
    return out


def flapping(slot: SlotSnapshot, kind: str, limits: Limits, age_at_breach: float) -> bool:
    """Whether recycling ``slot`` for a ``kind`` breach can help: False when it can.

    An RSS breach is flapping only if the worker was over max_rss near its
    start (its published baseline, :data:`fcgi_toolkit.scoreboard.BASELINE_REQUESTS`),
    when a fresh replacement would be over it too; a worker that grew past
    the limit while serving is never flapping, however young.  Without a
    baseline (no procfs) the old rule applies: a breach within
    recycle.flap_window of the start.  An age breach is flapping within
    flap_window (max_age itself is that short).
    """
    if kind not in FLAP_KINDS:
        return False
    baseline = slot.record.baseline if slot.record is not None else 0
    if kind == "rss" and baseline:
        return baseline > limits.max_rss
    return age_at_breach < limits.flap_window


def flap_evidence(slot: Optional[SlotSnapshot], kind: str, limits: Limits) -> str:
    """Why :func:`flapping` said so, for the log line."""
    baseline = slot.record.baseline if slot is not None and slot.record is not None else 0
    if kind == "rss" and baseline:
        return "it was at %s when it started (limits.max_rss = %s)" % (
            format_size(baseline), format_size(limits.max_rss))
    return "only %s after it started (recycle.flap_window = %s)" % (
        format_duration(slot.age if slot is not None else 0), format_duration(limits.flap_window))


def hard_stops(snapshot: Snapshot, limits: Limits, memory: Memory) -> list[HardStop]:
    """Workers over limits.max_rss_hard, to stop now, never the group's last ready one.

    A worker counts if it is RUNNING and not draining, in a recycle or not.
    Each stop needs another ready worker (not stopped in this pass either), so
    the group keeps serving and its socket stays open.
    """
    if not limits.max_rss_hard:
        return []
    ready = {s.name for s in snapshot.slots if s.ready}
    out = []
    for slot in sorted(snapshot.slots, key=lambda s: -s.latest_rss):
        if (not _watched(slot) or slot.state != ProcessStates.RUNNING or slot.record.draining
                or slot.warm or slot.latest_rss <= limits.max_rss_hard
                or slot.pid in memory.killed):
            continue
        if not ready - {slot.name}:
            continue
        ready.discard(slot.name)
        out.append(HardStop(slot.name, slot.pid, "rss %s > %s (limits.max_rss_hard)" % (
            format_size(slot.latest_rss), format_size(limits.max_rss_hard))))
    return out


def _watched(slot: SlotSnapshot) -> bool:
    # Only a worker whose scoreboard record is its own is judged.
    return slot.pid > 0 and slot.record is not None and slot.state in (
        ProcessStates.RUNNING, ProcessStates.STOPPING)


@dataclass(frozen=True)
class Room:
    """How many recycles may begin now, and in which standby slots."""
    recycles: int
    standby: tuple[str, ...] = ()    # free standby slots, lowest first (standby > 0 only)
    why: str = ""                    # why none may begin (recycles == 0)
    warm: bool = False               # the standby slots hold warm standbys (promote them)


def takes_over(slot: SlotSnapshot, snapshot: Snapshot) -> bool:
    """Whether ``slot``'s warm standby may be promoted now.

    A RUNNING one may.  One supervisord still calls STARTING may only while
    two other workers are ready: the offender stops once the promoted one
    accepts (:func:`fcgi_toolkit.recycle.ready_early`), and if the new one
    then exits within ``startsecs`` the other keeps serving."""
    if not slot.warm:
        return False
    return slot.state == ProcessStates.RUNNING or snapshot.ready_count() >= 2


def capacity(snapshot: Snapshot, now: float, limits: Limits, memory: Memory,
             offender: Optional[str] = None) -> Room:
    """The capacity guard, the one place that says whether a recycle may begin.

    At most ``max_concurrent`` recycles at once.  With standby slots each
    recycle needs a startable standby slot that is neither in a recycle nor
    backing off; without standby a recycle stops its worker first, so at
    least one other ready worker must keep serving.  ``offender`` (a recycle
    of that one slot) does not count among the others.
    """
    room = limits.max_concurrent - memory.operations
    if room <= 0:
        return Room(0, why="%d recycle(s) already in progress (recycle.max_concurrent = %d)" % (
            memory.operations, limits.max_concurrent))
    if limits.warm:
        free = tuple(s.name for s in sorted(snapshot.slots, key=lambda s: s.index)
                     if takes_over(s, snapshot) and s.name not in memory.busy
                     and s.name != offender and limits.usable(s)
                     and memory.backoff_until.get(s.name, 0.0) <= now)
        if not free:
            return Room(0, why="no warm standby is ready to take over yet")
        return Room(min(room, len(free)), free, warm=True)
    if limits.standby > 0:
        free = tuple(s.name for s in sorted(snapshot.slots, key=lambda s: s.index)
                     if s.startable and s.name not in memory.busy and limits.usable(s)
                     and memory.backoff_until.get(s.name, 0.0) <= now)
        if not free:
            return Room(0, why="no standby slot is free (all running or backing off)")
        return Room(min(room, len(free)), free)
    ready = [s.name for s in snapshot.slots if s.ready and s.name not in memory.busy]
    others = len([n for n in ready if n != offender]) if offender else len(ready) - 1
    if others < 1:
        return Room(0, why="no other worker is ready (workers.standby = 0 stops before it starts)")
    return Room(min(room, others))


def admit(snapshot: Snapshot, now: float, limits: Limits, memory: Memory, slot: str,
          reason: str, kind: str) -> Union[Recycle, Wait]:
    """A recycle of ``slot`` asked for outside :func:`decide` (an operator
    request, a reload step): the action if the guard has room, else why not."""
    room = capacity(snapshot, now, limits, memory, offender=slot)
    if room.recycles < 1:
        return Wait(slot, room.why)
    found = snapshot.get(slot)
    return Recycle(slot, found.pid if found else 0, reason, kind, 1.0,
                   replacement=room.standby[0] if room.standby else None, warm=room.warm)


def reload_refusal(limits: Limits) -> Optional[str]:
    """Why a rolling reload cannot keep serving with these limits; None if it can."""
    if limits.standby == 0 and limits.count < 2:
        return ("a rolling reload needs workers.standby >= 1 or workers.count >= 2"
                " to keep serving")
    return None


def decide(snapshot: Snapshot, now: float, limits: Limits, memory: Memory) -> list[Action]:
    """The watchdog's actions for this pass.

    At most one action per worker.  Hard stops (:func:`hard_stops`) and kills
    come first (a stuck request wastes a worker whatever else happens), then recycles worst offender first within
    the capacity guard (:func:`capacity`), each naming its replacement slot,
    then holds, then stack dumps.
    """
    kills: list[Action] = list(hard_stops(snapshot, limits, memory))
    acted: set[str] = {k.slot for k in kills}
    candidates: list[Recycle] = []
    holds: list[Action] = []
    for slot in snapshot.slots:
        if not _watched(slot) or slot.name in acted:
            continue
        running_for = slot.request_age(now)
        if (limits.request_timeout and running_for >= limits.request_timeout
                and slot.pid not in memory.killed):
            kills.append(Kill(slot.name, slot.pid, "request_timeout %s %s running %s" % (
                slot.record.method, slot.record.uri, format_duration(running_for))))
            acted.add(slot.name)
            continue
        if (slot.state != ProcessStates.RUNNING or slot.name in memory.busy
                or slot.record.draining or slot.warm):
            continue                # a warm standby is judged once it serves
        found = breaches(slot, limits)
        if not found:
            continue
        severity, kind, reason = found[0]
        breached_at = memory.first_breach.get(slot.pid, now)
        age_at_breach = slot.age - (now - breached_at)
        flaps = flapping(slot, kind, limits, age_at_breach)
        until = memory.backoff_until.get(slot.name, 0.0)
        if flaps and now < until:
            holds.append(Hold(slot.name, slot.pid, reason, kind, until))
            acted.add(slot.name)
            continue
        candidates.append(Recycle(slot.name, slot.pid, reason, kind, severity, flaps))

    candidates.sort(key=lambda r: (-r.severity, r.slot))
    room = capacity(snapshot, now, limits, memory)
    recycles: list[Action] = [replace(r, replacement=room.standby[i] if room.standby else None,
                                      warm=room.warm)
                              for i, r in enumerate(candidates[:room.recycles])]
    acted.update(r.slot for r in recycles)

    dumps: list[Action] = []
    if limits.slow_request:
        for slot in snapshot.slots:
            if slot.name in acted or not _watched(slot):
                continue
            running_for = slot.request_age(now)
            if (running_for >= limits.slow_request
                    and memory.dumped.get(slot.name) != (slot.pid, slot.record.req_id)):
                dumps.append(DumpStacks(slot.name, slot.pid, slot.record.req_id,
                                        "slow_request %s %s running %s" % (
                                            slot.record.method, slot.record.uri,
                                            format_duration(running_for))))
    return kills + recycles + holds + dumps


def rss_alarms(last: Snapshot, records: Mapping[str, Optional[SlotRecord]], limits: Limits,
               memory: Memory) -> list[RssAlarm]:
    """Workers whose freshly published RSS calls for a full pass before the timer.

    ``last`` is the latest full pass's snapshot, ``records`` the scoreboard
    read just now (slot name -> record).  A record counts only if the last
    pass saw that very process RUNNING (pid and create time), it is not
    draining, not in a recycle, over ``max_rss``, and no full pass has seen
    this worker over a limit yet (then the passes on the timer handle it,
    held or waiting for room).  Each published value raises at most one
    alarm (``memory.alarmed``), so a stale record cannot cause a pass storm.
    """
    if not limits.max_rss:
        return []
    out = []
    for slot in last.slots:
        rec = records.get(slot.name)
        if (rec is None or slot.state != ProcessStates.RUNNING or slot.name in memory.busy
                or rec.draining or rec.standby or rec.rss <= limits.max_rss
                or not is_live(rec, slot.pid, slot.create_time)
                or slot.pid in memory.first_breach
                or memory.alarmed.get(slot.name) == (rec.pid, rec.rss_time)):
            continue
        out.append(RssAlarm(slot.name, rec.pid, rec.rss, rec.rss_time))
    return out


def reconcile(snapshot: Snapshot, now: float, limits: Limits, memory: Memory) -> list[Action]:
    """Start or stop slots so that exactly ``limits.running_slots`` are active,
    and (warm standbys) promote or stop so that exactly ``count`` accept.

    Nothing is done while a recycle is in progress (it owns the extra slot).
    Starts take the lowest-numbered startable slots not backing off; a
    STOPPING slot is never started.  Stops take the highest-numbered active
    slots (with warm standbys: the extra serving ones, then the highest
    non-serving ones) and are graceful.  Promotions take the lowest-numbered
    RUNNING warm standbys, then those still STARTING.
    """
    if memory.operations:
        return []
    active = [s for s in snapshot.slots if s.active]
    why = "%d of %d workers active" % (len(active), limits.running_slots)
    actions: list[Action] = []
    stopping: set[str] = set()
    if limits.warm:
        serving = sorted((s for s in snapshot.slots if s.accepting), key=lambda s: s.index)
        said = "%d of %d workers serving" % (len(serving), limits.count)
        if len(serving) > limits.count:
            extra = serving[limits.count:]
            actions += [Stop(s.name, said) for s in extra]
            stopping = {s.name for s in extra}
        else:
            # RUNNING standbys first: one still in startsecs may yet fail to start.
            warm = sorted((s for s in snapshot.slots if s.warm and s.name not in memory.busy),
                          key=lambda s: (s.state != ProcessStates.RUNNING, s.index))
            actions += [Promote(s.name, s.pid, said) for s in warm[:limits.count - len(serving)]]
    missing = limits.running_slots - (len(active) - len(stopping))
    if missing > 0:
        free = [s for s in sorted(snapshot.slots, key=lambda s: s.index)
                if s.startable and s.name not in memory.busy and limits.usable(s)
                and memory.backoff_until.get(s.name, 0.0) <= now]
        actions += [Start(s.name, why) for s in free[:missing]]
    elif missing < 0:
        promoted = {a.slot for a in actions}
        spare = [s for s in active if s.name not in stopping and s.name not in promoted
                 and not (limits.warm and s.accepting)]
        actions += [Stop(s.name, why) for s in sorted(spare, key=lambda s: -s.index)[:-missing]]
    return actions
