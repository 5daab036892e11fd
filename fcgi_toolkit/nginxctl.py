"""nginx's graceful reload, and the sign that it took.

A graceful reload (HUP to the master; ``nginx -s reload`` sends the same)
makes the master read its configuration again, start new worker processes
with it and tell the old ones to finish their requests and exit: an old
worker's title becomes ``nginx: worker process is shutting down``.  So the
sign a reload took is on /proc: the master has a worker it did not have
before, and each old worker is gone or shutting down (:func:`reloaded`);
the old ones are done once every one is gone (:func:`old_gone`).

The managed nginx (``nginx.managed``) is HUP'd through supervisord (its
pid is the master: fcgi-toolkit lifeline execs nginx).  A system nginx
(nginx.managed = false) is reloaded with ``nginx.reload`` (default:
``<nginx> -s reload``); its master is not known, so every nginx master on
the machine is watched and the reload took when one of them shows the sign.
"""
from __future__ import annotations

import subprocess
import time
from typing import Any, Callable, Mapping, Optional

import psutil

from fcgi_toolkit.names import nginx_program

MASTER_TITLE = "nginx: master process"
SHUTTING_DOWN = "is shutting down"

#: {master pid: {worker pid: title}}
Workers = Mapping[int, Mapping[int, str]]


class ReloadFailed(Exception):
    """The reload was refused or did not take; the message is one line."""


# --------------------------------------------------------------------------
# Pure
# --------------------------------------------------------------------------

def reloaded(before: Workers, now: Workers) -> list[int]:
    """The masters of ``before`` that now have a new worker and whose every
    old worker is gone or shutting down: those that took a reload."""
    out = []
    for master, old in before.items():
        current = now.get(master)
        if current is None or not set(current) - set(old):
            continue
        if all(pid not in current or SHUTTING_DOWN in current[pid] for pid in old):
            out.append(master)
    return out


def old_gone(before: Workers, now: Workers) -> bool:
    """Whether every worker of ``before`` has exited (or its master has)."""
    return all(pid not in now.get(master, {}) for master, old in before.items() for pid in old)


def reload_command(dep: Any, nginx_binary: str) -> list[str]:
    """The system nginx's reload command: nginx.reload, else ``<nginx> -s reload``."""
    return list(dep.nginx.reload) or [nginx_binary, "-s", "reload"]


# --------------------------------------------------------------------------
# /proc
# --------------------------------------------------------------------------

def _title(proc: psutil.Process) -> str:
    return " ".join(proc.cmdline())


def workers_of(masters: list[int]) -> dict[int, dict[int, str]]:
    """Each master's worker processes and their titles (a gone master: absent)."""
    out: dict[int, dict[int, str]] = {}
    for pid in masters:
        try:
            out[pid] = {c.pid: _title(c) for c in psutil.Process(pid).children()}
        except psutil.Error:
            continue
    return out


def system_masters() -> list[int]:
    """Every nginx master process on the machine."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        # psutil splits a rewritten title at its spaces: join it back.
        if " ".join(proc.info.get("cmdline") or []).startswith(MASTER_TITLE):
            found.append(proc.pid)
    return found


def wait(predicate: Callable[[], bool], timeout: float, clock: Callable[[], float] = time.monotonic,
         sleep: Callable[[float], None] = time.sleep, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true (True) or ``timeout`` passed (False)."""
    deadline = clock() + timeout
    while True:
        if predicate():
            return True
        if clock() >= deadline:
            return False
        sleep(interval)


# --------------------------------------------------------------------------
# The reload
# --------------------------------------------------------------------------

#: Seconds a reload has to show its sign.
TOOK_TIMEOUT = 15.0


def reload(dep: Any, rpc: Any, nginx_binary: str,
           run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
           managed: Optional[bool] = None) -> Workers:
    """Reload nginx gracefully and wait until it took; return the old workers
    of the masters that took it (for :func:`wait_old_gone`).  Raise ReloadFailed.
    ``managed`` (default nginx.managed): HUP the managed nginx through
    ``rpc``; else the system nginx (a multi-host web server's always)."""
    if dep.nginx.managed if managed is None else managed:
        master = int(rpc.getProcessInfo(nginx_program(dep.name))["pid"])
        if not master:
            raise ReloadFailed("the managed nginx %s is not running" % nginx_program(dep.name))
        masters = [master]
        before = workers_of(masters)
        rpc.signalProcess(nginx_program(dep.name), "HUP")
    else:
        masters = system_masters()
        before = workers_of(masters)
        command = reload_command(dep, nginx_binary)
        try:
            done = run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=TOOK_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ReloadFailed("%s: %s" % (" ".join(command), exc)) from None
        if done.returncode != 0:
            text = (done.stdout or b"").decode("utf-8", "replace").strip().splitlines()
            raise ReloadFailed("%s exited %d: %s" % (" ".join(command), done.returncode,
                                                      text[-1] if text else "no output"))
    took: list[int] = []

    def sign() -> bool:
        took[:] = reloaded(before, workers_of(masters))
        return bool(took)

    if not wait(sign, TOOK_TIMEOUT):
        raise ReloadFailed("nginx showed no new worker processes within %gs of the reload "
                           "(see its error log)" % TOOK_TIMEOUT)
    return {master: before[master] for master in took}


def wait_old_gone(dep: Any, before: Workers) -> Optional[str]:
    """Wait until the old nginx workers finished their requests (at most
    nginx.read_timeout and a margin); a warning line if some did not."""
    timeout = dep.nginx.read_timeout + dep.nginx.connect_timeout + 5
    if wait(lambda: old_gone(before, workers_of(list(before))), timeout):
        return None
    return "old nginx workers still running after %gs" % timeout
