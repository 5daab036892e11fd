"""Generations of the worker group: the one home of the serving generation's facts.

A key rendered into the ``[fcgi-program]`` section (the socket, its mode and
owner, app.python, app.directory, workers.user, workers.graceful_timeout,
workers.max_slots, nginx.web_servers) cannot change in a running group.
``apply`` changes it with a *generation*: a new fcgi-program group in the
same running supervisord, next to the serving one, which nginx is then
switched to (:mod:`fcgi_toolkit.switch`).

Generation N (1 is the layout ``run`` starts, with unchanged names):

* group ``app.name`` for 1, ``<app.name>_g<N>`` otherwise; process names
  ``<group>_00``... (:func:`fcgi_toolkit.names.slot_name`);
* scoreboard ``<runtime.dir>/scoreboard`` for 1, ``scoreboard-g<N>``
  otherwise: both groups' workers write slots 0.. during a switch;
* socket: workers.socket, unless that is the serving generation's own
  address: a unix socket then gets a generation-suffixed path
  (``<stem>.g<N>.sock`` in the same directory); a TCP address cannot be
  bound twice (:class:`SocketCollision`).

Supervisord generations (README "Supervisord generations"): a generation
is held by the front (``supervisord`` 0: the supervisord ``run`` started,
which always keeps nginx) or by the inner supervisord that supervisord
generation N started as the front's ``[program:<app.name>_sN]``
(``supervisord`` N, with its own ``supervisord-gN.conf``,
``supervisor-gN.sock`` and ``supervisord-gN.pid``): ``successor(...,
new_supervisord=True)``.  A group generation stays in the supervisord that
holds the serving one.  ``dep.control_socket``, ``dep.supervisord_conf`` and
``dep.supervisord_pidfile`` follow the holder; ``dep.front_*`` are the
front's.  Two supervisords cannot bind one TCP control port
(:class:`ControlPortCollision`).

The serving generation is a small state file in the runtime dir
(:data:`STATE`; absent: generation 1 from the file).  Runtime readers
(watchdog, status, metrics, RPC plugin, leftovers) take the deployment
through :func:`load` / :func:`serving`: a Deployment copy with the
generation attached, so ``dep.group``, ``dep.scoreboard_path``,
``dep.socket_url`` and ``dep.slots`` follow it.  A worker learns its
generation from its command line (``--generation N``, :func:`for_worker`).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

from fcgi_toolkit import settings, statefile
from fcgi_toolkit.settings import Deployment

#: The serving generation (absent: generation 1 from the deployment file).
STATE = "generation.json"
#: Present while a switch is under way: from, to, phase, since.
SWITCH = "generation-switch.json"


class SocketCollision(ValueError):
    """The new generation would bind the serving generation's TCP address."""


class ControlPortCollision(ValueError):
    """The new supervisord would bind a TCP control port a running one holds."""


@dataclass(frozen=True)
class Generation:
    """One generation's facts."""
    number: int
    group: str              # supervisord group (and program) name
    socket_url: str         # the effective socket: "unix:///..." or "tcp://host:port"
    scoreboard_path: str
    slots: int              # numprocs of its group
    #: The supervisord holding its workers: 0 the front (``run``'s own), N
    #: the inner supervisord that supervisord generation N started.
    supervisord: int = 0
    #: The TCP control port ("host:port") of that supervisord; "" none.
    control_port: str = ""
    #: The front's TCP control port: it holds it until it stops.
    front_port: str = ""


# --------------------------------------------------------------------------
# Pure naming
# --------------------------------------------------------------------------

def group_name(app_name: str, number: int) -> str:
    """``group_name("wiki", 1) == "wiki"``, ``group_name("wiki", 3) == "wiki_g3"``."""
    return app_name if number == 1 else "%s_g%d" % (app_name, number)


def scoreboard_path(runtime_dir: str, number: int) -> str:
    return os.path.join(runtime_dir, "scoreboard" if number == 1 else "scoreboard-g%d" % number)


def suffixed_socket(url: str, number: int) -> str:
    """A unix socket URL with the generation in its file name:
    ``unix:///run/wiki.sock`` -> ``unix:///run/wiki.g2.sock``."""
    path = url[len("unix://"):]
    directory, base = os.path.split(path)
    stem = base[:-len(".sock")] if base.endswith(".sock") else base
    for n in range(2, number + 1):      # a path already suffixed keeps one suffix
        if stem.endswith(".g%d" % n):
            stem = stem[:-len(".g%d" % n)]
    return "unix://" + os.path.join(directory, "%s.g%d.sock" % (stem, number))


def effective_socket(configured: str, serving: str, number: int) -> str:
    """The socket generation ``number`` binds: ``configured`` unless it is the
    serving generation's address; raise SocketCollision for the same TCP address."""
    if configured != serving:
        return configured
    if configured.startswith("unix://"):
        return suffixed_socket(configured, number)
    raise SocketCollision(
        "workers.socket = %r: the serving generation listens there and a TCP address cannot be "
        "bound twice; change workers.socket too (another port)" % configured)


def control_port(dep: Deployment) -> str:
    """The file's TCP control port as supervisord binds it ("host:port"; "" none)."""
    port = dep.control.inet_port
    return port if not port or ":" in port else "127.0.0.1:" + port


def check_control_port(port: str, current: Generation) -> None:
    """Raise ControlPortCollision when a new supervisord would bind ``port``
    while the serving one or the front holds it (two cannot bind it)."""
    if port and port in (current.control_port, current.front_port):
        raise ControlPortCollision(
            "control.inet_port = %r: the %s supervisord holds it and two supervisords cannot "
            "bind it; change control.inet_port, or remove it, apply, and add it again"
            % (port, "serving" if port == current.control_port else "front"))


def of_file(dep: Deployment, number: int, socket_url: str, supervisord: int = 0,
            front_port: str = "") -> Generation:
    """Generation ``number`` of the file ``dep``, bound to ``socket_url``, its
    workers held by ``supervisord`` (0: the front)."""
    return Generation(number, group_name(dep.name, number), socket_url,
                      scoreboard_path(dep.runtime_dir, number),
                      settings.slot_total(dep.workers.count, dep.workers.standby,
                                          dep.workers.max_slots),
                      supervisord, control_port(dep), front_port)


def first(dep: Deployment) -> Generation:
    """Generation 1: what ``run`` starts from the file (the front holds it)."""
    return of_file(dep, 1, dep.workers.socket, front_port=control_port(dep))


def successor(dep: Deployment, current: Generation, new_supervisord: bool = False) -> Generation:
    """The generation after ``current`` for the file ``dep``: in the same
    supervisord, or (``new_supervisord``) in a new inner one of its own.
    Raise SocketCollision, or ControlPortCollision for a new supervisord."""
    number = current.number + 1
    socket_url = effective_socket(dep.workers.socket, current.socket_url, number)
    if not new_supervisord:
        gen = of_file(dep, number, socket_url, current.supervisord, current.front_port)
        # The serving supervisord keeps the control port it bound.
        return replace(gen, control_port=current.control_port)
    check_control_port(control_port(dep), current)
    return of_file(dep, number, socket_url, number, current.front_port)


def attach(dep: Deployment, gen: Generation) -> Deployment:
    """``dep`` as generation ``gen`` (group, socket, scoreboard, slots follow it)."""
    return replace(dep, generation=gen)


def to_json(gen: Generation) -> dict:
    return asdict(gen)


def from_json(data: Any) -> Optional[Generation]:
    """A Generation from the state file's dict; None when it is not one."""
    if not isinstance(data, dict):
        return None
    try:
        gen = Generation(number=int(data["number"]), group=str(data["group"]),
                         socket_url=str(data["socket_url"]),
                         scoreboard_path=str(data["scoreboard_path"]), slots=int(data["slots"]),
                         supervisord=int(data.get("supervisord", 0)),
                         control_port=str(data.get("control_port", "")),
                         front_port=str(data.get("front_port", "")))
    except (KeyError, TypeError, ValueError):
        return None
    return gen if gen.number >= 1 and gen.slots >= 1 and 0 <= gen.supervisord <= gen.number \
        else None


# --------------------------------------------------------------------------
# The state files
# --------------------------------------------------------------------------

def state_path(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, STATE)


def switch_path(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, SWITCH)


def read(runtime_dir: str) -> Optional[Generation]:
    """The serving generation recorded in ``runtime_dir``; None if none is."""
    return from_json(statefile.read_json(state_path(runtime_dir), quiet=True))


def current(dep: Deployment) -> Generation:
    """The serving generation: the state file's, else generation 1 from ``dep``."""
    return read(dep.runtime_dir) or first(dep)


def serving(dep: Deployment) -> Deployment:
    """``dep`` with the serving generation attached."""
    return attach(dep, current(dep))


def load(path: str, host: Optional[str] = None, source: str = "") -> Deployment:
    """:func:`fcgi_toolkit.settings.load` as the serving generation sees it."""
    return serving(settings.load(path, host=host, source=source))


def for_worker(dep: Deployment, number: int) -> Deployment:
    """The view of a worker started as ``--generation number``: the serving
    generation's facts when it is that one, else those the file gives it (a
    worker of the generation a switch is starting, held by the supervisord
    :data:`SWITCH` names)."""
    gen = current(dep)
    if gen.number != number:
        under_way = read_switch(dep.runtime_dir)
        holder = under_way.supervisord if under_way and under_way.new == number else 0
        gen = of_file(dep, number, dep.workers.socket, holder)   # the worker inherits its socket
    return attach(dep, gen)


def write(runtime_dir: str, gen: Generation) -> None:
    statefile.write_json_atomic(state_path(runtime_dir), to_json(gen))


@dataclass(frozen=True)
class SwitchState:
    """What ``status`` shows while a switch is under way."""
    old: int
    new: int
    phase: str
    since: float
    supervisord: int = 0      # the supervisord holding the new generation (0: the front)


def write_switch(runtime_dir: str, old: int, new: int, phase: str,
                 since: Optional[float] = None, supervisord: int = 0) -> None:
    statefile.write_json_atomic(switch_path(runtime_dir), asdict(SwitchState(
        old, new, phase, time.time() if since is None else since, supervisord)))


def read_switch(runtime_dir: str) -> Optional[SwitchState]:
    data = statefile.read_json(switch_path(runtime_dir), quiet=True)
    if not isinstance(data, dict):
        return None
    try:
        return SwitchState(int(data["old"]), int(data["new"]), str(data["phase"]),
                           float(data["since"]), int(data.get("supervisord", 0)))
    except (KeyError, TypeError, ValueError):
        return None


def end_switch(runtime_dir: str) -> None:
    statefile.remove(switch_path(runtime_dir))


def reset(dep: Deployment) -> None:
    """A fresh supervisord (``run``) starts at generation 1 from the file."""
    end_switch(dep.runtime_dir)
    write(dep.runtime_dir, first(dep))
