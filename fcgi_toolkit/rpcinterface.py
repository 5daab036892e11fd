"""The supervisord RPC plugin ``[rpcinterface:fcgi]``: the group's status,
recycle and reload as XML-RPC methods served by supervisord itself.

Every rendered supervisord configuration (``supervisord.conf`` of ``run``,
the conf.d fragment of ``install``) carries::

    [rpcinterface:fcgi]
    supervisor.rpcinterface_factory = fcgi_toolkit.rpcinterface:make_rpcinterface
    deploy = /srv/wiki/deploy.toml
    host = web1            ; a host of a [[hosts]] file only

so whoever may talk to that supervisord (its unix socket, or its TCP control
port with control.username/password: the credentials are supervisord's own)
also reads the full picture: multi-host ``status`` on the web server asks
every host's ``fcgi.status()`` over the control connection it already has.

Methods (namespace ``fcgi``):

* ``fcgi.getAPIVersion()`` -> ``"2"`` (2 added ``applied`` and ``respawn``)
* ``fcgi.status()`` -> the ``status --json`` object as a JSON **string**
  (XML-RPC has no null and only 32-bit integers; RSS does not fit);
* ``fcgi.recycle(worker)`` / ``fcgi.reload()`` -> a request id: the request
  is queued for the watchdog exactly as ``fcgi-toolkit recycle``/``reload``
  queue it (one coordinator, one concurrency guard);
* ``fcgi.result(request_id)`` -> the watchdog's answer as a JSON string,
  ``""`` while it has not answered;
* ``fcgi.applied()`` -> a host's running deployment as a JSON string:
  ``{"values": <applied snapshot>, "digest": <sha256 of its deployment
  file>, "respawn": <started by run>, "pid": <supervisord's pid>}``;
* ``fcgi.respawn(digest, previous)`` -> True: a host of a ``[[hosts]]``
  file, out of nginx's rotation, replaced by a new supervisord that its
  ``run`` starts from the file (``digest`` must be the file's sha256), or
  from the previous one (``previous``); see :mod:`fcgi_toolkit.respawn`.

supervisord runs plugins in its single-threaded main loop: every method
returns at once (status reads supervisord's own process table in process,
the scoreboard and /proc; recycle and reload only queue).
"""
from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Optional

from supervisor.xmlrpc import Faults, RPCError

API_VERSION = "2"


class FcgiRPCInterface:
    """The ``fcgi`` namespace.  ``load()`` returns the deployment (re-read
    on every call, as the commands do); ``processes()`` supervisord's
    process infos (``getAllProcessInfo``)."""

    def __init__(self, load: Callable[[], Any], processes: Callable[[], list],
                 shutdown: Callable[[], None] = lambda: None,
                 supervised: Callable[[], bool] = lambda: False):
        self._load = load
        self._processes = processes
        self._shutdown = shutdown
        self._supervised = supervised

    def getAPIVersion(self) -> str:
        """Version of the fcgi namespace's API."""
        return API_VERSION

    def _deployment(self) -> Any:
        from fcgi_toolkit.settings import ConfigError
        try:
            return self._load()
        except ConfigError as exc:
            raise RPCError(Faults.FAILED, str(exc)) from None

    def status(self) -> str:
        """The group's status, the ``status --json`` object as a JSON string."""
        from fcgi_toolkit import status
        dep = self._deployment()
        return json.dumps(status.to_json(status.gather(dep, _Processes(self._processes))))

    def recycle(self, worker: str) -> str:
        """Queue a graceful recycle of ``worker`` for the watchdog; return the request id."""
        if not isinstance(worker, str) or not worker:
            raise RPCError(Faults.BAD_ARGUMENTS, "worker: a slot name like wiki_01")
        return self._enqueue({"op": "recycle", "worker": worker})

    def reload(self) -> str:
        """Queue a rolling reload of every worker; return the request id."""
        return self._enqueue({"op": "reload"})

    def result(self, request_id: str) -> str:
        """The watchdog's answer to a request as a JSON string; "" while pending."""
        from fcgi_toolkit import statefile
        answer = statefile.result(self._deployment().runtime_dir, request_id)
        return "" if answer is None else json.dumps(answer)

    def applied(self) -> str:
        """This host's running deployment (see the module docstring) as a JSON string."""
        import os
        from fcgi_toolkit import applying, respawn
        dep = self._deployment()
        return json.dumps({"values": applying.load(dep), "digest": respawn.digest(dep.path),
                           "respawn": self._supervised(), "pid": os.getpid()})

    def respawn(self, digest: str, previous: bool = False) -> bool:
        """Stop this supervisord so that its ``run`` starts a new one from the
        deployment file whose sha256 is ``digest`` (or, ``previous``, from
        the file it ran before); refused, nothing changed, when that cannot be."""
        from fcgi_toolkit import render, respawn, runner
        from fcgi_toolkit.settings import ConfigError
        dep = self._deployment()
        if dep.host is None:
            raise RPCError(Faults.FAILED, "%s: a new supervisord is for a host of a [[hosts]] "
                                          "file, out of rotation; here apply switches "
                                          "generations" % dep.path)
        if not self._supervised():
            raise RPCError(Faults.FAILED, "supervisord of host %s was not started by "
                                          "fcgi-toolkit run: nothing would start it again"
                                          % dep.host.name)
        if not previous:
            mine = respawn.digest(dep.path)
            if digest != mine:
                raise RPCError(Faults.FAILED, "%s on host %s is not the web server's file "
                                              "(sha256 %s..., not %s...): copy the same file to "
                                              "every host" % (dep.path, dep.host.name, mine[:12],
                                                              str(digest)[:12]))
            try:
                runner.check_runnable(dep)
                render.render_all(dep, render.Host.probe(dep), dep.runtime_dir)
            except ConfigError as exc:
                raise RPCError(Faults.FAILED, str(exc)) from None
        try:
            respawn.request(dep, previous)
        except (OSError, ValueError) as exc:
            raise RPCError(Faults.FAILED, str(exc)) from None
        self._shutdown()
        return True

    def _enqueue(self, request: Mapping[str, Any]) -> str:
        from fcgi_toolkit import statefile
        return statefile.enqueue(self._deployment().runtime_dir, dict(request))


class _Processes:
    """The part of the ``supervisor`` namespace :func:`status.gather` uses, in process."""

    def __init__(self, processes: Callable[[], list]):
        self.getAllProcessInfo = processes


def make_rpcinterface(supervisord: Any, **config: str) -> FcgiRPCInterface:
    """supervisord's factory (``supervisor.rpcinterface_factory``)."""
    from supervisor.rpcinterface import SupervisorNamespaceRPCInterface
    from fcgi_toolkit import respawn, settings

    deploy = config["deploy"]
    host: Optional[str] = config.get("host") or ""
    main = SupervisorNamespaceRPCInterface(supervisord)
    # supervisord's own shutdown (supervisor.shutdown): it drains its
    # processes, then exits, and its run starts the new one.
    return FcgiRPCInterface(lambda: settings.load(deploy, host=host), main.getAllProcessInfo,
                            shutdown=main.shutdown, supervised=respawn.supervised)


def decode_status(text: str) -> dict:
    """``fcgi.status()``'s answer as the ``status --json`` dict."""
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("workers"), list):
        raise ValueError("not a status object")
    return data
