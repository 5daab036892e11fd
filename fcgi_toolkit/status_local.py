"""``status``'s local view: one row per worker slot, joined from three sources.

A slot's view joins what supervisord says about the process, what the worker
says about itself (its scoreboard slot, trusted only when it is live) and
what the watchdog remembers about it (the state file, read by
:func:`fcgi_toolkit.statefile.read_state`).  :func:`derive_state`,
:func:`worker_view` and :func:`group_status` are pure; :func:`gather` is the
thin I/O shell shared by ``status``, the supervisorctl plugin and the
metrics collector.  Remote hosts: :mod:`fcgi_toolkit.status_hosts`; text
and JSON: :mod:`fcgi_toolkit.status_output`.
"""
from __future__ import annotations

import errno
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from supervisor.states import ProcessStates, getProcessStateDescription

from fcgi_toolkit import statefile
from fcgi_toolkit.names import CAPACITY_STATES
from fcgi_toolkit.scoreboard import Scoreboard, SlotRecord

if TYPE_CHECKING:  # the sampler imports psutil: only when gathering
    from fcgi_toolkit.policy import SlotSnapshot
    from fcgi_toolkit.settings import Deployment

# Every value of WorkerView.state, in the order an operator reads them.
STATES: dict[str, str] = {
    "ready": "accepting, no request in flight (supervisord may still say STARTING)",
    "running": "running on a remote host (readiness is in that host's scoreboard)",
    "busy": "accepting and serving at least one request",
    "warm": "warm standby: running, app imported, accepting nothing until it takes over",
    "draining": "asked to stop: finishing in-flight requests, accepting none",
    "flapping": "over a limit from its start (a replacement would be); backs off",
    "starting": "started, app not imported yet (or no scoreboard slot yet)",
    "backoff": "failed to start; supervisord or the watchdog will retry",
    "standby": "stopped spare slot (workers.warm_standby = false, or between a recycle and its restart)",
    "stopped": "stopped while the group runs fewer than workers.count",
    "exited": "exited unexpectedly; supervisord restarts it",
    "fatal": "could not be started; needs the operator",
    "unknown": "supervisord does not know the state",
    "down": "the host's supervisord did not answer (multi-host status)",
}


class SupervisorUnavailable(RuntimeError):
    """supervisord does not answer on the control socket."""


@dataclass(frozen=True)
class Inflight:
    """The oldest request a worker is serving now."""
    method: str
    uri: str
    seconds: float


@dataclass(frozen=True)
class WorkerView:
    """One slot as ``status`` shows it."""
    name: str
    state: str
    supervisor_state: str
    pid: Optional[int]
    rss_bytes: Optional[int]
    requests: Optional[int]
    age_seconds: Optional[float]
    inflight: Optional[Inflight]
    recycles: Optional[int]  # None on a remote host (its state file is there)
    last_reason: Optional[str]
    last_recycle_time: Optional[float]
    serving: bool            # running, ready, not draining: counts as ready capacity
    by_reason: Mapping[str, int]


def worker_json(w: WorkerView) -> dict:
    """A worker's object in ``status --json`` (the inverse: :func:`worker_from_json`)."""
    return {
        "name": w.name,
        "state": w.state,
        "supervisor_state": w.supervisor_state,
        "pid": w.pid,
        "rss_bytes": w.rss_bytes,
        "requests": w.requests,
        "age_seconds": None if w.age_seconds is None else round(w.age_seconds, 3),
        "inflight": None if w.inflight is None else {
            "method": w.inflight.method, "uri": w.inflight.uri,
            "seconds": round(w.inflight.seconds, 3)},
        "recycles": w.recycles,
        "last_reason": w.last_reason,
        "last_recycle_time": w.last_recycle_time,
    }


def worker_from_json(obj: Mapping[str, Any]) -> WorkerView:
    """A :class:`WorkerView` back from :func:`worker_json`, as a host's fcgi.status() sends it."""
    inflight = obj.get("inflight")
    return WorkerView(
        name=str(obj["name"]), state=str(obj["state"]), supervisor_state=str(obj["supervisor_state"]),
        pid=obj.get("pid"), rss_bytes=obj.get("rss_bytes"), requests=obj.get("requests"),
        age_seconds=obj.get("age_seconds"),
        inflight=Inflight(str(inflight["method"]), str(inflight["uri"]), float(inflight["seconds"]))
        if isinstance(inflight, Mapping) else None,
        recycles=obj.get("recycles"), last_reason=obj.get("last_reason"),
        last_recycle_time=obj.get("last_recycle_time"),
        serving=obj.get("state") in ("ready", "busy"), by_reason={})


@dataclass(frozen=True)
class GroupStatus:
    group: str
    count: int
    standby: int
    workers: tuple[WorkerView, ...]
    generated_at: float
    recycle: Optional[Mapping[str, Any]] = None   # in-progress recycle from the state file
    reload: Optional[Mapping[str, Any]] = None    # in-progress reload from the state file
    drift: Optional[tuple[str, ...]] = None       # keys the file changed since run/apply; None: unknown
    generation: int = 1                           # the serving generation (README "Generations")
    switch: Optional[Mapping[str, Any]] = None    # a generation switch under way: old, new, phase, since
    supervisord: Optional[Mapping[str, Any]] = None  # which supervisord holds the workers

    @property
    def ready(self) -> int:
        return sum(1 for w in self.workers if w.serving)

    @property
    def recycles(self) -> int:
        return sum(w.recycles or 0 for w in self.workers)


# --------------------------------------------------------------------------
# Pure decisions
# --------------------------------------------------------------------------

def derive_state(supervisor_state: int, record: Optional[SlotRecord], slot_state: Mapping[str, Any],
                 capacity_short: bool, now: float) -> str:
    """The operator's state of one slot.

    ``supervisor_state`` is a :class:`supervisor.states.ProcessStates` code,
    ``record`` the slot's scoreboard record *already checked live* (None if
    absent or stale), ``slot_state`` the slot's state-file record (may be
    empty), ``capacity_short`` whether fewer than ``workers.count`` slots are
    in :data:`fcgi_toolkit.names.CAPACITY_STATES` (a stopped slot is then a
    hole, not a standby).
    """
    flapping = bool(slot_state.get("flapping"))
    backoff = _number(slot_state.get("backoff_until")) > now
    if supervisor_state in (ProcessStates.RUNNING, ProcessStates.STARTING):
        # What the worker says of itself decides, as for the watchdog
        # (SlotSnapshot.accepting / .warm): within startsecs it may accept already.
        if record is None or not (record.ready or record.standby):
            return "starting"
        if record.draining:
            return "draining"
        if record.standby:
            return "warm"
        if flapping:
            return "flapping"
        return "busy" if record.inflight else "ready"
    if supervisor_state == ProcessStates.STOPPING:
        return "draining"
    if supervisor_state == ProcessStates.BACKOFF:
        return "backoff"
    if supervisor_state == ProcessStates.FATAL:
        return "fatal"
    if supervisor_state == ProcessStates.EXITED:
        return "exited"
    if supervisor_state == ProcessStates.STOPPED:
        if flapping:
            return "flapping"
        if backoff:
            return "backoff"
        return "stopped" if capacity_short else "standby"
    return "unknown"


def worker_view(name: str, snap: Optional["SlotSnapshot"], slot_state: Mapping[str, Any],
                capacity_short: bool, now: float) -> WorkerView:
    """Join one slot's sources.  ``snap`` is the sampler's
    :class:`~fcgi_toolkit.policy.SlotSnapshot` (supervisord state and pid,
    psutil create time and RSS, the scoreboard record only when it is live),
    None if supervisord does not list the slot; ``slot_state`` is the slot's
    state-file record (may be empty)."""
    code = snap.state if snap is not None else ProcessStates.UNKNOWN
    pid = snap.pid if snap is not None and snap.pid else None
    probed = snap is not None and pid is not None and snap.create_time is not None
    live = snap.record if probed else None
    state = derive_state(code, live, slot_state, capacity_short, now)
    started: Optional[float] = None
    if probed:
        started = live.started if live is not None else snap.create_time
    inflight = None
    if live is not None and live.inflight:
        inflight = Inflight(live.method, live.uri, live.request_age(now))
    by_reason = slot_state.get("by_reason")
    by_reason = by_reason if isinstance(by_reason, Mapping) else {}
    return WorkerView(
        name=name,
        state=state,
        supervisor_state=getProcessStateDescription(code) or "UNKNOWN",
        pid=pid,
        rss_bytes=snap.rss if probed else None,
        requests=live.requests if live is not None else None,
        age_seconds=max(0.0, now - started) if started else None,
        inflight=inflight,
        recycles=int(_number(slot_state.get("recycles"))),
        last_reason=str(slot_state.get("last_reason") or "") or None,
        last_recycle_time=_number(slot_state.get("last_time")) or None,
        serving=probed and snap.accepting,   # the watchdog's one "accepts" fact
        by_reason={str(k): int(_number(v)) for k, v in by_reason.items()},
    )


def group_status(group: str, count: int, standby: int, slot_names: Sequence[str],
                 snaps: Sequence["SlotSnapshot"], state: Mapping[str, Any],
                 now: float) -> GroupStatus:
    """Every slot's view from plain values: the sampler's slot snapshots (a
    slot supervisord does not list may be missing) and the parsed state file."""
    by_name = {snap.name: snap for snap in snaps}
    up = sum(1 for snap in snaps if snap.state in CAPACITY_STATES)
    slots_state = state.get("slots")
    slots_state = slots_state if isinstance(slots_state, Mapping) else {}
    workers = tuple(
        worker_view(name, by_name.get(name), _mapping(slots_state.get(name)), up < count, now)
        for name in slot_names)
    return GroupStatus(group=group, count=count, standby=standby, workers=workers,
                       generated_at=now, recycle=_mapping(state.get("recycle")) or None,
                       reload=_mapping(state.get("reload")) or None)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def gather(dep: "Deployment", rpc: Any, now: Optional[float] = None,
           process_factory: Optional[Callable[[int], Any]] = None,
           server_url: Optional[str] = None) -> GroupStatus:
    """Read supervisord (``rpc`` is the ``supervisor`` namespace), the
    scoreboard, the state file and the OS; return the group's status.

    The per-slot sampling (psutil per pid, scoreboard liveness) is the
    watchdog's own :class:`fcgi_toolkit.sampler.Sampler`, so ``status``, the
    metrics and the watchdog see a worker the same way.
    ``process_factory`` replaces ``psutil.Process`` (tests); ``server_url``
    is where ``rpc`` connects, for the error message (default: the
    deployment's control socket).
    Raises :class:`SupervisorUnavailable` when supervisord does not answer.
    """
    from fcgi_toolkit import generations
    from fcgi_toolkit.policy import Limits
    from fcgi_toolkit.sampler import Sampler
    if dep.generation is None:
        dep = generations.serving(dep)
    switch = generations.read_switch(dep.runtime_dir)
    try:
        infos = rpc.getAllProcessInfo()
    except OSError as exc:
        raise SupervisorUnavailable(_unavailable_reason(dep, exc, server_url)) from None
    now = time.time() if now is None else now
    board = Scoreboard(dep.scoreboard_path, dep.slots)
    try:
        kwargs = {"process_factory": process_factory} if process_factory else {}
        sampler = Sampler(dep.group, dep.slot_names(), board, Limits.from_deployment(dep),
                          clock=lambda: now, **kwargs)
        snap = sampler.sample(infos)
    finally:
        board.close()
    from fcgi_toolkit import applying
    keys = applying.drift(dep)
    # Spare slots (workers.max_slots) are shown only while they hold a process.
    listed = {s.name: s for s in snap.slots}
    shown = [name for i, name in enumerate(dep.slot_names())
             if i < dep.used_slots or (name in listed and not listed[name].startable)]
    return replace(group_status(dep.group, dep.workers.count, dep.workers.standby,
                                shown, snap.slots,
                                statefile.read_state(dep.state_path), now),
                   drift=None if keys is None else tuple(keys),
                   generation=dep.generation_number,
                   switch=None if switch is None else asdict(switch),
                   supervisord=holder_json(dep))


def holder_json(dep: "Deployment") -> dict:
    """Which supervisord holds the serving workers (README "Generations"):
    the front (generation 0) or an inner one, and how supervisorctl reaches it."""
    return {"generation": dep.holder, "program": dep.supervisord_program or None,
            "conf": dep.supervisord_conf}


def _unavailable_reason(dep: "Deployment", exc: OSError, server_url: Optional[str]) -> str:
    from fcgi_toolkit.supervisorconf import control_client
    where = server_url or control_client(dep).serverurl
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
        start = ("the distribution's supervisord (systemctl start supervisor)"
                 if dep.control.system_supervisord else "fcgi-toolkit run -c %s" % dep.path)
        return "supervisord is not running (%s: %s); start it with: %s" % (
            where, os.strerror(exc.errno), start)
    return "cannot reach supervisord at %s: %s" % (where, exc.strerror or exc)
