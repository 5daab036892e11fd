"""The thin gateway to supervisord: one proxy builder, start, stop, signal, log tail.

Every XML-RPC connection of the package is built by :func:`proxy` (the
private unix control socket, a host's TCP control port, or the
``SUPERVISOR_SERVER_URL`` supervisord gives its event listener).
:class:`Gateway` is the watchdog's view of one group: non-waiting
``startProcess(name, False)`` / ``stopProcess(name, False)``, signals, the
error line of a worker's log, and whether supervisord is shutting down.
Faults are named (:data:`FAULT_NAMES`), never numbers.
"""
from __future__ import annotations

import http.client
import re
import urllib.parse
import xmlrpc.client
from typing import Any, Mapping, Optional

from supervisor.states import SupervisorStates
from supervisor.xmlrpc import Faults, SupervisorTransport

FAULT_NAMES = {code: name for name, code in vars(Faults).items() if not name.startswith("_")}
#: Bytes of a worker's log read to find why it failed.
LOG_TAIL = 16384
_LOG_CHANNELS = ("Stdout", "Stderr")
#: supervisord states in which it stops its processes: the watchdog stands by.
STOPPING_STATES = (SupervisorStates.SHUTDOWN, SupervisorStates.RESTARTING)
_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*")


# --------------------------------------------------------------------------
# Connections
# --------------------------------------------------------------------------

class _TimedTransport(SupervisorTransport):
    """supervisor's transport (basic auth, persistent connection) over
    ``http://host:port`` with a socket timeout, so that a blackholed host
    costs ``timeout`` seconds instead of hanging the caller."""

    def __init__(self, username: Optional[str], password: Optional[str], serverurl: str,
                 timeout: float):
        super().__init__(username, password, serverurl)
        parsed = urllib.parse.urlparse(serverurl)
        host, port = parsed.hostname, parsed.port or 80
        self._get_connection = lambda: http.client.HTTPConnection(host, port, timeout=timeout)


def proxy(serverurl: str, username: Optional[str] = None, password: Optional[str] = None,
          timeout: Optional[float] = None) -> xmlrpc.client.ServerProxy:
    """An XML-RPC proxy of a supervisord: ``unix:///path`` or ``http://host:port``.

    ``timeout`` (http only) bounds the connect and every read.  The proxy is
    also a context manager (it closes its connection on exit).
    """
    if serverurl.startswith("unix://") or timeout is None:
        transport = SupervisorTransport(username, password, serverurl)
    else:
        transport = _TimedTransport(username, password, serverurl, timeout)
    url = "http://127.0.0.1" if serverurl.startswith("unix://") else serverurl + "/RPC2"
    return xmlrpc.client.ServerProxy(url, transport=transport)


def control_proxy(dep: Any) -> Any:
    """The ``supervisor`` namespace of the supervisord holding the workers
    (``dep``'s generation's: the front or an inner one, each on its own
    private unix socket), or control.system_supervisord's ``[supervisorctl]``."""
    from fcgi_toolkit.supervisorconf import control_client
    client = control_client(dep)
    return proxy(client.serverurl, client.username or None, client.password or None).supervisor


def front_proxy(dep: Any) -> Any:
    """The ``supervisor`` namespace of the front: the supervisord ``run``
    started, home of the managed nginx and of every inner supervisord
    (README "Generations"); :func:`control_proxy` when there is none."""
    if dep.control.system_supervisord:
        return control_proxy(dep)
    return proxy("unix://" + dep.front_control_socket).supervisor


def listener_proxy(env: Mapping[str, str]) -> xmlrpc.client.ServerProxy:
    """The proxy supervisord hands its children (as ``childutils.getRPCInterface``)."""
    return proxy(env["SUPERVISOR_SERVER_URL"], env.get("SUPERVISOR_USERNAME", ""),
                 env.get("SUPERVISOR_PASSWORD", ""))


# --------------------------------------------------------------------------
# Faults and log lines
# --------------------------------------------------------------------------

class CommandFailed(Exception):
    """An RPC call answered with a fault; ``fault`` is its name ("BAD_NAME")."""

    def __init__(self, method: str, fault: xmlrpc.client.Fault):
        self.code = fault.faultCode
        self.fault = FAULT_NAMES.get(fault.faultCode, str(fault.faultCode))
        super().__init__("%s: %s %s" % (method, self.fault, fault.faultString))

    @property
    def shutting_down(self) -> bool:
        """supervisord refused because it is shutting down (SHUTDOWN_STATE)."""
        return self.code == Faults.SHUTDOWN_STATE


def worker_error(text: str) -> str:
    """The line of a worker's log that best says why it failed."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if _ERROR_LINE.match(line.strip()):
            return line.strip()
    return lines[-1].strip() if lines else ""


# --------------------------------------------------------------------------
# The gateway
# --------------------------------------------------------------------------

class Gateway:
    """One group's processes through ``rpc`` (a proxy: ``rpc.supervisor.*``).

    Every call raises :class:`CommandFailed` on a fault it does not expect;
    starting a started process and stopping a stopped one are not faults.
    """

    def __init__(self, rpc: Any, group: str):
        self.rpc = rpc
        self.group = group
        self.logs_at_start: dict[str, dict[str, int]] = {}   # slot -> log_sizes at its last start

    def call(self, method: str, *args: Any, ok_faults: tuple = ()) -> Any:
        try:
            return getattr(self.rpc.supervisor, method)(*args)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode in ok_faults:
                return None
            raise CommandFailed(method, fault) from None

    def namespec(self, slot: str) -> str:
        return "%s:%s" % (self.group, slot)

    def processes(self) -> list[dict]:
        return self.call("getAllProcessInfo")

    def shutting_down(self) -> bool:
        """Whether supervisord is shutting down or restarting (``getState``)."""
        try:
            state = self.call("getState")
        except CommandFailed as exc:
            return exc.shutting_down
        return isinstance(state, Mapping) and state.get("statecode") in STOPPING_STATES

    def start(self, slot: str) -> None:
        self.logs_at_start[slot] = self.log_sizes(slot)
        self.call("startProcess", self.namespec(slot), False, ok_faults=(Faults.ALREADY_STARTED,))

    def start_program(self, name: str) -> None:
        """Start a program outside the group (the managed nginx)."""
        self.call("startProcess", name, False, ok_faults=(Faults.ALREADY_STARTED,))

    def stop(self, slot: str) -> None:
        self.call("stopProcess", self.namespec(slot), False, ok_faults=(Faults.NOT_RUNNING,))

    def signal(self, slot: str, signame: str) -> None:
        self.call("signalProcess", self.namespec(slot), signame, ok_faults=(Faults.NOT_RUNNING,))

    def log_sizes(self, slot: str) -> dict[str, int]:
        """How long the slot's logs are now (by channel): :meth:`read_error`
        then reads only what a start after this wrote."""
        sizes = {}
        for channel in _LOG_CHANNELS:
            try:
                sizes[channel] = int(self.call("tailProcess%sLog" % channel, self.namespec(slot),
                                               0, 0)[1])
            except (CommandFailed, OSError, LookupError, TypeError, ValueError):
                pass
        return sizes

    def read_error(self, slot: str, description: str = "",
                   since: Optional[Mapping[str, int]] = None) -> str:
        """The worker's last error line from its log (stderr is redirected to
        stdout); with ``since`` (:meth:`log_sizes` before the start) only from
        what was written after it, so an earlier life's error is not reported;
        by default since this gateway last started the slot."""
        if since is None:
            since = self.logs_at_start.get(slot)
        text = ""
        for channel in _LOG_CHANNELS:
            try:
                length = LOG_TAIL
                if since is not None and channel in since:
                    size = self.log_sizes(slot).get(channel, 0)
                    if size >= since[channel]:          # else rotated: the whole tail is new
                        length = min(LOG_TAIL, size - since[channel])
                text = (self.call("readProcess%sLog" % channel, self.namespec(slot), -length, 0)
                        or "") if length else ""
            except (CommandFailed, OSError):
                text = ""
            if worker_error(text):
                break
        return worker_error(text) or description or "no output in its log"
