"""``fcgi-toolkit worker``: one FastCGI worker process, as supervisord runs it.

supervisord's ``[fcgi-program]`` owns the listening socket and hands it to
every worker as fd 0 (unix or TCP).  The worker reads the deployment file,
imports the WSGI application, registers in its scoreboard slot and serves
with the fixed flup6 server (:mod:`fcgi_toolkit.flupfix`) until SIGTERM.

Signals (handlers only set flags; the main loop does the rest):

* SIGTERM / SIGINT: drain.  Stop accepting (new connections wait in the
  shared backlog for another worker), finish in-flight requests, close idle
  keep-alive connections, clear the scoreboard slot, exit 0.  Past
  ``workers.graceful_timeout`` exit 1 with a log line naming the cut requests.
* SIGUSR1: dump every thread's Python stack to stderr (faulthandler).
* SIGUSR2: a warm standby takes over: it starts accepting.  With
  ``workers.warm_standby`` (and ``workers.standby`` > 0) every worker starts
  as a warm standby: it imports the app, says so in its scoreboard slot and
  accepts nothing until the watchdog sends SIGUSR2 (a serving worker ignores
  it).

supervisord's death is a SIGTERM too (:mod:`fcgi_toolkit.lifeline`: the
parent-death signal, and a watch on the parent pid), so a worker whose
supervisord was killed drains and exits instead of serving on, orphaned.

Exit status: 0 drained, 1 drain deadline passed, 2 bad configuration or no
listening socket on fd 0, 3 the application failed to import.
"""
from __future__ import annotations

import argparse
import errno
import faulthandler
import importlib
import logging
import os
import signal
import socket
import sys
import traceback
from typing import Callable

from fcgi_toolkit import lifeline, settings
from fcgi_toolkit.names import PROMOTE_SIGNAL, slot_name

log = logging.getLogger("fcgi_toolkit.worker")

EXIT_DRAINED = 0
EXIT_DEADLINE = 1
EXIT_CONFIG = 2
EXIT_IMPORT = 3

TAKE_OVER = getattr(signal, "SIG" + PROMOTE_SIGNAL)   # SIGUSR2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", dest="config", required=True, metavar="DEPLOY",
                        help="the deployment file (deploy.toml)")
    parser.add_argument("--slot", type=int, required=True,
                        help="this worker's slot number (supervisord's process_num)")
    parser.add_argument("--generation", type=int, default=1,
                        help="the group's generation (README \"Generations\"; default: 1)")
    settings.add_start_from(parser)


def configure_logging(slot_name: str) -> None:
    """Log to stderr; supervisord redirects it to the slot's log file."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s " + slot_name + "[%(process)d] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def load_application(ref: str) -> Callable:
    """Import ``module:callable`` (the callable may be dotted)."""
    module_name, _, attr = ref.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError("%s is not callable" % ref)
    return obj


def inherited_listener(fd: int = 0) -> socket.socket:
    """The listening socket supervisord passed as ``fd``; raises OSError if
    there is none.  The family comes from the socket itself (flup assumed
    AF_INET for every fd 0)."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise OSError(errno.EINVAL, "fd %d is a socket but not listening" % fd)
    except OSError:
        sock.close()
        raise
    return sock


def _prepare_process(dep) -> None:
    os.environ.update(dep.app.environment)
    os.chdir(dep.app.directory)
    if dep.app.directory not in sys.path:
        sys.path.insert(0, dep.app.directory)


def _open_slot(dep, slot: int):
    """The scoreboard writer for this slot (ready=False until we accept)."""
    import psutil

    from fcgi_toolkit.scoreboard import RSS_EVERY, SlotWriter
    os.makedirs(os.path.dirname(dep.scoreboard_path), exist_ok=True)
    # With a memory limit the worker publishes its own RSS for the watchdog's fast poll.
    return SlotWriter(dep.scoreboard_path, slot, dep.slots, os.getpid(),
                      psutil.Process().create_time(),
                      rss_every=RSS_EVERY if dep.limits.max_rss else 0.0)


def run(args: argparse.Namespace) -> int:
    from fcgi_toolkit import generations
    # ConfigError: cli prints it, exit 2.  The generation names our scoreboard.
    dep = generations.for_worker(settings.load(args.config, source=args.start_from), args.generation)
    if not 0 <= args.slot < dep.slots:
        print("fcgi-toolkit worker: --slot %d outside 0..%d" % (args.slot, dep.slots - 1),
              file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(slot_name(dep.group, args.slot))
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    # A stop signal during the app import must not kill us mid-way: remember it.
    early_stop: list = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: early_stop.append(signum))
    early_take_over: list = []     # SIGUSR2's default action would end the process
    signal.signal(TAKE_OVER, lambda signum, frame: early_take_over.append(signum))
    lifeline.guard(signal.SIGTERM, dep.supervisord_pidfile)

    try:
        listener = inherited_listener(0)
    except OSError as exc:
        log.error("no listening socket on fd 0 (%s): the worker runs under supervisord's "
                  "[fcgi-program], or with a listening socket as its stdin", exc)
        return EXIT_CONFIG
    # fd 0 is the listening socket: keep the app from reading it as stdin.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)

    _prepare_process(dep)
    slot = _open_slot(dep, args.slot)
    try:
        try:
            app = load_application(dep.app.wsgi)
        except Exception:
            log.error("cannot import the application %s:\n%s", dep.app.wsgi,
                      traceback.format_exc().rstrip())
            return EXIT_IMPORT
        code = serve(app, listener, dep, slot, stop_requested=bool(early_stop),
                     standby=warm_standby(dep) and not early_take_over)
    finally:
        slot.clear()
        logging.shutdown()
    if code != EXIT_DRAINED:
        # Pool threads may be stuck in the application: do not wait for them.
        sys.stderr.flush()
        os._exit(code)
    return code


def _exit_past_deadline(slot) -> None:
    """The drain deadline passed while the only serving thread is stuck in the
    application (threads = 1): free the slot and exit 1 without waiting."""
    slot.clear()
    logging.shutdown()
    sys.stderr.flush()
    os._exit(EXIT_DEADLINE)


def warm_standby(dep) -> bool:
    """Whether a fresh worker starts as a warm standby (the watchdog promotes it)."""
    return dep.workers.warm_standby and dep.workers.standby > 0


def serve(app: Callable, listener: socket.socket, dep, slot, stop_requested: bool = False,
          standby: bool = False) -> int:
    """Serve until SIGTERM/SIGINT, then drain; returns the exit status.  With
    ``standby``, wait as a warm standby until SIGUSR2 first."""
    from fcgi_toolkit.flupfix import WSGIServer

    workers = dep.workers
    server = WSGIServer(app, threads=workers.threads, idle_timeout=workers.idle_timeout,
                        graceful_timeout=workers.graceful_timeout, debug=workers.debug,
                        observer=slot,
                        web_server_addrs=os.environ.get("FCGI_WEB_SERVER_ADDRS"),
                        mount=dep.nginx.location,
                        path_from_uri=dep.web.path_info == "request_uri")

    def on_stop(signum: int, frame) -> None:
        server.request_stop()   # a flag; set_wakeup_fd wakes the main loop

    def on_take_over(signum: int, frame) -> None:
        server.request_take_over()   # a flag; set_wakeup_fd wakes the standby's wait

    previous = {sig: signal.signal(sig, on_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[TAKE_OVER] = signal.signal(TAKE_OVER, on_take_over)
    old_wakeup = signal.set_wakeup_fd(server.wake_fd, warn_on_full_buffer=False)
    if stop_requested:
        server.request_stop()

    def on_ready() -> None:
        slot.set_ready()
        log.info("serving %s on %s with %d thread(s)", dep.app.wsgi,
                 _describe(listener), workers.threads)

    def on_standby() -> None:
        slot.set_standby()
        log.info("warm standby: %s imported, waiting for SIGUSR2 to accept", dep.app.wsgi)

    try:
        return server.serve(listener, on_ready=on_ready, on_drain=slot.set_draining,
                            on_deadline=lambda: _exit_past_deadline(slot),
                            on_standby=on_standby if standby else None)
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _describe(listener: socket.socket) -> str:
    name = listener.getsockname()
    if listener.family == socket.AF_UNIX:
        return "unix:%s" % (name.decode() if isinstance(name, bytes) else name or "?")
    return "tcp:%s:%s" % name[:2]
