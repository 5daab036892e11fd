"""supervisorctl plugin: ``fcgi status``, ``fcgi recycle NAME``, ``fcgi reload``.

Enabled by the rendered supervisord.conf::

    [ctlplugin:fcgi]
    supervisor.ctl_factory = fcgi_toolkit.ctlplugin:make_plugin
    deploy = /path/to/deploy.toml
    host = app1            ; a host's supervisord.conf of a [[hosts]] file only

The command is ``fcgi``, never ``status``: supervisorctl's built-in
``status`` would shadow a plugin command of that name without a word.
``fcgi status`` talks to supervisord through supervisorctl's own connection
(so ``-s``, ``-u`` and ``-p`` apply); ``recycle`` and ``reload`` hand a
request to the watchdog through :mod:`fcgi_toolkit.control`, exactly like
``fcgi-toolkit recycle`` and ``fcgi-toolkit reload``.

supervisorctl imports this module each time it reads its configuration, so
the top level imports only supervisor itself.
"""
from __future__ import annotations

import json
import shlex
from typing import Any, Callable, Optional

from supervisor.supervisorctl import ControllerPluginBase, LSBInitExitStatuses

USAGE = (
    "fcgi status [--json]   every worker slot: state, pid, RSS, requests, in-flight request",
    "fcgi recycle NAME      gracefully replace one worker (NAME like wiki_01), capacity held",
    "fcgi reload            rolling restart of every worker, capacity held",
)


class FcgiControllerPlugin(ControllerPluginBase):
    """The ``fcgi`` command of supervisorctl.

    ``host`` is the ``[[hosts]]`` entry whose supervisord.conf this is
    (None: the FCGI_TOOLKIT_HOST environment variable decides, as for every
    command).  ``load_deployment`` (settings.load, called as
    ``load(deploy, host=host)``) and ``submit`` (hand a request to the
    watchdog and wait for its result; :func:`submit_request`) are injected so
    the plugin can be tested without files or a watchdog.
    """
    name = "fcgi"

    def __init__(self, controller: Any, deploy: str, host: Optional[str] = None,
                 load_deployment: Optional[Callable[..., Any]] = None,
                 submit: Optional[Callable[..., Optional[dict]]] = None):
        super().__init__(controller)
        self.deploy = deploy
        self.host = host
        self._load = load_deployment
        self._submit = submit or submit_request

    # supervisorctl entry points ------------------------------------------
    def do_fcgi(self, arg: str) -> None:
        try:
            words = shlex.split(arg)
        except ValueError as exc:
            return self._fail("fcgi: %s" % exc, LSBInitExitStatuses.INVALID_ARGS)
        if not words:
            return self._usage()
        sub, rest = words[0], words[1:]
        if sub == "status" and rest in ([], ["--json"]):
            return self._status(as_json=bool(rest))
        if sub == "recycle" and len(rest) == 1:
            return self._request("recycle %s" % rest[0], {"op": "recycle", "worker": rest[0]})
        if sub == "reload" and not rest:
            return self._request("reload", {"op": "reload"})
        return self._usage()

    def help_fcgi(self) -> None:
        for line in USAGE:
            self.ctl.output(line)

    # subcommands ----------------------------------------------------------
    def _status(self, as_json: bool) -> None:
        from fcgi_toolkit import status
        dep = self._deployment()
        if dep is None:
            return
        server_url = getattr(getattr(self.ctl, "options", None), "serverurl", None)
        rpc = self.ctl.get_supervisor()
        from fcgi_toolkit import generations, supervisord
        serving = generations.serving(dep)
        if serving.holder and server_url == "unix://" + serving.front_control_socket:
            # The front's supervisorctl: the workers are in an inner supervisord.
            server_url = "unix://" + serving.control_socket
            rpc = supervisord.control_proxy(serving)
        try:
            group = status.gather(serving, rpc, server_url=server_url)
        except status.SupervisorUnavailable as exc:
            return self._fail("fcgi: %s" % exc, LSBInitExitStatuses.NOT_RUNNING)
        if as_json:
            self.ctl.output(json.dumps(status.to_json(group), indent=2))
        else:
            self.ctl.output(status.format_table(group).rstrip("\n"))

    def _request(self, what: str, request: dict) -> None:
        """Hand ``request`` to the watchdog, as ``fcgi-toolkit recycle/reload`` do.

        The worker name is passed on as typed: the watchdog resolves
        ``wiki_01``, ``wiki:wiki_01`` and ``01`` and answers an unknown one."""
        from fcgi_toolkit import control
        from fcgi_toolkit.names import request_wait
        dep = self._deployment()
        if dep is None:
            return
        why = control.not_running(dep)
        if why:
            return self._fail("fcgi: %s" % why, LSBInitExitStatuses.NOT_RUNNING)
        timeout = request_wait(dep, request["op"])
        self.ctl.output("%s: asked the watchdog, waiting up to %ds" % (what, timeout))
        result = self._submit(dep, request, timeout, _LineWriter(self.ctl.output))
        if result is None:
            self._fail("fcgi: %s: no answer from the watchdog within %ds (see %s)" % (
                what, timeout, control.watchdog_log(dep)), LSBInitExitStatuses.GENERIC)
        elif result.get("ok"):
            self.ctl.output("%s: %s" % (what, result.get("message", "")))
        else:
            self._fail("fcgi: %s failed: %s" % (what, result.get("message", "")),
                       LSBInitExitStatuses.GENERIC)

    # helpers --------------------------------------------------------------
    def _deployment(self) -> Any:
        from fcgi_toolkit import settings
        load = self._load or settings.load
        try:
            return load(self.deploy, host=self.host)
        except settings.ConfigError as exc:
            self._fail("fcgi: %s" % exc, LSBInitExitStatuses.NOT_INSTALLED)
            return None

    def _usage(self) -> None:
        self.ctl.output("Usage:")
        self.help_fcgi()
        self.ctl.exitstatus = LSBInitExitStatuses.INVALID_ARGS

    def _fail(self, message: str, exitstatus: int) -> None:
        self.ctl.output(message)
        self.ctl.exitstatus = exitstatus


class _LineWriter:
    """A text stream that hands whole lines to supervisorctl's output()."""

    def __init__(self, output: Callable[[str], None]):
        self._output = output
        self._buffer = ""

    def write(self, text: str) -> int:
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            self._output(line)
        return len(text)

    def flush(self) -> None:
        pass


def submit_request(dep: Any, request: dict, timeout: float, out: Any) -> Optional[dict]:
    """The default ``submit``: :func:`fcgi_toolkit.control.submit`, imported on use."""
    from fcgi_toolkit import control
    return control.submit(dep, request, timeout, out)


def make_plugin(controller: Any, **config: str) -> FcgiControllerPlugin:
    """supervisorctl's ``supervisor.ctl_factory``; ``config`` is the section's
    other keys: ``deploy`` (required) and ``host`` (a host's supervisord.conf)."""
    deploy = config.get("deploy")
    if not deploy:
        raise ValueError("[ctlplugin:fcgi] needs deploy = /path/to/deploy.toml")
    return FcgiControllerPlugin(controller, deploy, host=config.get("host") or None)
