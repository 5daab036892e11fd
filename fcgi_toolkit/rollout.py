"""``apply`` on the web server of a multi-host deployment: every host that
needs it gets a new generation, one host at a time, out of rotation.

For each host to change, in the file's order::

    nginx re-rendered with the host "down"; graceful reload; wait until the
        old nginx workers finished (the requests they had sent the host)
    fcgi.respawn(sha256 of the file) on the host's control port: its
        supervisord drains its workers and exits, its run starts a new
        one from the file (fcgi_toolkit.respawn)
    wait: the host answers again with workers.count ready workers that
        are not the old ones (rollout_plan.check_host)
    nginx re-rendered with the host back, at its new address; reload

The other hosts serve meanwhile.  A host that does not come back (its app
does not import, a worker cannot bind...) is started again from the file
it ran before (``fcgi.respawn(previous=True)``) and put back into rotation;
``apply`` says why and exits 1 without touching the hosts after it.  Keys
only nginx uses are taken by the reloads (or by one reload when no host
restarts).  Before anything changes every host must answer, run the same
file (sha256) and have been started by ``fcgi-toolkit run``.

The decisions are pure (:mod:`fcgi_toolkit.rollout_plan`); :class:`Roller`
is the shell, its collaborators injected.
"""
from __future__ import annotations

import http.client
import json
import os
import sys
import time
import xmlrpc.client
from dataclasses import replace
from typing import Any, Callable, Mapping, Optional
from xml.parsers.expat import ExpatError

from fcgi_toolkit import applying, rollout_plan, statefile
from fcgi_toolkit.names import format_duration
from fcgi_toolkit.rollout_plan import Phase
from fcgi_toolkit.settings import Deployment, HostSpec

#: What status on the web server shows while a rollout is under way.
STATE = "rollout.json"
#: Seconds between two looks at a restarting host.
POLL = 0.2
#: Seconds each call to a host's supervisord has to answer.
CALL_TIMEOUT = 10.0
#: Seconds a host has beyond draining and readiness to start its new supervisord.
START_MARGIN = 30.0

_UNREACHABLE = (OSError, xmlrpc.client.Error, http.client.HTTPException, ExpatError)


class HostRefused(Exception):
    """A host cannot take part (down, another file, not run by run); one line."""


def state_path(dep: Deployment) -> str:
    return os.path.join(dep.runtime_dir, STATE)


def read_state(dep: Deployment) -> Optional[dict]:
    """The rollout under way (host, phase, done, since), None when none is."""
    data = statefile.read_json(state_path(dep), quiet=True)
    return data if isinstance(data, dict) else None


def restart_timeout(running: Mapping[str, Any], view: Deployment) -> float:
    """How long a host has to drain its old workers, start its new
    supervisord and have its new workers ready."""
    from fcgi_toolkit.render import stop_waits
    drain = max(float(running.get("workers.graceful_timeout") or 0),
                view.workers.graceful_timeout)
    return drain + stop_waits(view)["watchdog"] + view.recycle.ready_timeout + START_MARGIN


def default_connect(dep: Deployment, timeout: float = CALL_TIMEOUT) -> Callable[[HostSpec], Any]:
    """A proxy of a host's supervisord over its control port."""
    from fcgi_toolkit import supervisord
    from fcgi_toolkit.status_hosts import control_url

    def connect(spec: HostSpec) -> Any:
        return supervisord.proxy(control_url(dep, spec), dep.control.username,
                                 dep.control.password, timeout)
    return connect


class Roller:
    """One rollout of the front view ``dep`` (the deployment file as the web
    server reads it).  ``connect(spec)`` gives a host's supervisord proxy
    (``.supervisor``, ``.fcgi``); ``reload_nginx(files)`` writes the web
    server's files and reloads nginx gracefully, waiting for the old nginx
    workers when ``drain`` is true."""

    def __init__(self, dep: Deployment, out: Any, err: Any,
                 connect: Callable[[HostSpec], Any],
                 reload_nginx: Callable[[Deployment, bool], bool],
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 alive: Callable[[Any], bool] = lambda pid: _alive(pid)):
        self.dep = dep
        self.out, self.err = out, err
        self.connect = connect
        self.reload_nginx = reload_nginx
        self.clock, self.sleep = clock, sleep
        self.alive = alive
        self.digest = ""
        self.running: dict[str, dict] = {}      # host -> its applied snapshot
        self.specs: dict[str, HostSpec] = {}    # host -> its entry as it runs
        self.done: list[str] = []

    # -- talking to hosts -------------------------------------------------

    def _call(self, spec: HostSpec, what: Callable[[Any], Any]) -> Any:
        server = self.connect(spec)
        with server:
            return what(server)

    def _status(self, spec: HostSpec) -> Optional[dict]:
        """The host's ``fcgi.status()`` object, None while it does not answer."""
        from fcgi_toolkit.rpcinterface import decode_status
        try:
            return decode_status(self._call(spec, lambda s: s.fcgi.status()))
        except _UNREACHABLE + (ValueError,):
            return None

    def _preflight(self, spec: HostSpec) -> tuple[dict, dict]:
        """(the host's applied snapshot, its status); HostRefused with why."""
        from fcgi_toolkit.rpcinterface import decode_status
        from fcgi_toolkit.status_hosts import control_url, unreachable_reason
        url = control_url(self.dep, spec)
        expected = "%s_%s" % (self.dep.name, spec.name)

        def ask(server: Any) -> tuple[str, str, str]:
            return (server.supervisor.getIdentification(), server.fcgi.applied(),
                    server.fcgi.status())
        try:
            identity, applied, status = self._call(spec, ask)
        except xmlrpc.client.Fault as exc:
            from supervisor.xmlrpc import Faults
            if exc.faultCode == Faults.UNKNOWN_METHOD:
                raise HostRefused("host %s: its supervisord has no fcgi.applied (started before "
                                  "this fcgi-toolkit): stop it and run it again once"
                                  % spec.name) from None
            raise HostRefused("host %s: %s" % (spec.name, exc.faultString)) from None
        except _UNREACHABLE as exc:
            raise HostRefused("host %s: %s" % (spec.name, unreachable_reason(url, exc, CALL_TIMEOUT))) from None
        if identity != expected:
            raise HostRefused("host %s: %s is supervisord %r, not %r" % (spec.name, url, identity,
                                                                       expected))
        info = json.loads(applied)
        if info.get("digest") != self.digest:
            raise HostRefused("host %s: its %s is not this file (sha256 %s..., here %s...): copy "
                              "the same deployment file to every host" % (
                                  spec.name, self.dep.path, str(info.get("digest"))[:12],
                                  self.digest[:12]))
        if not isinstance(info.get("values"), dict):
            raise HostRefused("host %s: no applied deployment: was it started by fcgi-toolkit "
                              "run?" % spec.name)
        if not info.get("respawn"):
            raise HostRefused("host %s: its supervisord was not started by fcgi-toolkit run, "
                              "so nothing would start it again" % spec.name)
        return info["values"], decode_status(status)

    # -- the rollout ------------------------------------------------------

    def say(self, text: str) -> None:
        print("apply: %s" % text, file=self.out, flush=True)

    def refuse(self, text: str) -> int:
        print("fcgi-toolkit: %s" % text, file=self.err, flush=True)
        return 1

    def view(self, out: Optional[str] = None) -> Deployment:
        """The web server's view while ``out`` is out of rotation: hosts not
        restarted yet as they run, restarted ones as the file says."""
        servers = rollout_plan.upstream(self.dep.hosts, self.specs, self.done)
        return replace(self.dep, hosts=servers,
                       out_of_rotation=frozenset([out]) if out else frozenset())

    def record(self, host: str, phase: Phase, since: float) -> None:
        os.makedirs(self.dep.runtime_dir, exist_ok=True)
        statefile.write_json_atomic(state_path(self.dep), {
            "host": host, "phase": phase.value, "done": list(self.done), "since": since,
            "pid": os.getpid()})

    def run(self, everyone: bool = False) -> int:
        """0 every host runs the file; 1 not (said on err: what did not
        change, and what did)."""
        from fcgi_toolkit import respawn
        self.digest = respawn.digest(self.dep.path)
        under_way = read_state(self.dep)
        if under_way is not None and self.alive(under_way.get("pid")):
            return self.refuse("%s: a rollout (host %s, %s) is under way (apply pid %s); wait "
                               "for it" % (self.dep.path, under_way.get("host"),
                                           under_way.get("phase"), under_way.get("pid")))
        if under_way is not None:
            self.say("the rollout of apply pid %s stopped at host %s (%s); this one takes over"
                     % (under_way.get("pid"), under_way.get("host"), under_way.get("phase")))
        statuses: dict[str, dict] = {}
        problems = []
        for spec in self.dep.hosts:
            try:
                self.running[spec.name], statuses[spec.name] = self._preflight(spec)
            except HostRefused as exc:
                problems.append(str(exc))
        if problems:
            for line in problems:
                print("fcgi-toolkit: %s" % line, file=self.err)
            return self.refuse("not applied: every host must answer with the same file; "
                               "nothing changed")
        for name, values in self.running.items():
            spec = rollout_plan.running_spec(name, values)
            if spec is not None:
                self.specs[name] = spec
        wanted = {name: applying.values(self.dep.for_host(name)) for name in self.dep.host_names()}
        todo = rollout_plan.plan(self.running, wanted, self.dep.host_names(), everyone)
        if todo.fixed:
            return self.refuse("%s: not applied, stop and run again: %s; nothing changed" % (
                self.dep.path, ", ".join("%s (host %s)" % (k, h) for h, k in todo.fixed)))
        if todo.hosts and len(self.dep.hosts) < 2:
            return self.refuse("%s: not applied: a host restarts out of rotation, and %s is the "
                               "only host; nothing changed" % (self.dep.path, todo.names[0]))
        if todo.hosts:
            self.say("%d host%s, one at a time, out of rotation: %s" % (
                len(todo.hosts), "" if len(todo.hosts) == 1 else "s", ", ".join(
                    "%s (%s)" % (h.name, ", ".join(h.keys) or "--new-supervisord")
                    for h in todo.hosts)))
        try:
            for host in todo.hosts:
                status = self.restart_host(host.name, statuses[host.name])
                if status:
                    return status
            if self.reload_nginx(self.view(), False):
                self.say("nginx reloaded gracefully%s" % (
                    " (%s)" % ", ".join(todo.nginx) if todo.nginx and not todo.hosts else ""))
        except ReloadError as exc:
            state = read_state(self.dep)
            where = "host %s %s" % (state["host"], state["phase"]) if state else "the last reload"
            return self.refuse("nginx: %s; the rollout stopped at %s (done: %s)" % (
                exc, where, ", ".join(self.done) or "none"))
        finally:
            statefile.remove(state_path(self.dep))
        if not todo.hosts and not todo.nginx:
            self.say("nothing changed")
        elif todo.hosts:
            self.say("every host runs %s: %s" % (self.dep.path, ", ".join(todo.names)))
        return 0

    def restart_host(self, name: str, status: Mapping[str, Any]) -> int:
        """One host out of rotation, restarted, back; 0, or 1 (rolled back)."""
        spec = next(h for h in self.dep.hosts if h.name == name)
        since = time.time()
        if rollout_plan.alone(self.view().hosts, name):
            return self.refuse("not applied on %s: no other host would serve" % name)
        self.record(name, Phase.OUT, since)
        self.reload_nginx(self.view(out=name), True)
        self.say("%s out of rotation (nginx reloaded; the requests it had are done)" % name)
        old_pids = rollout_plan.serving_pids(status)
        self.record(name, Phase.RESTARTING, since)
        try:
            self._call(self.specs.get(name, spec),
                       lambda s: s.fcgi.respawn(self.digest, False))
        except (xmlrpc.client.Fault,) + _UNREACHABLE as exc:
            why = exc.faultString if isinstance(exc, xmlrpc.client.Fault) else str(exc)
            self.reload_nginx(self.view(), False)
            return self.refuse("not applied on %s (it serves as before, back in rotation): %s"
                               % (name, why))
        view = self.dep.for_host(name)
        self.say("%s: a new supervisord from the file, waiting for %d ready worker%s" % (
            name, view.workers.count, "" if view.workers.count == 1 else "s"))
        timeout = restart_timeout(self.running[name], view)
        failed = self.wait_back(spec, view.workers.count, old_pids, timeout)
        if not failed:
            self.done.append(name)
            self.record(name, Phase.BACK, since)
            self.reload_nginx(self.view(), False)
            self.say("%s back in rotation (%s)" % (name, spec.address))
            return 0
        return self.roll_back(name, spec, failed, old_pids, since)

    def wait_back(self, spec: HostSpec, count: int, old_pids: list, timeout: float) -> str:
        """Wait until the host is back; "" when it is, else why not."""
        began = self.clock()
        while True:
            verdict = rollout_plan.check_host(self._status(spec), count, old_pids,
                                              self.clock() - began, timeout)
            if verdict.ready:
                return ""
            if verdict.failed:
                return verdict.failed
            self.sleep(POLL)

    def roll_back(self, name: str, new_spec: HostSpec, why: str, old_pids: list,
                  since: float) -> int:
        """The host's previous file again, back into rotation; always 1."""
        self.record(name, Phase.ROLLING_BACK, since)
        print("fcgi-toolkit: host %s: %s; starting its previous deployment again" % (name, why),
              file=self.err, flush=True)
        old_spec = self.specs.get(name, new_spec)
        # The failed supervisord listens where the file says; the previous one where it ran.
        try:
            self._call(new_spec, lambda s: s.fcgi.respawn("", True))
        except (xmlrpc.client.Fault,) + _UNREACHABLE as exc:
            return self.refuse("not applied on %s, and it could not be asked to start its "
                               "previous deployment (%s): it stays out of rotation; start it "
                               "(fcgi-toolkit run), then apply again" % (name, exc))
        count = int(self.running[name].get("workers.count") or 1)
        failed = self.wait_back(old_spec, count, old_pids,
                                restart_timeout(self.running[name], self.dep.for_host(name)))
        if failed:
            return self.refuse("not applied on %s, and its previous deployment did not come back "
                               "either (%s): it stays out of rotation" % (name, failed))
        self.reload_nginx(self.view(), False)
        done = (": %s run%s the file" % (", ".join(self.done), "" if len(self.done) > 1 else "s")
                if self.done else "; no host changed")
        return self.refuse("not applied on %s: %s; %s serves its previous deployment again, back "
                           "in rotation; hosts after it untouched%s" % (name, why, name, done))


def nginx_reloader(dep: Deployment, output_dir: str,
                   out: Any) -> Callable[[Deployment, bool], bool]:
    """Write the web server's files into ``output_dir`` and reload the
    system nginx gracefully when they changed; with ``drain`` wait for the
    old nginx workers to finish.  Whether nginx was reloaded.  The views
    differ from ``dep`` in their hosts only: the machine is probed once."""
    from fcgi_toolkit import nginxctl, render
    host = render.Host.probe(dep)

    def reload(view: Deployment, drain: bool) -> bool:
        files = render.web_server_files(view, host, output_dir)
        if all(_reads(os.path.join(output_dir, n)) == text for n, text in files.items()):
            return False
        render.write_atomic(files, output_dir)
        try:
            before = nginxctl.reload(view, None, host.nginx_binary, managed=False)
        except nginxctl.ReloadFailed as exc:
            raise ReloadError(str(exc)) from None
        if drain:
            warning = nginxctl.wait_old_gone(view, before)
            if warning:
                print("apply: warning: %s" % warning, file=out, flush=True)
        return True
    return reload


class ReloadError(Exception):
    """nginx refused or did not take a reload (one line)."""


def _alive(pid: Any) -> bool:
    """Whether the apply that recorded a rollout still runs (another process
    than this one; a pid we may not signal exists)."""
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reads(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def apply(dep: Deployment, output_dir: Optional[str] = None, out: Any = sys.stdout,
          err: Any = sys.stderr, new_supervisord: bool = False) -> int:
    """``apply`` on the web server (the front view of a ``[[hosts]]`` file)."""
    from fcgi_toolkit.status_hosts import require_host_control
    require_host_control(dep)
    roller = Roller(dep, out, err, default_connect(dep),
                    nginx_reloader(dep, os.path.abspath(output_dir or dep.runtime_dir), out))
    return roller.run(everyone=new_supervisord)


def format_state(state: Mapping[str, Any], now: Optional[float] = None) -> str:
    """The rollout under way, in one line for status."""
    now = time.time() if now is None else now
    done = state.get("done") or []
    try:
        since = float(state["since"])
    except (KeyError, TypeError, ValueError):
        since = now
    return "rollout under way: host %s %s for %s%s" % (
        state.get("host"), state.get("phase"), format_duration(max(0.0, now - since)),
        "; done: %s" % ", ".join(map(str, done)) if done else "")
