"""The server: accept loop, drain and the inline monitor thread.

flup6 1.1.1's threaded ``WSGIServer`` subclassed: it accepts only while a
thread is free (bug 9), checks FCGI_WEB_SERVER_ADDRS on every TCP
connection (bug 6), drains on request and installs no signal handlers.
Bug numbers refer to ``docs/flup6-bugs.rst``.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterable, Optional

from flup.server import fcgi

from .. import sigthreads
from .connection import Connection, Request
from .gateway import RequestObserver, WSGIGateway
from .streams import ErrorStream

log = logging.getLogger("fcgi_toolkit.worker")

_NOTHING_PENDING = object()   # _accept: no connection waiting

def parse_web_server_addrs(value: Optional[str]) -> Optional[frozenset]:
    """FCGI_WEB_SERVER_ADDRS as a set (None: any peer).  flup keeps a ``map``
    iterator here, which is exhausted by the first check (bug 6)."""
    if value is None:
        return None
    return frozenset(a.strip() for a in value.split(",") if a.strip())


def client_allowed(family: int, addr: Any, allowed: Optional[frozenset]) -> bool:
    """Whether a peer may talk to us.  The list names IP addresses, so it
    applies to TCP only; on a unix socket the peer has no address (flup
    rejected every unix peer here, bug 6)."""
    if allowed is None or family not in (socket.AF_INET, socket.AF_INET6):
        return True
    host = addr[0] if isinstance(addr, tuple) and addr else ""
    if host.startswith("::ffff:") and host[7:] in allowed:
        return True
    return host in allowed


def describe_inflight(requests: Iterable[tuple], now: float) -> str:
    """``GET /x (12.3s), ...`` for a log line naming cut requests."""
    items = sorted(requests, key=lambda r: r[2])
    return ", ".join("%s %s (%.1fs)" % (m, u, now - s) for m, u, s in items) or "none"


def configure_client_socket(sock: socket.socket, family: int) -> None:
    """Per-connection socket options: TCP_NODELAY on TCP (flup set none, bug 8).
    Non-blocking: every wait is our own select with the idle timeout, so a
    stuck peer cannot hold a thread forever.  (Python sockets are created
    close-on-exec already.)"""
    if family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)


def exit_past_deadline() -> None:
    """What an inline server does past its drain deadline when given no
    ``on_deadline``: the stuck request holds the only serving thread, so the
    process exits with status 1 without waiting for it."""
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except (OSError, ValueError):
            pass
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(1)


class DrainControl:
    """The stop request, the drain and its deadline (a mixin of
    :class:`WSGIServer`, which provides ``connections()``, ``_busy()`` and
    ``inline``).

    Two pipes: the wake-up pipe (``wake_fd``, for ``signal.set_wakeup_fd``
    and for pool threads that free a slot) and the drain pipe, written once
    when draining starts and never read, so that it stays readable and every
    idle connection's wait ends at once."""

    inline: bool

    def __init__(self, graceful_timeout: float):
        self.graceful_timeout = graceful_timeout
        self.stop_requested = False
        self._stop_at = 0.0
        self.take_over_requested = False
        self.draining = False
        self._deadline = 0.0
        self._drain_lock = threading.Lock()
        self._finished = threading.Event()
        self._on_drain: Optional[Callable[[], None]] = None
        self._on_deadline: Optional[Callable[[], None]] = None
        self._wake_r, self._wake_w = os.pipe()
        self._drain_r, self._drain_w = os.pipe()
        for fd in (self._wake_r, self._wake_w, self._drain_r, self._drain_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)

    def connections(self) -> list:
        raise NotImplementedError

    def _busy(self) -> int:
        raise NotImplementedError

    # -- control -----------------------------------------------------------
    @property
    def wake_fd(self) -> int:
        """Write end of the wake-up pipe (for signal.set_wakeup_fd)."""
        return self._wake_w

    @property
    def drain_fd(self) -> int:
        """Readable once draining started (idle connections watch it)."""
        return self._drain_r

    def request_stop(self) -> None:
        """Ask for a drain.  Only sets a flag: safe in a signal handler
        (flup installed handlers that cut in-flight requests, bug 16)."""
        self.stop_requested = True
        self._stop_at = time.monotonic()

    def request_take_over(self) -> None:
        """A warm standby starts accepting.  Only sets a flag: safe in a signal handler."""
        self.take_over_requested = True

    def _stand_by(self) -> None:
        """Wait, accepting nothing, until a take-over or a stop is requested.

        A signal's C-level handler writes the wake-up pipe before its Python
        handler sets the flag in this (main) thread: after a wake-up, look
        again soon."""
        quick_until = 0.0
        while not (self.take_over_requested or self.stop_requested):
            now = time.monotonic()
            r, _, _ = select.select([self._wake_r], [], [], 0.02 if now < quick_until else 1.0)
            if r:
                self._drain_wake_pipe()
                quick_until = time.monotonic() + 1.0

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # already awake

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # -- drain ----------------------------------------------------------------
    def _begin_drain(self) -> None:
        """Start draining (once): from the accept loop, or the inline monitor."""
        with self._drain_lock:
            if self.draining:
                return
            self._deadline = time.monotonic() + self.graceful_timeout
            self.draining = True
            os.write(self._drain_w, b"x")   # never read: stays readable
        if self._on_drain is not None:
            self._on_drain()
        log.info("draining: %d connection(s) open, %d request(s) in flight; deadline %.1fs "
                 "(%.3fs after the stop request)", self._busy(), self._inflight_count(),
                 self.graceful_timeout, time.monotonic() - self._stop_at)

    def _drain(self) -> int:
        self._begin_drain()
        while True:
            if self._busy() == 0:
                log.info("drained: every request finished")
                return 0
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                self._log_cut()
                return 1
            select.select([self._wake_r], [], [], min(remaining, 1.0))
            self._drain_wake_pipe()

    def _log_cut(self) -> None:
        cut = [c.current for c in self.connections() if c.current]
        log.error("graceful timeout %.1fs passed: cutting %d request(s): %s "
                  "(and %d idle connection(s))",
                  self.graceful_timeout, len(cut), describe_inflight(cut, time.time()),
                  self._busy() - len(cut))

    def _monitor(self) -> None:
        """Inline mode's helper thread.  The serving thread may be inside the
        application or waiting on a connection; this thread waits on the
        wake-up pipe, starts the drain when a stop was requested (the drain
        pipe then wakes the serving thread's waits) and enforces the drain
        deadline.  It never takes the asynchronous signals (:mod:`fcgi_toolkit.sigthreads`):
        they go to the main thread, where their handlers run."""
        quick_until = 0.0
        while not self._finished.is_set():
            if self.stop_requested:
                self._begin_drain()
                break
            # The C-level signal handler writes the pipe before the Python
            # handler sets the flag in the main thread: after a wake-up, look
            # again soon.
            now = time.monotonic()
            r, _, _ = select.select([self._wake_r], [], [], 0.02 if now < quick_until else 1.0)
            if r:
                self._drain_wake_pipe()
                quick_until = time.monotonic() + 1.0
        else:
            return
        if self._finished.wait(max(0.0, self._deadline - time.monotonic())):
            return
        if self._finished.is_set():
            return
        self._log_cut()
        (self._on_deadline or exit_past_deadline)()

    def _inflight_count(self) -> int:
        return sum(1 for c in self.connections() if c.current)



class WSGIServer(DrainControl, WSGIGateway, fcgi.WSGIServer):
    """flup6's threaded WSGIServer with the fixes of this package.

    ``serve(listening_socket)`` runs the accept loop until :meth:`request_stop`
    (called from a signal handler: it only sets a flag), then drains: stops
    accepting, lets in-flight requests finish, closes idle connections.  It
    returns 0 when drained, 1 when ``graceful_timeout`` passed first (the log
    line names the requests cut).  It installs no signal handlers itself.

    With ``threads=1`` the server runs *inline*: the thread calling
    :meth:`serve` accepts a connection and serves it itself, with no pool
    thread and no hand-off per connection.  A small monitor thread then holds
    the wake-up pipe: it notices the stop request, starts the drain, and at the
    drain deadline calls ``on_deadline`` (default: :func:`exit_past_deadline`),
    since the stuck request holds the only serving thread.  With more threads,
    flup's pool serves the connections and the calling thread only accepts.
    """

    request_class = Request

    def __init__(self, application: Callable, *, threads: int = 1, idle_timeout: float = 60.0,
                 graceful_timeout: float = 30.0, debug: bool = False,
                 observer: Optional[RequestObserver] = None,
                 web_server_addrs: Optional[str] = None,
                 errors: Optional[ErrorStream] = None,
                 environ: Optional[dict] = None,
                 mount: str = "", path_from_uri: bool = False):
        # flup's debug=True default sends cgitb pages with locals (bug 3).
        # Inline (one thread): flup's pool gets no thread at all, so no idle
        # thread can take the process's signals from the main thread.
        pool = 0 if threads == 1 else threads
        fcgi.WSGIServer.__init__(self, application, environ=environ,
                                 multithreaded=threads > 1, multiprocess=True,
                                 debug=debug, minSpare=pool, maxSpare=pool,
                                 maxThreads=threads)
        self._connectionClass = Connection
        self.threads = threads
        self.inline = threads == 1
        self.idle_timeout = idle_timeout
        self.observer = observer
        self.errors = errors or ErrorStream()
        self.capability = {"FCGI_MAX_CONNS": threads, "FCGI_MAX_REQS": threads,
                           "FCGI_MPXS_CONNS": 0}
        self._allowed = parse_web_server_addrs(web_server_addrs)
        self._lock = threading.Lock()
        self._connections: set = set()
        self._init_gateway(mount, path_from_uri)
        DrainControl.__init__(self, graceful_timeout)

    def connections(self) -> list:
        with self._lock:
            return list(self._connections)

    def connection_done(self, conn: Connection) -> None:
        with self._lock:
            was_full = len(self._connections) >= self.threads
            self._connections.discard(conn)
        if not self.inline and (was_full or self.draining):
            self.wake()   # the main loop waits for a free thread, or drains

    def _busy(self) -> int:
        with self._lock:
            return len(self._connections)

    # -- accept loop ---------------------------------------------------------
    def serve(self, listener: socket.socket, on_ready: Optional[Callable[[], None]] = None,
              on_drain: Optional[Callable[[], None]] = None,
              on_deadline: Optional[Callable[[], None]] = None,
              on_standby: Optional[Callable[[], None]] = None) -> int:
        """Accept until :meth:`request_stop`, then drain; ``on_ready`` runs just
        before the first accept, ``on_drain`` when draining starts,
        ``on_deadline`` (inline only, in the monitor thread) when the drain
        deadline passes with a request still running.

        With ``on_standby`` the server is a warm standby first: it calls
        ``on_standby`` and accepts nothing until :meth:`request_take_over`
        (then it goes on as above) or :meth:`request_stop` (then it drains
        at once: it has no connection)."""
        listener.setblocking(False)
        self._on_drain, self._on_deadline = on_drain, on_deadline
        if on_standby is not None:
            on_standby()
            self._stand_by()    # before the monitor thread: only this thread reads the pipe
            if self.stop_requested:
                return self._drain()
        monitor = None
        if self.inline:
            monitor = sigthreads.start(self._monitor, "fcgi-drain-monitor")
        try:
            if on_ready is not None:
                on_ready()
            if self.inline:
                self._accept_inline(listener)
            else:
                self._accept_to_pool(listener)
            return self._drain()
        finally:
            self._finished.set()
            if monitor is not None:
                self.wake()
                monitor.join(5.0)

    def _accept_inline(self, listener: socket.socket) -> None:
        family = listener.family
        watch = [self._drain_r, listener]
        while not (self.stop_requested or self.draining):
            conn = self._accept(listener, family)
            if conn is _NOTHING_PENDING:
                # The drain pipe is never read: once readable, draining is set.
                select.select(watch, [], [], 1.0)
            elif conn is not None:
                conn.run()

    def _accept_to_pool(self, listener: socket.socket) -> None:
        family = listener.family
        while not self.stop_requested:
            if self._busy() < self.threads:
                conn = self._accept(listener, family)
                if conn is not _NOTHING_PENDING:
                    if conn is not None:
                        # A thread is free (checked before accepting), so this never queues.
                        self._threadPool.addJob(conn, allowQueuing=True)
                    continue
                watch = [self._wake_r, listener]
            else:
                watch = [self._wake_r]
            r, _, _ = select.select(watch, [], [], 1.0)
            if self._wake_r in r:
                self._drain_wake_pipe()

    def _accept(self, listener: socket.socket, family: int) -> Any:
        """One accepted connection, None if one was taken and refused, or
        _NOTHING_PENDING."""
        try:
            sock, addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return _NOTHING_PENDING   # none, or another worker took it
        except OSError as exc:
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                return None
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.error("accept failed: %s; pausing for 1s", exc)
                time.sleep(1.0)
                return None
            raise
        if not client_allowed(family, addr, self._allowed):
            log.warning("refusing FastCGI connection from %s: not in FCGI_WEB_SERVER_ADDRS", addr[0])
            sock.close()
            return None
        configure_client_socket(sock, family)
        conn = self._connectionClass(sock, addr, self)
        with self._lock:
            self._connections.add(conn)
        return conn
