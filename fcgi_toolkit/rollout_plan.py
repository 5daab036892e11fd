"""A multi-host rollout's pure decisions: which host restarts and why
(:func:`plan`), what nginx's upstream says while one host is out of
rotation (:func:`upstream`), whether a restarted host is back
(:func:`check_host`).  The shell that carries a rollout out is
:mod:`fcgi_toolkit.rollout`.

A host's socket is its own TCP address, so a second generation of its
workers cannot bind it beside the first.  A host therefore takes a new
generation *out of rotation*: nginx stops sending it requests (a ``down``
server, graceful reload; the old nginx workers finish what they sent it),
the host's ``run`` replaces its supervisord with one started from the file
(:mod:`fcgi_toolkit.respawn`), and once its workers are ready nginx sends
it requests again.  The other hosts serve meanwhile, so hosts go one at a
time and never the last one in rotation.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional, Sequence

from fcgi_toolkit import settings
from fcgi_toolkit.applying import diff
from fcgi_toolkit.names import format_duration
from fcgi_toolkit.settings import Applied, HostSpec
from fcgi_toolkit.switch_plan import Verdict


class Way(enum.Enum):
    """How a changed key reaches a multi-host deployment."""
    NGINX = "the web server's nginx"          # re-rendered, graceful reload
    HOST = "a new supervisord on the host"    # out of rotation, the host's run starts again
    FIXED = "stop and run again"              # where the deployment lives: no rollout moves it


#: Keys a rollout cannot change: the host's runtime directory holds the
#: respawn request itself, and app.name is the identifier the web server
#: expects from each host's supervisord.
FIXED_KEYS = frozenset(("app.name", "runtime.dir", "runtime.log_dir",
                        "control.system_supervisord"))
#: Keys only the web server uses (single-host ``run`` sets them up, hence RESTART there).
WEB_SERVER_KEYS = frozenset(("nginx.managed", "nginx.binary", "web.server"))


def way(key: str) -> Way:
    """How ``key`` ("section.name") takes effect in a multi-host rollout."""
    if key in FIXED_KEYS:
        return Way.FIXED
    if key in WEB_SERVER_KEYS or settings.applied_by(key) is Applied.NGINX:
        return Way.NGINX
    return Way.HOST


class Phase(enum.Enum):
    """What ``status`` on the web server shows while a rollout is under way."""
    OUT = "out of rotation"        # nginx reloaded without the host; its requests finish
    RESTARTING = "restarting"      # the host's run starts a new supervisord from the file
    BACK = "back in rotation"      # nginx reloaded with the host again
    ROLLING_BACK = "rolling back"  # the host's run starts its previous file again


@dataclass(frozen=True)
class HostPlan:
    """One host's part of a rollout: the keys its restart applies."""
    name: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class Rollout:
    """What ``apply`` on the web server does: hosts to restart in order, the
    keys nginx alone takes, and keys no rollout can apply ((host, key))."""
    hosts: tuple[HostPlan, ...]
    nginx: tuple[str, ...] = ()
    fixed: tuple[tuple[str, str], ...] = ()

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.hosts]


def host_keys(running: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The keys of one host's view that changed, "hosts" aside: the host's
    own count and address are its workers.count and workers.socket; the rest
    of its ``[[hosts]]`` entry is nginx's (compared by :func:`plan`)."""
    return [k for k in diff(running, wanted) if k != "hosts"]


def plan(running: Mapping[str, Mapping[str, Any]], wanted: Mapping[str, Mapping[str, Any]],
         order: Sequence[str], everyone: bool = False) -> Rollout:
    """The rollout from each host's running values (its applied snapshot) to
    the file's view of it (``wanted``), hosts in ``order`` (the file's).  A
    host restarts when a key of :attr:`Way.HOST` changed, or every host with
    ``everyone`` (``apply --new-supervisord``: an upgrade)."""
    hosts: list[HostPlan] = []
    nginx: dict[str, None] = {}
    fixed: list[tuple[str, str]] = []
    for name in order:
        keys = host_keys(running[name], wanted[name])
        by = {w: [k for k in keys if way(k) is w] for w in Way}
        fixed += [(name, k) for k in by[Way.FIXED]]
        nginx.update(dict.fromkeys(by[Way.NGINX]))
        if by[Way.HOST] or everyone:
            hosts.append(HostPlan(name, tuple(by[Way.HOST])))
    return Rollout(tuple(hosts), tuple(nginx), tuple(fixed))


def running_spec(name: str, values: Mapping[str, Any]) -> Optional[HostSpec]:
    """Host ``name``'s entry as its running snapshot records it (None if absent)."""
    for entry in values.get("hosts") or ():
        if isinstance(entry, Mapping) and entry.get("name") == name:
            return HostSpec(**{k: entry[k] for k in HostSpec.__dataclass_fields__})
    return None


def upstream(wanted: Sequence[HostSpec], running: Mapping[str, HostSpec],
             done: Sequence[str]) -> tuple[HostSpec, ...]:
    """nginx's servers during a rollout: a host not restarted yet serves as
    it runs (its running address and count); one restarted (``done``), and
    every nginx-only key, as the file says."""
    out = []
    for spec in wanted:
        old = running.get(spec.name)
        if spec.name in done or old is None:
            out.append(spec)
        else:
            out.append(replace(spec, address=old.address, count=old.count))
    return tuple(out)


def alone(servers: Sequence[HostSpec], out: str) -> bool:
    """Whether taking ``out`` out of rotation leaves nginx no server."""
    return not any(s.name != out for s in servers)


def check_host(status: Optional[Mapping[str, Any]], count: int, old_pids: Sequence[int],
               elapsed: float, timeout: float) -> Verdict:
    """Whether a restarted host is back: ``status`` (its ``fcgi.status()``;
    None while its supervisord does not answer) shows ``count`` workers
    ready that are not the old ones.  A worker in BACKOFF or FATAL (it
    exited within startsecs: the app does not import, the socket cannot be
    bound) fails, and so does a restart longer than ``timeout``."""
    if status is not None:
        workers = status.get("workers") or ()
        for w in workers:
            if w.get("supervisor_state") in ("BACKOFF", "FATAL"):
                return Verdict(failed="%s did not start (%s)" % (w.get("name"),
                                                                 w.get("supervisor_state")))
        fresh = [w for w in workers if w.get("state") in ("ready", "busy")
                 and w.get("pid") and w.get("pid") not in old_pids]
        if len(fresh) >= count:
            return Verdict(ready=True)
    if elapsed >= timeout:
        return Verdict(failed="not back with %d ready worker%s within %s" % (
            count, "" if count == 1 else "s", format_duration(timeout)))
    return Verdict()


def serving_pids(status: Mapping[str, Any]) -> list[int]:
    """The pids of a host's workers in its ``fcgi.status()`` object."""
    return [int(w["pid"]) for w in status.get("workers") or () if w.get("pid")]
