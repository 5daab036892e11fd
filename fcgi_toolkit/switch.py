"""The generation switch: a new worker group next to the serving one, nginx
moved to it, the old one drained (``apply`` of an Applied.GENERATION key).

Steps, in one running supervisord (never ``supervisorctl update``: it stops
a changed group first, and the group's socket closes with its last worker)::

    render supervisord.conf with the new group's section (in place of the old)
    reloadConfig                      the new group is "added"
    addProcessGroup(new)              autostart=false: nothing starts yet
    startProcess(new_00 .. new_NN)    workers.count of them
    wait: each RUNNING and ready in the new scoreboard
        a worker exiting within startsecs, or not ready within
        recycle.ready_timeout: stop and removeProcessGroup(new), restore
        supervisord.conf, reloadConfig; the old generation never stopped
    nginx files re-rendered with the new upstream; graceful reload; wait
        for new nginx workers, then for the old ones to finish
    the generation state says: new serves; the watchdog re-reads (follows it)
    stopProcess(old_00), wait STOPPED; old_01 ...   one at a time, each drains
    removeProcessGroup(old)

The decisions are pure, in :mod:`fcgi_toolkit.switch_plan`; :class:`Switcher`
is the shell, its collaborators injected.
"""
from __future__ import annotations

import os
import time
import xmlrpc.client
from typing import Any, Callable, Mapping, Optional

from supervisor.xmlrpc import Faults

from fcgi_toolkit import generations, names, nginxctl, render, scoreboard
from fcgi_toolkit.switch_plan import (DrainFailed, Phase, SwitchFailed, added_group,
                                      all_stopped, check_start)
from fcgi_toolkit.names import PROMOTE_SIGNAL, STARTABLE_STATES
from fcgi_toolkit.settings import ConfigError, Deployment

#: Files of the web server the switch re-renders.
NGINX_FILES = ("nginx.conf", "nginx-site.conf")
#: Seconds beyond stopwaitsecs a stopping process has to reach STOPPED.
STOP_MARGIN = 10.0
#: Seconds after which a new worker still waiting as a standby is signalled again.
PROMOTE_AGAIN = 1.0


# --------------------------------------------------------------------------
# The shell
# --------------------------------------------------------------------------

def scoreboard_ready(dep: Deployment, standby: bool = False) -> dict[str, int]:
    """{slot name: pid} of the slots whose scoreboard record says ready (not
    draining); with ``standby``, of those waiting as warm standbys instead."""
    board = scoreboard.Scoreboard(dep.scoreboard_path, dep.slots)
    try:
        return {name: rec.pid for name, rec in zip(dep.slot_names(), board.read_all())
                if rec is not None and (rec.standby if standby else rec.ready and not rec.draining)}
    finally:
        board.close()


def scoreboard_standby(dep: Deployment) -> dict[str, int]:
    return scoreboard_ready(dep, standby=True)


def notify_watchdog(dep: Deployment, out: Any) -> Optional[str]:
    """Ask the watchdog to re-read (it follows the serving generation); why not, or None."""
    from fcgi_toolkit import control
    result = control.submit(dep, {"op": "apply", "rolling": False},
                            names.recycle_time(dep), out=out)
    if result is None:
        return "no answer from the watchdog"
    return None if result.get("ok") else str(result.get("message", "refused"))


class Switcher:
    """One switch from ``old`` (the serving generation) to ``new`` (the file
    with the next generation attached), through ``rpc`` (the ``supervisor``
    namespace)."""

    def __init__(self, old: Deployment, new: Deployment, rpc: Any, out: Any,
                 host: Optional[render.Host] = None,
                 ready: Callable[[Deployment], Mapping[str, int]] = scoreboard_ready,
                 standby: Callable[[Deployment], Mapping[str, int]] = scoreboard_standby,
                 reload_nginx: Optional[Callable[[Deployment], Any]] = None,
                 nginx_done: Optional[Callable[[Deployment, Any], Optional[str]]] = None,
                 notify: Callable[[Deployment, Any], Optional[str]] = notify_watchdog,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.old, self.new, self.rpc, self.out = old, new, rpc, out
        self.host = host or render.Host.probe(new)
        self.ready, self.standby = ready, standby
        self.reload_nginx = reload_nginx or (
            lambda dep: nginxctl.reload(dep, self.rpc, self.host.nginx_binary))
        self.nginx_done = nginx_done or nginxctl.wait_old_gone
        self.notify = notify
        self.clock, self.sleep = clock, sleep
        self.since = time.time()

    # -- helpers -------------------------------------------------------------
    def say(self, text: str, *args: Any) -> None:
        print("apply: " + text % args, file=self.out, flush=True)

    def phase(self, phase: Phase) -> None:
        generations.write_switch(self.old.runtime_dir, self.old.generation_number,
                                 self.new.generation_number, phase.value, self.since)

    def call(self, method: str, *args: Any, ok: tuple = ()) -> Any:
        try:
            return getattr(self.rpc, method)(*args)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode in ok:
                return None
            raise SwitchFailed("%s(%s): %s %s" % (
                method, ", ".join(map(str, args)), names_of_fault(fault.faultCode),
                fault.faultString)) from None

    def infos(self, group: str) -> dict[str, dict]:
        return {i["name"]: i for i in self.call("getAllProcessInfo") if i["group"] == group}

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        return nginxctl.wait(predicate, timeout, self.clock, self.sleep)

    def write_conf(self, text: str) -> None:
        render.write_rendered(self.new, {"supervisord.conf": text}, self.new.runtime_dir)

    def render(self, dep: Deployment) -> dict[str, str]:
        return render.render_all(dep, self.host, dep.runtime_dir)

    # -- the switch ----------------------------------------------------------
    def run(self) -> str:
        """Carry out the switch; its summary line.  Raise ConfigError (the
        files do not render, nothing changed), SwitchFailed after rolling
        back (the old generation serving as before) or DrainFailed (the new
        one serves, the old one is left as it is)."""
        old, new = self.old, self.new
        files = self.render(new)          # ConfigError: nothing changed yet
        try:
            from fcgi_toolkit import leftovers
            leftovers.check_socket(new)
        except ConfigError as exc:
            raise SwitchFailed(str(exc)) from None
        with open(old.supervisord_conf, encoding="utf-8") as f:
            previous = f.read()
        self.phase(Phase.STARTING)
        try:
            self.start(files["supervisord.conf"])
        except (SwitchFailed, OSError, xmlrpc.client.Error) as exc:
            self.rollback(previous, exc if isinstance(exc, SwitchFailed) else SwitchFailed(
                "generation %d: %s" % (new.generation_number, exc)))
        self.phase(Phase.NGINX)
        try:
            before = self.switch_nginx(files)
        except (SwitchFailed, nginxctl.ReloadFailed, OSError, xmlrpc.client.Error) as exc:
            render.write_atomic({n: t for n, t in self.render(old).items() if n in NGINX_FILES},
                                old.runtime_dir)
            self.rollback(previous, SwitchFailed("nginx: %s" % exc))
        warning = self.nginx_done(new, before)
        if warning:
            self.say("warning: %s", warning)
        self.phase(Phase.DRAINING)
        generations.write(new.runtime_dir, new.generation)
        try:
            self.follow()
            self.drain()
        except SwitchFailed as exc:
            raise DrainFailed(str(exc)) from None
        finally:
            generations.end_switch(old.runtime_dir)
        return "generation %d (%s, %s) serves; generation %d drained and removed" % (
            new.generation_number, new.group, new.socket_url, old.generation_number)

    def start(self, conf: str) -> None:
        new = self.new
        scoreboard.create(new.scoreboard_path, new.slots)
        self.write_conf(conf)
        why = added_group(self.call("reloadConfig"), new.group)
        if why:
            raise SwitchFailed(why)
        self.call("addProcessGroup", new.group)
        slots = new.slot_names()[:new.workers.count]
        for slot in slots:
            self.call("startProcess", "%s:%s" % (new.group, slot), False)
        self.say("generation %d: started %s on %s, waiting for them to be ready",
                 new.generation_number, ", ".join(slots), new.socket_url)
        began = self.clock()
        promoted: dict[int, float] = {}     # pid -> when SIGUSR2 was sent
        while True:
            self.promote(slots, promoted)
            verdict = check_start(slots, self.infos(new.group), self.ready(new),
                                  self.clock() - began, new.recycle.ready_timeout)
            if verdict.ready:
                return
            if verdict.failed:
                raise SwitchFailed("generation %d: %s: %s" % (
                    new.generation_number, verdict.failed, self.error_of(verdict.failed)))
            self.sleep(0.05)

    def promote(self, slots: list, promoted: dict) -> None:
        """With workers.warm_standby every new worker waits as a standby: tell
        each started slot's to accept (SIGUSR2), again after a second if it
        still waits (a signal sent before its handler was installed)."""
        now = self.clock()
        for slot, pid in self.standby(self.new).items():
            if slot in slots and now - promoted.get(pid, -PROMOTE_AGAIN) >= PROMOTE_AGAIN:
                promoted[pid] = now
                self.call("signalProcess", "%s:%s" % (self.new.group, slot), PROMOTE_SIGNAL,
                          ok=(Faults.NOT_RUNNING,))

    def error_of(self, failed: str) -> str:
        """The failing slot's last error line from its log."""
        from fcgi_toolkit.supervisord import Gateway
        slot = failed.split(" ", 1)[0]
        if slot not in self.new.slot_names():
            return "see the workers' logs in %s" % self.new.log_dir
        return Gateway(_Proxy(self.rpc), self.new.group).read_error(slot)

    def switch_nginx(self, files: Mapping[str, str]) -> Any:
        new = self.new
        render.write_atomic({n: t for n, t in files.items() if n in NGINX_FILES},
                            new.runtime_dir)
        before = self.reload_nginx(new)
        self.say("nginx reloaded gracefully: upstream %s", new.socket_url)
        return before

    def follow(self) -> None:
        """Make the watchdog follow the new generation (restart it if it does not answer)."""
        why = self.notify(self.new, self.out)
        if why is None:
            return
        program = names.watchdog_program(self.new.name)
        self.say("the watchdog did not re-read (%s): restarting %s", why, program)
        self.call("stopProcess", program, True, ok=(Faults.NOT_RUNNING,))
        self.call("startProcess", program, True)

    def drain(self) -> None:
        """Stop the old generation's workers one at a time, then remove its group."""
        old, new = self.old, self.new
        timeout = render.stop_waits(old)["workers"] + STOP_MARGIN
        for slot, info in sorted(self.infos(old.group).items()):
            if info["state"] in STARTABLE_STATES:
                continue
            self.call("stopProcess", "%s:%s" % (old.group, slot), False, ok=(Faults.NOT_RUNNING,))
            if not self.wait(lambda: all_stopped([slot], self.infos(old.group)), timeout):
                raise SwitchFailed("generation %d: %s did not stop within %gs" % (
                    old.generation_number, slot, timeout))
        self.call("removeProcessGroup", old.group)
        self.say("generation %d drained and removed (%s)", old.generation_number, old.group)
        self.forget_files(old, keep=new)

    def rollback(self, previous_conf: str, exc: SwitchFailed) -> None:
        """Undo the new generation; the old one never stopped.  Raises ``exc``."""
        new = self.new
        self.phase(Phase.ROLLING_BACK)
        try:
            infos = self.infos(new.group)
            for slot, info in sorted(infos.items()):
                if info["state"] not in STARTABLE_STATES:
                    self.call("stopProcess", "%s:%s" % (new.group, slot), False,
                              ok=(Faults.NOT_RUNNING,))
            if infos:
                timeout = render.stop_waits(new)["workers"] + STOP_MARGIN
                self.wait(lambda: all_stopped(list(infos), self.infos(new.group)), timeout)
                self.call("removeProcessGroup", new.group, ok=(Faults.BAD_NAME,))
        finally:
            render.write_rendered(self.old, {"supervisord.conf": previous_conf},
                                  self.old.runtime_dir)
            self.call("reloadConfig")
            self.forget_files(new, keep=self.old)
            generations.end_switch(self.old.runtime_dir)
        raise exc

    @staticmethod
    def forget_files(gone: Deployment, keep: Deployment) -> None:
        """Remove a removed generation's scoreboard and unix socket file."""
        paths = [gone.scoreboard_path] + ([gone.socket_path] if gone.socket_is_unix else [])
        for path in paths:
            if path in (keep.scoreboard_path, keep.socket_path):
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


class _Proxy:
    """A ``supervisor`` namespace as the proxy :class:`~fcgi_toolkit.supervisord.Gateway` takes."""

    def __init__(self, namespace: Any):
        self.supervisor = namespace


def names_of_fault(code: int) -> str:
    from fcgi_toolkit.supervisord import FAULT_NAMES
    return FAULT_NAMES.get(code, str(code))


# --------------------------------------------------------------------------
# Entry from apply
# --------------------------------------------------------------------------

def prepare(file_dep: Deployment) -> tuple[Deployment, Deployment]:
    """(the serving generation, the file as the next one); raise ConfigError
    (one line) when the switch cannot be made, nothing changed."""
    if file_dep.multi_host or file_dep.control.system_supervisord:
        raise ConfigError("%s: a new generation needs the toolkit's own supervisord on one "
                          "machine (fcgi-toolkit run); stop and start again" % file_dep.path)
    under_way = generations.read_switch(file_dep.runtime_dir)
    if under_way is not None:
        raise ConfigError("%s: a generation switch (%d -> %d, %s) is under way (%s); wait for it "
                          "(or remove the file if no apply runs)" % (
                              file_dep.path, under_way.old, under_way.new, under_way.phase,
                              generations.switch_path(file_dep.runtime_dir)))
    current = generations.current(file_dep)
    try:
        nxt = generations.successor(file_dep, current)
    except generations.SocketCollision as exc:
        raise ConfigError("%s: %s" % (file_dep.path, exc)) from None
    old = generations.attach(file_dep, current)
    return old, generations.attach(file_dep, nxt)
