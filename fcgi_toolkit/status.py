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

On the web server of a multi-host deployment (``[[hosts]]``, no
FCGI_TOOLKIT_HOST) ``status`` asks every host's supervisord over its TCP
control port (control.inet_port with control.username/password) for its
own status, ``fcgi.status()`` of our RPC plugin (:mod:`fcgi_toolkit.rpcinterface`):
every worker in full, as on the host.  A host without the plugin shows
supervisord's view only (state, pid, uptime; RSS, requests, in-flight
request and recycles null).  A host that does not answer is "down";
the exit status is then 1.  ``--json``::

    {"group": "wiki",
     "generated_at": 1767225600.0,
     "up": 2,                    # hosts that answered
     "down": ["app2"],           # hosts that did not
     "hosts": [
       {"name": "app1",
        "address": "10.0.0.11:9000",          # the host's worker socket
        "control_url": "http://10.0.0.11:9001",
        "backup": false,
        "up": true,
        "error": null,           # why the host is down, else null
        "count": 8,              # the host's workers.count
        "standby": 1,
        "running": 8,            # workers RUNNING in supervisord
        "workers": [...]},       # as above; state "running" (readiness is not
                                 # known remotely), unknown values null
       {"name": "app2", ..., "up": false,
        "error": "connection refused at http://10.0.0.12:9001 ...", "running": 0, "workers": []}]}
"""
from __future__ import annotations

import argparse
import errno
import http.client
import json
import logging
import os
import sys
import time
import urllib.parse
import xmlrpc.client
from xml.parsers.expat import ExpatError
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from supervisor.states import ProcessStates, getProcessStateDescription
from supervisor.xmlrpc import SupervisorTransport

from fcgi_toolkit.scoreboard import Scoreboard, SlotRecord

if TYPE_CHECKING:  # the sampler imports psutil: only when gathering
    from fcgi_toolkit.policy import SlotSnapshot
    from fcgi_toolkit.settings import Deployment, HostSpec

log = logging.getLogger(__name__)

# Every value of WorkerView.state, in the order an operator reads them.
STATES: dict[str, str] = {
    "ready": "running, app imported, no request in flight",
    "running": "running on a remote host (readiness is in that host's scoreboard)",
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
    "down": "the host's supervisord did not answer (multi-host status)",
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
    recycles: Optional[int]  # None on a remote host (its state file is there)
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
        return sum(w.recycles or 0 for w in self.workers)


@dataclass(frozen=True)
class HostStatus:
    """One host of a multi-host deployment, as its supervisord reports it."""
    name: str
    address: str              # the host's worker socket, "IPv4:port"
    control_url: str          # where its supervisord was asked
    backup: bool
    count: int
    standby: int
    workers: tuple[WorkerView, ...]   # empty when the host is down
    error: Optional[str] = None       # why the host is down; None when it answered
    full: bool = False                # workers from the host's fcgi.status() (rpcinterface)

    @property
    def up(self) -> bool:
        return self.error is None

    @property
    def running(self) -> int:
        return sum(1 for w in self.workers if w.supervisor_state == "RUNNING")


@dataclass(frozen=True)
class DeploymentStatus:
    """Every host of a multi-host deployment, seen from the web server."""
    group: str
    hosts: tuple[HostStatus, ...]
    generated_at: float

    @property
    def down(self) -> list[str]:
        return [h.name for h in self.hosts if not h.up]


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


def remote_worker_view(name: str, info: Optional[Mapping[str, Any]],
                       capacity_short: bool) -> WorkerView:
    """One slot of a remote host from supervisord's process info alone.

    RUNNING is "running", not "ready": whether the app is imported and
    accepting is in the host's scoreboard, which only the host can read.
    The age is supervisord's ``now - start`` (the host's own clock, so a
    skewed web server clock does not matter).  RSS, requests, the
    in-flight request and the recycle history are unknown (None).
    """
    info = info or {}
    code = info.get("state", ProcessStates.UNKNOWN)
    if code == ProcessStates.RUNNING:
        state = "running"
    else:
        state = derive_state(code, None, {}, capacity_short, 0.0)
    up = code in (ProcessStates.RUNNING, ProcessStates.STARTING, ProcessStates.STOPPING)
    pid = info.get("pid") if up and info.get("pid") else None
    start, now = _number(info.get("start")), _number(info.get("now"))
    return WorkerView(
        name=name, state=state,
        supervisor_state=getProcessStateDescription(code) or "UNKNOWN",
        pid=pid, rss_bytes=None, requests=None,
        age_seconds=max(0.0, now - start) if up and start and now else None,
        inflight=None, recycles=None, last_reason=None, last_recycle_time=None,
        serving=False, by_reason={})


def host_status(group: str, spec: "HostSpec", standby: int, control_url: str,
                infos: Sequence[Mapping[str, Any]]) -> HostStatus:
    """A host that answered: its slots from ``getAllProcessInfo`` (any group)."""
    names = ["%s_%02d" % (group, i) for i in range(spec.count + standby)]
    mine = {i.get("name"): i for i in infos if i.get("group") == group}
    up = sum(1 for n in names if mine.get(n, {}).get("state") in _UP)
    workers = tuple(remote_worker_view(n, mine.get(n), up < spec.count) for n in names)
    return HostStatus(name=spec.name, address=spec.address, control_url=control_url,
                      backup=spec.backup, count=spec.count, standby=standby, workers=workers)


def host_down(spec: "HostSpec", standby: int, control_url: str, reason: str) -> HostStatus:
    return HostStatus(name=spec.name, address=spec.address, control_url=control_url,
                      backup=spec.backup, count=spec.count, standby=standby, workers=(),
                      error=reason)


def unreachable_reason(url: str, exc: BaseException, timeout: float) -> str:
    """Why a host's supervisord did not answer, in one line."""
    if isinstance(exc, xmlrpc.client.ProtocolError):
        if exc.errcode == 401:
            return ("%s refused the credentials: control.username and control.password "
                    "differ from that host's" % url)
        return "%s answered HTTP %d %s, not XML-RPC" % (url, exc.errcode, exc.errmsg)
    if isinstance(exc, xmlrpc.client.Fault):
        return "supervisord at %s refused: %s" % (url, exc.faultString)
    if isinstance(exc, TimeoutError):
        return "no answer from %s within %gs" % (url, timeout)
    if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
        return ("connection refused at %s: is the host's supervisord running, "
                "rendered with this control.inet_port?" % url)
    if isinstance(exc, OSError) and exc.errno:
        return "cannot reach %s: %s" % (url, os.strerror(exc.errno))
    return "%s did not answer XML-RPC: %s" % (url, exc or type(exc).__name__)


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
                     format_duration(w.age_seconds),
                     "-" if w.recycles is None else str(w.recycles),
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
        "workers": [_worker_json(w) for w in status.workers],
    }


def _worker_json(w: WorkerView) -> dict:
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
    """A :class:`WorkerView` back from :func:`_worker_json` (a host's fcgi.status())."""
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


_HOST_COLUMNS = ("HOST", "WORKER", "STATE", "PID", "AGE", "NOTE")
_FULL_HOST_COLUMNS = ("HOST", "WORKER", "STATE", "PID", "RSS", "REQS", "AGE", "RECYCLES", "NOTE")

#: Printed under the multi-host table: what it cannot show, and where to look.
REMOTE_NOTE = ("Remote hosts show supervisord's view only (state, pid, uptime); RSS, requests, "
               "in-flight requests and recycles: FCGI_TOOLKIT_HOST=NAME fcgi-toolkit status "
               "on that host.")


def format_hosts_table(status: DeploymentStatus) -> str:
    """The multi-host table: a row per slot of every host (one row for a
    host that is down), a summary line, then :data:`REMOTE_NOTE`."""
    full = any(h.full for h in status.hosts)
    columns = _FULL_HOST_COLUMNS if full else _HOST_COLUMNS
    rows = [columns]
    for h in status.hosts:
        if not h.up:
            rows.append((h.name, "-", "down") + ("-",) * (len(columns) - 4) + (h.error or "",))
            continue
        for w in h.workers:
            notes = ["backup host"] if h.backup else []
            if w.inflight:
                notes.append("%s %s (%s)" % (w.inflight.method, w.inflight.uri,
                                             format_duration(w.inflight.seconds)))
            counts = (format_bytes(w.rss_bytes), "-" if w.requests is None else str(w.requests))
            rows.append((h.name, w.name, w.state, str(w.pid) if w.pid else "-")
                        + (counts if full else ()) + (format_duration(w.age_seconds),)
                        + (("-" if w.recycles is None else str(w.recycles),) if full else ())
                        + ("; ".join(notes),))
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(r, widths)) + "  " + r[-1]
             for r in rows]
    note = "" if all(h.full for h in status.hosts if h.up) and full else REMOTE_NOTE + "\n"
    return "\n".join(line.rstrip() for line in lines) + "\n" + hosts_summary_line(status) + "\n" + note


def hosts_summary_line(status: DeploymentStatus) -> str:
    down = status.down
    up = len(status.hosts) - len(down)
    line = "%s: %d host%s, %d up, %d down" % (status.group, len(status.hosts),
                                            "" if len(status.hosts) == 1 else "s", up, len(down))
    if down:
        line += " (%s)" % ", ".join(down)
    running = sum(h.running for h in status.hosts)
    wanted = sum(h.count for h in status.hosts)
    return line + "; %d/%d workers running" % (running, wanted)


def hosts_to_json(status: DeploymentStatus) -> dict:
    """The documented multi-host ``status --json`` object (module docstring)."""
    return {
        "group": status.group,
        "generated_at": status.generated_at,
        "up": len(status.hosts) - len(status.down),
        "down": status.down,
        "hosts": [{
            "name": h.name,
            "address": h.address,
            "control_url": h.control_url,
            "backup": h.backup,
            "up": h.up,
            "error": h.error,
            "count": h.count,
            "standby": h.standby,
            "running": h.running,
            "workers": [_worker_json(w) for w in h.workers],
        } for h in status.hosts],
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
    """The ``supervisor`` XML-RPC namespace of the deployment's supervisord
    (its own private unix socket, or control.system_supervisord's serverurl)."""
    from supervisor.xmlrpc import SupervisorTransport
    from fcgi_toolkit.supervisorconf import control_client
    client = control_client(dep)
    transport = SupervisorTransport(client.username or None, client.password or None, client.serverurl)
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
    from fcgi_toolkit.supervisorconf import control_client
    where = server_url or control_client(dep).serverurl
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
        start = ("the distribution's supervisord (systemctl start supervisor)" if dep.control.system_supervisord
                 else "fcgi-toolkit run -c %s" % dep.path)
        return "supervisord is not running (%s: %s); start it with: %s" % (
            where, os.strerror(exc.errno), start)
    return "cannot reach supervisord at %s: %s" % (where, exc.strerror or exc)


# -- several hosts -------------------------------------------------------------

#: Seconds each host's supervisord has to answer (connect, then each read).
HOST_TIMEOUT = 5.0


class TimedSupervisorTransport(SupervisorTransport):
    """supervisor's XML-RPC transport (basic auth, persistent connection)
    over ``http://host:port`` with a socket timeout, so that a blackholed
    host costs ``timeout`` seconds instead of hanging ``status``."""

    def __init__(self, username: Optional[str], password: Optional[str], serverurl: str,
                 timeout: float):
        super().__init__(username, password, serverurl)
        parsed = urllib.parse.urlparse(serverurl)
        host, port = parsed.hostname, parsed.port or 80
        self._get_connection = lambda: http.client.HTTPConnection(host, port, timeout=timeout)


def control_url(dep: "Deployment", spec: "HostSpec") -> str:
    """Where host ``spec``'s supervisord listens: control.inet_port on its own IP."""
    return "http://%s:%s" % (spec.ip, dep.control.inet_port)


def host_proxy(url: str, username: str, password: str,
               timeout: float = HOST_TIMEOUT) -> xmlrpc.client.ServerProxy:
    """An XML-RPC proxy of one host's supervisord; use it as a context manager."""
    return xmlrpc.client.ServerProxy(
        url + "/RPC2", transport=TimedSupervisorTransport(username, password, url, timeout))


def query_host(group: str, spec: "HostSpec", standby: int, url: str, server: Any,
               timeout: float) -> HostStatus:
    """Ask one host's supervisord (``server``: a ServerProxy-like context
    manager) who it is and what its processes are; a host that does not
    answer, or answers as another supervisord, is down."""
    expected = "%s_%s" % (group, spec.name)   # identifier in the host's supervisord.conf
    try:
        with server:
            rpc = server.supervisor
            identity = rpc.getIdentification()
            if identity != expected:
                return host_down(spec, standby, url,
                                 "%s is supervisord %r, not %r: control.inet_port of another "
                                 "deployment or host?" % (url, identity, expected))
            infos = rpc.getAllProcessInfo()
            full = host_group_status(server)
    except (OSError, xmlrpc.client.Error, http.client.HTTPException, ExpatError) as exc:
        return host_down(spec, standby, url, unreachable_reason(url, exc, timeout))
    if full is not None:
        # The host's own status (fcgi_toolkit.rpcinterface): RSS, requests, in flight, recycles.
        return HostStatus(name=spec.name, address=spec.address, control_url=url, backup=spec.backup,
                          count=spec.count, standby=standby, full=True,
                          workers=tuple(worker_from_json(w) for w in full["workers"]))
    return host_status(group, spec, standby, url, infos)


def host_group_status(server: Any) -> Optional[dict]:
    """The host's ``fcgi.status()`` as the ``status --json`` dict; None when
    its supervisord has no fcgi plugin (configured before it existed) or the
    plugin failed (then supervisord's own view is shown)."""
    from supervisor.xmlrpc import Faults
    from fcgi_toolkit.rpcinterface import decode_status
    try:
        return decode_status(server.fcgi.status())
    except xmlrpc.client.Fault as exc:
        if exc.faultCode != Faults.UNKNOWN_METHOD:
            log.warning("fcgi.status() failed: %s; showing supervisord's view", exc.faultString)
        return None
    except ValueError as exc:
        log.warning("fcgi.status() answered no status object (%s); showing supervisord's view", exc)
        return None


def require_host_control(dep: "Deployment") -> None:
    """Raise ConfigError (one line) unless the hosts' control ports are configured."""
    from fcgi_toolkit.settings import ConfigError
    if not dep.control.inet_port:
        raise ConfigError(
            "%s: control.inet_port = '': status on the web server asks each host's supervisord "
            "over TCP; set control.inet_port, control.username and control.password (then render "
            "and restart the hosts), or run status on a host: FCGI_TOOLKIT_HOST=NAME "
            "fcgi-toolkit status -c %s" % (dep.path, dep.path))


def gather_hosts(dep: "Deployment", connect: Optional[Callable[[str], Any]] = None,
                 timeout: float = HOST_TIMEOUT, now: Optional[float] = None) -> DeploymentStatus:
    """Every host of the front view ``dep``, asked at once (a slow host
    costs at most ``timeout``, not ``timeout`` per host).

    ``connect(url)`` returns a ServerProxy-like context manager (default:
    :func:`host_proxy` with control.username/password).
    """
    require_host_control(dep)
    if connect is None:
        def connect(url: str) -> xmlrpc.client.ServerProxy:
            return host_proxy(url, dep.control.username, dep.control.password, timeout)
    now = time.time() if now is None else now
    standby = dep.workers.standby

    def one(spec: "HostSpec") -> HostStatus:
        url = control_url(dep, spec)
        try:
            server = connect(url)
        except (OSError, ValueError) as exc:
            return host_down(spec, standby, url, unreachable_reason(url, exc, timeout))
        return query_host(dep.name, spec, standby, url, server, timeout)

    with ThreadPoolExecutor(max_workers=min(8, len(dep.hosts)),
                            thread_name_prefix="status-host") as pool:
        hosts = tuple(pool.map(one, dep.hosts))
    return DeploymentStatus(group=dep.name, hosts=hosts, generated_at=now)


# --------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default="deploy.toml",
                        help="deployment file (default: deploy.toml)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (documented in README: Operator commands)")
    parser.add_argument("--timeout", type=float, default=HOST_TIMEOUT, metavar="SECONDS",
                        help="with [[hosts]], on the web server: how long each host's supervisord "
                             "has to answer (default: %(default)gs)")


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 shown; 1 supervisord (or, on a multi-host web
    server, any host) did not answer; 2 bad deployment file."""
    from fcgi_toolkit import settings
    dep = settings.load(args.config)
    if dep.multi_host and dep.host is None:
        return run_hosts(dep, args.json, args.timeout)
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


def run_hosts(dep: "Deployment", as_json: bool, timeout: float = HOST_TIMEOUT) -> int:
    """``status`` on the web server of a multi-host deployment; 1 if any host is down."""
    deployment = gather_hosts(dep, timeout=timeout)
    if as_json:
        print(json.dumps(hosts_to_json(deployment), indent=2, sort_keys=False))
    else:
        sys.stdout.write(format_hosts_table(deployment))
    for h in deployment.hosts:
        if not h.up:
            print("fcgi-toolkit: host %s is down: %s" % (h.name, h.error), file=sys.stderr)
    return 1 if deployment.down else 0
