"""``status`` on the web server of a multi-host deployment: every host's supervisord.

Each host is asked over its TCP control port (control.inet_port with
control.username/password, :func:`fcgi_toolkit.supervisord.proxy`), all at
once, each bounded by a timeout.  A host whose supervisord has our RPC plugin
(:mod:`fcgi_toolkit.rpcinterface`) answers ``fcgi.status()``: every worker in
full, as on the host.  A host without it shows supervisord's view only
(state, pid, uptime); a host that does not answer is "down".
"""
from __future__ import annotations

import errno
import http.client
import logging
import os
import time
import xmlrpc.client
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence
from xml.parsers.expat import ExpatError

from supervisor.states import ProcessStates, getProcessStateDescription

from fcgi_toolkit import supervisord
from fcgi_toolkit.names import CAPACITY_STATES, PROCESS_STATES, slot_names
from fcgi_toolkit.status_local import WorkerView, _number, derive_state, worker_from_json

if TYPE_CHECKING:
    from fcgi_toolkit.settings import Deployment, HostSpec

log = logging.getLogger(__name__)

#: Seconds each host's supervisord has to answer (connect, then each read).
HOST_TIMEOUT = 5.0


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
        """Workers RUNNING, warm standbys aside (the host's fcgi.status() tells
        them apart; from supervisord's view alone a standby counts as running)."""
        return sum(1 for w in self.workers if w.supervisor_state == "RUNNING" and w.state != "warm")


@dataclass(frozen=True)
class DeploymentStatus:
    """Every host of a multi-host deployment, seen from the web server."""
    group: str
    hosts: tuple[HostStatus, ...]
    generated_at: float
    #: The multi-host rollout under way on this web server (``apply``:
    #: fcgi_toolkit.rollout's state file), None when none is.
    rollout: Optional[Mapping[str, Any]] = None

    @property
    def down(self) -> list[str]:
        return [h.name for h in self.hosts if not h.up]


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
    up = code in PROCESS_STATES
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
    names = slot_names(group, spec.count + standby)
    mine = {i.get("name"): i for i in infos if i.get("group") == group}
    up = sum(1 for n in names if mine.get(n, {}).get("state") in CAPACITY_STATES)
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


def control_url(dep: "Deployment", spec: "HostSpec") -> str:
    """Where host ``spec``'s supervisord listens: control.inet_port on its own IP."""
    return "http://%s:%s" % (spec.ip, dep.control.inet_port)


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
    :func:`fcgi_toolkit.supervisord.proxy` with control.username/password).
    """
    require_host_control(dep)
    if connect is None:
        def connect(url: str) -> xmlrpc.client.ServerProxy:
            return supervisord.proxy(url, dep.control.username, dep.control.password, timeout)
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
    from fcgi_toolkit import rollout
    return DeploymentStatus(group=dep.name, hosts=hosts, generated_at=now,
                            rollout=rollout.read_state(dep))
