"""``fcgi-toolkit status``: one row per worker slot, from three sources.

A slot's view joins what supervisord says about the process (XML-RPC
``getAllProcessInfo``), what the worker says about itself (its scoreboard
slot, trusted only when :func:`fcgi_toolkit.scoreboard.is_live` matches pid
and start time) and what the watchdog remembers about it (the state file).

The decisions are pure: :func:`derive_state` and :func:`worker_view` take
plain values (the watchdog sampler's frozen ``SlotSnapshot`` and the state
file's dict), :func:`group_status` joins them, and the formatters turn a
:class:`GroupStatus` into text or a JSON object.  :func:`gather` is the
thin I/O shell (RPC, the watchdog's sampler, state file) shared by the
``status`` command, the supervisorctl plugin and the metrics collector.

``status --json`` prints this object (stable; new keys may be added)::

    {"group": "wiki",            # app.name
     "count": 2,                 # workers.count
     "standby": 1,               # workers.standby (configured standby slots)
     "ready": 2,                 # workers accepting requests now
     "recycles": 3,              # recycles of the group, every slot, every life
     "generated_at": 1767225600.0,
     "workers": [
       {"name": "wiki_00",
        "state": "busy",         # see STATES
        "supervisor_state": "RUNNING",
        "pid": 4242,             # null when not running
        "rss_bytes": 31457280,   # null when unknown
        "requests": 17,          # completed this life; null when unknown
        "age_seconds": 73.5,     # since the process started; null when not running
        "inflight": {"method": "GET", "uri": "/slow?s=5", "seconds": 2.1},  # or null
        "recycles": 1,
        "last_reason": "requests 1043 >= 1021",   # or null
        "last_recycle_time": 1767225500.0}]}      # or null
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
import xmlrpc.client
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from supervisor.states import ProcessStates, getProcessStateDescription

from fcgi_toolkit.scoreboard import Scoreboard, SlotRecord

if TYPE_CHECKING:  # the sampler imports psutil: only when gathering
    from fcgi_toolkit.policy import SlotSnapshot
    from fcgi_toolkit.settings import Deployment

# Every value of WorkerView.state, in the order an operator reads them.
STATES: dict[str, str] = {
    "ready": "running, app imported, no request in flight",
    "busy": "running and serving at least one request",
    "draining": "asked to stop: finishing in-flight requests, accepting none",
    "flapping": "broke a limit soon after it started; the watchdog backs off",
    "starting": "started, app not imported yet (or no scoreboard slot yet)",
    "backoff": "failed to start; supervisord or the watchdog will retry",
    "standby": "stopped spare slot used for graceful replacement",
    "stopped": "stopped while the group runs fewer than workers.count",
    "exited": "exited unexpectedly; supervisord restarts it",
    "fatal": "could not be started; needs the operator",
    "unknown": "supervisord does not know the state",
}

_UP = (ProcessStates.RUNNING, ProcessStates.STARTING)


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
    recycles: int
    last_reason: Optional[str]
    last_recycle_time: Optional[float]
    serving: bool            # running, ready, not draining: counts as ready capacity
    by_reason: Mapping[str, int]


@dataclass(frozen=True)
class GroupStatus:
    group: str
    count: int
    standby: int
    workers: tuple[WorkerView, ...]
    generated_at: float
    recycle: Optional[Mapping[str, Any]] = None   # in-progress recycle from the state file
    reload: Optional[Mapping[str, Any]] = None    # in-progress reload from the state file

    @property
    def ready(self) -> int:
        return sum(1 for w in self.workers if w.serving)

    @property
    def recycles(self) -> int:
        return sum(w.recycles for w in self.workers)


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
    RUNNING or STARTING (a stopped slot is then a hole, not a standby).
    """
    flapping = bool(slot_state.get("flapping"))
    backoff = _number(slot_state.get("backoff_until")) > now
    if supervisor_state == ProcessStates.RUNNING:
        if record is None or not record.ready:
            return "starting"
        if record.draining:
            return "draining"
        if flapping:
            return "flapping"
        return "busy" if record.inflight else "ready"
    if supervisor_state == ProcessStates.STARTING:
        return "starting"
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
        serving=(code == ProcessStates.RUNNING and live is not None and live.ready
                 and not live.draining),
        by_reason={str(k): int(_number(v)) for k, v in by_reason.items()},
    )


def group_status(group: str, count: int, standby: int, slot_names: Sequence[str],
                 snaps: Sequence["SlotSnapshot"], state: Mapping[str, Any],
                 now: float) -> GroupStatus:
    """Every slot's view from plain values: the sampler's slot snapshots (a
    slot supervisord does not list may be missing) and the parsed state file."""
    by_name = {snap.name: snap for snap in snaps}
    up = sum(1 for snap in snaps if snap.state in _UP)
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


# --------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------

def format_bytes(value: Optional[int]) -> str:
    """Supervisor-style sizes (1024-based, as in ``256MB``): ``512KB``, ``301MB``, ``2.5GB``."""
    if value is None:
        return "-"
    if value < 1024 * 1024:
        return "%dKB" % (value // 1024)
    if value < 1024 ** 3:
        return "%dMB" % round(value / 1024 ** 2)
    return "%.1fGB" % (value / 1024 ** 3)


def format_duration(seconds: Optional[float]) -> str:
    """``45s``, ``3m05s``, ``6h02m``, ``2d04h`` (the watchdog's reasons use the same)."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return "%.1fs" % seconds
    s = int(seconds)
    if s < 60:
        return "%ds" % s
    if s < 3600:
        return "%dm%02ds" % divmod(s, 60)
    if s < 86400:
        return "%dh%02dm" % (s // 3600, s % 3600 // 60)
    return "%dd%02dh" % (s // 86400, s % 86400 // 3600)


def summary_line(status: GroupStatus) -> str:
    standby = sum(1 for w in status.workers if w.state == "standby")
    parts = ["%s: %d/%d workers ready" % (status.group, status.ready, status.count),
             "%d standby" % standby,
             "%d recycle%s" % (status.recycles, "" if status.recycles == 1 else "s")]
    last = max((w for w in status.workers if w.last_recycle_time),
               key=lambda w: w.last_recycle_time or 0.0, default=None)
    if last is not None:
        parts[-1] += " (last %s ago: %s %s)" % (
            format_duration(status.generated_at - (last.last_recycle_time or 0.0)),
            last.name, last.last_reason or "")
    line = ", ".join(parts)
    if status.reload:
        line += "; reload in progress"
    elif status.recycle:
        # The state file keeps one entry per offender being replaced.
        moves = ["%s -> %s" % (offender, entry.get("replacement") or "?")
                 if isinstance(entry, Mapping) else offender
                 for offender, entry in sorted(status.recycle.items())]
        line += "; recycle in progress (%s)" % ", ".join(moves)
    return line


_COLUMNS = ("WORKER", "STATE", "PID", "RSS", "REQS", "AGE", "RECYCLES", "LAST REASON", "IN FLIGHT")


def format_table(status: GroupStatus) -> str:
    """The human table: a row per slot, then the summary line."""
    rows = [_COLUMNS]
    for w in status.workers:
        inflight = ("%s %s (%s)" % (w.inflight.method, w.inflight.uri,
                                    format_duration(w.inflight.seconds))
                    if w.inflight else "-")
        rows.append((w.name, w.state, str(w.pid) if w.pid else "-", format_bytes(w.rss_bytes),
                     "-" if w.requests is None else str(w.requests),
                     format_duration(w.age_seconds), str(w.recycles),
                     w.last_reason or "-", inflight))
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(r, widths)) + "  " + r[-1]
             for r in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n" + summary_line(status) + "\n"


def to_json(status: GroupStatus) -> dict:
    """The documented ``status --json`` object (see the module docstring)."""
    return {
        "group": status.group,
        "count": status.count,
        "standby": status.standby,
        "ready": status.ready,
        "recycles": status.recycles,
        "generated_at": status.generated_at,
        "workers": [{
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
        } for w in status.workers],
    }


# --------------------------------------------------------------------------
# I/O shell
# --------------------------------------------------------------------------

def read_state(path: str) -> dict:
    """The watchdog's state file as a dict; {} if missing or unreadable (the
    watchdog has not written it yet, or is being restarted)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def supervisor_proxy(dep: "Deployment") -> Any:
    """The ``supervisor`` XML-RPC namespace over the deployment's private unix socket."""
    from supervisor.xmlrpc import SupervisorTransport
    transport = SupervisorTransport(None, None, "unix://" + dep.control_socket)
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor


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
    from fcgi_toolkit.policy import Limits
    from fcgi_toolkit.sampler import Sampler
    try:
        infos = rpc.getAllProcessInfo()
    except OSError as exc:
        raise SupervisorUnavailable(_unavailable_reason(dep, exc, server_url)) from None
    now = time.time() if now is None else now
    board = Scoreboard(dep.scoreboard_path, dep.slots)
    try:
        kwargs = {"process_factory": process_factory} if process_factory else {}
        sampler = Sampler(dep.name, dep.slot_names(), board, Limits.from_deployment(dep),
                          clock=lambda: now, **kwargs)
        snap = sampler.sample(infos)
    finally:
        board.close()
    return group_status(dep.name, dep.workers.count, dep.workers.standby, dep.slot_names(),
                        snap.slots, read_state(dep.state_path), now)


def _unavailable_reason(dep: "Deployment", exc: OSError, server_url: Optional[str]) -> str:
    where = server_url or "unix://" + dep.control_socket
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
        return "supervisord is not running (%s: %s); start it with: fcgi-toolkit run -c %s" % (
            where, os.strerror(exc.errno), dep.path)
    return "cannot reach supervisord at %s: %s" % (where, exc.strerror or exc)


# --------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default="deploy.toml",
                        help="deployment file (default: deploy.toml)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (documented in README: Operator commands)")


def run(args: argparse.Namespace) -> int:
    from fcgi_toolkit import settings
    dep = settings.load(args.config)
    try:
        status = gather(dep, supervisor_proxy(dep))
    except SupervisorUnavailable as exc:
        print("fcgi-toolkit: %s" % exc, file=sys.stderr)
        return 1
    except xmlrpc.client.Fault as exc:
        print("fcgi-toolkit: supervisord refused getAllProcessInfo: %s" % exc.faultString,
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(to_json(status), indent=2, sort_keys=False))
    else:
        sys.stdout.write(format_table(status))
    return 0
