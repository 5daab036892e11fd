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

A supervisord generation (``apply`` of a ``[control]`` key, ``apply
--new-supervisord``) runs the same steps, the new workers in a new *inner*
supervisord (a program of the front, the supervisord ``run`` started, which
keeps nginx)::

    render the inner supervisord-gN.conf; the front's supervisord.conf with
        [program:<name>_sN] (in place of the old generation's sections)
    front: reloadConfig, addProcessGroup, startProcess(<name>_sN)
    wait: RUNNING in the front and getState RUNNING on its own socket
    its workers started and ready as above (through its socket)
    nginx switched as above; the generation state says: new serves
    stop the old watchdog; start the inner one's (one owns the state file)
    the old generation goes: in the front, its workers one at a time and
        its group removed; in an inner supervisord, its program stopped
        (it drains its workers) and removed
    a failure before nginx moved: stop and remove <name>_sN, restore the
        front's supervisord.conf, reloadConfig; the old one never stopped

The steps and the rollback are pure (:func:`fcgi_toolkit.switch_plan.plan`,
:func:`~fcgi_toolkit.switch_plan.undo`), like every other decision, in
:mod:`fcgi_toolkit.switch_plan`; :class:`Switcher` is the shell, its
collaborators injected.
"""
from __future__ import annotations

import http.client
import os
import time
import xmlrpc.client
from typing import Any, Callable, Mapping, Optional

from supervisor.xmlrpc import Faults

from fcgi_toolkit import generations, names, nginxctl, render, scoreboard, statefile
from fcgi_toolkit.switch_plan import (SERVING, DrainFailed, Phase, Step, SwitchFailed, Undo,
                                      added_group, all_stopped, check_start,
                                      check_supervisord, plan, undo)
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


def holder_proxy(dep: Deployment) -> Any:
    """The ``supervisor`` namespace of the supervisord holding ``dep``'s workers."""
    from fcgi_toolkit import supervisord
    return supervisord.control_proxy(dep)


def is_supervisord_conf(name: str) -> bool:
    """Whether a rendered file is a supervisord's: the front's or an inner one's."""
    return name == "supervisord.conf" or (
        name.startswith("supervisord-g") and name.endswith(".conf"))


class Switcher:
    """One switch from ``old`` (the serving generation) to ``new`` (the file
    with the next generation attached), through ``rpc`` (the front's
    ``supervisor`` namespace; ``connect(dep)`` gives the namespace of the
    supervisord holding ``dep``'s workers when that is an inner one)."""

    def __init__(self, old: Deployment, new: Deployment, rpc: Any, out: Any,
                 host: Optional[render.Host] = None,
                 ready: Callable[[Deployment], Mapping[str, int]] = scoreboard_ready,
                 standby: Callable[[Deployment], Mapping[str, int]] = scoreboard_standby,
                 reload_nginx: Optional[Callable[[Deployment], Any]] = None,
                 nginx_done: Optional[Callable[[Deployment, Any], Optional[str]]] = None,
                 notify: Callable[[Deployment, Any], Optional[str]] = notify_watchdog,
                 connect: Callable[[Deployment], Any] = holder_proxy,
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
        self.steps = plan(old.holder, new.holder)
        #: The supervisords holding the old and the new workers.
        self.connect = connect
        self.old_rpc = connect(old) if old.holder else rpc
        self.new_rpc = connect(new) if new.holder else rpc
        self.log_sizes: dict[str, dict[str, int]] = {}     # slot -> its logs' sizes at start

    @property
    def new_supervisord(self) -> bool:
        return Step.START_SUPERVISORD in self.steps

    # -- helpers -------------------------------------------------------------
    def say(self, text: str, *args: Any) -> None:
        print("apply: " + text % args, file=self.out, flush=True)

    def phase(self, phase: Phase) -> None:
        generations.write_switch(self.old.runtime_dir, self.old.generation_number,
                                 self.new.generation_number, phase.value, self.since,
                                 self.new.holder)

    def call(self, method: str, *args: Any, ok: tuple = (), rpc: Any = None) -> Any:
        try:
            return getattr(self.rpc if rpc is None else rpc, method)(*args)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode in ok:
                return None
            raise SwitchFailed("%s(%s): %s %s" % (
                method, ", ".join(map(str, args)), names_of_fault(fault.faultCode),
                fault.faultString)) from None

    def infos(self, group: str, rpc: Any = None) -> dict[str, dict]:
        return {i["name"]: i for i in self.call("getAllProcessInfo", rpc=rpc)
                if i["group"] == group}

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        return nginxctl.wait(predicate, timeout, self.clock, self.sleep)

    def render(self, dep: Deployment) -> dict[str, str]:
        return render.render_all(dep, self.host, dep.runtime_dir)

    @property
    def conf_rpc(self) -> Any:
        """The supervisord whose configuration the switch changes: the front
        for a new inner supervisord, else the one holding both generations."""
        return self.rpc if self.new_supervisord else self.new_rpc

    def confs_before(self, files: Mapping[str, str]) -> dict[str, Optional[str]]:
        """The supervisord files the switch writes, as they are now (None: absent)."""
        out: dict[str, Optional[str]] = {}
        for name in files:
            if is_supervisord_conf(name):
                path = os.path.join(self.old.runtime_dir, name)
                try:
                    with open(path, encoding="utf-8") as f:
                        out[name] = f.read()
                except FileNotFoundError:
                    out[name] = None
        return out

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
        previous = self.confs_before(files)
        self.phase(Phase.STARTING)
        actions: dict[Step, Callable[[], None]] = {
            Step.START_SUPERVISORD: lambda: self.start_supervisord(files),
            Step.START_WORKERS: lambda: self.start(files),
            Step.SWITCH_NGINX: lambda: self.switch_nginx(files),
            Step.RECORD: self.record,
            Step.FOLLOW: self.follow,
            Step.STOP_OLD_WATCHDOG: self.stop_old_watchdog,
            Step.START_NEW_WATCHDOG: self.start_new_watchdog,
            Step.DRAIN: self.drain,
            Step.STOP_OLD_SUPERVISORD: self.stop_old_supervisord,
        }
        try:
            for step in self.steps:
                try:
                    actions[step]()
                except (SwitchFailed, nginxctl.ReloadFailed, OSError, xmlrpc.client.Error,
                        http.client.HTTPException) as exc:
                    if step in SERVING:
                        raise DrainFailed(str(exc)) from None
                    self.rollback(previous, undo(self.steps, step), self.failure(step, exc))
        finally:
            if generations.current(new).number == new.generation_number:
                generations.end_switch(old.runtime_dir)
        where = " in %s" % new.supervisord_program if new.holder else ""
        return "generation %d (%s, %s%s) serves; generation %d drained and removed" % (
            new.generation_number, new.group, new.socket_url, where, old.generation_number)

    def failure(self, step: Step, exc: Exception) -> SwitchFailed:
        """The one line saying why ``step`` failed."""
        if step is Step.SWITCH_NGINX:
            return SwitchFailed("nginx: %s" % exc)
        if isinstance(exc, SwitchFailed):
            return exc
        return SwitchFailed("generation %d: %s" % (self.new.generation_number, exc))

    def start_supervisord(self, files: Mapping[str, str]) -> None:
        """The new inner supervisord: a program of the front, up and answering."""
        new = self.new
        program = new.supervisord_program
        render.write_rendered(new, {n: t for n, t in files.items() if is_supervisord_conf(n)},
                              new.runtime_dir)
        why = added_group(self.call("reloadConfig"), program)
        if why:
            raise SwitchFailed(why)
        self.call("addProcessGroup", program)
        self.call("startProcess", program, False)
        self.say("generation %d: started supervisord %s (%s)", new.generation_number, program,
                 new.supervisord_conf)
        began = self.clock()
        while True:
            info = self.call("getProcessInfo", program)
            verdict = check_supervisord(info, self.inner_state(), self.clock() - began,
                                        new.recycle.ready_timeout)
            if verdict.ready:
                return
            if verdict.failed:
                from fcgi_toolkit.supervisord import Gateway
                raise SwitchFailed("generation %d: %s: %s" % (
                    new.generation_number, verdict.failed,
                    Gateway(_Proxy(self.rpc), program).read_error(program)))
            self.sleep(0.05)

    def inner_state(self) -> Optional[Mapping[str, Any]]:
        """The new inner supervisord's getState; None while it does not answer
        (a fresh connection each time: a refused one is not reusable)."""
        try:
            self.new_rpc = self.connect(self.new)
            return self.new_rpc.getState()
        except (OSError, xmlrpc.client.Error, http.client.HTTPException):
            return None

    def start(self, files: Mapping[str, str]) -> None:
        new = self.new
        scoreboard.create(new.scoreboard_path, new.slots)
        if not self.new_supervisord:
            render.write_rendered(new, {n: t for n, t in files.items() if is_supervisord_conf(n)},
                                  new.runtime_dir)
            why = added_group(self.call("reloadConfig", rpc=self.new_rpc), new.group)
            if why:
                raise SwitchFailed(why)
            self.call("addProcessGroup", new.group, rpc=self.new_rpc)
        slots = new.slot_names()[:new.workers.count]
        # A failed earlier try of this generation number left its error in the same logs.
        gateway = self.gateway()
        self.log_sizes = {slot: gateway.log_sizes(slot) for slot in slots}
        for slot in slots:
            self.call("startProcess", "%s:%s" % (new.group, slot), False, rpc=self.new_rpc)
        self.say("generation %d: started %s on %s, waiting for them to be ready",
                 new.generation_number, ", ".join(slots), new.socket_url)
        began = self.clock()
        promoted: dict[int, float] = {}     # pid -> when SIGUSR2 was sent
        while True:
            self.promote(slots, promoted)
            verdict = check_start(slots, self.infos(new.group, self.new_rpc), self.ready(new),
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
                          ok=(Faults.NOT_RUNNING,), rpc=self.new_rpc)

    def error_of(self, failed: str) -> str:
        """The failing slot's last error line from its log."""
        slot = failed.split(" ", 1)[0]
        if slot not in self.new.slot_names():
            return "see the workers' logs in %s" % self.new.log_dir
        return self.gateway().read_error(slot, since=self.log_sizes.get(slot))

    def gateway(self) -> Any:
        """The new generation's group in the supervisord that holds it."""
        from fcgi_toolkit.supervisord import Gateway
        return Gateway(_Proxy(self.new_rpc), self.new.group)

    def switch_nginx(self, files: Mapping[str, str]) -> None:
        new = self.new
        self.phase(Phase.NGINX)
        render.write_atomic({n: t for n, t in files.items() if n in NGINX_FILES},
                            new.runtime_dir)
        before = self.reload_nginx(new)
        self.say("nginx reloaded gracefully: upstream %s", new.socket_url)
        warning = self.nginx_done(new, before)
        if warning:
            self.say("warning: %s", warning)

    def record(self) -> None:
        self.phase(Phase.DRAINING)
        generations.write(self.new.runtime_dir, self.new.generation)

    def follow(self) -> None:
        """Make the watchdog follow the new generation (restart it if it does not answer)."""
        why = self.notify(self.new, self.out)
        if why is None:
            return
        program = names.watchdog_program(self.new.name)
        self.say("the watchdog did not re-read (%s): restarting %s", why, program)
        self.call("stopProcess", program, True, ok=(Faults.NOT_RUNNING,), rpc=self.new_rpc)
        self.call("startProcess", program, True, rpc=self.new_rpc)

    def stop_process(self, namespec: str, rpc: Any, timeout: float) -> None:
        """Stop one process and wait until it is STOPPED (never start it while STOPPING)."""
        group, _, name = namespec.partition(":")
        self.call("stopProcess", namespec, False, ok=(Faults.NOT_RUNNING, Faults.BAD_NAME), rpc=rpc)
        if not self.wait(lambda: all_stopped([name or group], self.infos(group, rpc)), timeout):
            raise SwitchFailed("%s did not stop within %gs" % (name or group, timeout))

    def stop_old_watchdog(self) -> None:
        """One watchdog owns the state file and the operator requests: the
        old one stops before the new one starts (the front's is removed)."""
        program = names.watchdog_program(self.old.name)
        self.stop_process(program, self.old_rpc, render.stop_waits(self.old)["watchdog"]
                          + STOP_MARGIN)
        if not self.old.holder:
            self.call("removeProcessGroup", program, ok=(Faults.BAD_NAME,))

    def start_new_watchdog(self) -> None:
        """The inner supervisord's watchdog: it takes the recycle history, by slot index."""
        state = statefile.load_state(self.new.state_path)
        state.move_slots(self.old.slot_names(), self.new.slot_names())
        statefile.save_state(self.new.state_path, state)
        self.call("startProcess", names.watchdog_program(self.new.name), True, rpc=self.new_rpc)

    def drain(self) -> None:
        """Stop the old generation's workers one at a time, then remove its group."""
        old, new = self.old, self.new
        timeout = render.stop_waits(old)["workers"] + STOP_MARGIN
        for slot, info in sorted(self.infos(old.group, self.old_rpc).items()):
            if info["state"] in STARTABLE_STATES:
                continue
            self.call("stopProcess", "%s:%s" % (old.group, slot), False, ok=(Faults.NOT_RUNNING,),
                      rpc=self.old_rpc)
            if not self.wait(lambda: all_stopped([slot], self.infos(old.group, self.old_rpc)),
                             timeout):
                raise SwitchFailed("generation %d: %s did not stop within %gs" % (
                    old.generation_number, slot, timeout))
        self.call("removeProcessGroup", old.group, rpc=self.old_rpc)
        self.say("generation %d drained and removed (%s)", old.generation_number, old.group)
        self.forget_files(old, keep=new)

    def stop_old_supervisord(self) -> None:
        """The old inner supervisord stops (its watchdog, then its workers, drain) and goes."""
        old, new = self.old, self.new
        program = old.supervisord_program
        self.stop_process(program, self.rpc, render.stop_waits(old)["supervisord"] + STOP_MARGIN)
        self.call("removeProcessGroup", program, ok=(Faults.BAD_NAME,))
        self.say("generation %d drained and removed (%s stopped)", old.generation_number, program)
        self.forget_files(old, keep=new)

    def rollback(self, previous: Mapping[str, Optional[str]], todo: tuple,
                 exc: SwitchFailed) -> None:
        """Undo the new generation (``todo``: :func:`~fcgi_toolkit.switch_plan.undo`'s
        steps); the old one never stopped.  Raises ``exc``."""
        old, new = self.old, self.new
        self.phase(Phase.ROLLING_BACK)
        try:
            if Undo.RESTORE_NGINX in todo:
                render.write_atomic({n: t for n, t in self.render(old).items()
                                     if n in NGINX_FILES}, old.runtime_dir)
            if Undo.STOP_NEW_SUPERVISORD in todo:
                self.stop_process(new.supervisord_program, self.rpc,
                                  render.stop_waits(new)["supervisord"] + STOP_MARGIN)
                self.call("removeProcessGroup", new.supervisord_program, ok=(Faults.BAD_NAME,))
            if Undo.STOP_NEW_WORKERS in todo:
                self.stop_new_workers()
        finally:
            for name, text in previous.items():
                path = os.path.join(old.runtime_dir, name)
                if text is not None:
                    render.write_rendered(old, {name: text}, old.runtime_dir)
                elif os.path.exists(path):
                    os.unlink(path)
            self.call("reloadConfig", rpc=self.conf_rpc)
            self.forget_files(new, keep=old)
            generations.end_switch(old.runtime_dir)
        raise exc

    def stop_new_workers(self) -> None:
        new = self.new
        infos = self.infos(new.group, self.new_rpc)
        for slot, info in sorted(infos.items()):
            if info["state"] not in STARTABLE_STATES:
                self.call("stopProcess", "%s:%s" % (new.group, slot), False,
                          ok=(Faults.NOT_RUNNING,), rpc=self.new_rpc)
        if infos:
            timeout = render.stop_waits(new)["workers"] + STOP_MARGIN
            self.wait(lambda: all_stopped(list(infos), self.infos(new.group, self.new_rpc)),
                      timeout)
            self.call("removeProcessGroup", new.group, ok=(Faults.BAD_NAME,), rpc=self.new_rpc)

    @staticmethod
    def forget_files(gone: Deployment, keep: Deployment) -> None:
        """Remove a removed generation's scoreboard and unix socket file (and
        the configuration of an inner supervisord it had alone)."""
        paths = [gone.scoreboard_path] + ([gone.socket_path] if gone.socket_is_unix else [])
        if gone.holder and gone.holder != keep.holder:
            paths.append(gone.supervisord_conf)
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

def prepare(file_dep: Deployment, new_supervisord: bool = False) -> tuple[Deployment, Deployment]:
    """(the serving generation, the file as the next one, in a new inner
    supervisord with ``new_supervisord``); raise ConfigError (one line) when
    the switch cannot be made, nothing changed."""
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
        nxt = generations.successor(file_dep, current, new_supervisord)
    except (generations.SocketCollision, generations.ControlPortCollision) as exc:
        raise ConfigError("%s: %s" % (file_dep.path, exc)) from None
    old = generations.attach(file_dep, current)
    return old, generations.attach(file_dep, nxt)
