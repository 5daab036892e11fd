"""What a previous life of a deployment left behind, ending it, and ``fcgi-toolkit stop``.

A supervisord killed hard (SIGKILL, the OOM killer) leaves its pid file, a
control socket nobody answers and, for a moment, its children: they notice
the death (:mod:`fcgi_toolkit.lifeline`) and drain, which takes up to
``workers.graceful_timeout``.  Before ``run`` (or ``demo``) starts a new
supervisord, :func:`clear_for_start` finds those remains, says what it found
in one line, ends the processes (their graceful signal first, SIGKILL
after ``workers.graceful_timeout``) and then checks that the addresses the
deployment binds are free: a TCP address or unix socket held by a process
that is not part of this deployment is one line and exit 2 (supervisord
would crash on the TCP bind, and would silently unlink and replace a unix
socket file that another program serves).

A process belongs to the deployment when its command line is one that the
rendered supervisord.conf runs (:func:`classify`): supervisord with this
``supervisord.conf``, ``python -m fcgi_toolkit worker|listener|metrics -c
DEPLOY``, the lifeline wrapper with this pid file, nginx with this
``nginx.conf``; or when a live scoreboard slot names it; plus the
descendants of those (nginx's workers, an application's subprocesses).

``fcgi-toolkit stop -c deploy.toml`` asks a running supervisord to shut
down (gracefully, over the control socket), waits for it, then clears
whatever is left the same way.
"""
from __future__ import annotations

import argparse
import enum
import errno
import http.client
import os
import re
import signal
import socket
import sys
import time
import xmlrpc.client
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence, TextIO

from fcgi_toolkit import lifeline, render, settings
from fcgi_toolkit.settings import ConfigError, Deployment


class Kind(enum.Enum):
    SUPERVISORD = "supervisord"
    WORKER = "worker"
    WATCHDOG = "watchdog"
    METRICS = "metrics"
    NGINX = "nginx"


#: The ``python -m fcgi_toolkit COMMAND`` processes supervisord runs, by kind
#: ("lifeline" is the managed nginx before its exec).
SUPERVISED_COMMANDS = {"worker": Kind.WORKER, "listener": Kind.WATCHDOG,
                       "metrics": Kind.METRICS, "lifeline": Kind.NGINX}

#: The kinds a command line names by the deployment file (every host's alike).
BY_DEPLOY_PATH = frozenset({Kind.WORKER, Kind.WATCHDOG, Kind.METRICS})

#: The graceful stop signal of each kind (nginx finishes its requests on QUIT).
GRACEFUL_SIGNAL = {Kind.SUPERVISORD: signal.SIGTERM, Kind.WORKER: signal.SIGTERM,
                   Kind.WATCHDOG: signal.SIGTERM, Kind.METRICS: signal.SIGTERM,
                   Kind.NGINX: signal.SIGQUIT}


#: The files of an inner supervisord (README "Generations") in the runtime dir.
INNER_FILE = re.compile(r"(supervisord-g\d+\.(conf|pid)|supervisor-g\d+\.sock)")


@dataclass(frozen=True)
class Signature:
    """The paths by which a process's command line names this deployment."""
    deploy_path: str
    supervisord_conf: str       # the front's; an inner one's is supervisord-gN.conf beside it
    pidfile: str                # the front's: the lifeline of nginx and of inner supervisords
    nginx_conf: str
    host: str = ""              # the host view's name ("" single-host or the front)

    @classmethod
    def of(cls, dep: Deployment) -> "Signature":
        return cls(dep.path, dep.front_conf, dep.front_pidfile,
                   os.path.join(dep.runtime_dir, "nginx.conf"),
                   dep.host.name if dep.host is not None else "")

    def names_supervisord_conf(self, path: Optional[str]) -> bool:
        """Whether ``path`` is the front's supervisord.conf or an inner one's."""
        if path is None:
            return False
        directory, base = os.path.split(path)
        return path == self.supervisord_conf or (
            directory == os.path.dirname(self.supervisord_conf)
            and INNER_FILE.fullmatch(base) is not None and base.endswith(".conf"))


def _option(argv: Sequence[str], name: str) -> Optional[str]:
    for i, arg in enumerate(argv[:-1]):
        if arg == name:
            return argv[i + 1]
    return None


def classify(cmdline: Sequence[str], sig: Signature) -> Optional[Kind]:
    """Which of the deployment's processes ``cmdline`` is; None if it is not one."""
    argv = list(cmdline)
    if len(argv) == 1 and " " in argv[0]:
        argv = argv[0].split()   # a rewritten title ("nginx: master process ... -c CONF")
    for i, arg in enumerate(argv[:-2]):
        if arg == "-m" and argv[i + 1] == "fcgi_toolkit":
            kind = SUPERVISED_COMMANDS.get(argv[i + 2])
            rest = argv[i + 3:]
            if kind is Kind.NGINX:
                return kind if _option(rest, "--pidfile") == sig.pidfile else None
            return kind if kind is not None and _option(rest, "-c") == sig.deploy_path else None
        if arg == "-m" and argv[i + 1] == "supervisor.supervisord":
            return Kind.SUPERVISORD if sig.names_supervisord_conf(_option(argv, "-c")) else None
    if not argv:
        return None
    program = os.path.basename(argv[0])
    if program == "supervisord" and sig.names_supervisord_conf(_option(argv, "-c")):
        return Kind.SUPERVISORD
    if program.startswith("nginx") and _option(argv, "-c") == sig.nginx_conf:
        return Kind.NGINX
    return None


def same_host(environ: Optional[Mapping[str, str]], host: str) -> bool:
    """Whether a process named by the deployment file's path (a worker, the
    watchdog, the metrics server) is this host's: hosts of one file that share
    a machine tell theirs apart by the host supervisord.conf sets in every
    child's environment.  An environment we may not read (another user's
    process, without root) is counted as this host's."""
    if environ is None:
        return True
    return (environ.get(settings.HOST_ENV) or "") == host


@dataclass(frozen=True)
class Leftover:
    pid: int
    kind: Kind
    started: float          # psutil create_time: guards the signals against a reused pid


@dataclass(frozen=True)
class Remains:
    """What :func:`find` saw of a previous life."""
    pidfile_pid: Optional[int]       # the pid in a pid file left behind (None: no file)
    control_socket: bool             # a control socket file that nobody answers
    processes: tuple[Leftover, ...]
    inner_files: tuple[str, ...] = ()   # an inner supervisord's conf, pid file, socket

    @property
    def empty(self) -> bool:
        return (self.pidfile_pid is None and not self.control_socket and not self.processes
                and not self.inner_files)


def describe(name: str, remains: Remains, grace: float) -> str:
    """One line saying what was found and what happens to it."""
    found = []
    pids = {p.pid for p in remains.processes}
    if remains.pidfile_pid is not None:
        found.append("pid file (supervisord pid %d, %s)" % (
            remains.pidfile_pid, "still alive" if remains.pidfile_pid in pids else "gone"))
    if remains.control_socket:
        found.append("a control socket nobody answers")
    if remains.inner_files:
        found.append("inner supervisord files (%s)" % " ".join(
            sorted(os.path.basename(p) for p in remains.inner_files)))
    for kind in Kind:
        of_kind = sorted(p.pid for p in remains.processes if p.kind is kind)
        if of_kind:
            found.append("%s %s" % (kind.value, " ".join(map(str, of_kind))))
    if remains.processes:
        action = "ending them (graceful signal, SIGKILL after %gs)" % grace
    else:
        action = "no process left"
    return "fcgi-toolkit: %s: a previous supervisord left %s; %s" % (name, ", ".join(found), action)


# --------------------------------------------------------------------------
# I/O: the process table, signals, sockets
# --------------------------------------------------------------------------

def _own_lineage() -> set[int]:
    import psutil
    pids = {os.getpid()}
    try:
        pids.update(p.pid for p in psutil.Process().parents())
    except psutil.Error:
        pass
    return pids


def scan(dep: Deployment) -> list[Leftover]:
    """The live processes of this deployment (and their descendants), not counting ours."""
    import psutil

    from fcgi_toolkit import scoreboard

    sig = Signature.of(dep)
    exclude = _own_lineage()
    found: dict[int, Leftover] = {}

    def add(proc: "psutil.Process", kind: Kind) -> None:
        try:
            if proc.pid in exclude or proc.pid in found or proc.status() == psutil.STATUS_ZOMBIE:
                return   # a zombie has ended: only its reaping is left
            found[proc.pid] = Leftover(proc.pid, kind, proc.create_time())
            for child in proc.children(recursive=True):
                if child.pid not in exclude and child.pid not in found:
                    found[child.pid] = Leftover(child.pid, kind, child.create_time())
        except psutil.Error:
            pass   # it ended while we looked

    def environ(proc: "psutil.Process") -> Optional[dict]:
        try:
            return proc.environ()
        except psutil.Error:
            return None

    for proc in psutil.process_iter(["cmdline"]):
        kind = classify(proc.info.get("cmdline") or [], sig)
        if kind in BY_DEPLOY_PATH and not same_host(environ(proc), sig.host):
            continue   # another host's worker on this machine (same file)
        if kind is not None:
            add(proc, kind)
    board = scoreboard.Scoreboard(dep.scoreboard_path, dep.slots)
    try:
        for rec in board.read_all():
            if rec is None or rec.pid <= 0:
                continue
            try:
                proc = psutil.Process(rec.pid)
                if scoreboard.is_live(rec, rec.pid, proc.create_time()):
                    add(proc, Kind.WORKER)
            except psutil.Error:
                pass
    finally:
        board.close()
    return sorted(found.values(), key=lambda p: p.pid)


def answers(path: str) -> bool:
    """Whether something accepts connections on the unix socket ``path``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2)
        s.connect(path)
        return True
    except OSError:
        return False   # no file, not a socket, or a stale one (ECONNREFUSED)
    finally:
        s.close()


def find(dep: Deployment) -> Remains:
    """Remains of a previous life; call it when the control socket does not answer."""
    try:
        inner = tuple(sorted(os.path.join(dep.runtime_dir, name)
                             for name in os.listdir(dep.runtime_dir) if INNER_FILE.fullmatch(name)))
    except FileNotFoundError:
        inner = ()
    return Remains(pidfile_pid=lifeline.read_pid(dep.front_pidfile),
                   control_socket=os.path.exists(dep.front_control_socket),
                   processes=tuple(scan(dep)), inner_files=inner)


def end(processes: Iterable[Leftover], grace: float) -> list[Leftover]:
    """Send each process its graceful signal, wait up to ``grace`` seconds,
    SIGKILL the rest; returns those that had to be killed."""
    import psutil

    live: dict[int, tuple[Leftover, psutil.Process]] = {}
    for item in processes:
        try:
            proc = psutil.Process(item.pid)
            if abs(proc.create_time() - item.started) < 0.01:
                proc.send_signal(GRACEFUL_SIGNAL[item.kind])
                live[item.pid] = (item, proc)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs([proc for _, proc in live.values()], timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return [live[proc.pid][0] for proc in alive]


def _holder(match: Callable[[object], bool], kind: str) -> str:
    """'pid N (command)' of the process with a socket matching ``match``, if visible."""
    import psutil
    try:
        conns = psutil.net_connections(kind=kind)
    except psutil.Error:
        conns = []
    for conn in conns:
        if conn.pid and match(conn):
            try:
                # One line, whatever the command line holds (newlines, control characters).
                words = " ".join(psutil.Process(conn.pid).cmdline()).split()
                cmd = "".join(ch for ch in " ".join(words) if ch.isprintable()) or "?"
            except psutil.Error:
                cmd = "?"
            return "pid %d (%s)" % (conn.pid, cmd[:80])
    return "another process"


def tcp_in_use(host: str, port: int) -> bool:
    """Whether binding host:port fails with EADDRINUSE (SO_REUSEADDR, as
    supervisord and nginx bind); other bind errors are raised."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def _tcp_address(value: str) -> tuple[str, int]:
    """(host, port) of "host:port", "[v6]:port" or "port" (nginx binds every address)."""
    host, _, port = value.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def _check_tcp(dep: Deployment, key: str, value: str, address: str) -> None:
    host, port = _tcp_address(address)
    try:
        busy = tcp_in_use(host, port)
    except OSError as exc:   # e.g. EADDRNOTAVAIL: not an address of this machine
        raise ConfigError("%s: %s = %r: cannot bind %s:%d: %s"
                          % (dep.path, key, value, host, port, exc.strerror)) from None
    if busy:
        holder = _holder(lambda c: c.status == "LISTEN" and c.laddr and c.laddr.port == port, "tcp")
        raise ConfigError("%s: %s = %r: %s:%d is in use by %s, which is not part of this "
                          "deployment; stop it or choose another address"
                          % (dep.path, key, value, host, port, holder))


def check_addresses(dep: Deployment) -> None:
    """Raise ConfigError (one line) if an address the deployment binds is held by another program."""
    check_socket(dep)
    if dep.nginx.managed and not dep.multi_host:
        _check_tcp(dep, "nginx.listen", dep.nginx.listen, dep.nginx.listen)


def check_socket(dep: Deployment) -> None:
    """Raise ConfigError (one line) if the worker socket is held by another program."""
    if dep.socket_is_unix:
        path = dep.socket_path
        if os.path.lexists(path):
            import stat
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise ConfigError("%s: workers.socket = %r: %s exists and is not a socket "
                                  "(supervisord would replace it); remove it or choose another path"
                                  % (dep.path, dep.socket_url, path))
            if answers(path):
                holder = _holder(lambda c: c.laddr == path, "unix")
                raise ConfigError("%s: workers.socket = %r: %s is served by %s, which is not part "
                                  "of this deployment; stop it or choose another path"
                                  % (dep.path, dep.socket_url, path, holder))
    else:
        _check_tcp(dep, "workers.socket", dep.socket_url, dep.socket_url[len("tcp://"):])


def clear_for_start(dep: Deployment, stream: TextIO = sys.stderr) -> Optional[Remains]:
    """Before a new supervisord: end a previous life's processes (saying so
    in one line), then check the addresses (ConfigError naming a foreign
    holder).  Call it when the control socket does not answer."""
    from fcgi_toolkit import generations
    remains = find(generations.serving(dep))     # the last life's group may be a later generation
    if not remains.empty:
        _end_saying(dep, remains, stream)
    check_addresses(dep)
    return None if remains.empty else remains


def forget_inner_files(remains: Remains) -> None:
    """Remove what inner supervisords left (a stopped front's): the next
    ``run`` starts generation 1 in the front."""
    for path in remains.inner_files:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _end_saying(dep: Deployment, remains: Remains, stream: TextIO) -> None:
    grace = dep.workers.graceful_timeout
    print(describe(dep.name, remains, grace), file=stream, flush=True)
    killed = end(remains.processes, grace)
    forget_inner_files(remains)
    if killed:
        print("fcgi-toolkit: %s: killed (SIGKILL) past %gs: %s" % (
            dep.name, grace, ", ".join("%s %d" % (p.kind.value, p.pid) for p in killed)),
            file=stream, flush=True)


# --------------------------------------------------------------------------
# Command: stop
# --------------------------------------------------------------------------

def shutdown_bound(dep: Deployment) -> float:
    """How long supervisord's own orderly shutdown may take: it stops nginx,
    the watchdog, the metrics and the workers one after the other, each
    within its stopwaitsecs."""
    return float(sum(render.stop_waits(dep).values()))


def add_arguments_stop(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default="deploy.toml",
                        help="deployment file (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for supervisord's shutdown before ending what is "
                             "left (default: the sum of the stop timeouts)")


def _wait_gone(pid: Optional[int], dep: Deployment, timeout: float) -> bool:
    import psutil
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid is not None:
            try:
                psutil.Process(pid).wait(max(0.0, deadline - time.monotonic()))
                return True
            except psutil.TimeoutExpired:
                return False
            except psutil.NoSuchProcess:
                return True
        if not answers(dep.front_control_socket):
            return True
        time.sleep(0.2)
    return False


def run_stop(args: argparse.Namespace) -> int:
    """Stop a deployment: supervisord's graceful shutdown, then what is left."""
    from fcgi_toolkit import generations, supervisord

    dep = generations.load(args.config)     # leftovers of the serving generation's workers
    timeout = args.timeout if args.timeout is not None else shutdown_bound(dep)
    stopped = False
    # The front: it stops nginx, then an inner supervisord, which drains its workers.
    if answers(dep.front_control_socket):
        pid = lifeline.read_pid(dep.front_pidfile)
        print("fcgi-toolkit: %s: asking supervisord%s to shut down (waiting up to %gs)"
              % (dep.name, " (pid %d)" % pid if pid else "", timeout), flush=True)
        try:
            supervisord.front_proxy(dep).shutdown()
        except (OSError, xmlrpc.client.Fault, http.client.HTTPException) as exc:
            print("fcgi-toolkit: %s: supervisord did not take the shutdown: %s" % (dep.name, exc),
                  file=sys.stderr)
        stopped = _wait_gone(pid, dep, timeout)
        if not stopped:
            print("fcgi-toolkit: %s: supervisord still running after %gs" % (dep.name, timeout),
                  file=sys.stderr)
    remains = find(dep)
    if remains.processes:
        _end_saying(dep, remains, sys.stderr)
    elif stopped:
        forget_inner_files(remains)
    elif not stopped:
        print("fcgi-toolkit: %s is not running" % dep.name)
        return 0
    print("fcgi-toolkit: %s stopped" % dep.name)
    return 0
