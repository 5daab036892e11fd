"""``fcgi-toolkit apply``: make the running deployment what the file says.

The running deployment's values are a snapshot in the runtime dir
(``applied.json``: every key's parsed value), written by ``run`` at start and
after each apply.  ``apply`` validates the file first (a bad file: one line,
exit 2, nothing changed), compares it with the snapshot (:func:`diff`) and
takes each changed key through the one way the settings registry names for
it (:data:`fcgi_toolkit.settings.APPLIED_BY`, :func:`plan`):

* watchdog keys: a request through the operator-request channel; the
  watchdog re-reads the file and swaps its limits;
* workers.count and workers.standby: the same request; within the running
  supervisord's slots (workers.max_slots) the watchdog then starts or stops
  workers (never ``supervisorctl update``, which stops the group first);
* worker keys: the same request asks for a rolling replacement of every
  worker (each new worker reads the file at start), capacity held;
* nginx keys: the nginx files are re-rendered atomically and the managed
  nginx is sent HUP (a graceful reload: old nginx workers finish their
  requests);
* generation keys (rendered into the ``[fcgi-program]`` section: the
  socket, app.python...; and a count beyond the running slots): a new
  generation of the group next to the serving one, nginx switched to it,
  the old one drained (:mod:`fcgi_toolkit.switch`).  The switch also takes
  every other changed key (its workers read the file, nginx is re-rendered,
  the watchdog re-reads).  If the new generation does not come up, nothing
  is applied, the old one serves on, exit status 1;
* supervisord keys (``[control]``: supervisord's own sections), and
  ``apply --new-supervisord`` with or without a change (an upgrade of
  supervisor or of this toolkit): a generation in a new *inner*
  supervisord, a program of the one ``run`` started (the *front*, which
  keeps nginx), switched to the same way; it takes every other changed key;
* keys only ``run`` sets up (app.name, runtime.*, nginx.managed...) are
  reported by name ("stop and run again"), left unapplied (the snapshot
  keeps their old value, so ``status`` keeps showing the drift) and make the
  exit status 1; generation keys then wait with them.

The pure part (:func:`values`, :func:`diff`, :func:`plan`) is tested with
plain values; :func:`apply` is the thin I/O shell.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

from fcgi_toolkit import generations, settings, statefile
from fcgi_toolkit.names import nginx_program, recycle_time, request_wait
from fcgi_toolkit.settings import Applied, Deployment

SNAPSHOT = "applied.json"
#: The nginx files :func:`apply` re-renders (never supervisord.conf).
NGINX_FILES = ("nginx.conf", "nginx-site.conf")


# --------------------------------------------------------------------------
# Pure decisions
# --------------------------------------------------------------------------

def values(dep: Deployment) -> dict[str, Any]:
    """Every key's parsed value as plain JSON data ("section.name" -> value;
    "hosts" -> the ``[[hosts]]`` tables)."""
    out: dict[str, Any] = {s.key: dep.sections[s.section][s.name] for s in settings.REGISTRY}
    out["hosts"] = [asdict(h) for h in dep.hosts]
    return json.loads(json.dumps(out))


def diff(running: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The keys whose value differs, in registry order (a key missing on one side differs)."""
    keys = list(wanted) + [k for k in running if k not in wanted]
    return [k for k in keys if k not in running or k not in wanted or running[k] != wanted[k]]


@dataclass(frozen=True)
class Plan:
    """The changed keys grouped by how each takes effect."""
    watchdog: tuple[str, ...] = ()
    rolling: tuple[str, ...] = ()
    nginx: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()
    count: tuple[str, ...] = ()
    generation: tuple[str, ...] = ()
    supervisord: tuple[str, ...] = ()

    @property
    def applicable(self) -> tuple[str, ...]:
        return (self.watchdog + self.count + self.rolling + self.nginx + self.generation
                + self.supervisord)

    @property
    def needs_watchdog(self) -> bool:
        return bool(self.watchdog or self.count or self.rolling)


def plan(changed: list[str], fits: bool = True) -> Plan:
    """Group ``changed`` keys by :func:`fcgi_toolkit.settings.applied_by`; a
    count change that does not ``fit`` the running slots needs a new generation."""
    by: dict[Applied, list[str]] = {way: [] for way in Applied}
    for key in changed:
        way = settings.applied_by(key)
        by[Applied.GENERATION if way is Applied.COUNT and not fits else way].append(key)
    return Plan(tuple(by[Applied.WATCHDOG]), tuple(by[Applied.ROLLING]),
                tuple(by[Applied.NGINX]), tuple(by[Applied.RESTART]),
                tuple(by[Applied.COUNT]), tuple(by[Applied.GENERATION]),
                tuple(by[Applied.SUPERVISORD]))


def running_slots(dep: Deployment, running: Mapping[str, Any]) -> int:
    """The serving group's slots: what the generation state file recorded when
    the group was rendered (a count or standby applied in place since does not
    change them), else as the applied snapshot renders them."""
    gen = generations.read(dep.runtime_dir)
    if gen is not None:
        return gen.slots
    return settings.slot_total(running["workers.count"], running["workers.standby"],
                               running.get("workers.max_slots", 0))


def after(running: Mapping[str, Any], wanted: Mapping[str, Any],
          applied: tuple[str, ...]) -> dict[str, Any]:
    """The snapshot once ``applied`` keys took effect: theirs new, the rest as they were."""
    out = dict(running)
    out.update({k: wanted[k] for k in applied if k in wanted})
    return out


# --------------------------------------------------------------------------
# The snapshot
# --------------------------------------------------------------------------

def snapshot_path(dep: Deployment) -> str:
    return os.path.join(dep.runtime_dir, SNAPSHOT)


def save(dep: Deployment, snapshot: Mapping[str, Any]) -> None:
    statefile.write_json_atomic(snapshot_path(dep), dict(snapshot))


def load(dep: Deployment) -> Optional[dict[str, Any]]:
    """The running deployment's values; None if ``run`` has not written them."""
    data = statefile.read_json(snapshot_path(dep), quiet=True)
    return data if isinstance(data, dict) else None


def drift(dep: Deployment) -> Optional[list[str]]:
    """Keys where the file (read again now) differs from the running deployment;
    None when unknown: no snapshot (not started by ``run``) or a bad file."""
    running = load(dep)
    if running is None:
        return None
    try:
        now = settings.load(dep.path, host=dep.host.name if dep.host else "")
    except settings.ConfigError:
        return None
    return diff(running, values(now))


# --------------------------------------------------------------------------
# The I/O shell
# --------------------------------------------------------------------------

def apply_command(path: str) -> list[str]:
    """``fcgi-toolkit apply -c PATH``, as SIGHUP to ``run`` and a watched
    deployment file run it (in a child process: neither may block)."""
    return [sys.executable, "-m", "fcgi_toolkit", "apply", "-c", path]


def reload_nginx(dep: Deployment, rpc: Any) -> str:
    """Re-render the nginx files atomically and HUP the managed nginx."""
    from fcgi_toolkit import render
    files = render.render_all(dep, render.Host.probe(dep), dep.runtime_dir)
    render.write_atomic({n: files[n] for n in NGINX_FILES if n in files}, dep.runtime_dir)
    if not dep.nginx.managed:
        return "nginx files re-rendered in %s: reload your nginx" % dep.runtime_dir
    rpc.signalProcess(nginx_program(dep.name), "HUP")
    return "nginx reloaded gracefully (HUP)"


def apply(dep: Deployment, out: Any = sys.stdout, err: Any = sys.stderr,
          rpc: Optional[Any] = None, new_supervisord: bool = False,
          output_dir: Optional[str] = None, data: Optional[bytes] = None) -> int:
    """Apply what differs; 0 all applied, 1 something could not be (said on ``err``).
    ``new_supervisord``: a supervisord generation even when nothing changed
    (with ``[[hosts]]`` on the web server: a new supervisord on every host,
    :mod:`fcgi_toolkit.rollout`, writing nginx's files into ``output_dir``).
    ``data``: the bytes ``dep`` was parsed from (default: the file's now)."""
    from fcgi_toolkit import respawn
    if dep.multi_host and dep.host is None:
        from fcgi_toolkit import rollout     # the web server: every host, one at a time
        return rollout.apply(dep, output_dir, out, err, new_supervisord)
    running = load(dep)
    if running is None:
        print("fcgi-toolkit: %s: no applied deployment (%s): is it running?"
              % (dep.path, snapshot_path(dep)), file=err)
        return 1
    wanted = values(dep)
    todo = plan(diff(running, wanted), fits=dep.fits(running_slots(dep, running)))
    if not todo.applicable and not todo.restart and not new_supervisord:
        print("apply: nothing changed", file=out)
        return 0
    # A deployment started by run reads applied.toml: these bytes from now on
    # (new workers, the watchdog's re-read, a new generation), unless nothing applies.
    before = respawn.pin(dep, settings.read_bytes(dep.path) if data is None else data)
    if before is not None:
        dep = respawn.pinned(dep)
    status, applied_any = _apply(dep, running, wanted, todo, out, err, rpc, new_supervisord)
    if not applied_any:
        respawn.unpin(dep, before)
    return status


def _apply(dep: Deployment, running: Mapping[str, Any], wanted: Mapping[str, Any], todo: Plan,
           out: Any, err: Any, rpc: Optional[Any], new_supervisord: bool) -> tuple[int, bool]:
    """:func:`apply` once the plan is made: (exit status, whether any key was applied)."""
    from fcgi_toolkit import control, supervisord
    status = 0
    if todo.restart:
        print("fcgi-toolkit: %s: not applied, stop and run again: %s"
              % (dep.path, ", ".join(todo.restart)), file=err)
        status = 1
    switching = todo.generation + todo.supervisord
    if (switching or new_supervisord) and todo.restart:
        print("fcgi-toolkit: %s: not applied, a new generation waits for the keys that need "
              "stop and run again: %s" % (dep.path, ", ".join(switching or ("--new-supervisord",))),
              file=err)
    elif switching or new_supervisord:
        switched, served = apply_generation(dep, running, wanted, todo, out, err, rpc,
                                            new_supervisord=new_supervisord or bool(todo.supervisord))
        return status | switched, served
    applied: tuple[str, ...] = ()
    if todo.nginx:
        rpc = rpc or supervisord.front_proxy(dep)      # the managed nginx is the front's
        print("apply: %s (%s)" % (reload_nginx(dep, rpc), ", ".join(todo.nginx)), file=out)
        applied += todo.nginx
    if todo.needs_watchdog:
        timeout = request_wait(dep, "reload") if todo.rolling else recycle_time(dep)
        print("apply: asked the watchdog (%s), waiting up to %ds"
              % (", ".join(todo.watchdog + todo.count + todo.rolling), timeout), file=out,
              flush=True)
        result = control.submit(dep, {"op": "apply", "rolling": bool(todo.rolling)}, timeout,
                                out=out)
        if result is None:
            print("fcgi-toolkit: no answer from the watchdog listener within %ds (see %s)"
                  % (timeout, control.watchdog_log(dep)), file=err)
            status = 1
        elif not result.get("ok"):
            print("apply: %s" % result.get("message", ""), file=err)
            status = 1
        else:
            print("apply: %s" % result.get("message", ""), file=out)
            applied += todo.watchdog + todo.count + todo.rolling
    save(dep, after(running, wanted, applied))
    return status, bool(applied)


def apply_generation(dep: Deployment, running: Mapping[str, Any], wanted: Mapping[str, Any],
                     todo: Plan, out: Any, err: Any, rpc: Optional[Any],
                     new_supervisord: bool = False) -> tuple[int, bool]:
    """Every applicable key through a generation switch (``new_supervisord``:
    in a new inner supervisord): (exit status, whether the new generation serves)."""
    from fcgi_toolkit import supervisord, switch
    what = ", ".join(todo.applicable) or "--new-supervisord"
    try:
        old, new = switch.prepare(dep, new_supervisord=new_supervisord)
    except settings.ConfigError as exc:
        print("fcgi-toolkit: not applied (%s): %s" % (what, exc), file=err)
        return 1, False
    print("apply: generation %d -> %d%s (%s)" % (
        old.generation_number, new.generation_number,
        " in a new supervisord (%s)" % new.supervisord_program if new_supervisord else "",
        what), file=out, flush=True)
    try:
        message = switch.Switcher(old, new, rpc or supervisord.front_proxy(dep), out).run()
    except settings.ConfigError as exc:
        print("fcgi-toolkit: %s" % exc, file=err)
        return 2, False
    except switch.SwitchFailed as exc:
        print("fcgi-toolkit: not applied, generation %d still serves: %s"
              % (old.generation_number, exc), file=err)
        return 1, False
    except switch.DrainFailed as exc:
        save(dep, after(running, wanted, todo.applicable))
        print("fcgi-toolkit: generation %d serves, but generation %d did not drain: %s"
              % (new.generation_number, old.generation_number, exc), file=err)
        return 1, True
    print("apply: %s" % message, file=out)
    save(dep, after(running, wanted, todo.applicable))
    return 0, True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default="deploy.toml",
                        help="deployment file (default: ./deploy.toml)")
    parser.add_argument("--new-supervisord", action="store_true",
                        help="move the workers to a new supervisord generation even if nothing "
                             "changed (after an upgrade of supervisor or fcgi-toolkit); with "
                             "[[hosts]] on the web server: every host, one at a time")
    parser.add_argument("-o", "--output", default=None, metavar="DIR",
                        help="with [[hosts]], on the web server: the directory of nginx's files "
                             "(as rendered there with render -o DIR; default: runtime.dir)")


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 applied; 1 a key not applied or the watchdog did not
    answer; 2 bad deployment file (nothing changed)."""
    data = settings.read_bytes(args.config)
    dep = settings.loads(data, args.config)     # ConfigError: cli prints it, exit 2
    return apply(dep, new_supervisord=args.new_supervisord, output_dir=args.output, data=data)
